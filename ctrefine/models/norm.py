"""GroupNorm followed by SiLU as one module: the fused Triton kernel where the run's
:class:`ctrefine.device.Kernels` says so (:func:`use_fused_groupnorm`; ``CTREFINE_KERNELS=1``: measured
slower than PyTorch's two ops on an H200, so ``auto`` does not pick it), the two PyTorch ops otherwise.

The module *is* a ``nn.GroupNorm`` (same parameters, same names, same initialisation), so model files
load unchanged and the ONNX export, which runs the reference, writes the same GroupNormalization and
SiLU nodes as before. The kernel (``ctrefine.kernels.groupnorm_silu``) keeps only the input for the
backward and never writes the normalised tensor; tests/test_kernels.py holds it to the reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm_silu_reference(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """``silu(group_norm(x))``: the truth the kernel is tested against, and the path off CUDA."""
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


def group_norm_silu(x: torch.Tensor, groups: int, weight, bias, eps: float, fused: bool = False) -> torch.Tensor:
    """The fused kernel (``fused``) or the reference."""
    if fused:
        from ..kernels.groupnorm_silu import GroupNormSiLUFunction

        # CUDA autocast runs group_norm in float32 and returns float32 (CPU autocast keeps the input's
        # dtype): the kernel returns what the reference would
        cuda_autocast = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
        out = torch.float32 if cuda_autocast else x.dtype
        return GroupNormSiLUFunction.apply(x, weight, bias, groups, eps, out)
    return group_norm_silu_reference(x, groups, weight, bias, eps)


class GroupNormSiLU(nn.GroupNorm):
    """``silu(GroupNorm(x))`` in one call (see the module docstring)."""

    fused = False  # the Triton kernel instead of the two ops: set per run by use_fused_groupnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.fused)


def use_fused_groupnorm(model: nn.Module, on: bool) -> int:
    """Every :class:`GroupNormSiLU` of ``model`` runs the fused kernel (``on``) or the reference; how many."""
    layers = [m for m in model.modules() if isinstance(m, GroupNormSiLU)]
    for m in layers:
        m.fused = on
    return len(layers)
