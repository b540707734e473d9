"""Where along its ray each lifted radiograph feature goes (issue "detail in place", step 2).

Lifting a view's 2D features along its rays (:func:`~ctrefine.models.blocks.lift_view`) copies each pixel to
every voxel the ray crossed: a vessel seen on the PA radiograph is offered at every depth, and the network
downstream has to find its depth itself.

:class:`RayPlacement` spreads each feature along its ray with learned weights instead of evenly. For every
voxel it reads the coarse volume, its high-pass, both views' lifted features and their product -- for a PA
ray at height ``D`` and width ``W``, the lateral features say at which depths ``H`` of that height the other
view sees structure -- and from them a logit per view and channel group. A softmax along each view's ray
axis, times the ray's length, makes the weights: they sum along the ray to what the even spread gives, so
the feature keeps its strength and only moves in depth. The loss term ``placement``
(:func:`ctrefine.losses.reference.placement_kl`) can teach the weights where along each ray the detail the
coarse volume lacks truly lies; they read the features detached, so it teaches the placement alone. The last
convolution starts at zero: even weights, exactly the plain lifting, so a trained refiner can be given it without
changing its output (``bench/widen_refiner.py --ray-placement``).

Off by default (``model.guidance_depth="along-rays"``): on the shipped split the placement learns the PA depths
when taught, and the refined volume loses 0.02-0.03 dB for it; the hilar fan it was built against comes from the
re-projection residual instead (bench/RESULTS.md, "Detail in place: each lifted feature placed in depth").
The refiner's ``residual_weighting="learned"`` places that residual with a one-group placement of its own
(:meth:`RayPlacement.place_lifted`), also off: -0.020 dB, and the fan stays (bench/RESULTS.md, "Detail in place: a
refiner that never drew the fan").
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import conv_norm_act, lift_view

GROUPS = 4  # channel groups per view with their own weights along the ray
HIDDEN = 8  # channels of the per-voxel reading before the logits
# Logits are LOGIT_SCALE * the convolution: AdamW moves a weight by about the learning rate per step, and a leg of
# ~150 steps at 3e-4 would leave logits of ~0.1 -- even weights still. Scaled, the same steps can reach ~1-5.
LOGIT_SCALE = 10.0


class RayPlacement(nn.Module):
    """``(pa (B,C,D,W), lateral (B,C,D,H), coarse (B,1,D,H,W), highpass) -> [pa, lat, pa*lat]`` in 3D, each
    view's features placed along its rays (``(B, 3C, D, H, W)``, as :func:`~ctrefine.models.blocks.fuse_views`)."""

    def __init__(self, channels: int, groups: int = GROUPS):
        super().__init__()
        if channels % groups:
            raise ValueError(f"guidance channels ({channels}) must be divisible by the placement groups ({groups})")
        self.groups = groups
        self.read = conv_norm_act(2 + 3 * channels, HIDDEN, dim=3, k=1)
        self.logits = nn.Conv3d(HIDDEN, 2 * groups, 3, padding=1)
        nn.init.zeros_(self.logits.weight)  # even weights along every ray at initialisation: the plain lifting
        nn.init.zeros_(self.logits.bias)
        self.last_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # kept in training mode for the loss

    def weights(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view ``(B, groups, D, H, W)`` weights, summing along that view's ray axis to its length
        (float32 softmax: bf16 has too few bits to sum 64 terms to 64)."""
        z = LOGIT_SCALE * self.logits(self.read(context)).float()
        pa = torch.softmax(z[:, :self.groups], dim=3) * z.shape[3]  # PA rays run along H
        lat = torch.softmax(z[:, self.groups:], dim=4) * z.shape[4]  # lateral rays along W
        return pa, lat

    def _place(self, lifted: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, c = lifted.shape[:2]
        g = lifted.reshape(b, self.groups, c // self.groups, *lifted.shape[2:]) * w.to(lifted.dtype).unsqueeze(2)
        return g.reshape(lifted.shape)

    def place_lifted(self, p: torch.Tensor, l_: torch.Tensor, coarse: torch.Tensor,
                     highpass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features already spread evenly along their rays (PA ``p`` constant along H, lateral ``l_`` along W,
        ``(B, C, D, H, W)`` each) -> the same features placed along the rays by the learned weights."""
        # the features are read detached: the placement loss teaches where to put them, not what they say
        w_pa, w_lat = self.weights(torch.cat([coarse, highpass, p, l_, p * l_], dim=1).detach())
        self.last_weights = (w_pa, w_lat) if self.training else None
        return self._place(p, w_pa), self._place(l_, w_lat)

    def forward(self, pa: torch.Tensor, lat: torch.Tensor, coarse: torch.Tensor,
                highpass: torch.Tensor) -> torch.Tensor:
        p, l_ = self.place_lifted(lift_view(pa, "pa", lat.shape[-1]), lift_view(lat, "lateral", pa.shape[-1]),
                                  coarse, highpass)
        return torch.cat([p, l_, p * l_], dim=1)
