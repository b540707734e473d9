"""The one frequency grid of ctrefine: ``|f|`` in cycles/voxel for every bin of a 3D FFT.

Shared by the high-pass weight of the spectral loss (:mod:`ctrefine.losses.reference`) and the radial
bands of the frequency attention (:mod:`ctrefine.models.blocks`), so "frequency" means the same thing
in the loss that trains the refiner and in the block that re-weights its spectrum. The Triton kernel
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
