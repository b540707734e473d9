"""The one results table: per-patient metrics of coarse vs refined, their summary, and its formats.

Used by ``ctrefine infer`` (``metrics.txt``, ``metrics.json`` and the console), ``ctrefine demo`` and the
quality benchmark (markdown), so every report of the project has the same rows. A new report column
is one entry in :data:`METRICS`.
"""
from __future__ import annotations

import numpy as np

from .metrics import all_metrics

# key -> label; the metrics of :func:`ctrefine.metrics.all_metrics` shown in every report.
METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "mae": "MAE", "hf_ratio": "HF-energy ratio"}
METRIC_KEYS = tuple(METRICS)
STAGES = ("coarse", "refined")


def patient_metrics(coarse, refined, truth) -> dict:
    """``{"coarse": {metric: value}, "refined": {...}}`` for one patient (model-space volumes)."""
    return {stage: {k: float(v) for k, v in all_metrics(vol[None] if vol.dim() == 4 else vol,
                                                         truth[None] if truth.dim() == 4 else truth).items()}
            for stage, vol in zip(STAGES, (coarse, refined))}


def summarize(per_patient: dict) -> dict:
    """Mean and std of every metric per stage, the PSNR gain and the refined-wins count."""
    if not per_patient:
        raise ValueError("summarize needs at least one patient")
    s = {}
    for stage in STAGES:
        for k in METRIC_KEYS:
            v = np.array([m[stage][k] for m in per_patient.values()])
            s[f"{stage}_{k}_mean"], s[f"{stage}_{k}_std"] = float(v.mean()), float(v.std())
    gains = np.array([m["refined"]["psnr"] - m["coarse"]["psnr"] for m in per_patient.values()])
    s.update({"gain_db_mean": float(gains.mean()), "gain_db_std": float(gains.std()),
              "refined_wins": int((gains > 0).sum()), "num_patients": len(per_patient)})
    return s


def summary_table(s: dict, markdown: bool = False) -> str:
    """Coarse vs refined (mean +- std), the gain and the wins; plain text for the console or markdown."""
    n = s["num_patients"]
    pm = " ± " if markdown else " +- "
    rows = [(label, *(f"{s[f'{st}_{k}_mean']:.4f}{pm}{s[f'{st}_{k}_std']:.4f}" for st in STAGES))
            for k, label in METRICS.items()]
    rows.append(("gain (refined - coarse)", "", f"{s['gain_db_mean']:+.3f} dB{pm}{s['gain_db_std']:.3f}"))
    rows.append(("refined wins", "", f"{s['refined_wins']} / {n}"))
    if markdown:
        return "\n".join([f"| test split (n = {n}) | coarse | refined |", "|---|---|---|",
                          *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
    return "\n".join([f"{'test split (' + str(n) + ' patients)':<28s}{'coarse':>20s}{'refined':>20s}",
                      *(f"{a:<28s}{b:>20s}{c:>20s}" for a, b, c in rows)])


def _patient_row(name: str, m: dict) -> str:
    return (f"{name:<14s}" + "".join(f"{m['coarse'][k]:>17.4f}{m['refined'][k]:>17.4f}" for k in METRIC_KEYS)
            + f"{m['refined']['psnr'] - m['coarse']['psnr']:>+10.3f}")


def metrics_text(per_patient: dict, s: dict) -> str:
    """``metrics.txt``: a header, one row per patient, then the summary table."""
    head = (f"{'patient':<14s}" + "".join(f"{'coarse_' + k:>17s}{'refined_' + k:>17s}" for k in METRIC_KEYS)
            + f"{'gain_db':>10s}")
    lines = [f"ctrefine inference: {s['num_patients']} patients of split '{s['split']}' from {s['data_path']}",
             f"predictor: {s['predictor']} ({s['source']})",
             "metrics on model-space volumes in [0, 1]: PSNR (dB, data range 1), 3D SSIM, MAE, "
             "HF-energy ratio (1.0 ideal)", "", head]
    lines += [_patient_row(name, m) for name, m in sorted(per_patient.items())]
    lines += ["", summary_table(s)]
    return "\n".join(lines) + "\n"
