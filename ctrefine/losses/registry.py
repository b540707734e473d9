"""The refiner's loss terms: one registry of name, default weight and function.

The config's ``loss`` section, :class:`~ctrefine.losses.loss.DetailRefinementLoss` and the quality
benchmark's ablation list are all derived from :data:`TERMS`; adding a term means adding one entry
here (and its reference in :mod:`ctrefine.losses.reference`), nothing else.

The five core terms (L1, frequency, gradient, texture, consistency) and their weights: L1 anchors
intensities; the frequency and gradient terms reward high frequencies; the texture term matches local
contrast; a light consistency term keeps the base's anatomy. The terms added since (X-ray consistency,
band energy, gradient distribution, streak, streak_match, lung_streak_match, mse, soft_l1, lung_mse, lung_rim_mse,
lung_detail_mse, lung_l1, ghost_mse, placement, adversarial) carry the defaults the 64^3 ablations support (below, and
bench/RESULTS-history.md section 10).

A term is ``fn(refined, target, coarse, ctx)``; ``ctx`` is a :class:`TermContext`: what some terms
need beyond the three volumes (the batch's normalised radiographs and the re-projector of the
dataset's geometry; the adversarial critic). A term whose input is missing says so.

Importing this table imports no torch: the config schema is built from it (``ctrefine.config``), and
each term's implementation is imported the first time the term is computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from ..reprojection import SliceProjector
    from .adversarial import AdversarialCritic

# Defaults of the further terms, from the 64^3 ablations (bench/RESULTS-history.md section 10, 26 test
# patients, 12 epochs each): xray_consistency is worth +0.19 dB (all terms +0.73 vs without it +0.54); with the
# refiner's depth cues (density-weighted SIRT, the residual product; bench/RESULTS.md, "Detail in place") 0.3
# beats 1.0 -- matching the projections is also satisfied by smearing along the rays, and at 0.3 the lung and
# soft-tissue errors and the vessel Dice improve at the same PSNR (13 test patients, 6 epochs each). band_energy
# (at 0.005) keeps the refined volume at least as sharp as the coarse one: fine-tuning the shipped refiner on unseen
# patients without it ends smoother than the coarse volume in the top band (0.536 vs 0.577, +1.44 dB), with it
# sharper (0.618, +1.33 dB, rib Dice 0.235 -> 0.266; bench/RESULTS.md, "Detail in place"); a gain with a smoother
# output is not a refinement. gradient_distribution stays off (-0.18 dB of HF-PSNR in section 10). streak at 0.002
# brought the correction's ray-constant share of detail to the truth's own (0.036 vs 0.039; 0.044 without it) for
# 0.04 dB; 0.01 overshoots (0.027) and costs 0.12 dB and lung error: the smear it removes was partly right
# (bench/RESULTS.md, "Detail in place"). mse weighs the large errors L1 lets stand (the lung's rim beside the
# ribs and chest wall): at 5, +0.12 dB, lung and soft-tissue MAE below the coarse volume's, the top band still above
# it; at 20 the output ends smoother than the coarse volume, and raising band_energy to hold it costs lung MAE
# and rib Dice (bench/RESULTS.md, "Detail in place: squared error"). With the lung terms below, 10 (from 5) is
# +0.037 dB on the shipped split (24 of 26) and takes back two thirds of the soft-tissue MAE lung_mse costs
# (bench/RESULTS.md, "Detail in place: the vessels and the streak share"). band_energy 0.01 (from 0.0075) holds the
# demo's top band above the coarse volume's on either inference path (0.598 against 0.576 in fp32; at 0.0075 the two
# were within a thousandth and OpenVINO's bf16 put the refined one below) for 0.037 dB on the shipped split
# (bench/RESULTS.md, "Detail in place: the top band's margin, and the vessels drawn where they are likely").
XRAY_CONSISTENCY_WEIGHT = 0.3
BAND_ENERGY_WEIGHT = 0.01
GRADIENT_DISTRIBUTION_WEIGHT = 0.0
# The one-sided streak term lets a correction fall below the truth's ray-constant share (0.88x on the shipped
# split); streak_match holds it to the truth's from both sides (bench/RESULTS.md, "Detail in place: the vessels
# and the streak share"), so streak is off. Its |log| ratio pulls each correction towards the truth's share in log
# terms -- their geometric mean, below the arithmetic one the report compares (the truth's shares are right-skewed) --
# so beside lung_streak_match it is 0.001: at 0.002 the whole-ray index ends at 0.90x the truth's, at 0.003 at 0.87x
# (with soft_l1 4), at 0.001 at 0.92x (bench/RESULTS.md, "Detail in place: the soft tissue's absolute error, and
# streaks across one lung").
STREAK_WEIGHT = 0.0
STREAK_MATCH_WEIGHT = 0.001
# lung_streak_match 0.005 holds the share of the lung's detail along 45 mm ray segments to the truth's: a streak from
# the hilum across one lung is a small part of a whole ray's detail, which the ribs' arcs dominate, but most of a
# segment's. On the shipped split the lung streak index falls from 1.11x the truth's to 1.04x (patients above 1.1x: 13
# -> 4 of 26) at the same PSNR.
LUNG_STREAK_MATCH_WEIGHT = 0.005
MSE_WEIGHT = 10.0
# lung_rim_mse 30 counts the squared error again in the lung's rim inside the chest wall, where the refiner's
# blurred rib correction spills rib density into the lung: on the shipped split the lung's squared error falls from
# 0.864x to 0.785x the coarse volume's at the same PSNR (-0.005 dB), the vessel Dice above the mean volume's.
# Weighing the whole lung alone (lung_mse) fades the vessels deep in it: at 10, vessel Dice 0.114 -> 0.097, below
# the mean volume's (bench/RESULTS.md, "Detail in place: the lung weighed more"). lung_detail_mse 60 weighs the
# vessels and nodules inside the deep lung: on the demo's patients vessel Dice 0.101 -> 0.189 (the mean volume's
# 0.107) for 5.6 HU of lung MAE; band_energy 0.0075 (from 0.005) keeps the top band above the coarse volume's with
# it (0.574 -> 0.603, coarse 0.576) for 0.04 dB. On the shipped split that pair lifts the lung around the vessels
# (lung squared error 0.785x -> 0.826x the coarse volume's); lung_mse 10 beside it takes that back (0.779x) with the
# vessel Dice still 0.170 (bench/RESULTS.md, "Detail in place: the vessels and the streak share"). Weighed 60 against
# the lung's 10, a vessel missed costs 70 and a vessel drawn where there is none 20. At 30 the lung MAE falls 1.9 HU (on
# all 26 of the shipped split) and the lung's squared error 0.788x -> 0.772x the coarse volume's, for vessel Dice
# 0.163 -> 0.138 (the mean volume's 0.101) (bench/RESULTS.md, "Detail in place: the top band's margin, and the
# vessels drawn where they are likely"). It does not draw the hilar fan: at 0 the fan stays and the vessel Dice
# falls to 0.105 (bench/RESULTS.md, "Detail in place: each lifted feature placed in depth").
LUNG_MSE_WEIGHT = 10.0
LUNG_RIM_MSE_WEIGHT = 30.0
LUNG_DETAIL_MSE_WEIGHT = 30.0
# soft_l1 counts the absolute error again inside flat soft tissue: the squared-error terms trade many small errors
# there for a few large ones, raising the soft-tissue MAE above the coarse volume's (71.65 against 71.39 HU on the
# shipped split); with it 70.89 (17 of 26 below the coarse volume's) at the same PSNR. Over the whole soft-tissue
# window, borders included, it costs the rib Dice (0.320 -> 0.283) and the lung's squared error (0.782x -> 0.814x).
# With band_energy 0.01 the soft-tissue MAE is back at the coarse volume's (71.37 against 71.39 HU); at 3 it is 71.05.
SOFT_L1_WEIGHT = 3.0
# lung_l1 counts the absolute error again inside the lung with its vessels (ctrefine.anatomy.lung_region): there the
# squared-error terms' optimum is the mean, which draws a vessel faintly wherever it may be; weighed above them, the
# optimum is the median, which leaves out a vessel likelier absent than present. Off: at 20 on the shipped split the
# lung parenchyma far from vessels is no longer lifted (+10.2 -> -2.7 HU against the truth), lung MAE 88.9 -> 85.7 HU,
# but -0.034 dB (+1.187) and vessel Dice 0.137 -> 0.110, and the hilar fan stays (bench/RESULTS.md, "Detail in
# place: a refiner that never drew the fan, the residual placed in depth, and the lung's median").
LUNG_L1_WEIGHT = 0.0
# ghost_mse counts the squared error again at the lung voxels where a PA shadow of a vessel crosses a lateral one but
# no vessel is (ctrefine.anatomy.vessel_ghosts): where intersecting the two views draws the hilar fan. Off: at 300 on
# the shipped split it cuts the refined volume's vessel ghost lift by a third (+45.0 -> +30.3 HU; coarse +8.6) for
# -0.003 dB, but vessel Dice 0.139 -> 0.106 (the mean volume's 0.101); at 30 it barely moves it (+42.7). See
# bench/RESULTS.md, "Detail in place: the fan measured as the two views' ghosts".
GHOST_MSE_WEIGHT = 0.0
# placement teaches model.guidance_depth="cross-view" where along each ray the detail the coarse volume lacks lies.
# Off: at 0.01 the placement learns the PA depths (KL 1.66 -> 1.09 nats; lateral 1.66 -> 1.40), but the refined
# volume loses 0.02-0.03 dB and the lung detail alignment 0.516 -> 0.510 on the shipped split, and the hilar fan
# stays (bench/RESULTS.md, "Detail in place: each lifted feature placed in depth").
PLACEMENT_WEIGHT = 0.0
# crossing_bce teaches model.guidance_crossing="mlp"'s vessel logit which crossings of the two views' vessel shadows
# hold a vessel. Off: with the reader taught first (bench/pretrain_crossing_reader.py: logit AUC 0.775 vessel vs ghost)
# and the term at 0.02, a 6-epoch leg refines as the untaught reader does (+1.254 against +1.255 dB, ghost lift +45.0
# HU); the volume does not take up what the reader knows (bench/RESULTS.md, "Detail in place: how far two views can
# tell a vessel from a ghost").
CROSSING_BCE_WEIGHT = 0.0
# Off by default: the optional knob between fidelity and sharpness (a GAN critic trained alongside). 64^3
# ablation (bench/RESULTS-history.md section 10): 0.01 -> bone edge ratio 0.48 -> 0.63 and high band
# +0.15 for -0.35 dB; 0.1 does not train stably in 12 epochs (+0.09 dB, 18/26 wins).
ADVERSARIAL_WEIGHT = 0.0


@dataclass(frozen=True)
class TermContext:
    """What some terms need beyond the three volumes: normalised radiographs ``(B, 2, 1, S, S)`` and the
    :class:`~ctrefine.reprojection.SliceProjector` of their geometry (``xray_consistency``), and the
    critic trained alongside (``adversarial``)."""

    images: torch.Tensor | None = None
    projector: SliceProjector | None = None
    critic: AdversarialCritic | None = None
    kernels: bool = False  # the Triton loss kernels instead of their references (the run's device.Kernels.loss)
    placement: tuple[torch.Tensor, torch.Tensor] | None = None  # the refiner's ray-placement weights of this batch
    crossing: torch.Tensor | None = None  # the refiner's crossing-reader vessel logits of this batch


# term(refined, target, coarse, context) -> scalar tensor
TermFn = Callable[[Any, Any, Any, TermContext], Any]


def _reference():
    from . import reference

    return reference


def _functional():
    from . import functional

    return functional


def _consistency_with(r: torch.Tensor, ctx: TermContext) -> torch.Tensor:
    from ..reprojection import xray_consistency

    if ctx.images is None or ctx.projector is None:
        raise ValueError("the xray_consistency term needs the batch's radiographs")
    return xray_consistency(ctx.projector, r, ctx.images).mean()


def _placement(r: torch.Tensor, t: torch.Tensor, c: torch.Tensor, ctx: TermContext) -> torch.Tensor:
    if ctx.placement is None:  # a refiner that spreads its lifted features evenly has no placement to teach
        return r.new_zeros(()).float()
    return _reference().placement_kl(ctx.placement, t, c)


def _crossing_bce(r: torch.Tensor, t: torch.Tensor, ctx: TermContext) -> torch.Tensor:
    if ctx.crossing is None:  # a refiner without a crossing reader has no vessel logits to teach
        return r.new_zeros(()).float()
    return _reference().crossing_bce(ctx.crossing, t)


def _adversarial(r: torch.Tensor, c: torch.Tensor, ctx: TermContext) -> torch.Tensor:
    if ctx.critic is None:
        raise ValueError("the adversarial term needs a critic (DetailRefinementLoss builds one when its weight is > 0)")
    return ctx.critic.generator_loss(r, c)


@dataclass(frozen=True)
class LossTerm:
    name: str
    default_weight: float
    fn: TermFn
    doc: str
    aliases: tuple[str, ...] = ()  # older names accepted in configs


TERMS: dict[str, LossTerm] = {t.name: t for t in (
    LossTerm("l1", 1.0, lambda r, t, c, x: _reference().l1(r, t), "mean |refined - truth|"),
    LossTerm("mse", MSE_WEIGHT, lambda r, t, c, x: _reference().mse(r, t), "mean (refined - truth)^2"),
    LossTerm("soft_l1", SOFT_L1_WEIGHT, lambda r, t, c, x: _reference().soft_l1(r, t),
             "mean |refined - truth| where the truth is soft tissue inside the body (fat, muscle, organs, blood)"),
    LossTerm("lung_mse", LUNG_MSE_WEIGHT, lambda r, t, c, x: _reference().lung_mse(r, t),
             "mean (refined - truth)^2 where the truth is lung-dense inside the body (the lung weighed more)"),
    LossTerm("lung_rim_mse", LUNG_RIM_MSE_WEIGHT, lambda r, t, c, x: _reference().lung_rim_mse(r, t),
             "lung_mse counted only in the chest wall's shell (the lung's rim beside ribs and wall, not the deep lung)"),
    LossTerm("lung_detail_mse", LUNG_DETAIL_MSE_WEIGHT, lambda r, t, c, x: _reference().lung_detail_mse(r, t),
             "lung_mse counted only on the dense structures inside the deep lung (vessels, nodules)"),
    LossTerm("lung_l1", LUNG_L1_WEIGHT, lambda r, t, c, x: _reference().lung_l1(r, t),
             "mean |refined - truth| in the lung with its vessels (its optimum the median: no vessel drawn faintly "
             "wherever it may be)"),
    LossTerm("ghost_mse", GHOST_MSE_WEIGHT, lambda r, t, c, x: _reference().ghost_mse(r, t),
             "lung_mse counted only where both views' vessel shadows cross but no vessel is (the two views' ghosts)"),
    LossTerm("frequency", 0.5, lambda r, t, c, x: _functional().spectral_l1(r, t, x.kernels),
             "high-pass-weighted spectral L1 (Triton kernel on CUDA)"),
    LossTerm("gradient", 0.3, lambda r, t, c, x: _functional().laplacian_l1(r, t, x.kernels),
             "L1 of the 3D Laplacians (Triton kernel on CUDA)"),
    # Also accepted as "perceptual"; no pretrained weights exist here, so it is named for what it is.
    LossTerm("texture", 0.2, lambda r, t, c, x: _reference().local_stats_loss(r, t),
             "multi-scale local mean/std L1", aliases=("perceptual",)),
    LossTerm("consistency", 0.1, lambda r, t, c, x: _reference().consistency_l1(r, c),
             "L1 of the low-passed refined vs coarse volume"),
    LossTerm("xray_consistency", XRAY_CONSISTENCY_WEIGHT, lambda r, t, c, x: _consistency_with(r, x),
             "mean |normalised input radiograph - fitted re-projection of the refined volume| (needs no truth)"),
    LossTerm("band_energy", BAND_ENERGY_WEIGHT, lambda r, t, c, x: _reference().band_energy_l1(r, t),
             "L1 of log radial power per frequency band (phase-free: rewards detail at the right scale)"),
    LossTerm("gradient_distribution", GRADIENT_DISTRIBUTION_WEIGHT,
             lambda r, t, c, x: _reference().gradient_distribution_l1(r, t),
             "L1 between sorted gradient magnitudes (phase-free: as many sharp edges as the truth)"),
    LossTerm("streak", STREAK_WEIGHT, lambda r, t, c, x: _reference().streak_excess(r, t, c),
             "log-excess of the correction's ray-constant share of detail over the truth's (no smearing along the rays)"),
    LossTerm("streak_match", STREAK_MATCH_WEIGHT, lambda r, t, c, x: _reference().streak_mismatch(r, t, c),
             "|log| ratio of the correction's ray-constant share of detail to the truth's (as much as the truth's)"),
    LossTerm("lung_streak_match", LUNG_STREAK_MATCH_WEIGHT,
             lambda r, t, c, x: _reference().lung_streak_mismatch(r, t, c),
             "streak_match inside the lung on 45 mm segments of the rays (no streak fanning across one lung)"),
    LossTerm("crossing_bce", CROSSING_BCE_WEIGHT, lambda r, t, c, x: _crossing_bce(r, t, x),
             "cross-entropy of the crossing reader's vessel logit where both views' vessel shadows cross: a vessel or "
             "a ghost (model.guidance_crossing=mlp; 0 without it)"),
    LossTerm("placement", PLACEMENT_WEIGHT, lambda r, t, c, x: _placement(r, t, c, x),
             "KL from where along each ray the detail the coarse volume lacks lies to the refiner's ray placement "
             "(model.guidance_depth=cross-view; 0 without it)"),
    LossTerm("adversarial", ADVERSARIAL_WEIGHT, lambda r, t, c, x: _adversarial(r, c, x),
             "softplus(-critic(refined | coarse)): a 3D patch critic's verdict that the correction looks true"),
)}

DEFAULT_WEIGHTS: dict[str, float] = {name: t.default_weight for name, t in TERMS.items()}
ALIASES: dict[str, str] = {a: name for name, t in TERMS.items() for a in t.aliases}


def canonical_name(name: str) -> str:
    """The registry name of a term given by its name or an alias (``perceptual`` -> ``texture``)."""
    return ALIASES.get(name, name)
