"""The two loss terms with a Triton kernel: ``laplacian_l1`` and ``spectral_l1`` here are what the
training loss calls. Kernel or reference is the run's choice (:class:`ctrefine.device.Kernels`), given to
:class:`~ctrefine.losses.loss.DetailRefinementLoss` at construction and passed down as ``kernels``;
each kernel file (``ctrefine.kernels.*``) holds its kernels, launchers and autograd Function.

Both paths give the same numbers (tests/test_kernels.py holds them to per-dtype tolerances).
"""
from __future__ import annotations

import torch

from . import reference


def laplacian_l1_kernel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Kernel path of :func:`laplacian_l1` (no dispatch)."""
    from ..kernels.laplacian_l1 import laplacian_l1_loss

    return laplacian_l1_loss(pred, target)


def spectral_l1_kernel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Kernel path of :func:`spectral_l1` (no dispatch), with the reference's weight parameters."""
    from ..kernels.spectral_l1 import spectral_l1_loss

    return spectral_l1_loss(pred, target, reference.SPECTRAL_SHARPNESS, reference.SPECTRAL_CUTOFF)


def laplacian_l1(pred: torch.Tensor, target: torch.Tensor, kernels: bool = False) -> torch.Tensor:
    """``mean |L(pred) - L(target)|``: fused Triton kernel (``kernels``) or the reference."""
    if kernels:
        return laplacian_l1_kernel(pred, target)
    return reference.laplacian_l1(pred, target)


def spectral_l1(pred: torch.Tensor, target: torch.Tensor, kernels: bool = False) -> torch.Tensor:
    """High-pass weighted spectral L1: one-FFT Triton path (``kernels``) or the reference."""
    if kernels:
        return spectral_l1_kernel(pred, target)
    return reference.spectral_l1(pred, target)
