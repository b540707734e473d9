"""Masks found from a model-space volume's own intensities, without labels: the body's outline and the
lung-dense voxels inside it. The chest-wall cue (:mod:`ctrefine.models.chest_wall`) and the ``lung_mse`` loss
term (:mod:`ctrefine.losses.reference`) share them, so a phantom and an ingested CT are masked alike.

The body outline is the ray hull of the not-air voxels: a voxel is inside when tissue lies on both sides of it
along W and along H (CumSum, so it exports to ONNX). Thresholds have no gradient; everything is float32.
"""
from __future__ import annotations

import torch

from .conventions import hu_to_model

TISSUE = float(hu_to_model(-500.0))  # above: not air
LUNG = float(hu_to_model(-400.0))  # below, inside the body: lung-dense

__all__ = ["LUNG", "TISSUE", "body_inside", "lung_dense"]


def _inside_along(tissue: torch.Tensor, dim: int) -> torch.Tensor:
    """Voxels with tissue on both sides of them (themselves counted) along ``dim``."""
    before = torch.cumsum(tissue, dim)
    after = before.narrow(dim, tissue.shape[dim] - 1, 1) - before + tissue
    return (before > 0) & (after > 0)


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
