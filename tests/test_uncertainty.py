"""Calibrated per-voxel uncertainty (ctrefine.uncertainty, its head and its fit): the record, the head,
the training and calibration, and where the head travels (model file, pipeline, ONNX metadata)."""
import json

import numpy as np
import pytest
import torch

from ctrefine.errors import DataError
from ctrefine.models.uncertainty_head import INIT_Q, UncertaintyHead, voxel_coordinates
from ctrefine.training.uncertainty_fit import class_weights, fit_scale, measure, pinball, predict_std_hu, train_head
from ctrefine.uncertainty import Calibration, Z90, build_head, coverage, gated_std_hu, head_entry


def test_calibration_record_round_trip_and_refusals():
    cal = Calibration(64, "cone", 8, (1, 2), 1.7, (40.0, 50.0, 60.0), 0.5, 200, 8)
    again = Calibration.from_dict(json.loads(json.dumps(cal.as_dict())), "f")
    assert again == cal and again.percentile(55.0) == pytest.approx(200 / 3) and again.percentile(10.0) == 0.0
    ok = cal.as_dict()
    for bad in ({**ok, "scale": "x"}, {**ok, "scale": -1}, {**ok, "channels": 0}, {**ok, "dilations": [99]},
                {**ok, "volume_size": 7}, {**ok, "volume_size": 4096}, {**ok, "geometry": "fan"},
                {k: v for k, v in ok.items() if k != "channels"}, {**ok, "val_mean_std_hu": [float("nan")]}, [1]):
        with pytest.raises(DataError, match="f: its uncertainty calibration"):
            Calibration.from_dict(bad, "f")
    # a record of the earlier kind (test-time perturbation) is read as "no uncertainty", not as an error
    assert Calibration.from_dict({"scale": 1.5, "floor_hu": 30.0, "passes": 4}, "f") is None
    assert build_head({"scale": 1.5, "floor_hu": 30.0, "passes": 4}, "f") == (None, None)
    assert build_head(None, "f") == (None, None)


def test_head_starts_flat_positive_and_reads_position():
    head = UncertaintyHead(8, "cone", 4, (1, 2), scale=2.0).eval()
    v = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        std = head(v, v, torch.rand(2, 2, 1, 16, 16))
    assert std.shape == v.shape and torch.allclose(std, torch.full_like(std, 2.0 * INIT_Q / Z90))
    c = voxel_coordinates(v)
    assert c.shape == (2, 3, 8, 8, 8) and float(c[0, 0, 0, 0, 0]) == pytest.approx(-7 / 8)
    assert float(c[0, 2, 0, 0, 7]) == pytest.approx(7 / 8) and bool((c[0, 1] == c[0, 1, :1, :, :1]).all())  # H position varies along H only


def test_fast_path_computes_the_heads_textbook_formula():
    """The head's CPU fast path (channels-last inside, pooling as the sub-grid mean, the 1x1 output commuted
    past the up-sampling) gives what its plain form out(s + up(body(avgpool(s)))) gives, and its pooling keeps
    a channels-last tensor channels-last."""
    import torch.nn.functional as F

    from ctrefine.models.uncertainty_head import EDGE_GAIN, half_resolution
    from ctrefine.stencil import gradient_magnitude3d

    x = torch.randn(2, 5, 8, 6, 4).contiguous(memory_format=torch.channels_last_3d)
    pooled = half_resolution(x)
    assert torch.allclose(pooled, F.avg_pool3d(x.contiguous(), 2), atol=1e-6)
    assert pooled.is_contiguous(memory_format=torch.channels_last_3d) and not pooled.is_contiguous()
    torch.manual_seed(0)
    head = UncertaintyHead(16, "cone", channels=8)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
        coarse, answer = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
        xf = head.xray_features(answer, torch.rand(2, 2, 1, 16, 16))
        fast = head.log_quantile(coarse, answer, xf)
        feats = torch.cat([coarse, answer, EDGE_GAIN * (answer - coarse).abs(), EDGE_GAIN * gradient_magnitude3d(answer),
                           voxel_coordinates(answer), xf], dim=1)
        s = head.stem(feats)
        plain = head.out(s + F.interpolate(head.body(F.avg_pool3d(s, 2)), scale_factor=2.0, mode="nearest"))
    assert torch.allclose(fast, plain, atol=1e-5), (fast - plain).abs().max()


