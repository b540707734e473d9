"""The Python API: the README's example runs as written and gives `infer --out`'s volumes bit for bit."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctrefine.data.io import load_nifti
from ctrefine.data.radiograph import load_radiograph
from ctrefine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory):
    """A 64^3 phantom's two DRRs as 16-bit PNGs (what the shipped pair reads: 128^2)."""
    from PIL import Image

    from ctrefine.data.dataset import make_dataset

    root = tmp_path_factory.mktemp("api")
    make_dataset(root / "ds", 1, seed=91, size=64, xray_size=128, workers=1, progress=False)
    for view in ("pa", "lateral"):
        img = load_nifti(root / "ds" / "patient_0000" / f"xray_{view}.nii.gz")[0]
        u16 = np.round((img - img.min()) / (img.max() - img.min()) * 65535).astype(np.uint16)
        Image.fromarray(u16).save(root / f"{view}.png")
    return root


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block, "README.md has no Python API example"
    return block.group(1)


def test_the_readme_example_reproduces_infer_bit_for_bit(radiographs):
    work = radiographs / "readme"
    work.mkdir()
    for view in ("pa", "lateral"):
        os.link(radiographs / f"{view}.png", work / f"{view}.png")
    r = subprocess.run([sys.executable, "-c", _readme_example()], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("(64, 64, 64) ")
    cli = subprocess.run([sys.executable, "-m", "ctrefine.cli", "infer", "--base-checkpoint", "pretrained:phantom-64",
                          "--refinement-checkpoint", "pretrained:phantom-64-refiner", "--xray-pa", "pa.png",
                          "--xray-lateral", "lateral.png", "--out", "cli.nii.gz"], cwd=work, capture_output=True,
                         text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    for suffix in ("", "_coarse", "_std"):
        api_vol, api_aff = load_nifti(work / f"ct{suffix}.nii.gz")
        cli_vol, cli_aff = load_nifti(work / f"cli{suffix}.nii.gz")
        assert np.array_equal(api_vol, cli_vol) and np.array_equal(api_aff, cli_aff), suffix


def test_arrays_and_files_give_the_same_volume_and_bad_input_is_one_line(radiographs):
    import ctrefine

    rec = ctrefine.Reconstructor.load(base="pretrained:phantom-64", refiner="pretrained:phantom-64-refiner",
                                      device="cpu", uncertainty=False)
    from_files = rec.reconstruct(radiographs / "pa.png", radiographs / "lateral.png")
    arrays = [load_radiograph(radiographs / f"{v}.png") for v in ("pa", "lateral")]
    from_arrays = rec.reconstruct(*arrays)
    assert np.array_equal(from_files.refined_hu, from_arrays.refined_hu) and from_arrays.uncertainty_hu is None
    assert from_files.refined_hu.dtype == np.float32 and from_files.affine.shape == (4, 4)
    cases = [((np.stack([arrays[0], arrays[0]]), arrays[1]), "expected a 2D radiograph"),
             ((np.array([["a"] * 64] * 64), arrays[1]), "not an array of numbers"),
             ((arrays[0], np.full((64, 64), 3.0)), "image is constant"),
             ((arrays[0], [[1, 2], [3, 4]]), "must be a file path or a 2D numpy array"),
             ((arrays[0], radiographs / "missing.png"), "no such file")]
    for args, needle in cases:
        with pytest.raises(UserError, match=needle) as exc:
            rec.reconstruct(*args)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="device must be auto, cpu or cuda"):
        ctrefine.Reconstructor.load(device="gpu")
    out = radiographs / "saved.nii.gz"
    from_files.save(out)
    with pytest.raises(UserError, match="--overwrite"):
        from_files.save(out)
    assert sorted(p.name for p in radiographs.glob("saved*")) == ["saved.nii.gz", "saved_coarse.nii.gz",
                                                                   "saved_gate.json", "saved_viewer.html"]


def test_the_device_and_the_arithmetic_are_the_users_choice(radiographs):
    import torch

    import ctrefine

    models = dict(base="pretrained:phantom-64", refiner="pretrained:phantom-64-refiner", uncertainty=False)
    fp32 = ctrefine.Reconstructor.load(**models, device="cpu")
    bf16 = ctrefine.Reconstructor.load(**models, device="cpu", precision="bf16")
    assert (fp32.predictor.compute, bf16.predictor.compute) == ("f32", "bf16")
    a, b = (r.reconstruct(radiographs / "pa.png", radiographs / "lateral.png").refined_hu for r in (fp32, bf16))
    assert not np.array_equal(a, b) and np.abs(a - b).mean() < 10.0  # HU: bf16 rounding, not another answer
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device cuda asked for, but torch sees no CUDA GPU"):
            ctrefine.Reconstructor.load(**models, device="cuda")
        r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "infer", "--device", "cuda", "--xray-pa", "pa.png",
                            "--xray-lateral", "lateral.png", "--out", "x.nii.gz"], cwd=radiographs,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no CUDA GPU" in r.stderr, r.stderr


