"""Autograd Functions over the loss kernels; ``laplacian_l1`` and ``spectral_l1`` here are what the
training loss calls. Kernel or reference is decided per call by :func:`ctrefine.device.use_kernels`.

Both paths give the same numbers (tests/test_kernels.py holds them to per-dtype tolerances).
"""
from __future__ import annotations

import torch

from ..device import use_kernels
from . import reference


class LaplacianL1Function(torch.autograd.Function):
    """``mean |L(pred) - L(target)|`` with the fused forward and backward kernels."""

    @staticmethod
    def forward(ctx, pred, target):
        from ..kernels.laplacian_l1 import laplacian_l1_forward

        ctx.save_for_backward(pred, target)
        return laplacian_l1_forward(pred, target)

    @staticmethod
    def backward(ctx, grad_output):
        from ..kernels.laplacian_l1 import laplacian_l1_backward

        pred, target = ctx.saved_tensors
        gp = laplacian_l1_backward(pred, target, grad_output).view(pred.shape)
        return (gp if ctx.needs_input_grad[0] else None,
                (-gp).to(target.dtype) if ctx.needs_input_grad[1] else None)


class SpectralWeightedAbs(torch.autograd.Function):
    """Half spectrum ``rfftn(p - t)`` -> full-spectrum mean of ``w(f)|X|`` (fused weighting kernel)."""

    @staticmethod
    def forward(ctx, spec, full_shape):
        from ..kernels.spectral_l1 import spectral_weighted_abs_forward

        ri = torch.view_as_real(spec.contiguous()).contiguous()
        ctx.save_for_backward(ri)
        ctx.full_shape = full_shape
        return spectral_weighted_abs_forward(ri, full_shape, reference.SPECTRAL_SHARPNESS, reference.SPECTRAL_CUTOFF)

    @staticmethod
    def backward(ctx, grad_output):
        from ..kernels.spectral_l1 import spectral_weighted_abs_backward

        (ri,) = ctx.saved_tensors
        g = spectral_weighted_abs_backward(ri, ctx.full_shape, grad_output, reference.SPECTRAL_SHARPNESS,
                                           reference.SPECTRAL_CUTOFF)
        return torch.view_as_complex(g), None


def laplacian_l1_kernel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Kernel path of :func:`laplacian_l1` (no dispatch; the launcher validates shapes and dtypes)."""
    return LaplacianL1Function.apply(pred, target)


def spectral_l1_kernel(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Kernel path of :func:`spectral_l1`: one ``rfftn`` of the difference, then the fused weighting."""
    if pred.shape != target.shape or pred.dim() < 3:
        raise ValueError(f"spectral_l1 expects two tensors of one shape (..., D, H, W), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    diff = pred.float() - target.float()
    spec = torch.fft.rfftn(diff, dim=(-3, -2, -1), norm="ortho")
    return SpectralWeightedAbs.apply(spec, tuple(diff.shape))


def laplacian_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean |L(pred) - L(target)|``: fused Triton kernel or the reference."""
    if use_kernels(pred):
        return laplacian_l1_kernel(pred, target)
    return reference.laplacian_l1(pred, target)


def spectral_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """High-pass weighted spectral L1: one-FFT Triton path or the reference."""
    if use_kernels(pred):
        return spectral_l1_kernel(pred, target)
    return reference.spectral_l1(pred, target)
