import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from ctrefine import metrics


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 1, 20, 18, 16, generator=g, dtype=torch.float64)
    p = (t + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return p, t


def test_ssim_matches_skimage(pair):
    p, t = pair
    ours = metrics.ssim(p, t)
    for i in range(2):
        ref = structural_similarity(p[i, 0].numpy(), t[i, 0].numpy(), data_range=1.0)
        assert abs(ours[i].item() - ref) < 1e-3


def test_psnr_mae(pair):
    p, t = pair
    mse = ((p - t) ** 2).flatten(1).mean(1)
    assert torch.allclose(metrics.psnr(p, t), 10 * torch.log10(1 / mse))
    assert torch.allclose(metrics.mae(p, t), (p - t).abs().flatten(1).mean(1))
    assert torch.isinf(metrics.psnr(t, t)).all()
    assert metrics.ssim(t, t).allclose(torch.ones(2, dtype=torch.float64))


def test_hf_ratio():
    t = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    assert metrics.hf_energy_ratio(t, t).item() == pytest.approx(1.0)
    blurred = torch.nn.functional.avg_pool3d(t, 3, stride=1, padding=1, count_include_pad=False)
    assert metrics.hf_energy_ratio(blurred, t).item() < 0.5


def test_bad_inputs(pair):
    p, t = pair
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.psnr(p, t[:, :, :-1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.mae(p * float("nan"), t)
    with pytest.raises(ValueError, match=">= 7"):
        metrics.ssim(p[..., :5], t[..., :5])
    with pytest.raises(TypeError):
        metrics.psnr(np.zeros((4, 4, 4)), t)


def test_float32_metrics_agree_with_float64(monkeypatch):
    """What an accelerator computes (float32, :func:`ctrefine.device.metrics_dtype`) against the CPU's
    float64 figures, on realistic volumes at 64^3: far below what any report prints."""
    g = torch.Generator().manual_seed(3)
    t = torch.nn.functional.avg_pool3d(torch.rand(3, 1, 64, 64, 64, generator=g), 3, stride=1, padding=1)
    p = (t + 0.03 * torch.randn(t.shape, generator=g)).clamp(0, 1)
    fns = {"psnr": metrics.psnr, "ssim": metrics.ssim, "hf_psnr": metrics.hf_psnr, "hf": metrics.hf_energy_ratio,
           "mae": metrics.mae}
    f64 = {k: f(p, t) for k, f in fns.items()}
    monkeypatch.setattr(metrics, "metrics_dtype", lambda device: torch.float32)
    f32 = {k: f(p, t) for k, f in fns.items()}
    assert all(v.dtype == torch.float32 for v in f32.values())
    tol = {"psnr": 1e-4, "ssim": 1e-5, "hf_psnr": 1e-4, "hf": 1e-5, "mae": 1e-7}
    for k in fns:
        assert (f32[k].double() - f64[k]).abs().max() <= tol[k], k