def test_dicom_out_round_trips_within_a_hu_on_the_niftis_geometry(radiographs):
    from ctrefine.data.dicom import SERIES_DESCRIPTION, list_series, load_series, read_dicom

    work = radiographs / "dicom"
    work.mkdir()
    args = [sys.executable, "-m", "ctrefine.cli", "infer", "--base-checkpoint", "pretrained:phantom-64",
            "--refinement-checkpoint", "pretrained:phantom-64-refiner", "--xray-pa", str(radiographs / "pa.png"),
            "--xray-lateral", str(radiographs / "lateral.png"), "--out", "ct.nii.gz", "--no-uncertainty"]
    r = subprocess.run([*args, "--format", "both"], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    hu, affine = load_nifti(work / "ct.nii.gz")
    vol, dicom_affine = load_series(work / "ct_dicom")
    (series,) = list_series(work / "ct_dicom")
    assert len(series.files) == 64
    first = read_dicom(series.files[0].filename)
    assert list(first.ImageType) == ["DERIVED", "SECONDARY"] and first.SeriesDescription == SERIES_DESCRIPTION
    # every voxel of the NIfTI lands on a voxel of the series (same world position) with the same HU (+- 0.5)
    ijk = np.stack([*np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij"), np.ones(hu.shape)]).reshape(4, -1)
    idx = np.linalg.inv(dicom_affine) @ affine @ ijk
    assert np.abs(idx - np.round(idx)).max() < 1e-3 / 5.0  # world positions within 1e-3 mm (5 mm voxels)
    i = np.round(idx[:3]).astype(int)
    assert np.abs(vol[i[0], i[1], i[2]] - hu.ravel()).max() <= 0.5
    # and through `ctrefine prepare` (a series already on the canonical grid keeps it: no re-centring, no resampling)
    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "prepare", "--ct", "ct_dicom", "--out", "ds", "--size", "64",
                        "--xray-size", "128", "--quiet"], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    back, back_affine = load_nifti(work / "ds" / "patient_0000" / "ct.nii.gz")
    assert np.abs(back - hu).max() <= 0.5 and np.abs(back_affine - affine).max() < 1e-3
    uid = first.SeriesInstanceUID
    r = subprocess.run([*args, "--format", "dicom"], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--overwrite" in r.stderr  # ct.nii.gz's outputs exist
    r = subprocess.run([*args, "--format", "dicom", "--overwrite"], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_dicom(list_series(work / "ct_dicom")[0].files[0].filename).SeriesInstanceUID != uid  # new UIDs a run
    (work / "ct_dicom" / "notes.txt").write_text("mine")
    r = subprocess.run([*args, "--format", "dicom", "--overwrite"], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "notes.txt" in r.stderr and (work / "ct_dicom" / "notes.txt").read_text() == "mine"


def test_onnx_precision_auto_follows_the_cpu(monkeypatch):
    import torch

    from ctrefine import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.onnx_precision("auto") == "bf16" and device.onnx_precision("int8") == "int8"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.onnx_precision("auto") == "fp32"


def test_demo_takes_the_device_and_precision_and_refuses_a_missing_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: --device cuda is valid")
    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "demo", "--out", str(tmp_path / "d"), "--device", "cuda",
                        "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and not (tmp_path / "d").exists(), r.stderr
