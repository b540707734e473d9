"""The local operators of ctrefine, one home each: the 3D Laplacian (below), the Gaussian high-pass that
defines a volume's *detail* for the metrics and the losses (:func:`highpass`), and the part of that detail
that is constant along the radiographs' rays (:func:`ray_constant_energy`: the streak index and the streak loss) or
along 45 mm segments of them (:func:`ray_segment_share`: the lung streak index and its loss).

The one 3D Laplacian is shared by the refiner's high-pass branch, the gradient loss, the HF-energy metric
and the Triton kernel (which must match it exactly).

Stencil: 7-point, ``L(x)_i = sum over the 6 face neighbours j of (x_j - x_i)``.
Padding: replicate (a neighbour outside the volume takes the centre's value, so its term is 0).
This is the graph Laplacian of the voxel grid with Neumann boundaries: a constant volume maps to 0
everywhere (no border artefact), a linear ramp to 0 in the interior, x^2 (unit spacing) to 2.
The operator is symmetric, so its adjoint -- needed by a fused backward -- is itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _constant(key: tuple, values: list, like: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor of ``like``'s dtype and device, kept for reuse in plain eager runs; a tracer
    (``torch.export``, the ONNX exporter, ``torch.compile``) gets a fresh constant, never a cached one,
    so no fake or functional tensor of a trace outlives it in the cache."""
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    key = key + (like.dtype, like.device)
    if key not in _CONSTANTS:
        with torch.inference_mode(False):  # an inference tensor could not be saved for a later backward
            _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


_CONSTANTS: dict[tuple, torch.Tensor] = {}


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


HF_SIGMA = 1.0  # voxels: the detail band is what a 1-voxel Gaussian removes


def _gaussian_taps(sigma: float) -> list:
    """The normalised 1D Gaussian of ``highpass``, radius ``4 sigma``, in double precision."""
    r = int(4.0 * sigma + 0.5)
    k = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-r, r + 1)]
    total = math.fsum(k)
    return [v / total for v in k]


def highpass(x: torch.Tensor, sigma: float = HF_SIGMA) -> torch.Tensor:
    """``x - gaussian(x, sigma)`` over the last three dims of ``(B, 1, D, H, W)``, replicate borders (scipy's
    ``mode="nearest"``), kernel radius ``4 sigma`` (scipy's default truncate)."""
    k = _constant(("gaussian", float(sigma)), _gaussian_taps(sigma), x)
    r = k.numel() // 2
    y = x
    for axis in range(3):  # separable: one 1D convolution per axis
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return x - y


RAY_DIMS = (3, 4)  # (B, 1, D, H, W): PA rays run along H (anterior -> posterior), lateral rays along W


def ray_constant_energy(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` -> ``(B, 2)``: per view (PA, lateral), the energy of ``x``'s mean along that view's
    rays spread back along them -- the part of ``x`` a radiograph's pattern copied through the body explains."""
    return torch.stack([(x.mean(dim=d, keepdim=True) ** 2).flatten(1).sum(1) * x.shape[d] for d in RAY_DIMS], dim=1)


# A ray segment's share of the ray: about a third of a lung's width, 9 voxels (45 mm) at 64^3 over the 320 mm field
# of view, 5 at 32^3.
RAY_SEGMENT = 0.14


def ray_segment_energy(x: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, 1, D, H, W)`` -> ``(B, 2)``: per view (PA, lateral), the energy of ``x``'s running mean over ``length``
    voxels along that view's rays (zero beyond the volume) -- :func:`ray_constant_energy` on segments: a streak
    across one lung, not the whole ray, keeps its energy under it, detail a voxel or two deep along the ray loses it."""
    out = []
    for d in RAY_DIMS:
        size = [1, 1, 1]
        size[d - 2] = length
        m = F.avg_pool3d(x, tuple(size), 1, tuple(s // 2 for s in size), count_include_pad=True)
        out.append((m * m).flatten(1).sum(1))
    return torch.stack(out, dim=1)


def ray_segment_share(detail: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` -> ``(B, 2)``: per view, the share of ``detail``'s energy under the running mean over
    :data:`RAY_SEGMENT` of its rays' length (an odd number of voxels, at least 3; :func:`ray_segment_energy`)."""
    half = round(RAY_SEGMENT * detail.shape[-1] / 2)
    total = (detail * detail).flatten(1).sum(1, keepdim=True)
    return (ray_segment_energy(detail, max(3, 2 * half + 1)) + 1e-12) / (total + 1e-12)
