"""DetailRefinementLoss: the refiner's five-term objective, weights from the config's ``loss`` section."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional, reference

# Seed defaults: L1 anchors intensities; the frequency and gradient terms reward high frequencies;
# the texture term matches local contrast; a light consistency term keeps the base's anatomy.
DEFAULT_WEIGHTS = {"l1": 1.0, "frequency": 0.5, "gradient": 0.3, "perceptual": 0.2, "consistency": 0.1}


class DetailRefinementLoss(nn.Module):
    """``forward(refined, target, coarse) -> (total, {term: value})``; zero-weight terms are skipped."""

    def __init__(self, weights: dict | None = None):
        super().__init__()
        w = dict(DEFAULT_WEIGHTS)
        for k, v in (weights or {}).items():
            if k not in DEFAULT_WEIGHTS:
                raise ValueError(f"unknown loss term {k!r} (expected one of {sorted(DEFAULT_WEIGHTS)})")
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"loss weight {k!r} must be a non-negative number, got {v!r}")
            w[k] = float(v)
        self.weights = w

    def forward(self, refined: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor):
        fns = {
            "l1": lambda: (refined.float() - target.float()).abs().mean(),
            "frequency": lambda: functional.spectral_l1(refined, target),
            "gradient": lambda: functional.laplacian_l1(refined, target),
            "perceptual": lambda: reference.local_stats_loss(refined, target),
            "consistency": lambda: reference.consistency_l1(refined, coarse),
        }
        terms = {k: fn() for k, fn in fns.items() if self.weights[k] > 0}
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}
