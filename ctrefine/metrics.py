"""Image-quality metrics on model-space volumes in [0, 1] (DESIGN.md §2), vectorised in torch.

* PSNR = 10 log10(1 / MSE) over the whole 3D volume (data range 1).
* SSIM = 3D SSIM with the defaults of ``skimage.metrics.structural_similarity(data_range=1)``:
  7^3 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N/(N-1)), mean over the valid
  interior (skimage crops (7-1)/2 voxels at each border before averaging).
* MAE = mean |x - y|.
* HF-energy ratio = sum L(pred)^2 / sum L(truth)^2 with the package's 3D Laplacian (1.0 is ideal,
  < 1 blurrier than the truth, > 1 noisier / over-sharpened).

Each function takes ``(B, 1, D, H, W)`` (or ``(D, H, W)``) tensors and returns one value per volume.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .stencil import laplacian3d

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x[None, None]
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(f"{name} must be (D, H, W) or (B, 1, D, H, W), got {tuple(x.shape)}")
    return x.double()


def _pair(pred, target):
    p, t = _as_batch(pred, "pred"), _as_batch(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {tuple(p.shape)} vs target {tuple(t.shape)}")
    if not (torch.isfinite(p).all() and torch.isfinite(t).all()):
        raise ValueError("metrics got NaN or Inf values")
    return p, t


def psnr(pred, target) -> torch.Tensor:
    """Per-volume PSNR in dB (data range 1); identical volumes give +inf."""
    p, t = _pair(pred, target)
    mse = ((p - t) ** 2).flatten(1).mean(1)
    return torch.where(mse > 0, 10.0 * torch.log10(1.0 / mse), torch.full_like(mse, float("inf")))


def mae(pred, target) -> torch.Tensor:
    p, t = _pair(pred, target)
    return (p - t).abs().flatten(1).mean(1)


def ssim(pred, target) -> torch.Tensor:
    """Per-volume 3D SSIM matching skimage's defaults with ``data_range=1``."""
    p, t = _pair(pred, target)
    if min(p.shape[-3:]) < SSIM_WIN:
        raise ValueError(f"SSIM needs every side >= {SSIM_WIN}, got {tuple(p.shape[-3:])}")
    n = SSIM_WIN**3
    mean = lambda x: F.avg_pool3d(x, SSIM_WIN, stride=1)  # noqa: E731 -- valid interior only, like skimage's crop
    ux, uy = mean(p), mean(t)
    cov = n / (n - 1)
    vx = cov * (mean(p * p) - ux * ux)
    vy = cov * (mean(t * t) - uy * uy)
    vxy = cov * (mean(p * t) - ux * uy)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def hf_energy_ratio(pred, target) -> torch.Tensor:
    """Energy of the Laplacian of ``pred`` over that of ``target`` (sharpness; 1.0 is ideal)."""
    p, t = _pair(pred, target)
    ep = laplacian3d(p).pow(2).flatten(1).sum(1)
    et = laplacian3d(t).pow(2).flatten(1).sum(1)
    return ep / et.clamp_min(1e-12)


def all_metrics(pred, target) -> dict[str, torch.Tensor]:
    """Every metric, per volume, as a dict of float64 tensors."""
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target), "mae": mae(pred, target),
            "hf_ratio": hf_energy_ratio(pred, target)}
