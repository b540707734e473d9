"""Fused 3D Laplacian L1 loss: ``mean |L(pred) - L(target)|`` without materialising either Laplacian.

Reference: :func:`ctrefine.losses.reference.laplacian_l1` (7-point stencil, replicate padding, see
:mod:`ctrefine.stencil`). By linearity ``L(p) - L(t) = L(p - t)``, so the forward kernel reads ``p``
and ``t`` once per voxel (neighbour loads hit cache) and writes one partial sum per program; the
partials are summed by torch in a fixed order, so the result is deterministic.

Backward. With ``e = p - t``, ``loss = mean |L e|`` and ``dloss/de = L^T sign(L e) / N``. The
replicate-padded 7-point Laplacian is the graph Laplacian of the voxel grid, which is symmetric
(``L^T = L``): ``grad_i = g/N * sum_{j in N(i)} (s_j - s_i)``, ``s = sign(L e)``. The backward kernel
recomputes ``s`` at the voxel and its 6 neighbours from ``p`` and ``t`` (a 25-point footprint, served
by cache) and writes ``grad_pred`` in one pass; ``grad_target = -grad_pred``. No N-sized temporary
exists in either direction beyond the gradient itself.

The ``torch.autograd.Function`` over these launchers and the loss's kernel path follow them below.

Memory traffic per voxel: forward 2 reads; backward 2 reads + 1 write (+1 for ``-grad`` if the
target needs a gradient). That is what the GB/s figure of the benchmark counts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # voxels per program: 8 fp32 per thread at 4 warps, long contiguous runs along W
NUM_WARPS = 4


@triton.jit
def _neighbour_minus_centre(P, T, offs, step, m, c):
    """(p - t) at ``offs + step`` minus the centre's ``c``, where ``m`` (inside the volume); 0 elsewhere."""
    nb = tl.load(P + offs + step, mask=m, other=0.0).to(tl.float32) - tl.load(T + offs + step, mask=m, other=0.0).to(tl.float32)
    return tl.where(m, nb - c, 0.0)


@triton.jit
def _lap_e(P, T, offs, d, h, w, D, H, W, HW, valid):
    """L(p - t) at flat positions ``offs`` (indices d, h, w); 0 where ``valid`` is false. The six face
    neighbours, each only where it lies inside the volume (zero-flux borders, as the reference)."""
    c = tl.load(P + offs, mask=valid, other=0.0).to(tl.float32) - tl.load(T + offs, mask=valid, other=0.0).to(tl.float32)
    acc = tl.zeros_like(c)
    acc += _neighbour_minus_centre(P, T, offs, -1, valid & (w > 0), c)
    acc += _neighbour_minus_centre(P, T, offs, 1, valid & (w < W - 1), c)
    acc += _neighbour_minus_centre(P, T, offs, -W, valid & (h > 0), c)
    acc += _neighbour_minus_centre(P, T, offs, W, valid & (h < H - 1), c)
    acc += _neighbour_minus_centre(P, T, offs, -HW, valid & (d > 0), c)
    acc += _neighbour_minus_centre(P, T, offs, HW, valid & (d < D - 1), c)
    return acc


