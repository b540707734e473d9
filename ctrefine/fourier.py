"""The one frequency grid of ctrefine: ``|f|`` in cycles/voxel for every bin of a 3D FFT.

Shared by the high-pass weight and the band energies of the spectral losses
(:mod:`ctrefine.losses.reference`), the radial bands of the frequency attention
(:mod:`ctrefine.models.blocks`) and the band ratios of :mod:`ctrefine.metrics`, so "frequency" means the
same thing in the loss that trains the refiner, in the block that re-weights its spectrum and in the
report; :func:`radial_bins` and :func:`hermitian_multiplicity` are the one home of the band index and of
what a half spectrum's bin stands for. The Triton kernel
recomputes the same quantity from the bin index (it cannot read a torch helper) and is tested
against the reference that uses this grid.
"""
from __future__ import annotations

import math

import torch

NYQUIST_3D = math.sqrt(3) / 2  # largest |f| on a 3D grid: the corner bin (0.5, 0.5, 0.5)


def frequency_magnitude(shape, onesided: bool = False, device=None) -> torch.Tensor:
    """``|f|`` (cycles/voxel) of every bin of ``fftn`` over a (D, H, W) grid, or of ``rfftn`` if ``onesided``.

    Returns a float32 tensor of shape ``(D, H, W)`` or ``(D, H, W // 2 + 1)``.
    """
    d, h, w = (int(s) for s in shape)
    fd = torch.fft.fftfreq(d, device=device).view(-1, 1, 1)
    fh = torch.fft.fftfreq(h, device=device).view(1, -1, 1)
    fw = (torch.fft.rfftfreq(w, device=device) if onesided else torch.fft.fftfreq(w, device=device)).view(1, 1, -1)
    return torch.sqrt(fd**2 + fh**2 + fw**2)


def radial_bins(shape, n_bins: int, device=None) -> torch.Tensor:
    """Radial band of every ``rfftn`` bin of a (D, H, W) grid: ``n_bins`` equal bands of ``|f|`` over
    ``[0, sqrt(3)/2]``, as long integers in ``[0, n_bins)``."""
    mag = frequency_magnitude(shape, onesided=True, device=device)
    return (mag / NYQUIST_3D * n_bins).long().clamp_(max=n_bins - 1)


def hermitian_multiplicity(shape, device=None) -> torch.Tensor:
    """How many bins of the full spectrum each ``rfftn`` bin of a real (D, H, W) grid stands for: 2 (itself
    and its mirror), except 1 on the ``k_w = 0`` plane and, for even W, the Nyquist plane ``k_w = W/2``."""
    d, h, w = (int(s) for s in shape)
    mult = torch.full((d, h, w // 2 + 1), 2.0, device=device)
    mult[..., 0] = 1.0
    if w % 2 == 0:
        mult[..., -1] = 1.0
    return mult


def dft_matrices(n: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Orthonormal DFT matrices of length ``n`` as real arrays, for transforms written as matrix products.

    * ``"r2c"`` ``(n, 2 * (n // 2 + 1))``: ``x @ r2c`` = ``[Re | Im]`` of ``rfft(x, norm="ortho")``;
    * ``"c2r"`` ``(2 * (n // 2 + 1), n)``: ``[Re | Im] @ c2r`` = ``irfft(., n, norm="ortho")`` (the
      half spectrum counted twice except DC and Nyquist; their imaginary parts ignored, as irfft does);
    * ``"fwd"`` / ``"inv"`` ``(2n, 2n)``: the complex DFT / inverse DFT as the real block matrix
      ``[[Re F, -Im F], [Im F, Re F]]``, acting on ``[Re; Im]`` stacked along the transformed axis.

    Computed in float64 and rounded once, so the products match ``torch.fft`` to float32 rounding.
    """
    k = torch.arange(n, dtype=torch.float64)
    half = n // 2 + 1
    ang = 2 * math.pi * torch.outer(k, k) / n  # (n, n): angle of bin k at sample m
    cos, sin = torch.cos(ang) / math.sqrt(n), torch.sin(ang) / math.sqrt(n)
    r2c = torch.cat([cos[:, :half], -sin[:, :half]], dim=1)
    w = torch.full((half, 1), 2.0, dtype=torch.float64)  # each interior bin stands for itself and its mirror
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    c2r = torch.cat([w * cos[:half], -w * sin[:half]], dim=0)
    fwd = torch.cat([torch.cat([cos, sin], 1), torch.cat([-sin, cos], 1)], 0)  # F = cos - i sin
    inv = torch.cat([torch.cat([cos, -sin], 1), torch.cat([sin, cos], 1)], 0)  # F^-1 = cos + i sin
    return {name: m.to(dtype) for name, m in (("r2c", r2c), ("c2r", c2r), ("fwd", fwd), ("inv", inv))}
