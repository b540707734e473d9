"""ONNX export + ORT parity, dataset inference outputs, radiograph-file inference, bad inputs."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ctrefine.checkpoint import save_model_file
from ctrefine.config import load_config
from ctrefine.conventions import hu_to_model
from ctrefine.data.io import load_nifti, save_nifti
from ctrefine.export import PARITY_TOL, export_onnx, verify
from ctrefine.models import build_models
from ctrefine.engines import onnx_metadata, ort_session
from ctrefine.pipeline import load_two_stage
from ctrefine.metrics import all_metrics


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """cpu-small models with a non-zero refiner head (so refined != coarse), saved like the trainer does."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config("cpu-small")
    torch.manual_seed(0)
    base, refiner = build_models(cfg)
    with torch.no_grad():
        refiner.head.weight.normal_(0, 0.02)
        for m in refiner.modules():
            if hasattr(m, "n_bins"):
                m.base.normal_(0, 1.0)
    for stage, model in (("base", base), ("refine", refiner)):
        save_model_file(root / f"{stage}.pt", stage, model.state_dict(), cfg, {}, epoch=1)
    return root / "base.pt", root / "refine.pt"


@pytest.fixture(scope="module")
def onnx_model(checkpoints, tmp_path_factory):
    model, cfg = load_two_stage(*checkpoints)
    return export_onnx(model, cfg, tmp_path_factory.mktemp("onnx") / "model.onnx")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ctrefine.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_export_parity_and_metadata(checkpoints, onnx_model):
    import onnx

    onnx.checker.check_model(onnx.load(str(onnx_model)))
    model, cfg = load_two_stage(*checkpoints)
    torch.manual_seed(1)
    for b in (1, 3):
        assert verify(model, onnx_model, [torch.rand(b, 2, 1, 64, 64)]) <= PARITY_TOL
    meta = onnx_metadata(onnx_model)
    assert meta["volume_size"] == "32" and meta["xray_size"] == "64" and meta["precision"] == "fp32"
    assert json.loads(meta["intensity_window"])["hu_min"] == -1000.0
    assert "percentiles" in json.loads(meta["xray_normalization"]) and "kind" in json.loads(meta["geometry"])
    names = [i.name for i in ort_session(onnx_model).get_inputs()]
    assert names == ["xray_pa", "xray_lateral"]


@pytest.mark.parametrize("mode", ["torch", "onnx"])
def test_infer_dataset_outputs(mode, checkpoints, onnx_model, tiny_dataset, tmp_path):
    out = tmp_path / "results"
    src = ["--onnx", onnx_model] if mode == "onnx" else ["--base_checkpoint", checkpoints[0],
                                                          "--refinement_checkpoint", checkpoints[1]]
    r = cli("infer", *src, "--data_path", tiny_dataset, "--output_dir", out, "--quiet")
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "metrics.json").read_text())
    splits = json.loads((tiny_dataset / "splits.json").read_text())
    assert sorted(data["patients"]) == sorted(splits["test"])  # test split only, never training patients
    text = (out / "metrics.txt").read_text()
    assert "refined wins" in text and "gain" in text
    page = (out / "viewer.html").read_text()  # the viewer: every patient with a figure, its layers and metrics
    for name in data["patients"]:
        assert f'"name":"{name}"' in page
    assert '"coarse":{"shape":[32,32,32]' in page and '"truth":' in page and '"refined psnr":' in page
    for name, m in data["patients"].items():
        folder = out / name
        for f in ("coarse.nii.gz", "refined.nii.gz", "ground_truth.nii.gz", f"{name}_comparison.png"):
            assert (folder / f).exists(), f
        _, src_aff = load_nifti(tiny_dataset / name / "ct.nii.gz")
        vols = {}
        for f in ("coarse", "refined", "ground_truth"):
            v, aff = load_nifti(folder / f"{f}.nii.gz")
            assert np.array_equal(aff, src_aff)
            vols[f] = torch.from_numpy(hu_to_model(v))[None, None]
        for stage in ("coarse", "refined"):
            again = all_metrics(vols[stage], vols["ground_truth"])
            for k, v in again.items():
                assert v.item() == pytest.approx(m[stage][k], rel=1e-4, abs=1e-5)
        assert f"{m['refined']['psnr']:.4f}" in text
        assert Image.open(folder / f"{name}_comparison.png").size[0] > 500
        g = m["gate"]  # the safety gate's record: refined is what it let through, and the choice is consistent
        assert g["fell_back"] == (g["xray_consistency_refined"] > g["xray_consistency_coarse"])
        if g["fell_back"]:
            assert m["refined"]["psnr"] == pytest.approx(m["coarse"]["psnr"])
        else:
            assert m["refined"]["psnr"] == pytest.approx(g["psnr_ungated"])
    assert data["summary"]["gate_fell_back"] == sum(m["gate"]["fell_back"] for m in data["patients"].values())
    assert "gate fell back to coarse" in text


