"""Masks found from a model-space volume's own intensities, without labels: the body's outline, how deep below
it each voxel lies, the chest wall (the outer shell of the body, where the ribs are) and the lung-dense voxels.
The chest-wall cue (:mod:`ctrefine.models.chest_wall`) and the lung loss terms (:mod:`ctrefine.losses.reference`)
share them, so a phantom and an ingested CT are masked alike.

The body outline is the ray hull of the not-air voxels: a voxel is inside when tissue lies on both sides of it
along W and along H (CumSum, so it exports to ONNX). Thresholds have no gradient; everything is float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .conventions import FOV_MM, hu_to_model

TISSUE = float(hu_to_model(-500.0))  # above: not air
LUNG = float(hu_to_model(-400.0))  # below, inside the body: lung-dense
# The chest wall's depth, ribs included (8 voxels at 64^3): on the demo's test patients 97 % of rib voxels lie at
# most 7 erosions below the coarse volume's outline (bench/RESULTS.md, "a chest-wall cue").
SHELL_MM = 40.0
# A dense voxel is a structure inside the lung (a vessel, a nodule) when more than this share of its 5^3
# neighbourhood is lung-dense: on six of the demo's test patients, below the chest wall, that mask is 75 % vessel
# and 5 % nodule voxels and holds two thirds of the vessel voxels (the heart's and the wall's borders, about half
# lung, fall out).
LUNG_SURROUND = 0.6
# The soft-tissue window: fat (about -100 HU), muscle, organs and blood (0-80 HU), costal cartilage (150 HU); the lung
# and the bone lie outside it.
SOFT_HU = (-200.0, 200.0)

__all__ = ["LUNG", "LUNG_SURROUND", "SHELL_MM", "SOFT_HU", "TISSUE", "body_depth", "body_inside", "chest_wall",
           "lung_dense", "lung_region", "lung_structures", "shadow_crossings", "shell_voxels", "soft_core",
           "vessel_ghosts"]


def _inside_along(tissue: torch.Tensor, dim: int) -> torch.Tensor:
    """Voxels with tissue on both sides of them (themselves counted) along ``dim``."""
    before = torch.cumsum(tissue, dim)
    after = before.narrow(dim, tissue.shape[dim] - 1, 1) - before + tissue
    return (before > 0) & (after > 0)


def _erosion_depth(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """How many 3^3 erosions each voxel of ``mask`` survives (0 outside), at most ``steps``."""
    depth, m = torch.zeros_like(mask), mask
    for _ in range(steps):
        depth = depth + m
        m = -F.max_pool3d(-m, 3, 1, 1)
    return depth


def shell_voxels(volume_size: int) -> int:
    """``SHELL_MM`` in voxels of a ``volume_size``^3 grid over the field of view (at least 2)."""
    return max(2, round(SHELL_MM * volume_size / FOV_MM))


def body_inside(volume: torch.Tensor) -> torch.Tensor:
    """The body's ray hull of a model-space volume ``(B, 1, D, H, W)``: 1 where tissue lies on both sides along
    W and along H, else 0 (float32)."""
    tissue = (volume.float() > TISSUE).float()
    return (_inside_along(tissue, 3) & _inside_along(tissue, 4)).float()


def lung_dense(volume: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
    """1 at the voxels below :data:`LUNG` inside the body (lung and airways; the air around the body excluded),
    else 0 (float32). ``inside``: the volume's :func:`body_inside`, when the caller has it already."""
    inside = body_inside(volume) if inside is None else inside
    return inside * (volume.float() < LUNG).float()