def test_pinball_loss_is_minimised_by_the_quantile():
    err = torch.tensor(np.random.default_rng(0).exponential(1.0, 20_000), dtype=torch.float32)
    qs = np.linspace(0.5, 4.0, 71)
    losses = [float(pinball(torch.full_like(err, float(np.log(q))), err, torch.ones_like(err))) for q in qs]
    assert qs[int(np.argmin(losses))] == pytest.approx(np.log(10.0), abs=0.06)  # 90th percentile of Exp(1)


def _normalised(images):
    lo, hi = images.amin(dim=(-2, -1), keepdim=True), images.amax(dim=(-2, -1), keepdim=True)
    return (images - lo) / (hi - lo)


def _synthetic(n, size=16, seed=0):
    """Patients whose answer errs by N(0, s^2): s = 0.02 in the left half of the volume, 0.2 in the right
    half, and everywhere 0.2 on voxels labelled 2 (a rare class, 1 voxel in 8 of the left half); the
    radiographs are the truth's, normalised."""
    from ctrefine.reprojection import SliceProjector

    rng, proj = np.random.default_rng(seed), SliceProjector(size, size, "cone")
    out = []
    for _ in range(n):
        truth = rng.uniform(0.3, 0.6, (size,) * 3).astype(np.float32)
        labels = np.ones((size,) * 3, np.uint8)
        labels[..., size // 2:] = 3
        labels[(rng.random(labels.shape) < 1 / 8) & (labels == 1)] = 2
        s = np.where(labels == 1, 0.02, 0.2)
        answer = truth + rng.normal(0, 1, truth.shape) * s
        out.append({"coarse": truth.astype(np.float16), "answer": answer.astype(np.float16),
                    "xrays": _normalised(proj(torch.from_numpy(truth)[None, None]))[0].numpy().astype(np.float16),
                    "truth": truth.astype(np.float16), "labels": labels, "psnr": 20.0, "name": "p"})
    return out


def test_head_learns_where_errors_are_large_and_the_scale_calibrates():
    """Trained on synthetic errors, the head's sigma is several times larger in the noisy half; after the val scale
    the 90 % interval holds 88-92 % of fresh patients' voxels; weighting classes by frequency^-1 raises the
    rare class's coverage (it is invisible in the input) at the common class's expense."""
    train, val, fresh = _synthetic(16), _synthetic(6, seed=1), _synthetic(8, seed=2)
    head = train_head(train, "cone", channels=8, dilations=(1, 2), epochs=8, crop=16, batch_size=4, lr=1e-2, log=lambda m: None)
    scale = fit_scale(head, val)
    assert 0.2 < scale < 5.0 and float(head.scale) == scale
    std = predict_std_hu(head, fresh)
    left, right = np.median(np.stack(std)[..., :8]), np.median(np.stack(std)[..., 8:])
    assert 3 < right / left < 20  # ideal ~6.6: q90 of N(0, 0.2) over the left half's mixture q90
    m = measure(std, fresh, {1: "calm", 2: "rare", 3: "noisy"})
    assert 0.88 <= m["coverage90"] <= 0.92 and m["spearman_voxel"] > 0.4 and m["by_class"]["rare"] < 0.7
    weighted = train_head(train, "cone", channels=8, dilations=(1, 2), epochs=8, crop=16, batch_size=4, lr=1e-2,
                          class_power=1.0, log=lambda m: None)
    fit_scale(weighted, val)
    mw = measure(predict_std_hu(weighted, fresh), fresh, {1: "calm", 2: "rare", 3: "noisy"})
    assert mw["by_class"]["rare"] > m["by_class"]["rare"] + 0.1
    w = class_weights(train, 1.0)
    assert float(w[2]) == pytest.approx(7 * float(w[1]), rel=0.1) and float(class_weights(train, 0.0)[2]) == 1.0


def test_head_travels_in_the_model_file_and_the_gate_picks_its_sigma(tmp_path):
    from ctrefine.checkpoint import load_model_file, save_model_file
    from ctrefine.config import load_config
    from ctrefine.models import build_refiner

    cfg = load_config("cpu-small")
    head = UncertaintyHead(8, "cone", 4, (1, 2))
    torch.nn.init.normal_(head.out.weight, std=0.1)
    cal = Calibration(8, "cone", 4, (1, 2), 1.3, (45.0,), 0.5, 10, 2)
    save_model_file(tmp_path / "r.pt", "refine", build_refiner(cfg).state_dict(), cfg, uncertainty=head_entry(head, cal))
    raw = load_model_file(tmp_path / "r.pt").uncertainty
    again, cal2 = build_head(raw, "r.pt")
    assert cal2 == cal and float(again.scale) == pytest.approx(1.3)
    v, x = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(again(v, v, x), 1.3 * head(v, v, x))  # the stored head, with the record's scale
    broken = {**raw, "state_dict": {**raw["state_dict"], "out.weight": torch.zeros(3)}}
    with pytest.raises(DataError, match="r.pt: its uncertainty head's weights do not fit"):
        build_head(broken, "r.pt")
    cs, rs = torch.full((2, 1, 2, 2, 2), 0.01), torch.full((2, 1, 2, 2, 2), 0.02)
    picked = gated_std_hu(cs, rs, [{"fell_back": True}, {"fell_back": False}])
    assert picked[0].max() == pytest.approx(25.0) and picked[1].min() == pytest.approx(50.0)  # x 2500 HU
    assert coverage(np.array([1.0, 2.0]), np.array([1.0, 1.0]), z=Z90) == 0.5


def test_onnx_metadata_carries_the_record():
    from ctrefine.config import load_config
    from ctrefine.export import _metadata
    from ctrefine.pipeline import _onnx_calibration

    cfg = load_config("cpu-small")
    cal = Calibration(32, "cone", 4, (1, 2), 1.3, (45.0,))
    meta = _metadata(cfg, None, "fp32", cal.as_dict())
    assert _onnx_calibration("m.onnx", meta["uncertainty"]) == cal
    assert "uncertainty" not in _metadata(cfg, None) and _onnx_calibration("m.onnx", None) is None
    with pytest.raises(DataError, match="m.onnx: metadata uncertainty is not JSON"):
        _onnx_calibration("m.onnx", "{")


def test_fit_uncertainty_command_gives_a_trained_refiner_a_head(random_pair, tiny_dataset, tmp_path):
    """`ctrefine fit-uncertainty`: the refiner's model file with a calibrated head, which infer then uses."""
    import subprocess
    import sys

    from ctrefine.checkpoint import load_model_file
    from ctrefine.pipeline import TorchPredictor

    args = [sys.executable, "-m", "ctrefine.cli", "fit-uncertainty", "--base-checkpoint", random_pair[0],
            "--refinement-checkpoint", random_pair[1], "--data-path", tiny_dataset, "--out",
            tmp_path / "unc.pt", "--epochs", "1", "--quiet"]
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "90 % interval coverage" in r.stdout
    mf = load_model_file(tmp_path / "unc.pt", stage="refine")
    assert mf.uncertainty is not None and mf.uncertainty["epochs"] == 1 and "state_dict" in mf.uncertainty
    assert TorchPredictor(random_pair[0], tmp_path / "unc.pt", "cpu").uncertainty is not None
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--overwrite" in r.stderr