def test_gate_off_keeps_the_refiners_output(checkpoints, tiny_dataset, tmp_path, monkeypatch):
    """--no-gate: the refined volume is the refiner's own; with the gate, fallbacks (forced here by making
    every refined volume explain the radiographs worse) are the coarse volume, reported per patient."""
    import ctrefine.reprojection as rp
    from ctrefine.infer import evaluate_dataset
    from ctrefine.pipeline import TorchPredictor

    pred = TorchPredictor(checkpoints[0], checkpoints[1], device="cpu")
    off = evaluate_dataset(pred, tiny_dataset, tmp_path / "off", save_volumes=False, progress=False, gate=False)
    real, calls = rp.xray_consistency, []

    def worse_refined(p, v, x):
        calls.append(v)
        return real(p, v, x) + (1.0 if len(calls) % 2 == 0 else 0.0)  # every second call is the refined volume

    monkeypatch.setattr(rp, "xray_consistency", worse_refined)
    on = evaluate_dataset(pred, tiny_dataset, tmp_path / "on", save_volumes=False, progress=False, gate=True)
    assert off["gate_fell_back"] == 0 and on["gate_fell_back"] == on["num_patients"]
    assert on["refined_psnr_mean"] == pytest.approx(on["coarse_psnr_mean"])
    assert on["gate_psnr_change_db"] == pytest.approx(on["coarse_psnr_mean"] - off["refined_psnr_mean"], abs=1e-6)


def test_torch_and_both_onnx_engines_agree(checkpoints, onnx_model, tiny_dataset, tmp_path):
    for mode, src in (("t", ["--base_checkpoint", checkpoints[0], "--refinement_checkpoint", checkpoints[1]]),
                      ("onnxruntime", ["--onnx", onnx_model, "--engine", "onnxruntime"]),
                      ("openvino", ["--onnx", onnx_model, "--engine", "openvino"])):
        r = cli("infer", *src, "--data_path", tiny_dataset, "--output_dir", tmp_path / mode, "--quiet",
                "--no_save_volumes")
        assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "t" / "metrics.json").read_text())["patients"]
    for engine in ("onnxruntime", "openvino"):
        data = json.loads((tmp_path / engine / "metrics.json").read_text())
        assert data["summary"]["predictor"] == f"onnx:{engine}" and data["summary"]["precision"] == "fp32"
        assert data["summary"]["compute"] == "f32"  # an fp32 file is computed in f32, even where bf16 is native
        for name in a:
            assert a[name]["refined"]["psnr"] == pytest.approx(data["patients"][name]["refined"]["psnr"], abs=1e-3)


