"""Image-quality metrics on model-space volumes in [0, 1] (:mod:`ctrefine.conventions`), vectorised in torch.

* PSNR = 10 log10(1 / MSE) over the whole 3D volume (data range 1).
* SSIM = 3D SSIM with the defaults of ``skimage.metrics.structural_similarity(data_range=1)``:
  7^3 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N/(N-1)), mean over the valid
  interior (skimage crops (7-1)/2 voxels at each border before averaging).
* MAE = mean |x - y|.
* HF-energy ratio = sum L(pred)^2 / sum L(truth)^2 with the package's 3D Laplacian (1.0 is ideal,
  < 1 blurrier than the truth, > 1 noisier / over-sharpened). It rewards noise as much as detail.
* HF-PSNR = PSNR of the detail band alone: ``hp(x) = x - gaussian(x, sigma = 1 voxel)`` (replicate
  borders, scipy's ``mode="nearest"``, kernel radius 4), ``10 log10(1 / mean((hp(pred) - hp(truth))^2))``.
  It rises only when the detail is *right*: added noise or misplaced edges lower it.
* Band energy ratios ``band_low / band_mid / band_high`` = ``sum |F(pred)|^2 / sum |F(truth)|^2`` over
  radial bands ``|f| < 0.125``, ``0.125 <= |f| < 0.25``, ``|f| >= 0.25`` cycles/voxel (1.0 ideal).

With a label map (``ctrefine.data.phantoms.LABELS``) :func:`label_metrics` adds, on HU volumes:
``bone_dice`` (prediction > 200 HU vs the rib, vertebra and other-bone labels), ``bone_edge_ratio``
(mean gradient magnitude on the bone boundary band, prediction / truth), ``nodule_contrast_ratio``
(nodule minus surrounding-lung mean, prediction / truth) and the mean absolute HU error inside the
lung, vessel, bone and soft-tissue labels, and :func:`ghost_lift` (density drawn where the two views' vessel shadows
cross but no vessel is). A metric whose structure is absent is NaN, never faked.

Each function takes ``(B, 1, D, H, W)`` (or ``(D, H, W)``) tensors and returns one value per volume.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .anatomy import lung_region, shadow_crossings
from .device import metrics_dtype
from .fourier import frequency_magnitude
from .stencil import highpass, laplacian3d, ray_constant_energy, ray_segment_share

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x[None, None]
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(f"{name} must be (D, H, W) or (B, 1, D, H, W), got {tuple(x.shape)}")
    return x.to(metrics_dtype(x.device))


def _pair(pred, target):
    p, t = _as_batch(pred, "pred"), _as_batch(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {tuple(p.shape)} vs target {tuple(t.shape)}")
    if not (torch.isfinite(p).all() and torch.isfinite(t).all()):
        raise ValueError("metrics got NaN or Inf values")
    return p, t


def _psnr_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``10 log10(1 / MSE)`` per volume of two ``(B, ...)`` tensors (data range 1); +inf where they agree."""
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return torch.where(mse > 0, 10.0 * torch.log10(1.0 / mse), torch.full_like(mse, float("inf")))


def psnr(pred, target) -> torch.Tensor:
    """Per-volume PSNR in dB (data range 1); identical volumes give +inf."""
    return _psnr_of(*_pair(pred, target))


def mae(pred, target) -> torch.Tensor:
    p, t = _pair(pred, target)
    return (p - t).abs().flatten(1).mean(1)


def _box_mean(x: torch.Tensor, win: int) -> torch.Tensor:
    """Mean over every ``win^3`` cube of the last three dims, valid interior only (skimage's crop):
    three 1D passes instead of one ``win^3`` pass (21 reads a voxel instead of 343)."""
    for k in ((win, 1, 1), (1, win, 1), (1, 1, win)):
        x = F.avg_pool3d(x, k, stride=1)
    return x