@triton.jit
def _block_coords(N, D, H, W, BLOCK: tl.constexpr):
    """This program's flat offsets, their validity mask and (d, h, w) indices in the stacked volumes."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    return offs, offs < N, (offs // HW) % D, (offs // W) % H, offs % W, HW


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _laplacian_l1_fwd(
    P,  # pred, contiguous (N,) view of (B, C, D, H, W), fp32/bf16/fp16
    T,  # target, same shape and dtype as P
    PARTIAL,  # (num_programs,) fp32: sum of |L(p - t)| over each program's block
    N, D, H, W,  # total voxels and the volume dims (B*C volumes are stacked along the flat index)
    BLOCK: tl.constexpr,
):
    offs, valid, d, h, w, HW = _block_coords(N, D, H, W, BLOCK)
    lap = _lap_e(P, T, offs, d, h, w, D, H, W, HW, valid)
    tl.store(PARTIAL + tl.program_id(0), tl.sum(tl.where(valid, tl.abs(lap), 0.0), axis=0))


@triton.jit
def _laplacian_l1_bwd(
    P,  # pred, contiguous (N,)
    T,  # target, contiguous (N,)
    GP,  # out: grad wrt pred, (N,), dtype of P
    GO,  # (1,) fp32: the incoming grad_output (read on device: no host sync)
    inv_n,  # 1 / N (fp32 scalar)
    N, D, H, W,
    BLOCK: tl.constexpr,
):
    offs, valid, d, h, w, HW = _block_coords(N, D, H, W, BLOCK)
    scale = tl.load(GO).to(tl.float32) * inv_n
    s0 = _sign(_lap_e(P, T, offs, d, h, w, D, H, W, HW, valid))
    acc = tl.zeros_like(s0)
    # For each in-bounds neighbour j: + (s_j - s_i). Out-of-bounds neighbours contribute 0 (replicate pad).
    m = valid & (w > 0)
    acc += tl.where(m, _sign(_lap_e(P, T, offs - 1, d, h, w - 1, D, H, W, HW, m)) - s0, 0.0)
    m = valid & (w < W - 1)
    acc += tl.where(m, _sign(_lap_e(P, T, offs + 1, d, h, w + 1, D, H, W, HW, m)) - s0, 0.0)
    m = valid & (h > 0)
    acc += tl.where(m, _sign(_lap_e(P, T, offs - W, d, h - 1, w, D, H, W, HW, m)) - s0, 0.0)
    m = valid & (h < H - 1)
    acc += tl.where(m, _sign(_lap_e(P, T, offs + W, d, h + 1, w, D, H, W, HW, m)) - s0, 0.0)
    m = valid & (d > 0)
    acc += tl.where(m, _sign(_lap_e(P, T, offs - HW, d - 1, h, w, D, H, W, HW, m)) - s0, 0.0)
    m = valid & (d < D - 1)
    acc += tl.where(m, _sign(_lap_e(P, T, offs + HW, d + 1, h, w, D, H, W, HW, m)) - s0, 0.0)
    tl.store(GP + offs, (acc * scale).to(GP.dtype.element_ty), mask=valid)


def _check(pred: torch.Tensor, target: torch.Tensor):
    if pred.shape != target.shape or pred.dim() != 5:
        raise ValueError(f"laplacian_l1 expects two (B, C, D, H, W) tensors of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        target = target.to(pred.dtype)
    return pred.contiguous(), target.contiguous()


@torch.compiler.disable
def laplacian_l1_forward(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Launcher: the fp32 scalar loss."""
    p, t = _check(pred, target)
    n = p.numel()
    d, h, w = p.shape[-3:]
    grid = (triton.cdiv(n, BLOCK),)
    partial = torch.empty(grid[0], device=p.device, dtype=torch.float32)
    _laplacian_l1_fwd[grid](p, t, partial, n, d, h, w, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return partial.sum() / n


@torch.compiler.disable
def laplacian_l1_backward(pred: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Launcher: gradient of ``grad_output * loss`` with respect to ``pred``."""
    p, t = _check(pred, target)
    n = p.numel()
    d, h, w = p.shape[-3:]
    gp = torch.empty_like(p)
    grid = (triton.cdiv(n, BLOCK),)
    go = grad_output.detach().to(device=p.device, dtype=torch.float32).reshape(1).contiguous()
    _laplacian_l1_bwd[grid](p, t, gp, go, 1.0 / n, n, d, h, w, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gp


class LaplacianL1Function(torch.autograd.Function):
    """``mean |L(pred) - L(target)|`` with the fused forward and backward kernels above."""

    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(pred, target)
        return laplacian_l1_forward(pred, target)

    @staticmethod
    def backward(ctx, grad_output):
        pred, target = ctx.saved_tensors
        gp = laplacian_l1_backward(pred, target, grad_output).view(pred.shape)
        return (gp if ctx.needs_input_grad[0] else None,
                (-gp).to(target.dtype) if ctx.needs_input_grad[1] else None)


def laplacian_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The kernel path of ``ctrefine.losses.functional.laplacian_l1`` (the launchers validate the inputs)."""
    return LaplacianL1Function.apply(pred, target)
