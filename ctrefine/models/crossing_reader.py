"""Reads each lung voxel's two radiograph neighbourhoods together: a vessel, or only two shadows crossing?

A vessel's PA shadow says at which height and width it is, its lateral shadow at which height and depth. Where the
PA shadow of one vessel crosses the lateral shadow of another, both views show density and no vessel is there: a
ghost. Lifted along the rays and summed, the two views paint one at every such crossing -- the hilar fan
(``ctrefine.metrics.ghost_lift``). Telling a vessel from a ghost needs both neighbourhoods at once: whether the
two shadows have the same width, the same strength, the same course over the heights around.

:class:`CrossingReader` describes each view's neighbourhood in 2D (three 3x3 convolutions, dilated 1, 2, 4: 15
pixels across at the volume's size), takes the first layer of a per-voxel reading there too (a linear layer of the
two descriptors is the sum of one of each, so it costs 2D work), lifts both along their rays, adds them, and reads
the sum with two 1x1x1 layers. A small multilayer perceptron per voxel over both views' neighbourhoods. Its last
layer starts at zero, so a trained refiner given one computes the same volume
(``bench/widen_refiner.py --crossing-reader``).

Beside its output the reader reads one more channel from the same hidden layer: a logit that a vessel is at the
voxel, kept in training mode (:attr:`CrossingReader.last_logits`) for the loss term ``crossing_bce``, which teaches
it directly which crossings hold a vessel (``ctrefine.losses.reference.crossing_bce``). The volume never reads it.

The reader's inputs are the same cues the refiner's guidance encoders read (each radiograph and its 2D high-pass),
at the volume's size. Off by default (``model.guidance_crossing="off"``): on the shipped split a 6-epoch leg with it
gains 0.016 dB over one without, and the hilar fan stays (ghost lift +45.5 against +45.0 HU), taught or not
(bench/RESULTS.md, "Detail in place: how far two views can tell a vessel from a ghost").
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import lift_view

DESCRIPTORS = 24  # channels of each view's 2D neighbourhood description
HIDDEN = 32  # width of the per-voxel reading


class CrossingReader(nn.Module):
    """``(pa cues (B,K,D,W), lateral cues (B,K,D,H)) -> (B, out_channels, D, H, W)``; zero at initialisation."""

    def __init__(self, cues: int, out_channels: int, descriptors: int = DESCRIPTORS, hidden: int = HIDDEN):
        super().__init__()
        self.describe = nn.ModuleDict({v: nn.Sequential(
            nn.Conv2d(cues, descriptors, 3, padding=1), nn.SiLU(),
            nn.Conv2d(descriptors, descriptors, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(descriptors, descriptors, 3, padding=4, dilation=4), nn.SiLU(),
            nn.Conv2d(descriptors, hidden, 1)) for v in ("pa", "lateral")})
        self.read = nn.Sequential(nn.SiLU(), nn.Conv3d(hidden, hidden, 1), nn.SiLU(), nn.Conv3d(hidden, out_channels, 1))
        nn.init.zeros_(self.read[-1].weight)  # a refiner given the reader computes the same volume at first
        nn.init.zeros_(self.read[-1].bias)
        self.vessel = nn.Conv3d(hidden, 1, 1)  # the vessel logit, for the crossing_bce term only
        self.last_logits: torch.Tensor | None = None  # kept in training mode for the loss

    def forward(self, pa: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
        first = lift_view(self.describe["pa"](pa), "pa", lateral.shape[-1]) \
            + lift_view(self.describe["lateral"](lateral), "lateral", pa.shape[-1])
        hidden = self.read[:-1](first)
        self.last_logits = self.vessel(hidden) if self.training else None
        return self.read[-1](hidden)
