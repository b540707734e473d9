"""The one 3D Laplacian of ctrefine: shared by the refiner's high-pass branch, the gradient loss,
the HF-energy metric and the Triton kernel (which must match it exactly).

Stencil: 7-point, ``L(x)_i = sum over the 6 face neighbours j of (x_j - x_i)``.
Padding: replicate (a neighbour outside the volume takes the centre's value, so its term is 0).
This is the graph Laplacian of the voxel grid with Neumann boundaries: a constant volume maps to 0
everywhere (no border artefact), a linear ramp to 0 in the interior, x^2 (unit spacing) to 2.
The operator is symmetric, so its adjoint -- needed by a fused backward -- is itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def laplacian3d(x: torch.Tensor) -> torch.Tensor:
    """7-point Laplacian with replicate padding over the last three dims of ``(B, C, D, H, W)``."""
    if x.dim() != 5:
        raise ValueError(f"laplacian3d expects (B, C, D, H, W), got {tuple(x.shape)}")
    p = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    c = p[:, :, 1:-1, 1:-1, 1:-1]
    return (p[:, :, :-2, 1:-1, 1:-1] + p[:, :, 2:, 1:-1, 1:-1] + p[:, :, 1:-1, :-2, 1:-1]
            + p[:, :, 1:-1, 2:, 1:-1] + p[:, :, 1:-1, 1:-1, :-2] + p[:, :, 1:-1, 1:-1, 2:] - 6.0 * c)


def laplacian2d(x: torch.Tensor) -> torch.Tensor:
    """5-point 2D analogue (replicate padding) for radiograph detail cues, ``(B, C, H, W)``."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    c = p[:, :, 1:-1, 1:-1]
    return p[:, :, :-2, 1:-1] + p[:, :, 2:, 1:-1] + p[:, :, 1:-1, :-2] + p[:, :, 1:-1, 2:] - 4.0 * c


def gradient_magnitude3d(x: torch.Tensor) -> torch.Tensor:
    """``|grad x|`` by central differences (half the difference of the two face neighbours, replicate
    padding, so a border voxel sees a one-sided half difference) over the last three dims of ``(B, C, D, H, W)``."""
    p = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
    gd = p[:, :, 2:, 1:-1, 1:-1] - p[:, :, :-2, 1:-1, 1:-1]
    gh = p[:, :, 1:-1, 2:, 1:-1] - p[:, :, 1:-1, :-2, 1:-1]
    gw = p[:, :, 1:-1, 1:-1, 2:] - p[:, :, 1:-1, 1:-1, :-2]
    return 0.5 * torch.sqrt(gd * gd + gh * gh + gw * gw + 1e-12)