def lung_region(volume: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
    """1 where more than :data:`LUNG_SURROUND` of a voxel's 5^3 neighbourhood is lung-dense -- the lung with the vessels
    and nodules inside it, its borders with the wall and the heart left out -- else 0 (float32)."""
    return (F.avg_pool3d(lung_dense(volume, inside), 5, 1, 2, count_include_pad=False) > LUNG_SURROUND).float()


def soft_core(volume: torch.Tensor) -> torch.Tensor:
    """1 at the voxels inside the body whose whole 3^3 neighbourhood lies in :data:`SOFT_HU` -- the flat fat,
    muscle, organs and blood, their borders with the lung, the bone and the air left out -- else 0 (float32)."""
    v = volume.float()
    soft = body_inside(volume) * ((v >= hu_to_model(SOFT_HU[0])) & (v <= hu_to_model(SOFT_HU[1]))).float()
    return -F.max_pool3d(-soft, 3, 1, 1)


def body_depth(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inside, depth)`` of a model-space volume ``(B, 1, D, H, W)``, float32: the body's ray hull (1 inside)
    and how many erosions of it each voxel survives (1 at the skin, at most the shell's voxels)."""
    inside = body_inside(volume)
    return inside, _erosion_depth(inside, shell_voxels(volume.shape[-1]))


def chest_wall(depth: torch.Tensor) -> torch.Tensor:
    """1 at the body's outer ``shell - 1`` voxels (``depth`` from :func:`body_depth`: 1 to shell - 1), else 0."""
    return ((depth >= 1) & (depth <= shell_voxels(depth.shape[-1]) - 1)).float()


def lung_structures(volume: torch.Tensor, inside: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """1 at the dense voxels (at least :data:`LUNG`) below the chest wall with more than :data:`LUNG_SURROUND` of
    their 5^3 neighbourhood lung-dense -- the vessels and nodules inside the lung -- else 0 (float32).
    ``inside``, ``depth``: the volume's :func:`body_depth`."""
    deep = depth > shell_voxels(volume.shape[-1]) - 1
    return (deep & (volume.float() >= LUNG) & (lung_region(volume, inside) > 0)).float()


def shadow_crossings(structures: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
    """1 where both radiographs' shadows of ``structures`` cross but none is, else 0 (float32): the ``lung`` voxels off
    the structures and their 6-neighbour rim with a structure on the voxel's PA ray (along H) and on its lateral ray
    (along W). At each height every PA shadow crosses every lateral one, and only some crossings hold a structure:
    intersecting the two views draws one at the others (the two views' ghosts). ``structures``, ``lung``: masks of
    the same shape ``(..., D, H, W)``."""
    s = structures.float()
    x = s.reshape(-1, 1, *s.shape[-3:])
    rim = torch.maximum(torch.maximum(F.max_pool3d(x, (3, 1, 1), 1, (1, 0, 0)), F.max_pool3d(x, (1, 3, 1), 1, (0, 1, 0))),
                        F.max_pool3d(x, (1, 1, 3), 1, (0, 0, 1))).reshape(s.shape)
    crossing = s.amax(dim=-2, keepdim=True) * s.amax(dim=-1, keepdim=True)
    return lung.float() * (1 - rim) * crossing


def vessel_crossings(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vessel, ghost)`` masks (float32, ``(B, 1, D, H, W)``) of the lung voxels where a PA shadow of the lung's
    structures (:func:`lung_structures`, from the volume's intensities) crosses a lateral one: on a structure, or a
    ghost (:func:`shadow_crossings`). A structure's rim is neither."""
    v = volume.detach().float()
    inside, depth = body_depth(v)
    structures = lung_structures(v, inside, depth)
    lung = lung_region(v, inside) > 0
    vessel = lung * structures * structures.amax(dim=-2, keepdim=True) * structures.amax(dim=-1, keepdim=True)
    return vessel, shadow_crossings(structures, lung)


def vessel_ghosts(volume: torch.Tensor, inside: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """:func:`shadow_crossings` of the lung's structures (:func:`lung_structures`) in the lung (:func:`lung_region`),
    found from the volume's intensities (float32; ``(B, 1, D, H, W)``; ``inside``, ``depth``: its :func:`body_depth`)."""
    return shadow_crossings(lung_structures(volume, inside, depth), lung_region(volume, inside) > 0)
