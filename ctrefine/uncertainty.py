"""Per-voxel uncertainty of the refined volume, calibrated: where the reconstruction can be trusted.

Along each ray the radiographs say how much attenuation there is, not where: a volume reconstructed
from two of them is firm in some places and guessed in others. The guess shows as *sensitivity*: the
pipeline is re-run on ``passes`` copies of its radiographs, each perturbed within the imaging-chain
ranges of :class:`ctrefine.config.AugmentConfig` (detector blur, quantum noise, display gamma), and
the root-mean-square deviation of those refined volumes from the unperturbed one is the raw spread
``r`` (model units). The answer itself is always the unperturbed pass, so the volume does not change.

Measured on validation patients, that spread alone ranks voxels by their error only weakly (rank
correlation ~0.31 for the narrow pair): at 5 mm most error sits on edges placed a voxel off. So the raw
signal adds two things the pipeline knows without ground truth: the local edge strength of the answer
(Sobel gradient magnitude, HU a voxel: a misplaced edge costs its contrast) and the size of the
refiner's correction ``|refined - coarse|`` (where it changed most, it is least sure) --
``raw = spread + w_grad * |grad| + w_corr * |correction|`` (0.43 with the weights the fit picks there).
It becomes an error bar on validation patients (:func:`fit`): the weights that rank the body's voxels
best, then ``sigma = sqrt((scale * raw)^2 + floor^2)`` fitted to the 90th percentile of |error| in ten
bins of ``raw``, then one factor on both so that the body's 90 % interval ``+-1.645 sigma`` holds 90 %. The
:class:`Calibration` lives in the refiner's model file (``uncertainty``; ``bench/calibrate_uncertainty.py``
writes it), with the validation patients' mean sigma, so a user's radiographs -- no ground truth -- can
be placed among them (:meth:`Calibration.percentile`). A refiner file without one infers as before,
without uncertainty.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .conventions import HU_MAX, HU_MIN
from .data.augment import gaussian_blur
from .errors import DataError

PASSES = 4  # perturbed passes per volume (the budget: at most four)
Z90 = 1.6448536  # half-width of a central 90 % Gaussian interval, in standard deviations
BODY_HU = -950.0  # voxels denser than this (in truth or prediction) are the body: calibration ignores air


@dataclass(frozen=True)
class Calibration:
    """How raw spread becomes a standard deviation in HU, fitted on validation patients."""

    scale: float
    floor_hu: float
    passes: int = PASSES
    seed: int = 0
    val_mean_std_hu: tuple[float, ...] = ()  # per validation patient: the mean sigma in the body
    w_grad: float = 0.0  # weight of the answer's edge strength in the raw signal
    w_corr: float = 0.0  # weight of the refiner's correction |refined - coarse|

    def as_dict(self) -> dict:
        return {**asdict(self), "val_mean_std_hu": list(self.val_mean_std_hu)}

    @classmethod
    def from_dict(cls, raw, source: str) -> "Calibration":
        try:
            cal = cls(float(raw["scale"]), float(raw["floor_hu"]), int(raw["passes"]), int(raw.get("seed", 0)),
                      tuple(float(v) for v in raw.get("val_mean_std_hu", ())), float(raw.get("w_grad", 0.0)),
                      float(raw.get("w_corr", 0.0)))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{source}: its uncertainty calibration is malformed") from None
        if not (all(math.isfinite(v) and v >= 0 for v in (cal.scale, cal.floor_hu, cal.w_grad, cal.w_corr))
                and 1 <= cal.passes <= 16):
            raise DataError(f"{source}: its uncertainty calibration is out of range ({cal.scale}, {cal.floor_hu}, "
                            f"{cal.passes} passes)")
        return cal

    def std_hu(self, raw_hu):
        """Raw signal (HU, :func:`raw_signal`) -> predicted standard deviation in HU."""
        return ((self.scale * raw_hu) ** 2 + self.floor_hu ** 2) ** 0.5

    def raw(self, sig: dict) -> np.ndarray:
        return raw_signal(sig, self.w_grad, self.w_corr)

    def percentile(self, mean_std_hu: float) -> float | None:
        """Where a volume's mean sigma falls among the validation patients' (0-100), or None without them."""
        if not self.val_mean_std_hu:
            return None
        return float(100.0 * np.mean(np.asarray(self.val_mean_std_hu) <= mean_std_hu))


def perturb(xrays: torch.Tensor, gen: torch.Generator, aug) -> torch.Tensor:
    """Normalised ``(B, 2, 1, S, S)`` radiographs, each image perturbed within ``aug``'s ranges: detector
    blur up to ``blur_px``, Gaussian noise of a detector with ``photons_min..photons_max`` photons a pixel
    (std ``1/sqrt(N0)`` on the normalised image), display gamma within ``1 +- gamma_jitter``."""
    shape = xrays.shape
    x = xrays.reshape(-1, shape[-2], shape[-1]).float()
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * aug.blur_px
    x = gaussian_blur(x.double(), sigma.double()).float()
    log_n0 = math.log(aug.photons_min) + torch.rand(n, generator=gen) * math.log(aug.photons_max / aug.photons_min)
    x = x + torch.randn(x.shape, generator=gen) * torch.exp(-0.5 * log_n0).view(-1, 1, 1)
    jit = math.log1p(aug.gamma_jitter)
    gamma = torch.exp((2 * torch.rand(n, generator=gen) - 1) * jit).view(-1, 1, 1)
    return x.clamp_min(0.0).pow(gamma).reshape(shape)


def raw_spread(predictor, xrays: torch.Tensor, coarse: torch.Tensor, refined: torch.Tensor, passes: int = PASSES,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS deviation of ``passes`` perturbed passes' coarse and refined volumes from the unperturbed ones,
    model units, ``(B, 1, D, H, W)`` each (the coarse one serves a patient the safety gate sent back to
    the coarse volume). Deterministic in ``seed``."""
    from .config import AugmentConfig

    aug, gen = AugmentConfig(), torch.Generator().manual_seed(seed)
    acc_c, acc_r = torch.zeros_like(coarse), torch.zeros_like(refined)
    for _ in range(passes):
        c, r = predictor(perturb(xrays, gen, aug))
        acc_c += (c - coarse) ** 2
        acc_r += (r - refined) ** 2
    return torch.sqrt(acc_c / passes), torch.sqrt(acc_r / passes)