def ssim(pred, target) -> torch.Tensor:
    """Per-volume 3D SSIM matching skimage's defaults with ``data_range=1``."""
    p, t = _pair(pred, target)
    if min(p.shape[-3:]) < SSIM_WIN:
        raise ValueError(f"SSIM needs every side >= {SSIM_WIN}, got {tuple(p.shape[-3:])}")
    n = SSIM_WIN**3
    # the five local means in one separable pass over the stacked maps
    ux, uy, uxx, uyy, uxy = _box_mean(torch.cat([p, t, p * p, t * t, p * t], dim=1), SSIM_WIN).split(1, dim=1)
    cov = n / (n - 1)  # sample covariance, as skimage
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def hf_energy_ratio(pred, target) -> torch.Tensor:
    """Energy of the Laplacian of ``pred`` over that of ``target`` (sharpness; 1.0 is ideal)."""
    p, t = _pair(pred, target)
    ep = laplacian3d(p).pow(2).flatten(1).sum(1)
    et = laplacian3d(t).pow(2).flatten(1).sum(1)
    return ep / et.clamp_min(1e-12)


BANDS = {"band_low": (0.0, 0.125), "band_mid": (0.125, 0.25), "band_high": (0.25, float("inf"))}  # cycles/voxel


def hf_psnr(pred, target) -> torch.Tensor:
    """PSNR of the detail band (see the module docstring); +inf when the bands are identical."""
    p, t = _pair(pred, target)
    return _psnr_of(highpass(p), highpass(t))


def band_ratios(pred, target) -> dict[str, torch.Tensor]:
    """Spectral energy of ``pred`` over that of ``target`` in each radial band of :data:`BANDS`."""
    p, t = _pair(pred, target)
    ep = torch.fft.fftn(p, dim=(-3, -2, -1)).abs().pow(2)
    et = torch.fft.fftn(t, dim=(-3, -2, -1)).abs().pow(2)
    f = frequency_magnitude(p.shape[-3:], device=p.device)
    out = {}
    for name, (lo, hi) in BANDS.items():
        m = (f >= lo) & (f < hi)
        out[name] = ep[..., m].flatten(1).sum(1) / et[..., m].flatten(1).sum(1).clamp_min(1e-12)
    return out


def all_metrics(pred, target) -> dict[str, torch.Tensor]:
    """Every ground-truth metric that needs no labels, per volume, as a dict of float64 tensors."""
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target), "mae": mae(pred, target),
            "hf_ratio": hf_energy_ratio(pred, target), "hf_psnr": hf_psnr(pred, target), **band_ratios(pred, target)}


# ------------------------------------------------------------------------------- with a label map
# Above this a voxel counts as bone. Not 300: cancellous vertebral bone is 100-300 HU in real CT (230 in
# the phantoms), so 300 calls a third of each vertebral body soft tissue; measured on phantoms at 64^3,
# the ground truth's own Dice against the bone labels is 0.87 at 200 HU, 0.82 at 300 and 0.85 at 150
# (costal cartilage, 150 HU, starts to count as bone).
BONE_HU = 200.0
BONE_LABELS = ("rib", "vertebra", "other_bone")
NODULE_SHELL = 2  # voxels of lung around a nodule that make its background
LABEL_MAE = {"lung": ("lung",), "vessel": ("vessel",), "bone": BONE_LABELS,
             "soft": ("heart_blood", "soft_tissue", "fat")}

# Per structure class: (side, HU threshold, the other classes on that side of it). The class's predicted
# mask is every voxel within one voxel (26-neighbourhood) of its true voxels whose predicted HU lies on
# its side of the threshold, leaving out voxels truly labelled with one of those other classes (a rib
# voxel predicted as bone does not count for the vertebra beside it). Dice against the true voxels then
# says whether the structure is resolved where it is: ~0 when the model draws nothing there, and the mean
# training volume shows what position alone gives. Thresholds: bone as BONE_HU; vessels against the lung
# they run in (-850 HU) and soft tissue (40): -400; airway lumen (air, -1000) against its wall: -500.
_DENSE = ("rib", "vertebra", "other_bone", "vessel", "nodule", "heart_blood", "soft_tissue", "fat", "table", "metal")
STRUCTURES = {
    "rib": (">", BONE_HU, ("vertebra", "other_bone", "metal")),
    "vertebra": (">", BONE_HU, ("rib", "other_bone", "metal")),
    "other_bone": (">", BONE_HU, ("rib", "vertebra", "metal")),
    "vessel": (">", -400.0, tuple(n for n in _DENSE if n != "vessel")),
    "airway": ("<", -500.0, ("lung", "gas", "background")),
}


