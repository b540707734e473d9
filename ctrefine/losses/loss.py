"""The loss modules of the two training stages.

* :class:`ReconstructionLoss` -- the base stage: L1 between the coarse prediction and the truth.
* :class:`DetailRefinementLoss` -- the refiner: the weighted sum of the terms in
  :data:`ctrefine.losses.registry.TERMS`, weights from the config's ``loss`` section.

Both return ``(total, {term: detached value})`` so the training driver logs every stage alike.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import reference
from .registry import DEFAULT_WEIGHTS, TERMS, canonical_name

__all__ = ["DEFAULT_WEIGHTS", "DetailRefinementLoss", "ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    """``forward(pred, target) -> (l1, {"l1": l1})`` for the base stage."""

    term_names = ("l1",)

    def forward(self, pred: torch.Tensor, target: torch.Tensor):
        loss = reference.l1(pred, target)
        return loss, {"l1": loss.detach()}


class DetailRefinementLoss(nn.Module):
    """``forward(refined, target, coarse) -> (total, {term: value})``; zero-weight terms are skipped."""

    def __init__(self, weights: dict | None = None):
        super().__init__()
        w = dict(DEFAULT_WEIGHTS)
        for k, v in (weights or {}).items():
            name = canonical_name(k)
            if name not in TERMS:
                raise ValueError(f"unknown loss term {k!r} (expected one of {sorted(TERMS)})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"loss weight {k!r} must be a non-negative number, got {v!r}")
            w[name] = float(v)
        self.weights = w

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def forward(self, refined: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor):
        terms = {k: TERMS[k].fn(refined, target, coarse) for k, w in self.weights.items() if w > 0}
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}
