"""Shipped model files: ``pretrained:NAME`` resolves to a digest-checked file, anything else is a path."""
from pathlib import Path

import pytest

from ctrefine import pretrained
from ctrefine.errors import DataError


def test_plain_paths_pass_through():
    assert pretrained.resolve("runs/demo/base/best_model.pt") == Path("runs/demo/base/best_model.pt")


def test_unknown_name_damaged_and_missing_files_are_one_line_errors(tmp_path, monkeypatch):
    f = tmp_path / "m.pt"
    f.write_bytes(b"weights")
    monkeypatch.setattr(pretrained, "ROOT", tmp_path)
    monkeypatch.setattr(pretrained, "SHIPPED", {"good": ("m.pt", pretrained.sha256(f)), "bad": ("m.pt", "0" * 64),
                                                "gone": ("nope.pt", "0" * 64)})
    assert pretrained.resolve("pretrained:good") == f
    for name, words in (("nothing", "no such shipped model (shipped: pretrained:bad, pretrained:gone, pretrained:good)"),
                        ("bad", "does not match its recorded sha256"), ("gone", "is missing")):
        with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
            pretrained.resolve(f"pretrained:{name}")
        assert "\n" not in str(err.value)


def test_infer_works_out_of_the_box_with_the_shipped_models(tmp_path):
    """A user's two radiographs -> a 64^3 CT with nothing trained here: both stages by name."""
    import subprocess
    import sys

    import nibabel as nib
    import torch

    from ctrefine.conventions import hu_to_model
    from ctrefine.data.dataset import make_dataset
    from ctrefine.data.io import load_nifti
    from ctrefine.metrics import psnr

    make_dataset(tmp_path / "d", 1, seed=4242, size=64, xray_size=128, workers=1, progress=False)  # an unseen patient
    p = tmp_path / "d" / "patient_0000"
    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "infer", "--base-checkpoint", "pretrained:phantom-64",
                        "--refinement-checkpoint", "pretrained:phantom-64-refiner", "--xray-pa", str(p / "xray_pa.nii.gz"),
                        "--xray-lateral", str(p / "xray_lateral.nii.gz"), "--out", str(tmp_path / "ct.nii.gz")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    assert img.shape == (64, 64, 64) and nib.aff2axcodes(img.affine) == ("I", "P", "L")
    got, _ = load_nifti(tmp_path / "ct.nii.gz")
    truth, _ = load_nifti(p / "ct.nii.gz")
    # a reconstruction of this patient, not a generic chest: the shipped pair scored 24-25 dB on held-out
    # phantoms, the mean training volume 18-19 dB
    score = float(psnr(hu_to_model(torch.from_numpy(got))[None, None], hu_to_model(torch.from_numpy(truth))[None, None]))
    assert score > 21.0, score


def test_every_shipped_pair_loads_and_names_its_own_base():
    """PAIRS (best first) holds shipped models only; each refiner was trained on the base it is paired
    with (its config names it), and every file -- fp16 ones too -- loads as fp32 weights."""
    import torch

    from ctrefine.checkpoint import load_model_file

    assert pretrained.PAIRS and pretrained.default_pair() == tuple(pretrained.PREFIX + n for n in pretrained.PAIRS[0])
    for base, refiner in pretrained.PAIRS:
        b = load_model_file(pretrained.PREFIX + base, stage="base")
        r = load_model_file(pretrained.PREFIX + refiner, stage="refine")
        assert r.config.model.base_model_checkpoint == pretrained.PREFIX + base
        assert (b.config.model.volume_size, b.config.model.xray_size) == (r.config.model.volume_size,
                                                                          r.config.model.xray_size)
        for mf in (b, r):
            assert all(v.dtype == torch.float32 for v in mf.state_dict.values() if v.is_floating_point())