def signals(predictor, xrays, coarse, ungated, records, passes: int = PASSES, seed: int = 0) -> list[dict]:
    """Per patient of a batch, for what the safety gate returned (HU arrays ``(D, H, W)``): the spread over
    perturbed passes, the answer's edge strength and the refiner's correction (0 where the gate fell back)."""
    from scipy import ndimage

    sc, sr = raw_spread(predictor, xrays, coarse, ungated, passes, seed)
    out = []
    for i, rec in enumerate(records):
        fell = bool(rec["fell_back"])
        ans = (coarse if fell else ungated)[i, 0].numpy() * (HU_MAX - HU_MIN)
        grad = np.sqrt(sum(ndimage.sobel(ans, a) ** 2 for a in range(3))) / 16.0  # Sobel's weights sum to 16
        corr = np.zeros_like(ans) if fell else np.abs(ungated[i, 0].numpy() - coarse[i, 0].numpy()) * (HU_MAX - HU_MIN)
        out.append({"spread": (sc if fell else sr)[i, 0].numpy() * (HU_MAX - HU_MIN), "grad": grad, "corr": corr})
    return out


def raw_signal(sig: dict, w_grad: float, w_corr: float) -> np.ndarray:
    return sig["spread"] + w_grad * sig["grad"] + w_corr * sig["corr"]


def gated_std_hu(cal: Calibration, predictor, xrays, coarse, ungated, records) -> list[np.ndarray]:
    """The calibrated sigma (HU) of what the safety gate returned, for each patient of a batch."""
    return [cal.std_hu(cal.raw(s)).astype(np.float32)
            for s in signals(predictor, xrays, coarse, ungated, records, cal.passes, cal.seed)]


