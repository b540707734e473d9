"""Pure-PyTorch reference of the refiner's loss terms -- the truth that the Triton kernels must match.

All terms take ``(B, C, D, H, W)`` model-space volumes and return a scalar mean.

* :func:`laplacian_l1` (the "gradient" term): ``mean |L(pred) - L(target)|`` with the package
  Laplacian (:mod:`ctrefine.stencil`).
* :func:`spectral_l1` (the "frequency" term): mean over the *full* 3D spectrum of
  ``w(f) |F(pred) - F(target)|``, ``F`` = orthonormal ``fftn`` over (D, H, W) (so the value does not
  grow with the volume size), ``w(f) = sigmoid(10 (|f| - 0.1))`` with |f| in cycles/voxel: about 0.27
  at DC, 0.5 at |f| = 0.1, > 0.99 above |f| = 0.56 -- high frequencies dominate.
* :func:`l1`: ``mean |pred - target|`` (the base stage's loss and the refiner's intensity anchor).
* :func:`mse`: ``mean (pred - target)^2`` -- what PSNR and the per-structure squared errors measure. L1's pull
  on a voxel is the same for every error size; this one grows with the error, so it weighs the large errors
  at boundaries (the lung's rim beside ribs and chest wall) that L1 lets stand.
* :func:`soft_l1`: ``l1`` counted again inside flat soft tissue (fat, muscle, organs, blood: an intensity window
  inside the body, its borders left out), against the squared-error terms' habit of spreading small errors over flat tissue.
* :func:`lung_mse`: the same squared error counted only where the truth is lung-dense inside the body (lung and
  airways, found from the truth's intensities, not from labels, so it applies to ingested CTs alike). Added to
  ``mse``, it weighs the lung more: the refiner's rib correction is a blur that spills rib density one voxel into the
  lung, and the pointwise optimum of a uniform weight accepts that spill as the price of the rib.
  :func:`lung_rim_mse` counts only the lung-dense voxels in the chest wall's shell (the lung's rim beside the ribs
  and the wall, :func:`ctrefine.anatomy.chest_wall`), leaving the deep lung and its vessels to ``mse``.
* :func:`local_stats_loss` (the "texture" term, also accepted as "perceptual"). No pretrained network weights can be downloaded
  here, and a VGG trained on photographs is a poor judge of CT texture anyway. This term is what it
  says: L1 between multi-scale local means and local standard deviations (3^3 windows at 1x, 2x, 4x
  down-sampling) of the two volumes. Matching local std is a texture/contrast criterion that a
  blurred prediction fails even when its L1 is small.
* :func:`band_energy_l1` and :func:`gradient_distribution_l1`: detail terms that need no exact phase.
  Every term above is pointwise (in space or frequency), so detail whose exact position the network is
  unsure of is cheapest averaged away -- a blur. These compare *how much* detail there is at each
  scale (log energy per radial band of the spectrum) and *how many* sharp edges (the sorted gradient
  magnitudes: the 1D Wasserstein distance between the two volumes' gradient-magnitude distributions),
  never where: they pull a blurred answer back towards the truth's sharpness.
* :func:`streak_excess`: the other side of not knowing where -- detail seen in one radiograph but not
  placed in depth is cheapest spread along the rays (a band through the lungs at every rib level). It
  compares the share of the correction's detail that is constant along each view's rays with the share in
  the truth's own correction, and charges only the excess. :func:`lung_streak_mismatch` compares the same share inside
  the lung on 45 mm segments of the rays, from both sides: a streak from the hilum across one lung is a small part of
  a whole ray's detail, which the ribs' arcs dominate, but most of a segment's.
* :func:`consistency_l1`: L1 between the 4x-down-sampled (low-pass) refined and coarse volumes. It
  keeps the refiner's anatomy that of the base -- the refiner may add detail, not move organs --
  without penalising the high frequencies it exists to add.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..anatomy import (body_depth, chest_wall, lung_dense, lung_region, lung_structures, soft_core, vessel_crossings,
                       vessel_ghosts)
from ..fourier import NYQUIST_3D, frequency_magnitude, hermitian_multiplicity, radial_bins
from ..stencil import highpass, laplacian3d, ray_constant_energy, ray_segment_share

SPECTRAL_SHARPNESS = 10.0  # slope of the high-pass weight's sigmoid
SPECTRAL_CUTOFF = 0.1  # cycles/voxel where the weight is 0.5
STATS_SCALES = (1, 2, 4)
STATS_WINDOW = 3
ENERGY_BANDS = 8  # radial bands over [0, sqrt(3)/2] cycles/voxel for band_energy_l1
ENERGY_MIN_F = 0.1  # cycles/voxel: bands below this are left to the pointwise terms (they carry position)
CONSISTENCY_POOL = 4  # low-pass factor for the coarse-consistency term (5 mm voxels -> 20 mm blobs at 64^3)

__all__ = ["laplacian3d", "l1", "mse", "lung_mse", "lung_rim_mse", "laplacian_l1", "spectral_weight", "spectral_l1",
           "local_stats_loss", "consistency_l1", "soft_l1", "lung_streak_mismatch",
           "band_energy_l1", "gradient_distribution_l1", "streak_excess"]


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean |pred - target|``, computed in float32."""
    return (pred.float() - target.float()).abs().mean()


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean (pred - target)^2``, computed in float32."""
    return (pred.float() - target.float()).pow(2).mean()


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean mask (pred - target)^2`` over all voxels (float32): the mean is over the whole volume, so a weight on
    it adds to ``mse``'s weight inside the mask."""
    return (mask * (pred.float() - target.float()).pow(2)).mean()