def _cross_dilate(m: torch.Tensor, outside: bool = False, iterations: int = 1) -> torch.Tensor:
    """Binary dilation of a ``(D, H, W)`` bool mask by the 6-neighbour cross (scipy's default structure),
    voxels outside the volume taken as ``outside``."""
    x = m.to(torch.uint8)
    for _ in range(iterations):
        p = F.pad(x[None, None], (1,) * 6, value=int(outside))[0, 0]
        c = p[1:-1, 1:-1, 1:-1]
        x = torch.stack([c, p[:-2, 1:-1, 1:-1], p[2:, 1:-1, 1:-1], p[1:-1, :-2, 1:-1], p[1:-1, 2:, 1:-1],
                         p[1:-1, 1:-1, :-2], p[1:-1, 1:-1, 2:]]).amax(0)
    return x.bool()


def _erode(m: torch.Tensor) -> torch.Tensor:
    """Binary erosion by the cross, outside the volume counting as background (scipy's border_value=0)."""
    return ~_cross_dilate(~m, outside=True)


def _cube_dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(m[None, None].to(torch.float32), 3, 1, 1)[0, 0] > 0


def _masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``v`` over ``m`` (NaN for an empty mask), without a host synchronisation."""
    n = m.sum()
    return torch.where(n > 0, (v * m).sum() / n.clamp(min=1), torch.full_like(n, float("nan"), dtype=v.dtype))


def _grad_mag(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(sum(g**2 for g in torch.gradient(v)))  # central differences, one-sided at the faces


OUTSIDE_BODY = ("background", "table")  # what body-only PSNR leaves out: the air around the patient, the table
HU_PER_UNIT = 2500.0  # model space spans the HU window -1000..1500 (ctrefine.conventions)


def streak_index(correction: torch.Tensor) -> torch.Tensor:
    """How much of a correction's detail is smeared along the rays: ``(B, 1, D, H, W)`` -> ``(B,)`` in [0, 1].

    The correction (a volume minus the coarse one) is high-passed (:func:`highpass`: its detail); for each
    view, the share of that detail's energy that is constant along the view's rays (its mean along H for
    PA, along W for the lateral, spread back); the index is the mean of the two shares. A 2D pattern copied
    along the rays -- what lifting a radiograph's detail through the body without placing it in depth
    gives -- scores 1 for that view; detail placed on anatomy, a few voxels deep along each ray, scores
    about its depth over the ray's length. Read against the truth's own correction (truth − coarse), which
    has the right amount of depth structure."""
    hp = highpass(_as_batch(correction, "correction").to(metrics_dtype(correction.device)))
    total = (hp * hp).flatten(1).sum(1).clamp_min(1e-20)
    return ray_constant_energy(hp).mean(dim=1) / total


def lung_streak_index(correction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """How much of a correction's detail *inside the lung* is smeared along 45 mm segments of the rays: ``(B, 1, D,
    H, W)`` -> ``(B,)`` in [0, 1]. :func:`streak_index` on ray segments (:func:`ctrefine.stencil.ray_segment_share`)
    and only inside the truth's lung (:func:`ctrefine.anatomy.lung_region`, from its intensities): a streak fanning
    from the hilum across one lung is a small share of a whole ray's detail, where the ribs' arcs dominate, but most
    of a segment's in the lung. Read against the truth's own correction, whose vessels branch across the rays."""
    dtype = metrics_dtype(correction.device)
    lung = lung_region(_as_batch(truth, "truth").to(dtype))
    return ray_segment_share(highpass(_as_batch(correction, "correction").to(dtype)) * lung).mean(dim=1)


def lung_detail_alignment(correction: torch.Tensor, truth_correction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Whether a correction's detail *inside the lung* lies where the truth's does: ``(B, 1, D, H, W)`` -> ``(B,)`` in
    [-1, 1], the cosine between the two corrections' high-passed detail (:func:`highpass`) over the truth's lung
    (:func:`ctrefine.anatomy.lung_region`). 1: the truth's own pattern (at any strength); ~0: detail at the wrong
    place or depth -- the same vessel tree a few voxels off along the rays already scores near 0, so it separates
    detail placed in depth from detail that only matches the radiographs; NaN where either has no detail there."""
    dtype = metrics_dtype(correction.device)
    lung = lung_region(_as_batch(truth, "truth").to(dtype))
    a = (highpass(_as_batch(correction, "correction").to(dtype)) * lung).flatten(1)
    b = (highpass(_as_batch(truth_correction, "truth_correction").to(dtype)) * lung).flatten(1)
    norm = torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    return torch.where(norm > 0, (a * b).sum(1) / norm.clamp_min(1e-30), torch.full_like(norm, float("nan")))


