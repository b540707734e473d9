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
* :class:`MatmulSpectralGain` -- the same ``irfftn(rfftn(x) * gain)`` as real matrix products, the
  form the ONNX export uses (:func:`matmul_transforms`): every runtime reads and accelerates MatMul,
  whereas ONNX ``DFT`` with complex products is read by few (OpenVINO refuses it, older ONNX Runtime
  builds reject ``inverse`` with ``onesided``). torch keeps its FFT; the two agree to float32 rounding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import contextlib

from ..fourier import dft_matrices, radial_bins
from .norm import GroupNormSiLU


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


def conv_norm_act(cin: int, cout: int, dim: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    return nn.Sequential(conv(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                         GroupNormSiLU(_groups(cout), cout))


class Upsample2x(nn.Module):
    """Trilinear 2x up-sampling (a module, so :mod:`ctrefine.models.layout` can choose its memory layout)."""

    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class ResBlock(nn.Module):
    """Pre-activation-free residual block: conv-norm-act, conv-norm, skip, act (2D or 3D)."""

    def __init__(self, c: int, dim: int = 3):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        # the Identity holds index 2 so the parameter names (body.0/1/3/4) are those model files use
        self.body = nn.Sequential(conv(c, c, 3, padding=1, bias=False), GroupNormSiLU(_groups(c), c), nn.Identity(),
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


def apply_spectral_gain(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``irfftn(rfftn(x) * gain)`` over (D, H, W) in float32; ``gain`` real, ``(B, C, D, H, W//2+1)``."""
    spec = torch.fft.rfftn(x.float(), dim=(-3, -2, -1), norm="ortho")
    out = torch.fft.irfftn(spec * gain, s=x.shape[-3:], dim=(-3, -2, -1), norm="ortho")
    return out.to(x.dtype)


def _complex_along_h(z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """DFT (``sign=-1``) or inverse DFT (``+1``) along H of ``z`` = ``[Re; Im]`` stacked along D (dim 2)."""
    d = z.shape[2] // 2
    a, s = cos @ z, sin @ z
    re = a[:, :, :d] - sign * s[:, :, d:]
    im = a[:, :, d:] + sign * s[:, :, :d]
    return torch.cat([re, im], dim=2)


class MatmulSpectralGain(nn.Module):
    """``irfftn(rfftn(x, norm="ortho") * gain)`` over (D, H, W) written as real matrix products.

    The real and imaginary parts travel stacked along D: W is transformed first (real -> half
    spectrum, two products), D as one product with a ``(2D, 2D)`` block matrix, H as two products
    recombined; the inverse runs backwards. About 14 GFLOP per volume for the `full` refiner's two
    blocks, against ~0.7 s that ONNX Runtime's ``DFT`` took (bench/RESULTS-history.md section 4).
    The matrices are non-persistent buffers: checkpoints are unchanged.
    """

    def __init__(self, size: tuple[int, int, int]):
        super().__init__()
        d, h, w = size
        md, mh, mw = dft_matrices(d), dft_matrices(h), dft_matrices(w)
        half = w // 2 + 1
        for name, m in (("w_re", mw["r2c"][:, :half]), ("w_im", mw["r2c"][:, half:]),
                        ("w_inv_re", mw["c2r"][:half]), ("w_inv_im", mw["c2r"][half:]),
                        ("d_fwd", md["fwd"]), ("d_inv", md["inv"]),
                        ("h_cos", mh["fwd"][:h, :h]), ("h_sin", mh["inv"][h:, :h])):
            self.register_buffer(name, m.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        xf = x.float()
        z = torch.cat([xf @ self.w_re, xf @ self.w_im], dim=2)  # (B, C, 2D, H, W//2+1)
        half = z.shape[-1]
        z = (self.d_fwd @ z.reshape(b, c, 2 * d, h * half)).reshape(b, c, 2 * d, h, half)
        z = _complex_along_h(z, self.h_cos, self.h_sin, -1.0)
        z = z * torch.cat([gain, gain], dim=2)
        z = _complex_along_h(z, self.h_cos, self.h_sin, 1.0)
        z = (self.d_inv @ z.reshape(b, c, 2 * d, h * half)).reshape(b, c, 2 * d, h, half)
        out = z[:, :, :d] @ self.w_inv_re + z[:, :, d:] @ self.w_inv_im
        return out.to(x.dtype)


@contextlib.contextmanager
def matmul_transforms(model: nn.Module):
    """Inside the block, every :class:`FrequencyAttention` of ``model`` uses :class:`MatmulSpectralGain`."""
    blocks = [m for m in model.modules() if isinstance(m, FrequencyAttention)]
    saved = [m.use_matmul for m in blocks]
    try:
        for m in blocks:
            m.use_matmul = True
        yield model
    finally:
        for m, v in zip(blocks, saved):
            m.use_matmul = v


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
        # (n_bins, bins) one-hot, float32, per device: the gain expansion as a matrix product (see gain()).
        # Not a buffer, so a bf16 cast of the module (DeepSpeed's bf16 mode) leaves it float32.
        self._onehot: dict[torch.device, torch.Tensor] = {}
        self.matmul = MatmulSpectralGain(size)
        self.use_matmul = False  # torch's FFT by default; matmul_transforms() switches it for export
        self.base = nn.Parameter(torch.zeros(channels, n_bins))
        self.cond = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels * n_bins))
        nn.init.zeros_(self.cond[-1].weight)
        nn.init.zeros_(self.cond[-1].bias)

    def gain(self, x: torch.Tensor) -> torch.Tensor:
        """Per-bin gain ``(B, C, D, H, W//2+1)``, real and non-negative."""
        b, c = x.shape[:2]
        logits = self.base + self.cond(x.mean(dim=(2, 3, 4))).view(b, c, self.n_bins)  # in the weights' dtype
        g = 2.0 * torch.sigmoid(logits.float())
        if self.use_matmul:  # ONNX: a Gather, so the graph carries no (n_bins, bins) constant
            return g[:, :, self.bins]
        # Training: a product with the one-hot matrix gives the same values (one non-zero term per bin)
        # and a matrix-product backward, where indexing's backward is a sort-based scatter (10 % of the
        # `full` refiner's step on an H200) -- 2.5-3x faster for the expansion on CPU too. fp32 even
        # under autocast: the gain must not be rounded to bf16.
        dev = self.bins.device
        if dev not in self._onehot:
            self._onehot[dev] = nn.functional.one_hot(self.bins.flatten(), self.n_bins).T.float().contiguous()
        with torch.autocast(x.device.type, enabled=False):
            return (g @ self._onehot[dev]).view(b, c, *self.bins.shape)

    def forward(self, x):
        if self.use_matmul:
            return self.matmul(x, self.gain(x))
        return apply_spectral_gain(x, self.gain(x))
