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
from ..reprojection import SliceProjector
from .adversarial import AdversarialCritic
from .registry import DEFAULT_WEIGHTS, TERMS, TermContext, canonical_name

__all__ = ["DEFAULT_WEIGHTS", "DetailRefinementLoss", "ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    """``forward(pred, target) -> (l1, {"l1": l1})`` for the base stage."""

    term_names = ("l1",)

    def forward(self, pred: torch.Tensor, target: torch.Tensor):
        loss = reference.l1(pred, target)
        return loss, {"l1": loss.detach()}


class DetailRefinementLoss(nn.Module):
    """``forward(refined, target, coarse, xrays=None, placement=None, crossing=None) -> (total, {term: value})``;
    zero-weight terms are skipped. ``xrays`` (normalised, ``(B, 2, 1, S, S)``) is needed only by ``xray_consistency``, which
    re-projects in ``geometry`` (the dataset's: ``cone`` or ``parallel``); ``placement`` (the refiner's
    :meth:`~ctrefine.models.refiner.DetailRefinementNetwork.placement_weights` of this batch) only by
    ``placement``, ``crossing`` (its :meth:`~ctrefine.models.refiner.DetailRefinementNetwork.crossing_logits`) only
    by ``crossing_bce``. ``kernels``: the Triton loss kernels instead of their references (the run's
    :class:`ctrefine.device.Kernels`, decided once).

    With ``adversarial`` > 0 the loss owns an :class:`~ctrefine.losses.adversarial.AdversarialCritic`
    (``self.critic``, else None); the training stage calls :meth:`train_critic` once per step, before
    this loss, and keeps the critic's state in its checkpoints."""

    def __init__(self, weights: dict | None = None, geometry: str = "cone", device: torch.device | str = "cpu",
                 projector: SliceProjector | None = None, kernels: bool = False):
        super().__init__()
        self.geometry, self.kernels = geometry, kernels
        # the run's re-projector when the caller has one (the refine stage shares its own with validation)
        self._projectors: dict = {} if projector is None else {(projector.volume_size, projector.ray_sum.device): projector}
        w = dict(DEFAULT_WEIGHTS)
        for k, v in (weights or {}).items():
            name = canonical_name(k)
            if name not in TERMS:
                raise ValueError(f"unknown loss term {k!r} (expected one of {sorted(TERMS)})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"loss weight {k!r} must be a non-negative number, got {v!r}")
            w[name] = float(v)
        self.weights = w
        self.critic = AdversarialCritic(device) if w["adversarial"] > 0 else None

    @property
    def term_names(self) -> tuple[str, ...]:
        """Logged columns: every term, and the critic's own loss when there is one."""
        return tuple(self.weights) + (("critic",) if self.critic else ())

    def train_critic(self, refined: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor | None:
        """One critic step on this batch (no-op without a critic); its loss, for the log."""
        return self.critic.step(target, refined, coarse) if self.critic else None

    def projector(self, volume: torch.Tensor) -> SliceProjector:
        """The re-projector for this volume size and device (built once, kept)."""
        key = (volume.shape[-1], volume.device)
        if key not in self._projectors:
            self._projectors[key] = SliceProjector(volume.shape[-1], geometry=self.geometry).to(volume.device)
        return self._projectors[key]

    def forward(self, refined: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor,
                xrays: torch.Tensor | None = None, placement: tuple[torch.Tensor, torch.Tensor] | None = None,
                crossing: torch.Tensor | None = None):
        ctx = TermContext(xrays, None if xrays is None else self.projector(refined), self.critic, self.kernels,
                          placement, crossing)
        terms = {k: TERMS[k].fn(refined, target, coarse, ctx) for k, w in self.weights.items() if w > 0}
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}