def error_by_class(pred_hu, truth_hu, labels, table: dict) -> dict[str, float]:
    """``sse_<class>``: the squared error (model units) summed over each labelled class, for the error budget
    of a report (each class's share of a volume's error, and refined over coarse); one host transfer."""
    pred_hu, truth_hu, labels = torch.as_tensor(pred_hu), torch.as_tensor(truth_hu), torch.as_tensor(labels)
    err = ((pred_hu.to(metrics_dtype(pred_hu.device)) - truth_hu.to(pred_hu.device)) / HU_PER_UNIT) ** 2
    labels = labels.to(err.device).long().flatten()
    sums = torch.zeros(256, dtype=err.dtype, device=err.device).index_add_(0, labels, err.flatten()).tolist()
    return {f"sse_{name}": sums[int(k)] for k, name in table.items()}


def body_psnr(pred_hu, truth_hu, labels, table: dict) -> torch.Tensor:
    """PSNR (model units, data range 1) over the patient's own voxels: every label but :data:`OUTSIDE_BODY`."""
    outside = [int(k) for k, name in table.items() if name in OUTSIDE_BODY]
    body = ~torch.isin(labels, torch.tensor(outside, dtype=labels.dtype, device=labels.device))
    mse = _masked_mean(((pred_hu - truth_hu) / HU_PER_UNIT) ** 2, body)
    return -10.0 * torch.log10(mse.clamp_min(1e-20))


def label_metrics(pred_hu, truth_hu, labels, table: dict) -> dict[str, float]:
    """Structure-aware metrics of one volume: HU ``(D, H, W)`` arrays or tensors (computed where the tensors
    are, float32 on an accelerator, one host transfer at the end); ``table``: label id -> name."""
    pred_hu = torch.as_tensor(pred_hu)
    pred_hu = pred_hu.to(metrics_dtype(pred_hu.device))
    truth_hu = torch.as_tensor(truth_hu).to(pred_hu.device, pred_hu.dtype)
    labels = torch.as_tensor(labels).to(pred_hu.device)
    ids = {name: int(k) for k, name in table.items()}
    nan = torch.full((), float("nan"), dtype=pred_hu.dtype, device=pred_hu.device)

    def mask(names):
        wanted = [ids[n] for n in names if n in ids]
        return torch.isin(labels, torch.tensor(wanted, dtype=labels.dtype, device=labels.device))

    grads = (_grad_mag(pred_hu), _grad_mag(truth_hu))
    out = {}
    bone, pred_bone = mask(BONE_LABELS), pred_hu > BONE_HU
    out["bone_dice"] = torch.where(bone.any(), 2 * (bone & pred_bone).sum() / (bone.sum() + pred_bone.sum()).clamp(min=1), nan)
    out["bone_edge_ratio"] = _edge_ratio(bone, grads)
    nod = mask(("nodule",))
    shell = _cross_dilate(nod, iterations=NODULE_SHELL) & mask(("lung",))
    c_true = _masked_mean(truth_hu, nod) - _masked_mean(truth_hu, shell)
    c_pred = _masked_mean(pred_hu, nod) - _masked_mean(pred_hu, shell)
    out["nodule_contrast_ratio"] = torch.where(c_true.abs() > 1e-6, c_pred / c_true, nan)
    err = (pred_hu - truth_hu).abs()
    for key, names in LABEL_MAE.items():
        out[f"mae_hu_{key}"] = _masked_mean(err, mask(names))
    out.update(structure_metrics(pred_hu, labels, grads, mask))
    out["spine_profile_corr"] = spine_profile_corr(pred_hu, truth_hu, mask(("vertebra",)))
    out["body_psnr"] = body_psnr(pred_hu, truth_hu, labels, table)
    out["ghost_lift"] = ghost_lift(pred_hu, truth_hu, mask(GHOST_SOURCES), mask(GHOST_LUNG))
    values = torch.stack([v.to(pred_hu.dtype) for v in out.values()]).tolist()
    return dict(zip(out, values))