def dataset_summary(per_patient: dict) -> dict:
    """Over patients with an uncertainty record: mean coverage and voxel rank correlation, and the
    patient-level rank correlation of mean sigma with refined PSNR (a good sigma is high where PSNR is low)."""
    recs = [(m["uncertainty"], m["refined"]["psnr"]) for m in per_patient.values() if "uncertainty" in m]
    if not recs:
        return {}
    out = {"uncertainty_mean_std_hu": float(np.mean([u["mean_std_hu"] for u, _ in recs]))}
    if all("coverage90" in u for u, _ in recs):
        out["uncertainty_coverage90"] = float(np.mean([u["coverage90"] for u, _ in recs]))
        out["uncertainty_spearman_voxel"] = float(np.mean([u["spearman_std_abs_error"] for u, _ in recs]))
        if len(recs) >= 3:
            out["uncertainty_spearman_patient_psnr"] = spearman(np.array([u["mean_std_hu"] for u, _ in recs]),
                                                                np.array([p for _, p in recs]))
    return out


def body(truth_hu: np.ndarray | None, pred_hu: np.ndarray) -> np.ndarray:
    """Voxels that count: denser than air in the prediction (or the truth, where there is one)."""
    m = pred_hu > BODY_HU
    return m if truth_hu is None else m | (truth_hu > BODY_HU)


WEIGHTS = (0.0, 0.1, 0.3, 1.0)  # the grid the fit tries for w_grad and w_corr


def fit(abs_err_hu: np.ndarray, sig: dict, passes: int = PASSES, seed: int = 0) -> Calibration:
    """A calibration from body voxels of validation patients: ``abs_err_hu`` flat, ``sig`` the flat
    :func:`signals` arrays. Weights: the grid pair whose raw signal ranks |error| best (on a fixed
    200,000-voxel subsample); scale and floor: a least-squares fit of ``sqrt((s raw)^2 + f^2)`` to the
    90th percentile of |error| / 1.645 in ten raw-signal bins; then one factor on both for 90 % coverage."""
    pick = np.random.default_rng(0).permutation(abs_err_hu.size)[:200_000]
    sub = {k: v[pick] for k, v in sig.items()}
    _, w_grad, w_corr = max((spearman(raw_signal(sub, g, c), abs_err_hu[pick]), g, c) for g in WEIGHTS for c in WEIGHTS)
    raw = raw_signal(sig, w_grad, w_corr)
    edges = np.quantile(raw, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(edges, raw, side="right") - 1, 0, 9)
    r_bin = np.array([raw[which == b].mean() for b in range(10) if (which == b).any()])
    s_bin = np.array([np.quantile(abs_err_hu[which == b], 0.9) / Z90 for b in range(10) if (which == b).any()])
    # sigma^2 = s^2 raw^2 + f^2 is linear in (s^2, f^2): non-negative least squares on the bins
    from scipy.optimize import nnls

    (s2, f2), _ = nnls(np.stack([r_bin ** 2, np.ones_like(r_bin)], 1), s_bin ** 2)
    scale, floor = math.sqrt(s2), max(math.sqrt(f2), 1.0)
    lo, hi = 0.0, 1.0
    while coverage(abs_err_hu, hi * np.sqrt((scale * raw) ** 2 + floor ** 2)) < 0.9 and hi < 1e6:
        hi *= 2.0
    for _ in range(40):  # coverage grows with the factor: bisect to 90 %
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if coverage(abs_err_hu, mid * np.sqrt((scale * raw) ** 2 + floor ** 2)) < 0.9 else (lo, mid)
    return Calibration(hi * scale, hi * floor, passes, seed, w_grad=w_grad, w_corr=w_corr)


def coverage(abs_err_hu: np.ndarray, std_hu: np.ndarray, z: float = Z90) -> float:
    """Fraction of voxels whose error lies inside the central interval ``+-z * std``."""
    return float(np.mean(abs_err_hu <= z * std_hu))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two flat arrays (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def patient_figures(std_hu: np.ndarray, pred_hu: np.ndarray, truth_hu: np.ndarray | None) -> dict:
    """One patient's uncertainty summary: mean sigma in the body; with a truth, the 90 % coverage and the
    voxel rank correlation of sigma with |error| (on at most 50,000 body voxels, a fixed subsample)."""
    m = body(truth_hu, pred_hu)
    out = {"mean_std_hu": float(std_hu[m].mean()) if m.any() else 0.0}
    if truth_hu is not None and m.any():
        err, s = np.abs(pred_hu - truth_hu)[m], std_hu[m]
        out["coverage90"] = coverage(err, s)
        pick = np.random.default_rng(0).permutation(err.size)[:50_000]
        out["spearman_std_abs_error"] = spearman(s[pick], err[pick])
    return out
