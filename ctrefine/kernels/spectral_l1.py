"""High-pass weighted spectral L1 with ONE real FFT and a fused weighting/reduction kernel.

Reference: :func:`ctrefine.losses.reference.spectral_l1` = mean over the full spectrum of
``w(f) |F(p) - F(t)|`` -- two complex ``fftn`` of the full grid, a materialised weight grid, a
complex abs and a mean.

Here:

1. Linearity: ``F(p) - F(t) = F(p - t)``, and ``p - t`` is real, so ``rfftn(p - t)`` (half the bins,
   one transform) holds everything. The full-spectrum sum equals the half-spectrum sum with the
   Hermitian multiplicity ``m = 2`` for every bin whose mirror is not itself stored, ``m = 1`` for the
   ``k_w = 0`` plane and, when W is even, the Nyquist plane ``k_w = W/2``; |f| of a bin equals |f|
   of its mirror, so the weight is the same.
2. The Triton kernel computes each bin's weight from its index on the fly (no weight tensor), the
   complex magnitude, ``m * w * |X|``, and one partial sum per program (deterministic reduction).
3. Backward: the kernel writes ``dloss/dX = g/N * m * w * X/|X|`` (0 where ``X = 0``, matching
   torch's ``abs`` subgradient), and torch's own ``rfftn`` backward carries it to ``p`` and ``t``.

The weight's sharpness and cut-off are arguments (the reference owns their values). Kernels, launchers,
the ``torch.autograd.Function`` and the loss's kernel path are all in this file.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # complex bins per program (2 fp32 loads each)
NUM_WARPS = 4


@triton.jit
def _bin_weight(offs, D, H, W, WR, SHARP: tl.constexpr, CUT: tl.constexpr):
    """Hermitian multiplicity x high-pass weight of rfftn bins at flat offsets (any batch)."""
    k = offs % WR
    hh = (offs // WR) % H
    dd = (offs // (WR * H)) % D
    fd = tl.where(dd < (D + 1) // 2, dd, dd - D).to(tl.float32) / D
    fh = tl.where(hh < (H + 1) // 2, hh, hh - H).to(tl.float32) / H
    fw = k.to(tl.float32) / W
    mag = tl.sqrt(fd * fd + fh * fh + fw * fw)
    wgt = 1.0 / (1.0 + tl.exp(-SHARP * (mag - CUT)))
    single = (k == 0) | ((W % 2 == 0) & (k == W // 2))
    return tl.where(single, 1.0, 2.0) * wgt


@triton.jit
def _load_bins(X, M, BLOCK: tl.constexpr):
    """This program's bin offsets, validity mask, real and imaginary parts."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < M
    return offs, valid, tl.load(X + 2 * offs, mask=valid, other=0.0), tl.load(X + 2 * offs + 1, mask=valid, other=0.0)


