"""Building blocks shared by the base reconstructor and the refiner.

* :func:`lift_view` -- geometry-aware 2D->3D lifting: a view's features are spread along that view's
  own ray axis (PA along H, lateral along W), so a pixel lights exactly the voxels its ray crossed
  (parallel-beam approximation of the cone: at 541 mm source distance the rays through a 320 mm FOV
  diverge by under 17 degrees, well within what the 3D convolutions after the lifting absorb).
* :func:`fuse_views` -- cross-view fusion: ``[pa, lat, pa*lat]``; the product is large only where
  both views' rays see structure, i.e. it localises in depth what each view alone cannot.
* :class:`FrequencyAttention` -- FFT over (D, H, W), a learned content-conditioned real non-negative
  gain per radial frequency band and channel, inverse FFT. A real non-negative gain scales magnitudes
  and leaves every phase untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..fourier import NYQUIST_3D, frequency_magnitude


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


def conv_norm_act(cin: int, cout: int, dim: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    return nn.Sequential(conv(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                         nn.GroupNorm(_groups(cout), cout), nn.SiLU())


class ResBlock(nn.Module):
    """Pre-activation-free residual block: conv-norm-act, conv-norm, skip, act (2D or 3D)."""

    def __init__(self, c: int, dim: int = 3):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.body = nn.Sequential(conv(c, c, 3, padding=1, bias=False), nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                  conv(c, c, 3, padding=1, bias=False), nn.GroupNorm(_groups(c), c))
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(x + self.body(x))


def lift_view(feat: torch.Tensor, view: str, depth: int) -> torch.Tensor:
    """Spread 2D features along the view's ray axis.

    PA features ``(B, C, D, W)`` -> ``(B, C, D, H=depth, W)``; lateral ``(B, C, D, H)`` -> ``(B, C, D, H, W=depth)``.
    """
    if view == "pa":
        return feat.unsqueeze(3).expand(-1, -1, -1, depth, -1)
    if view == "lateral":
        return feat.unsqueeze(4).expand(-1, -1, -1, -1, depth)
    raise ValueError(f"unknown view {view!r}")


def fuse_views(pa: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """Lift both views to 3D and stack ``[pa, lateral, pa*lateral]`` along channels."""
    p = lift_view(pa, "pa", lat.shape[-1])
    l_ = lift_view(lat, "lateral", pa.shape[-1])
    return torch.cat([p, l_, p * l_], dim=1)


def radial_bins(size: tuple[int, int, int], n_bins: int) -> torch.Tensor:
    """Radial frequency band of every ``rfftn`` bin of a (D, H, W) grid, in ``[0, n_bins)``.

    |f| is in cycles/voxel (:func:`ctrefine.fourier.frequency_magnitude`); its maximum is sqrt(3)/2.
    """
    mag = frequency_magnitude(size, onesided=True)
    return (mag / NYQUIST_3D * n_bins).long().clamp_(max=n_bins - 1)


def apply_spectral_gain(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``irfftn(rfftn(x) * gain)`` over (D, H, W) in float32; ``gain`` real, ``(B, C, D, H, W//2+1)``."""
    spec = torch.fft.rfftn(x.float(), dim=(-3, -2, -1), norm="ortho")
    out = torch.fft.irfftn(spec * gain, s=x.shape[-3:], dim=(-3, -2, -1), norm="ortho")
    return out.to(x.dtype)


class FrequencyAttention(nn.Module):
    """Content-conditioned frequency gain: ``x -> irfftn(rfftn(x) * g)``, ``g = 2*sigmoid(...)`` in (0, 2).

    The gain depends on (channel, radial frequency band): a learned per-band base plus an offset
    predicted from the globally pooled features (the "attention": what to amplify depends on what
    the volume contains). ``2*sigmoid`` of zero logits is exactly 1, so a fresh block is the identity;
    the offset head is zero-initialised for the same reason. Bands rather than every bin keep the
    block resolution-independent in parameters and small (C x n_bins).
    """

    def __init__(self, channels: int, size: tuple[int, int, int], n_bins: int = 16):
        super().__init__()
        self.n_bins = n_bins
        self.register_buffer("bins", radial_bins(size, n_bins), persistent=False)
        self.base = nn.Parameter(torch.zeros(channels, n_bins))
        self.cond = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels * n_bins))
        nn.init.zeros_(self.cond[-1].weight)
        nn.init.zeros_(self.cond[-1].bias)

    def gain(self, x: torch.Tensor) -> torch.Tensor:
        """Per-bin gain ``(B, C, D, H, W//2+1)``, real and non-negative."""
        b, c = x.shape[:2]
        logits = self.base + self.cond(x.mean(dim=(2, 3, 4))).view(b, c, self.n_bins)  # in the weights' dtype
        g = 2.0 * torch.sigmoid(logits.float())
        return g[:, :, self.bins]

    def forward(self, x):
        return apply_spectral_gain(x, self.gain(x))