GHOST_LUNG = ("lung", "airway", "vessel", "nodule")  # the lung with everything inside it
GHOST_SOURCES = ("vessel", "nodule")  # the lung's dense structures, whose shadows both radiographs carry


def ghost_lift(pred_hu: torch.Tensor, truth_hu: torch.Tensor, sources: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
    """Density drawn at the two-view ghosts of the lung's vessels: mean ``pred - truth`` (HU) over
    :func:`ctrefine.anatomy.shadow_crossings` of ``sources`` in ``lung`` (the lung voxels off every vessel and its
    one-voxel rim whose PA ray and lateral ray both cross one). A refiner that cannot tell which crossings hold a
    vessel draws the others faintly -- the fan of lines from the hilum. The truth reads 0; a refiner should not read
    above the coarse volume. NaN where the set is empty."""
    return _masked_mean(pred_hu - truth_hu, shadow_crossings(sources, lung) > 0)


def _edge_ratio(truth: torch.Tensor, grads) -> torch.Tensor:
    """Mean gradient magnitude, predicted over true, on the band straddling ``truth``'s boundary."""
    band = _cross_dilate(truth) & ~_erode(truth)
    return _masked_mean(grads[0], band) / _masked_mean(grads[1], band).clamp(min=1e-9)


SPINE_DETREND = 5  # slices (25 mm at 64^3): about one vertebra and its disc, the period the profile should show


def spine_profile_corr(pred_hu: torch.Tensor, truth_hu: torch.Tensor, vertebra: torch.Tensor) -> torch.Tensor:
    """Are the vertebrae resolved one by one, not as a smooth column? The mean HU of each axial slice over
    the spine's footprint (every in-plane position a vertebra label reaches on some slice), over the slices
    the spine spans, minus its :data:`SPINE_DETREND`-slice moving average; then the correlation of the
    predicted profile with the true one. A column without vertebral bodies and discs scores ~0; a spine
    whose bodies and discs sit where the truth's do scores near 1. NaN without a vertebra label."""
    nan = torch.full((), float("nan"), dtype=pred_hu.dtype, device=pred_hu.device)
    foot = vertebra.any(dim=0)
    zs = vertebra.flatten(1).any(dim=1).nonzero()  # one host read a volume: the profile's length depends on it
    if len(zs) == 0:
        return nan
    lo, hi = int(zs[0]), int(zs[-1]) + 1  # the discs between the first and last vertebra included

    def profile(v):
        p = (v[lo:hi] * foot).sum(dim=(1, 2)) / foot.sum()
        k = SPINE_DETREND
        smooth = F.avg_pool1d(F.pad(p[None, None], (k // 2, k // 2), mode="replicate"), k, 1)[0, 0]
        return p - smooth
    a, b = profile(pred_hu), profile(truth_hu)
    den = torch.sqrt((a * a).sum() * (b * b).sum())
    return torch.where(den > 0, (a * b).sum() / den.clamp(min=1e-12), torch.zeros_like(den))


def structure_metrics(pred_hu, labels, grads, mask) -> dict[str, torch.Tensor]:
    """``dice_<class>`` (the predicted mask as :data:`STRUCTURES` defines it) and ``edge_<class>``
    (:func:`_edge_ratio` on the class) per class; NaN where the volume has none of the class."""
    out = {}
    for name, (side, hu, others) in STRUCTURES.items():
        truth = mask((name,))
        near = _cube_dilate(truth) & ~mask(others)
        pred = near & ((pred_hu > hu) if side == ">" else (pred_hu < hu))
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum()).clamp(min=1)
        present = truth.any()
        out[f"dice_{name}"] = torch.where(present, dice.to(pred_hu.dtype), torch.full_like(dice, float("nan"), dtype=pred_hu.dtype))
        out[f"edge_{name}"] = _edge_ratio(truth, grads)
    return out
