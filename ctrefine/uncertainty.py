"""Per-voxel uncertainty of a reconstruction, calibrated: where it can be trusted.

Along each ray the radiographs say how much attenuation there is, not where: a volume reconstructed
from two of them is firm in some places and guessed in others. A small network, the uncertainty head
(:class:`ctrefine.models.uncertainty_head.UncertaintyHead`), reads the coarse volume and the answer
and predicts, per voxel, the 90th percentile of the answer's |error| -- trained on the refiner's own
errors on training patients (:mod:`ctrefine.training.uncertainty_fit`), then scaled by one factor so
that on validation patients the central 90 % interval ``+-1.645 sigma`` holds 90 % of the body's
voxels. It runs inside the pipeline as one extra cheap pass, on the refined volume and on the coarse one
(the safety gate may return either), and travels in the refiner's model file (``uncertainty``: the
:class:`Calibration` record and the head's weights) and in the exported ONNX graph (two more
outputs). A refiner file without one infers as before, without uncertainty, and says so.

This module holds the record, the choice of sigma after the gate, and the calibration figures.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .conventions import HU_MAX, HU_MIN
from .errors import DataError

KIND = "error-head"  # the record's kind; files calibrated by test-time perturbation (earlier) carry none
QUANTILE = 0.9  # the head predicts this quantile of |error|
Z90 = 1.6448536  # half-width of a central 90 % Gaussian interval, in standard deviations
BODY_HU = -950.0  # voxels denser than this (in truth or prediction) are the body: calibration ignores air


@dataclass(frozen=True)
class Calibration:
    """The head's shape and geometry, its validation-fitted scale, and the validation patients' mean sigma."""

    volume_size: int
    geometry: str  # the ray geometry its re-projection residual uses (the refiner's)
    channels: int
    dilations: tuple[int, ...]
    scale: float
    val_mean_std_hu: tuple[float, ...] = ()  # per validation patient: the mean sigma in the body (HU)
    class_power: float = 0.0  # training weighted each structure class by frequency^-power (0: every voxel alike)
    train_patients: int = 0
    epochs: int = 0

    def as_dict(self) -> dict:
        return {"kind": KIND, **asdict(self), "dilations": list(self.dilations),
                "val_mean_std_hu": list(self.val_mean_std_hu)}

    @classmethod
    def from_dict(cls, raw, source: str) -> "Calibration | None":
        """The record, validated (one-line :class:`DataError` if malformed); None for a record of an earlier
        kind (test-time perturbation), which this version no longer computes."""
        if not isinstance(raw, dict):
            raise DataError(f"{source}: its uncertainty calibration is malformed")
        if raw.get("kind") != KIND:
            return None
        try:
            cal = cls(int(raw["volume_size"]), str(raw["geometry"]), int(raw["channels"]),
                      tuple(int(d) for d in raw["dilations"]), float(raw["scale"]),
                      tuple(float(v) for v in raw.get("val_mean_std_hu", ())), float(raw.get("class_power", 0.0)),
                      int(raw.get("train_patients", 0)), int(raw.get("epochs", 0)))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{source}: its uncertainty calibration is malformed") from None
        if not (8 <= cal.volume_size <= 512 and cal.volume_size % 2 == 0 and cal.geometry in ("cone", "parallel")
                and 1 <= cal.channels <= 256 and 1 <= len(cal.dilations) <= 8 and all(1 <= d <= 16 for d in cal.dilations)
                and math.isfinite(cal.scale) and cal.scale > 0 and all(math.isfinite(v) for v in cal.val_mean_std_hu)):
            raise DataError(f"{source}: its uncertainty calibration is out of range ({cal.volume_size}^3, "
                            f"{cal.geometry!r}, {cal.channels} channels, dilations {cal.dilations}, scale {cal.scale})")
        return cal

    def percentile(self, mean_std_hu: float) -> float | None:
        """Where a volume's mean sigma falls among the validation patients' (0-100), or None without them."""
        if not self.val_mean_std_hu:
            return None
        return float(100.0 * np.mean(np.asarray(self.val_mean_std_hu) <= mean_std_hu))

    def describe(self) -> str:
        return (f"uncertainty head ({self.channels} channels), trained on {self.train_patients} patients' errors, "
                f"scaled x{self.scale:.3f} on validation patients")


def build_head(raw: dict | None, source: str):
    """``(head, calibration)`` from a refiner file's ``uncertainty`` entry, or ``(None, None)`` without one (or
    with one of an earlier kind). Weights that do not fit the record: one-line :class:`DataError`."""
    from .models.uncertainty_head import UncertaintyHead

    cal = None if raw is None else Calibration.from_dict(raw, source)
    if cal is None:
        return None, None
    state = raw.get("state_dict")
    head = UncertaintyHead(cal.volume_size, cal.geometry, cal.channels, cal.dilations, cal.scale, Z90)
    try:
        head.load_state_dict({**{k: torch.as_tensor(v).float() for k, v in state.items()},
                              "scale": torch.tensor(cal.scale)})
    except (AttributeError, RuntimeError, TypeError):
        raise DataError(f"{source}: its uncertainty head's weights do not fit its record") from None
    return head.eval(), cal


def head_entry(head, cal: Calibration) -> dict:
    """A refiner file's ``uncertainty`` entry: the record and the head's weights (fp32, without the scale)."""
    return {**cal.as_dict(), "state_dict": {k: v.detach().float().cpu().clone()
                                            for k, v in head.state_dict().items() if k != "scale"}}


def gated_std_hu(coarse_std: torch.Tensor, refined_std: torch.Tensor, records: list[dict]) -> list[np.ndarray]:
    """Per patient of a batch, the sigma (HU, ``(D, H, W)``) of what the safety gate returned."""
    return [((coarse_std if rec["fell_back"] else refined_std)[i, 0].numpy() * (HU_MAX - HU_MIN)).astype(np.float32)
            for i, rec in enumerate(records)]


# ------------------------------------------------------------------------------------- figures
def body(truth_hu: np.ndarray | None, pred_hu: np.ndarray) -> np.ndarray:
    """Voxels that count: denser than air in the prediction (or the truth, where there is one)."""
    m = pred_hu > BODY_HU
    return m if truth_hu is None else m | (truth_hu > BODY_HU)


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