def test_exported_graph_is_portable(checkpoints, onnx_model):
    """FFTs leave as MatMul (no ONNX DFT, no complex tensors), and OpenVINO reads and matches the file."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(onnx_model)).graph.node}
    assert "DFT" not in ops and "MatMul" in ops
    model, _ = load_two_stage(*checkpoints)
    x = torch.rand(2, 2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    assert verify(model, onnx_model, [x], engine="openvino") <= PARITY_TOL


def test_int8_export_quantises_the_refiner_and_is_judged_in_db(checkpoints, onnx_model, tiny_dataset, tmp_path,
                                                               monkeypatch):
    import shutil

    import onnx

    from ctrefine import export
    from ctrefine.pipeline import OnnxPredictor

    model, cfg = load_two_stage(*checkpoints)

    def exported_already(m, c, out, geometry=None, precision="fp32"):  # the module's export of this same model
        assert m is model and precision == "fp32"
        return Path(shutil.copyfile(onnx_model, out))

    monkeypatch.setattr(export, "export_onnx", exported_already)  # int8 quantises the fp32 graph: skip re-exporting
    lines = []
    delta = export.export_and_verify(model, cfg, tmp_path / "m8.onnx", log=lines.append, precision="int8",
                                     data_path=tiny_dataset, calibration_patients=3)
    assert delta <= 0.05, lines
    text = "\n".join(lines)
    assert "calibrated on 3 training patients" in text and "openvino int8" in text and "onnxruntime int8" in text
    proto = onnx.load(str(tmp_path / "m8.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["precision"] == "int8"
    quantised = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    weights = {w for w in quantised if w.endswith("weight") or "weight" in w}
    assert any("refiner.dec0" in w for w in weights)  # the refiner's body runs in int8 ...
    assert not any(w.startswith("base.") or "refiner.head" in w or "refiner.stem" in w for w in weights)  # ... not these
    pred = OnnxPredictor(tmp_path / "m8.onnx", "onnxruntime")
    assert pred.precision == "int8" and pred.kind == "onnx:onnxruntime"
    # over the tolerance: a one-line ParityError, the file kept for inspection, nothing else left beside it
    monkeypatch.setattr(export, "PSNR_TOL_DB", -1.0)
    with pytest.raises(export.ParityError, match="int8 changes the mean PSNR"):
        export.export_and_verify(model, cfg, tmp_path / "bad.onnx", log=lambda s: None, precision="int8",
                                 data_path=tiny_dataset, calibration_patients=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "m8.onnx"]


def test_bf16_export_is_tagged_computed_in_bf16_where_native_and_judged_in_db(checkpoints, onnx_model, tiny_dataset,
                                                                              tmp_path):
    import onnx

    from ctrefine import export
    from ctrefine.pipeline import OnnxPredictor
    from ctrefine.device import cpu_has_native_bf16
    from ctrefine.engines import onnx_feed

    model, cfg = load_two_stage(*checkpoints)
    lines = []
    delta = export.export_and_verify(model, cfg, tmp_path / "mb.onnx", log=lines.append, precision="bf16",
                                     data_path=tiny_dataset)
    assert delta <= 0.05, lines
    assert "openvino bf16" in "\n".join(lines)
    proto = onnx.load(str(tmp_path / "mb.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["precision"] == "bf16"
    assert not any(n.op_type == "QuantizeLinear" for n in proto.graph.node)  # the fp32 graph, only tagged
    ov = OnnxPredictor(tmp_path / "mb.onnx", "openvino")
    if cpu_has_native_bf16():
        assert ov.compute == "bf16"
    # what it reports is what it computes: bf16 (native, or emulated on AVX-512 CPUs) moves the output, f32 does not
    feed = onnx_feed(torch.rand(1, 2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    moved = np.abs(ov._run(feed)[1] - OnnxPredictor(onnx_model, "openvino")._run(feed)[1]).max()
    assert (moved > 1e-4) if ov.compute == "bf16" else (moved == 0.0), (ov.compute, moved)
    assert OnnxPredictor(tmp_path / "mb.onnx", "onnxruntime").compute == "f32"
    # the fp32 file of the same model is computed in f32 by OpenVINO: bit-for-bit parity is its promise
    assert OnnxPredictor(onnx_model, "openvino").compute == "f32"


def test_int8_needs_a_dataset(checkpoints, tmp_path):
    r = cli("export-onnx", "--base-checkpoint", checkpoints[0], "--refinement-checkpoint", checkpoints[1],
            "--out", tmp_path / "m.onnx", "--precision", "int8")
    assert r.returncode == 2 and "needs --data-path" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def _png16(path, img):
    x = (img - img.min()) / (np.ptp(img) + 1e-9) * 65535
    Image.fromarray(x.astype(np.uint16)).save(path)


def test_infer_from_radiograph_files(checkpoints, onnx_model, tiny_dataset, tmp_path):
    name = json.loads((tiny_dataset / "splits.json").read_text())["test"][0]
    pa, _ = load_nifti(tiny_dataset / name / "xray_pa.nii.gz")
    lat, _ = load_nifti(tiny_dataset / name / "xray_lateral.nii.gz")
    _png16(tmp_path / "pa.png", pa)
    _png16(tmp_path / "lat.png", np.pad(lat, ((0, 0), (8, 8))))  # non-square: padded, not stretched
    r = cli("infer", "--onnx", onnx_model, "--xray_pa", tmp_path / "pa.png", "--xray_lateral", tmp_path / "lat.png",
            "--out", tmp_path / "ct.nii.gz")
    assert r.returncode == 0, r.stderr
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    assert img.shape == (32, 32, 32) and nib.aff2axcodes(img.affine) == ("I", "P", "L")
    assert (tmp_path / "ct_coarse.nii.gz").exists()
    assert '"name":"ct"' in (tmp_path / "ct_viewer.html").read_text()
    gate = json.loads((tmp_path / "ct_gate.json").read_text())
    assert gate["gate"] is True and gate["geometry"] == "cone" and "xray_consistency_refined" in gate
    assert "X-ray consistency coarse" in r.stdout
    # no model named: the best shipped pair (64^3 from 128^2: the PNGs are resampled to its size), said so
    r = cli("infer", "--xray_pa", tmp_path / "pa.png", "--xray_lateral", tmp_path / "lat.png", "--out",
            tmp_path / "shipped.nii.gz")
    assert r.returncode == 0, r.stderr
    from ctrefine.pretrained import default_pair

    used = " + ".join(default_pair())
    assert f"models: {used} (the best shipped pair" in r.stdout
    assert nib.load(str(tmp_path / "shipped.nii.gz")).shape == (64, 64, 64)
    assert json.loads((tmp_path / "shipped_gate.json").read_text())["models"] == used
    r = cli("infer", "--base-checkpoint", "pretrained:phantom-64", "--xray_pa", tmp_path / "pa.png", "--xray_lateral",
            tmp_path / "lat.png", "--out", tmp_path / "half.nii.gz")
    assert r.returncode != 0 and "give both --base-checkpoint and --refinement-checkpoint" in r.stderr
    # a PNG of the DRR gives the same normalised input as the DRR itself (up to 16-bit quantisation)
    from ctrefine.conventions import normalize_xray
    from ctrefine.data.radiograph import prepare_radiographs

    x = prepare_radiographs(tmp_path / "pa.png", tmp_path / "pa.png", 64)
    ref = normalize_xray(torch.from_numpy(pa))
    assert (x[0, 0, 0] - ref).abs().max() < 1e-3


def test_bad_inputs(checkpoints, onnx_model, tiny_dataset, tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    _png16(tmp_path / "ok.png", np.random.default_rng(0).random((64, 64)))
    save_nifti(tmp_path / "vol.nii.gz", np.zeros((8, 20, 20)), np.eye(4))
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "never"
    cases = [
        (["infer", "--base_checkpoint", tmp_path / "missing.pt", "--refinement_checkpoint", checkpoints[1],
          "--data_path", tiny_dataset, "--output_dir", out], "missing.pt"),
        (["infer", "--onnx", onnx_model, "--xray_pa", tmp_path / "colour.png", "--xray_lateral", tmp_path / "ok.png",
          "--out", out / "ct.nii.gz"], "colour"),
        (["infer", "--onnx", onnx_model, "--xray_pa", tmp_path / "vol.nii.gz", "--xray_lateral", tmp_path / "ok.png",
          "--out", out / "ct.nii.gz"], "2D radiograph"),
        (["infer", "--onnx", onnx_model, "--xray_pa", tmp_path / "ok.png", "--out", out / "ct.nii.gz"], "both views"),
        (["infer", "--onnx", onnx_model, "--xray_pa", tmp_path / "junk.png", "--xray_lateral", tmp_path / "ok.png",
          "--out", out / "ct.nii.gz"], "cannot read"),
        (["infer", "--onnx", tmp_path / "nope.onnx", "--data_path", tiny_dataset, "--output_dir", out], "nope.onnx"),
    ]
    for args, needle in cases:
        r = cli(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ctrefine: error")]
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], (args, r.stderr[-500:])
        assert not out.exists()


def test_dicom_radiograph_monochrome1(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from ctrefine.data.radiograph import load_radiograph

    img = np.zeros((32, 40), np.uint16)
    img[10:20, 10:30] = 1000  # a bright (attenuating) block in display convention
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = 1
    for photometric, expect_bright_block in (("MONOCHROME2", True), ("MONOCHROME1", False)):
        ds.PhotometricInterpretation = photometric
        ds.PixelData = img.tobytes()
        ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
        ds.save_as(str(tmp_path / "IM0001"), enforce_file_format=True)  # PACS exports often have no extension
        out = load_radiograph(tmp_path / "x.dcm")
        assert out.shape == (32, 40)
        assert (out[15, 20] > out[0, 0]) == expect_bright_block  # MONOCHROME1 (bone black) is inverted
        assert np.array_equal(load_radiograph(tmp_path / "IM0001"), out)  # recognised by content


def test_split_all_takes_its_baseline_from_the_training_set(checkpoints, tiny_dataset, tmp_path):
    """A set no model was trained on is evaluated whole; its own 'train' split would leak into the
    baseline, so the baseline comes only from the named training set."""
    src = ["--base-checkpoint", checkpoints[0], "--refinement-checkpoint", checkpoints[1]]
    splits = json.loads((tiny_dataset / "splits.json").read_text())
    everyone = sorted(n for names in splits.values() for n in names)
    r = cli("infer", *src, "--data-path", tiny_dataset, "--split", "all", "--output-dir", tmp_path / "a", "--quiet",
            "--no-save-volumes")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert sorted(data["patients"]) == everyone and data["summary"]["baseline_data"] is None
    assert all("mean" not in m for m in data["patients"].values())
    r = cli("infer", *src, "--data-path", tiny_dataset, "--split", "all", "--output-dir", tmp_path / "b", "--quiet",
            "--no-save-volumes", "--baseline-data", tiny_dataset)
    data = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert r.returncode == 0 and all("mean" in m for m in data["patients"].values())
    assert data["summary"]["baseline_data"] == str(tiny_dataset)


def test_figures_limit_the_pngs_not_the_metrics(checkpoints, tiny_dataset, tmp_path):
    """--figures N draws the first N patients only (a PNG is the costliest part of a patient on a GPU);
    every patient is still measured; 0 writes no patient folder when the volumes are not kept."""
    from ctrefine.infer import evaluate_dataset
    from ctrefine.pipeline import TorchPredictor

    pred = TorchPredictor(checkpoints[0], checkpoints[1], device="cpu")
    s = evaluate_dataset(pred, tiny_dataset, tmp_path / "one", save_volumes=False, progress=False, figures=1, split="all")
    assert s["num_patients"] > 1
    assert len(list((tmp_path / "one").glob("patient_*/patient_*_comparison.png"))) == 1
    assert (tmp_path / "one" / "viewer.html").read_text().count('"gate":') == 1  # the viewer has the same patients
    evaluate_dataset(pred, tiny_dataset, tmp_path / "none", save_volumes=False, progress=False, figures=0, split="all")
    assert not list((tmp_path / "none").glob("patient_*")) and (tmp_path / "none" / "metrics.json").exists()
    assert not (tmp_path / "none" / "viewer.html").exists()


def test_a_dataset_of_another_geometry_is_refused(checkpoints, tiny_dataset, tmp_path):
    """The refiner and the safety gate re-project in the model's geometry: a dataset rendered in another
    is a one-line error before any work, not a silently wrong gate."""
    import shutil

    from ctrefine.errors import DataError
    from ctrefine.infer import evaluate_dataset
    from ctrefine.pipeline import TorchPredictor

    data = tmp_path / "parallel"
    shutil.copytree(tiny_dataset, data)
    header = json.loads((data / "dataset.json").read_text())
    header["geometry"]["kind"] = "parallel"
    (data / "dataset.json").write_text(json.dumps(header))
    with pytest.raises(DataError, match="rendered in 'parallel' geometry but the model was trained for 'cone'"):
        evaluate_dataset(TorchPredictor(*checkpoints, device="cpu"), data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_ship_pretrained_writes_a_loadable_pair_with_cards(checkpoints, tiny_dataset, tmp_path, monkeypatch):
    """bench/ship_pretrained.py: a base stored in fp16 and read back as fp32, its refiner re-pointed at
    the shipped base, each measured on the test split and carded (with the structure rows)."""
    from ctrefine import pretrained
    from ctrefine.checkpoint import load_model_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import ship_pretrained
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(pretrained, "ROOT", tmp_path)
    monkeypatch.setattr(pretrained, "SHIPPED", {})
    log = tmp_path / "val.csv"
    log.write_text("epoch,psnr,refined_psnr\n1,20.0,20.5\n2,21.0,21.5\n")
    common = ["--val-log", str(log), "--data", str(tiny_dataset), "--command", "test", "--wall-time", "1 s"]
    assert ship_pretrained.main(["--name", "t-base", "--model", str(checkpoints[0]), "--weights", "fp16", *common]) == 0
    pretrained.SHIPPED["t-base"] = ("t-base.pt", pretrained.sha256(tmp_path / "t-base.pt"))
    assert ship_pretrained.main(["--name", "t-ref", "--model", str(checkpoints[1]), "--base", "t-base", *common]) == 0
    base = load_model_file(tmp_path / "t-base.pt", stage="base")
    assert all(v.dtype == torch.float32 for v in base.state_dict.values() if v.is_floating_point())
    assert load_model_file(tmp_path / "t-ref.pt", stage="refine").config.model.base_model_checkpoint == "pretrained:t-base"
    card = (tmp_path / "t-ref.md").read_text()
    assert "| refined (this model) |" in card and "vertebra Dice" in card and "fp32 weights" in card
    assert "fp16 weights, read back as fp32" in (tmp_path / "t-base.md").read_text()


def test_a_refiner_with_an_uncertainty_head_adds_it_everywhere_and_an_old_one_says_it_has_none(
        checkpoints, tiny_dataset, tmp_path, capsys):
    """A refiner file carrying an uncertainty head: dataset inference writes uncertainty.nii.gz, per-patient and
    summary calibration figures and a viewer layer; radiograph inference writes ``*_std.nii.gz`` and places
    the input among the validation patients; the ONNX export carries the head as two more outputs (parity
    like the volumes) and infers the same sigma. The refined volume is the one without the head.
    (In-process: the CLI's own wiring is checked by its radiograph-mode calls.)"""
    from ctrefine.checkpoint import load_model_file
    from ctrefine.cli import main
    from ctrefine.api import Reconstructor
    from ctrefine.infer import evaluate_dataset
    from ctrefine.models.uncertainty_head import UncertaintyHead
    from ctrefine.pipeline import OnnxPredictor, TorchPredictor
    from ctrefine.uncertainty import Calibration, head_entry

    mf = load_model_file(checkpoints[1])
    torch.manual_seed(1)
    head = UncertaintyHead(32, "cone", 4, (1, 2))
    torch.nn.init.normal_(head.out.weight, std=0.3)
    cal = Calibration(32, "cone", 4, (1, 2), 2.0, (10.0, 20.0, 30.0, 40.0), 0.5, 3, 1)
    calibrated = tmp_path / "refiner_unc.pt"
    save_model_file(calibrated, "refine", mf.state_dict, mf.config, uncertainty=head_entry(head, cal))
    plain, withu = tmp_path / "plain", tmp_path / "withu"
    a, b = (evaluate_dataset(TorchPredictor(checkpoints[0], ref, "cpu"), tiny_dataset, out, progress=False)
            for out, ref in ((plain, checkpoints[1]), (withu, calibrated)))
    assert a["uncertainty"].startswith("none") and "uncertainty_coverage90" not in a
    assert b["uncertainty"].startswith("uncertainty head (4 channels), trained on 3 patients")
    assert 0 <= b["uncertainty_coverage90"] <= 1 and "uncertainty_spearman_voxel" in b
    pa_, pb = (json.loads((d / "metrics.json").read_text())["patients"] for d in (plain, withu))
    for name, m in pb.items():
        assert m["refined"]["psnr"] == pa_[name]["refined"]["psnr"]  # the volume does not change
        std, _ = load_nifti(withu / name / "uncertainty.nii.gz")
        assert std.shape == (32, 32, 32) and std.min() > 0 and std.std() > 0  # the head varies over the volume
        assert m["uncertainty"]["mean_std_hu"] > 0 and 0 <= m["uncertainty"]["coverage90"] <= 1
    assert '"uncertainty":{"shape":[32,32,32]' in (withu / "viewer.html").read_text()
    name = json.loads((tiny_dataset / "splits.json").read_text())["test"][0]
    for view in ("pa", "lateral"):
        _png16(tmp_path / f"{view}.png", load_nifti(tiny_dataset / name / f"xray_{view}.nii.gz")[0])
    views = ["--xray-pa", str(tmp_path / "pa.png"), "--xray-lateral", str(tmp_path / "lateral.png")]
    models = ["--base-checkpoint", str(checkpoints[0]), "--refinement-checkpoint"]
    assert main(["infer", *models, str(calibrated), *views, "--out", str(tmp_path / "u.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "uncertainty: mean predicted std" in out and "validation patients'" in out
    gate = json.loads((tmp_path / "u_gate.json").read_text())
    assert gate["uncertainty"]["val_percentile"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    torch_std = load_nifti(tmp_path / "u_std.nii.gz")[0]
    assert torch_std.shape == (32, 32, 32)
    model, cfg = load_two_stage(checkpoints[0], calibrated)
    export_onnx(model, cfg, tmp_path / "u.onnx")
    assert [o.name for o in ort_session(tmp_path / "u.onnx").get_outputs()] == ["coarse", "refined", "coarse_std",
                                                                                 "refined_std"]
    assert verify(model, tmp_path / "u.onnx", [torch.rand(2, 2, 1, 64, 64)]) <= PARITY_TOL  # all four outputs
    Reconstructor(OnnxPredictor(tmp_path / "u.onnx")).reconstruct_to(tmp_path / "pa.png", tmp_path / "lateral.png",
                                                                     tmp_path / "o.nii.gz")
    assert np.abs(load_nifti(tmp_path / "o_std.nii.gz")[0] - torch_std).max() < 2500 * PARITY_TOL
    assert main(["infer", *models, str(calibrated), *views, "--out", str(tmp_path / "n.nii.gz"), "--no-uncertainty"]) == 0
    assert "uncertainty: none" in capsys.readouterr().out and not (tmp_path / "n_std.nii.gz").exists()
    assert main(["infer", *models, str(checkpoints[1]), *views, "--out", str(tmp_path / "p.nii.gz")]) == 0
    assert "uncertainty: none (the refiner carries no uncertainty head" in capsys.readouterr().out
    assert not (tmp_path / "p_std.nii.gz").exists()
