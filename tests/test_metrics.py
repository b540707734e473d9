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