@triton.jit
def _spectral_fwd(
    X,  # rfftn(p - t) as interleaved fp32 (re, im): (M, 2) with M = B*C*D*H*(W//2+1)
    PARTIAL,  # (num_programs,) fp32 partial sums of m * w * |X|
    M, D, H, W, WR,  # bins, full-grid dims, WR = W//2 + 1
    SHARP: tl.constexpr, CUT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, valid, re, im = _load_bins(X, M, BLOCK)
    val = _bin_weight(offs, D, H, W, WR, SHARP, CUT) * tl.sqrt(re * re + im * im)
    tl.store(PARTIAL + tl.program_id(0), tl.sum(tl.where(valid, val, 0.0), axis=0))


@triton.jit
def _spectral_bwd(
    X,  # (M, 2) fp32 spectrum saved by the forward
    GX,  # out: (M, 2) fp32 gradient wrt the spectrum (conjugate-Wirtinger convention: d/dre + i d/dim)
    GO,  # (1,) fp32 incoming grad_output
    inv_n,  # 1 / (B*C*D*H*W): the full-spectrum mean's denominator
    M, D, H, W, WR,
    SHARP: tl.constexpr, CUT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, valid, re, im = _load_bins(X, M, BLOCK)
    mag = tl.sqrt(re * re + im * im)
    coef = tl.load(GO) * inv_n * _bin_weight(offs, D, H, W, WR, SHARP, CUT) / tl.where(mag > 0, mag, 1.0)
    coef = tl.where(mag > 0, coef, 0.0)
    tl.store(GX + 2 * offs, coef * re, mask=valid)
    tl.store(GX + 2 * offs + 1, coef * im, mask=valid)


@torch.compiler.disable
def spectral_weighted_abs_forward(spec_ri: torch.Tensor, full_shape, sharp: float, cut: float) -> torch.Tensor:
    """Launcher: ``sum(m * w * |X|) / N`` for an interleaved half spectrum ``(..., D, H, WR, 2)``."""
    d, h, w = full_shape[-3:]
    wr = spec_ri.shape[-2]
    m = spec_ri.numel() // 2
    grid = (triton.cdiv(m, BLOCK),)
    partial = torch.empty(grid[0], device=spec_ri.device, dtype=torch.float32)
    _spectral_fwd[grid](spec_ri, partial, m, d, h, w, wr, SHARP=sharp, CUT=cut, BLOCK=BLOCK,
                        num_warps=NUM_WARPS)
    n_full = spec_ri.numel() // 2 // wr * w
    return partial.sum() / n_full


@torch.compiler.disable
def spectral_weighted_abs_backward(spec_ri: torch.Tensor, full_shape, grad_output: torch.Tensor, sharp: float,
                                   cut: float) -> torch.Tensor:
    """Launcher: gradient wrt the interleaved spectrum, same layout."""
    d, h, w = full_shape[-3:]
    wr = spec_ri.shape[-2]
    m = spec_ri.numel() // 2
    n_full = m // wr * w
    gx = torch.empty_like(spec_ri)
    go = grad_output.detach().to(device=spec_ri.device, dtype=torch.float32).reshape(1).contiguous()
    grid = (triton.cdiv(m, BLOCK),)
    _spectral_bwd[grid](spec_ri, gx, go, 1.0 / n_full, m, d, h, w, wr, SHARP=sharp, CUT=cut,
                        BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gx


class SpectralWeightedAbs(torch.autograd.Function):
    """Half spectrum ``rfftn(p - t)`` -> full-spectrum mean of ``w(f)|X|`` (the fused weighting kernel)."""

    @staticmethod
    def forward(ctx, spec, full_shape, sharp, cut):
        ri = torch.view_as_real(spec.contiguous()).contiguous()
        ctx.save_for_backward(ri)
        ctx.full_shape, ctx.sharp, ctx.cut = full_shape, sharp, cut
        return spectral_weighted_abs_forward(ri, full_shape, sharp, cut)

    @staticmethod
    def backward(ctx, grad_output):
        (ri,) = ctx.saved_tensors
        g = spectral_weighted_abs_backward(ri, ctx.full_shape, grad_output, ctx.sharp, ctx.cut)
        return torch.view_as_complex(g), None, None, None


def spectral_l1_loss(pred: torch.Tensor, target: torch.Tensor, sharp: float, cut: float) -> torch.Tensor:
    """The kernel path of ``ctrefine.losses.functional.spectral_l1``: one ``rfftn`` of the difference, then
    the fused weighting (``sharp`` and ``cut`` are the reference's weight parameters)."""
    if pred.shape != target.shape or pred.dim() < 3:
        raise ValueError(f"spectral_l1 expects two tensors of one shape (..., D, H, W), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    diff = pred.float() - target.float()
    spec = torch.fft.rfftn(diff, dim=(-3, -2, -1), norm="ortho")
    return SpectralWeightedAbs.apply(spec, tuple(diff.shape), sharp, cut)
