"""The refiner's loss terms: one registry of name, default weight and function.

The config's ``loss`` section, :class:`~ctrefine.losses.loss.DetailRefinementLoss` and the quality
benchmark's ablation list are all derived from :data:`TERMS`; adding a term means adding one entry
here (and its reference in :mod:`ctrefine.losses.reference`), nothing else.

Default weights are the seed's: L1 anchors intensities; the frequency and gradient terms reward high
frequencies; the texture term matches local contrast; a light consistency term keeps the base's anatomy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import functional, reference

# term(refined, target, coarse) -> scalar
TermFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossTerm:
    name: str
    default_weight: float
    fn: TermFn
    doc: str
    aliases: tuple[str, ...] = ()  # older names accepted in configs


TERMS: dict[str, LossTerm] = {t.name: t for t in (
    LossTerm("l1", 1.0, lambda r, t, c: reference.l1(r, t), "mean |refined - truth|"),
    LossTerm("frequency", 0.5, lambda r, t, c: functional.spectral_l1(r, t),
             "high-pass-weighted spectral L1 (Triton kernel on CUDA)"),
    LossTerm("gradient", 0.3, lambda r, t, c: functional.laplacian_l1(r, t),
             "L1 of the 3D Laplacians (Triton kernel on CUDA)"),
    # The seed calls this "perceptual"; no pretrained weights exist here, so it is named for what it is.
    LossTerm("texture", 0.2, lambda r, t, c: reference.local_stats_loss(r, t),
             "multi-scale local mean/std L1", aliases=("perceptual",)),
    LossTerm("consistency", 0.1, lambda r, t, c: reference.consistency_l1(r, c),
             "L1 of the low-passed refined vs coarse volume"),
)}

DEFAULT_WEIGHTS: dict[str, float] = {name: t.default_weight for name, t in TERMS.items()}
ALIASES: dict[str, str] = {a: name for name, t in TERMS.items() for a in t.aliases}


def canonical_name(name: str) -> str:
    """The registry name of a term given by its name or an alias (``perceptual`` -> ``texture``)."""
    return ALIASES.get(name, name)
