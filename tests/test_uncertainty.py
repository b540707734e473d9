"""Calibrated per-voxel uncertainty (ctrefine.uncertainty): the fit, the record, and where it travels."""
import json

import numpy as np
import pytest
import torch

from ctrefine.config import AugmentConfig
from ctrefine.errors import DataError
from ctrefine.uncertainty import Calibration, Z90, coverage, fit, gated_std_hu, perturb, raw_spread, signals


def test_fit_recovers_a_known_noise_model():
    """Errors drawn as N(0, (2 (spread + 0.3 grad))^2 + 20^2), the correction irrelevant: the fit picks
    w_grad 0.3 and w_corr 0, finds scale ~2 and floor ~20 HU, and its 90 % interval holds 90 % (also on
    fresh draws)."""
    rng = np.random.default_rng(0)
    sig = {"spread": rng.gamma(2.0, 10.0, 200_000), "grad": rng.gamma(2.0, 30.0, 200_000),
           "corr": rng.gamma(2.0, 10.0, 200_000)}
    true_std = np.sqrt((2.0 * (sig["spread"] + 0.3 * sig["grad"])) ** 2 + 20.0 ** 2)
    cal = fit(np.abs(rng.normal(0, true_std)), sig)
    assert (cal.w_grad, cal.w_corr) == (0.3, 0.0)
    assert cal.floor_hu == pytest.approx(20.0, rel=0.35) and cal.scale == pytest.approx(2.0, rel=0.1)
    fresh = np.abs(rng.normal(0, true_std))
    assert coverage(fresh, cal.std_hu(cal.raw(sig))) == pytest.approx(0.9, abs=0.01)
    assert coverage(np.array([1.0, 2.0]), np.array([1.0, 1.0]), z=Z90) == 0.5


def test_calibration_record_round_trip_and_refusals():
    cal = Calibration(1.7, 35.0, 4, 0, (40.0, 50.0, 60.0), 0.3, 1.0)
    again = Calibration.from_dict(json.loads(json.dumps(cal.as_dict())), "f")
    assert again == cal and again.percentile(55.0) == pytest.approx(200 / 3) and again.percentile(10.0) == 0.0
    for bad in ({"scale": "x", "floor_hu": 1, "passes": 4}, {"scale": -1, "floor_hu": 1, "passes": 4},
                {"scale": 1, "floor_hu": 1, "passes": 99}, {"floor_hu": 1},
                {"scale": 1, "floor_hu": 1, "passes": 4, "w_grad": float("nan")}):
        with pytest.raises(DataError, match="f: its uncertainty calibration"):
            Calibration.from_dict(bad, "f")
    assert float(cal.std_hu(0.0)) == pytest.approx(35.0)


def test_perturbations_stay_in_range_and_spread_is_deterministic():
    x = torch.rand(2, 2, 1, 32, 32)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = perturb(x, g1, AugmentConfig()), perturb(x, g2, AugmentConfig())
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and 0 < (a - x).abs().mean() < 0.1

    def predictor(xr):  # a stand-in pipeline: coarse = mean image, refined = its square
        v = xr.mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1, 1).expand(-1, 1, 4, 4, 4)
        return v, v ** 2

    c, r = predictor(x)
    s1 = raw_spread(predictor, x, c, r, passes=3, seed=1)
    s2 = raw_spread(predictor, x, c, r, passes=3, seed=1)
    assert torch.equal(s1[1], s2[1]) and (s1[1] > 0).all() and (s1[0] > 0).all()
    cal = Calibration(2.0, 10.0, 3, 1, w_grad=0.5, w_corr=1.0)
    recs = [{"fell_back": True}, {"fell_back": False}]
    sig = signals(predictor, x, c, r, recs, 3, 1)
    assert np.allclose(sig[0]["spread"], s1[0][0, 0].numpy() * 2500) and not sig[0]["corr"].any()  # fell back
    assert np.allclose(sig[1]["spread"], s1[1][1, 0].numpy() * 2500)
    assert np.allclose(sig[1]["corr"], (r - c)[1, 0].abs().numpy() * 2500) and not sig[1]["grad"].any()  # flat
    std = gated_std_hu(cal, predictor, x, c, r, recs)
    assert np.allclose(std[1], np.sqrt((2.0 * (sig[1]["spread"] + sig[1]["corr"])) ** 2 + 100.0), rtol=1e-5)


def test_model_file_and_onnx_metadata_carry_the_calibration(tmp_path):
    from ctrefine.checkpoint import load_model_file, save_model_file
    from ctrefine.config import load_config
    from ctrefine.export import _metadata
    from ctrefine.models import build_refiner
    from ctrefine.pipeline import _onnx_calibration

    cfg = load_config("cpu-small")
    cal = Calibration(1.5, 30.0, 4, 0, (45.0,))
    save_model_file(tmp_path / "r.pt", "refine", build_refiner(cfg).state_dict(), cfg, uncertainty=cal.as_dict())
    save_model_file(tmp_path / "old.pt", "refine", build_refiner(cfg).state_dict(), cfg)
    assert Calibration.from_dict(load_model_file(tmp_path / "r.pt").uncertainty, "r") == cal
    assert load_model_file(tmp_path / "old.pt").uncertainty is None  # an old refiner: loads, no uncertainty
    meta = _metadata(cfg, None, "fp32", cal.as_dict())
    assert _onnx_calibration("m.onnx", meta["uncertainty"]) == cal
    assert "uncertainty" not in _metadata(cfg, None) and _onnx_calibration("m.onnx", None) is None
    with pytest.raises(DataError, match="m.onnx: metadata uncertainty is not JSON"):
        _onnx_calibration("m.onnx", "{")