def soft_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean m |pred - target|`` over all voxels, ``m`` = :func:`ctrefine.anatomy.soft_core` of the truth (no
    gradient; float32): a weight ``w`` on it adds ``w`` to ``l1``'s weight inside flat fat, muscle, organs and blood.
    The squared-error terms trade many small errors for a few large ones; in flat soft tissue that trade raises the
    absolute error, and this term prices it back. Borders are left to the squared-error terms (the lung's rim and the
    ribs' edges are where those terms earn their keep)."""
    return (soft_core(target.detach()) * (pred.float() - target.float()).abs()).mean()


def lung_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean m (pred - target)^2`` over all voxels, ``m`` = :func:`ctrefine.anatomy.lung_dense` of the
    truth (no gradient; float32): a weight ``w`` on it adds ``w`` to ``mse``'s weight in the lung."""
    return _masked_mse(pred, target, lung_dense(target.detach()))


def lung_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean m |pred - target|`` over all voxels, ``m`` = :func:`ctrefine.anatomy.lung_region` of the truth (the lung
    with its vessels and nodules; no gradient; float32). The absolute error's optimum is the conditional median: a
    vessel likelier absent than present at a voxel is left out there, where the squared error's optimum (the mean)
    draws it faintly at every place it may be -- around the hilum, a fan of every direction a vessel may take."""
    return (lung_region(target.detach()) * (pred.float() - target.float()).abs()).mean()


def ghost_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`lung_mse`'s form on the truth's two-view ghosts (:func:`ctrefine.anatomy.vessel_ghosts`): the lung voxels
    where a PA shadow of a vessel crosses a lateral one but no vessel is. A refiner that intersects the two views'
    shadows draws a vessel faintly at each crossing; weighed more there, drawing one where it is not costs more
    (float32)."""
    inside, depth = body_depth(target.detach())
    return _masked_mse(pred, target, vessel_ghosts(target.detach(), inside, depth))


def crossing_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of vessel ``logits`` ``(B, 1, D, H, W)`` at the truth's crossings: the lung voxels where a PA
    shadow of the lung's structures crosses a lateral one (:func:`ctrefine.anatomy.vessel_crossings`): 1 on a
    structure, 0 on a ghost. Each class is averaged alone and the two means averaged, so the many ghosts do not
    outvote the vessels (0 with no crossing; float32)."""
    vessel, ghost = vessel_crossings(target)
    z = logits.float()
    loss = z.new_zeros(())
    for mask, label in ((vessel, 1.0), (ghost, 0.0)):
        bce = F.binary_cross_entropy_with_logits(z, torch.full_like(z, label), reduction="none")
        loss = loss + (mask * bce).sum() / mask.sum().clamp_min(1.0) / 2
    return loss


def lung_rim_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`lung_mse` with ``m`` also 0 below the chest wall's shell (:func:`ctrefine.anatomy.chest_wall` of the
    truth's body depth): the lung's rim beside the ribs and the wall, not the deep lung (float32)."""
    inside, depth = body_depth(target.detach())
    return _masked_mse(pred, target, lung_dense(target.detach(), inside) * chest_wall(depth))


def lung_detail_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`lung_mse`'s form on the truth's structures inside the deep lung (:func:`ctrefine.anatomy.lung_structures`:
    vessels, nodules): a squared-error optimum puts a thin structure unsure of its place below the lung's
    threshold everywhere; weighed more, it shows where it is likely (float32)."""
    inside, depth = body_depth(target.detach())
    return _masked_mse(pred, target, lung_structures(target.detach(), inside, depth))


def laplacian_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean |L(pred) - L(target)|``, computed in float32 as ``|L(pred - target)|`` (the Laplacian is linear:
    one stencil instead of two)."""
    return laplacian3d(pred.float() - target.float()).abs().mean()


def spectral_weight(shape, device=None, onesided: bool = False) -> torch.Tensor:
    """High-pass weight ``sigmoid(10 (|f| - 0.1))`` on the (D, H, W) FFT grid (or the rfft half grid).

    Cached per (shape, device, onesided): the loss calls it every step with the same volume size.
    """
    return _spectral_weight(tuple(int(s) for s in shape), torch.device(device or "cpu"), onesided)


@functools.lru_cache(maxsize=16)
def _spectral_weight(shape: tuple, device: torch.device, onesided: bool) -> torch.Tensor:
    mag = frequency_magnitude(shape, onesided, device)
    return torch.sigmoid(SPECTRAL_SHARPNESS * (mag - SPECTRAL_CUTOFF))


def spectral_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the full spectrum of ``w(f) |F(pred) - F(target)|`` (orthonormal FFT, float32), computed as
    ``|F(pred - target)|`` (the transform is linear: one FFT instead of two)."""
    diff = torch.fft.fftn(pred.float() - target.float(), dim=(-3, -2, -1), norm="ortho")
    w = spectral_weight(pred.shape[-3:], pred.device)
    return (w * diff.abs()).mean()


def _local_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pool = lambda v: F.avg_pool3d(v, STATS_WINDOW, stride=1, padding=STATS_WINDOW // 2, count_include_pad=False)  # noqa: E731
    mu = pool(x)
    var = (pool(x * x) - mu * mu).clamp_min(0.0)
    return mu, torch.sqrt(var + 1e-6)  # eps keeps the gradient finite in flat regions


def local_stats_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-scale local mean/std L1 (the texture term standing in for a perceptual loss)."""
    total = pred.new_zeros((), dtype=torch.float32)
    p, t = pred.float(), target.float()
    scales = [s for s in STATS_SCALES if min(p.shape[-3:]) // s >= STATS_WINDOW] or [1]  # small volumes: fewer scales
    for s in scales:
        ps, ts = (F.avg_pool3d(p, s), F.avg_pool3d(t, s)) if s > 1 else (p, t)
        (mp, sp), (mt, st) = _local_stats(ps), _local_stats(ts)
        total = total + (mp - mt).abs().mean() + (sp - st).abs().mean()
    return total / len(scales)


def consistency_l1(refined: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """L1 between low-passed refined and coarse volumes (anatomy preserved, detail free)."""
    k = CONSISTENCY_POOL if min(refined.shape[-3:]) >= CONSISTENCY_POOL else 1
    return F.avg_pool3d(refined.float() - coarse.float(), k).abs().mean()  # pooling is linear: one pass


@functools.lru_cache(maxsize=16)
def _energy_bands(shape: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Band index of every ``rfftn`` bin, each bin's multiplicity (interior bins stand for their mirror)."""
    return radial_bins(shape, ENERGY_BANDS, device), hermitian_multiplicity(shape, device)


def band_energy_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over volumes and bands above :data:`ENERGY_MIN_F` of ``|log E_pred(band) - log E_truth(band)|``,
    ``E`` = the power of the orthonormal spectrum summed over a radial band (float32)."""
    dims = (-3, -2, -1)
    band, mult = _energy_bands(tuple(int(s) for s in pred.shape[-3:]), pred.device)
    keep = [k for k in range(ENERGY_BANDS) if (k + 1) * NYQUIST_3D / ENERGY_BANDS > ENERGY_MIN_F]

    def energy(x):
        p = torch.fft.rfftn(x.float(), dim=dims, norm="ortho").abs().pow(2) * mult
        e = torch.zeros(*p.shape[:-3], ENERGY_BANDS, device=p.device, dtype=p.dtype)
        return e.index_add_(-1, band.flatten(), p.flatten(-3))[..., keep]

    return (torch.log(energy(pred) + 1e-8) - torch.log(energy(target) + 1e-8)).abs().mean()


def _ray_share_log(v: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``log S(v - coarse)`` per volume and view: ``S`` the share of the high-passed correction's energy that is
    constant along the view's rays (the streak index's share, :func:`ctrefine.metrics.streak_index`)."""
    hp = highpass(v.float() - coarse.float())
    return torch.log((ray_constant_energy(hp) + 1e-12) / ((hp * hp).flatten(1).sum(1, keepdim=True) + 1e-12))


def streak_excess(pred: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """Mean over volumes and the two views of ``relu(log S(pred - coarse) - log S(target - coarse))``
    (:func:`_ray_share_log`). A correction smeared along the rays has the truth's ray means but none of its depth
    structure, so its share is higher; only the excess costs (float32)."""
    return F.relu(_ray_share_log(pred, coarse) - _ray_share_log(target, coarse)).mean()


def streak_mismatch(pred: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """Mean over volumes and the two views of ``|log S(pred - coarse) - log S(target - coarse)|``: the
    two-sided :func:`streak_excess`. A correction with less ray-constant detail than the truth's costs too --
    the truth's correction has some (a structure the coarse volume missed along its whole depth), and a
    refiner kept below it has dropped that part (float32)."""
    return (_ray_share_log(pred, coarse) - _ray_share_log(target, coarse)).abs().mean()


def _lung_segment_share_log(v: torch.Tensor, coarse: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
    """``log`` of the high-passed correction's share of energy inside ``lung`` that stays under a running mean over
    45 mm segments of each view's rays (:func:`ctrefine.stencil.ray_segment_share`), ``(B, 2)``."""
    return torch.log(ray_segment_share(highpass(v.float() - coarse.float()) * lung))


def lung_streak_mismatch(pred: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """:func:`streak_mismatch` inside the lung (:func:`ctrefine.anatomy.lung_region` of the truth) on segments of the
    rays, not whole rays: a streak fanning from the hilum across one lung is a small share of a whole ray's detail
    but most of a segment's; the truth's vessels branch, a few voxels along any ray (float32)."""
    lung = lung_region(target.detach())
    return (_lung_segment_share_log(pred, coarse, lung) - _lung_segment_share_log(target, coarse, lung)).abs().mean()


def placement_kl(weights: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor,
                 coarse: torch.Tensor) -> torch.Tensor:
    """How far the refiner's ray placement (:class:`~ctrefine.models.ray_placement.RayPlacement`; per view
    ``(B, G, D, H, W)`` weights summing to the ray's length along its axis, PA along H, lateral along W) is from
    where the detail the coarse volume lacks truly lies: ``e = highpass(target - coarse)^2``, normalised along each
    ray, against the mean of the groups' weights, as ``KL(e's share || placement)`` per ray, summed with each ray
    weighed by its ``e``, mean over the two views (0: every feature placed where the missing detail is; float32).
    Rays without missing detail cost nothing."""
    e = highpass(target.float() - coarse.float()).square()[:, 0]
    kl = []
    for w, axis in zip(weights, (2, 3)):  # (B, D, H, W) after the groups' mean: H is axis 2, W axis 3
        p = w.float().mean(1) / w.shape[axis + 1]
        share = e / (e.sum(axis, keepdim=True) + 1e-20)
        kl.append((torch.xlogy(e, share) - e * torch.log(p.clamp_min(1e-12))).sum() / (e.sum() + 1e-20))
    return (kl[0] + kl[1]) / 2


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Forward-difference gradient magnitude over (D, H, W) (replicate border: zero at the far faces)."""
    g = [torch.diff(x, dim=d, append=x.narrow(d, x.shape[d] - 1, 1)) for d in (-3, -2, -1)]
    return torch.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2 + 1e-12)


def gradient_distribution_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per volume, L1 between the sorted gradient magnitudes of ``pred`` and ``target`` (float32)."""
    gp = torch.sort(gradient_magnitude(pred.float()).flatten(1), dim=1).values
    gt = torch.sort(gradient_magnitude(target.float()).flatten(1), dim=1).values
    return (gp - gt).abs().mean()
