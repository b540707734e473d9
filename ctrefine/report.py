"""The one results table: per-patient metrics of the mean baseline, coarse and refined volumes, their
summary, and its formats.

Used by ``ctrefine infer`` (``metrics.txt``, ``metrics.json`` and the console), ``ctrefine demo`` and the
quality benchmark (markdown), so every report of the project has the same rows. Every figure stands
beside the **mean baseline** (the voxel-wise mean of the training CTs, predicted for every patient)
and the **coarse** volume: a PSNR gain with a smoother output, or over a base that barely beats the
mean, is not a refinement. A new report row is one entry in :data:`METRICS`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .conventions import model_to_hu
from .metrics import (STRUCTURES, all_metrics, error_by_class, label_metrics, lung_detail_alignment, lung_streak_index,
                      streak_index)

# key -> label, in report order; label metrics appear when the dataset has labels.
METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "mae": "MAE", "hf_psnr": "HF-PSNR (dB)", "hf_ratio": "HF-energy ratio",
           "band_low": "band energy low", "band_mid": "band energy mid", "band_high": "band energy high",
           "bone_dice": "bone Dice", "bone_edge_ratio": "bone edge ratio", "nodule_contrast_ratio": "nodule contrast ratio",
           "mae_hu_lung": "MAE lung (HU)", "mae_hu_vessel": "MAE vessel (HU)", "mae_hu_bone": "MAE bone (HU)",
           "mae_hu_soft": "MAE soft tissue (HU)",
           # per structure class (ctrefine.metrics.STRUCTURES says how a predicted mask is made)
           **{f"dice_{c}": f"{c.replace('_', ' ')} Dice" for c in STRUCTURES},
           **{f"edge_{c}": f"{c.replace('_', ' ')} edge ratio" for c in STRUCTURES},
           "spine_profile_corr": "spine profile corr.", "body_psnr": "PSNR in the body (dB)",
           "ghost_lift": "vessel ghost lift (HU)",
           "streak": "streak index of the correction", "lung_streak": "lung streak index of the correction",
           "lung_alignment": "lung detail alignment with the truth's"}
METRIC_KEYS = tuple(METRICS)
STAGES = ("mean", "coarse", "refined")
STAGE_NAMES = {"mean": "mean baseline", "coarse": "coarse", "refined": "refined"}


@torch.no_grad()
def batch_metrics(vols: dict, truth, labels=None, table: dict | None = None) -> list[dict]:
    """``[{stage: {metric: value}}]``, one per patient, for a batch: ``vols`` maps stages to model-space
    ``(B, 1, D, H, W)`` volumes (a ``(1, D, H, W)`` one, e.g. the mean baseline, serves every patient),
    ``truth`` ``(B, 1, D, H, W)``, ``labels`` a list of ``(D, H, W)`` maps or None.

    Every metric is computed on the tensors' device (float32 on an accelerator,
    :func:`ctrefine.device.metrics_dtype`): the label-free ones for the whole batch at once, the label
    metrics per patient.
    """
    b = truth.shape[0]
    per_stage = {}
    for stage, vol in vols.items():
        v = vol.to(truth.device)
        v = v.expand(b, *truth.shape[1:]) if v.dim() == 4 else v
        per_stage[stage] = {k: val.double().cpu().tolist() for k, val in all_metrics(v, truth).items()}
    out = [{stage: {k: vals[i] for k, vals in m.items()} for stage, m in per_stage.items()} for i in range(b)]
    if "coarse" in vols:  # how much of each correction is smeared along the rays; the truth's own as reference
        coarse = vols["coarse"].to(truth.device).float()
        corrections = {stage: vol.to(truth.device).float() - coarse
                       for stage, vol in [(k, vols[k]) for k in ("refined",) if k in vols] + [("truth", truth)]}
        for stage, correction in corrections.items():
            for i, (v, lung) in enumerate(zip(streak_index(correction).tolist(),
                                              lung_streak_index(correction, truth.float()).tolist())):
                out[i].setdefault(stage, {}).update(streak=v, lung_streak=lung)
        if "refined" in corrections:  # is the refiner's lung detail where the truth's is (the truth's own would read 1)
            aligned = lung_detail_alignment(corrections["refined"], corrections["truth"], truth.float())
            for i, v in enumerate(aligned.tolist()):
                out[i]["refined"]["lung_alignment"] = v
    if labels is not None and table:
        truth_hu = model_to_hu(truth.double() if truth.device.type == "cpu" else truth.float())
        for stage, vol in vols.items():
            hu = model_to_hu(vol.to(truth.device, truth_hu.dtype))
            for i in range(b):
                if labels[i] is not None:
                    one = hu[i, 0] if hu.dim() == 5 else hu[0]
                    out[i][stage].update(label_metrics(one, truth_hu[i, 0], labels[i], table))
                    out[i][stage]["error_by_class"] = error_by_class(one, truth_hu[i, 0], labels[i], table)
    return out


def error_budget(per_patient: dict) -> dict[str, dict[str, float]]:
    """Where the refined volume's squared error lies, over every patient with labels: per class its share of
    the refined error and the refined error over the coarse one (below 1: the refiner reduced it there)."""
    sums = {stage: {} for stage in ("coarse", "refined")}
    for m in per_patient.values():
        for stage in sums:
            for k, v in (m.get(stage, {}).get("error_by_class") or {}).items():
                sums[stage][k] = sums[stage].get(k, 0.0) + v
    total = sum(sums["refined"].values())
    if not total:
        return {}
    return {k.removeprefix("sse_"): {"share_of_refined_error": v / total,
                                     "refined_over_coarse": v / sums["coarse"][k] if sums["coarse"].get(k) else float("nan")}
            for k, v in sorted(sums["refined"].items(), key=lambda kv: -kv[1]) if v > 0}


def _stats(values) -> tuple[float, float, int]:
    v = np.array([x for x in values if not math.isnan(x)], float)
    return (float(v.mean()), float(v.std()), len(v)) if len(v) else (float("nan"), float("nan"), 0)


def summarize(per_patient: dict) -> dict:
    """Mean and std (over patients where defined) of every metric per stage; gain, skill and wins."""
    if not per_patient:
        raise ValueError("summarize needs at least one patient")
    first = next(iter(per_patient.values()))
    stages = [s for s in STAGES if s in first]
    s = {"stages": stages, "num_patients": len(per_patient)}
    for stage in stages:
        for k in (k for k in METRIC_KEYS if k in first[stage]):
            s[f"{stage}_{k}_mean"], s[f"{stage}_{k}_std"], s[f"{stage}_{k}_n"] = _stats(
                m[stage][k] for m in per_patient.values())
    budget = error_budget(per_patient)
    if budget:
        s["error_budget"] = budget
    if "truth" in first:  # the truth's own correction (truth - coarse): what a refiner's streak index is read against
        for k in ("streak", "lung_streak"):
            s[f"truth_{k}_mean"], s[f"truth_{k}_std"], s[f"truth_{k}_n"] = _stats(
                m["truth"][k] for m in per_patient.values() if k in m["truth"])
    gains = np.array([m["refined"]["psnr"] - m["coarse"]["psnr"] for m in per_patient.values()])
    s.update({"gain_db_mean": float(gains.mean()), "gain_db_std": float(gains.std()),
              "refined_wins": int((gains > 0).sum())})
    gates = [m["gate"] for m in per_patient.values() if "gate" in m]
    if gates:  # the safety gate (ctrefine.reprojection.safety_gate): how often it fell back, what that changed
        s["gate_fell_back"] = sum(g["fell_back"] for g in gates)
        s["gate_psnr_change_db"] = float(np.mean([m["refined"]["psnr"] - m["gate"]["psnr_ungated"]
                                                  for m in per_patient.values()]))
        for k in ("coarse", "refined"):
            s[f"{k}_xray_consistency_mean"] = float(np.mean([g[f"xray_consistency_{k}"] for g in gates]))
    if "mean" in stages:  # skill: how far each volume is above the trivial answer
        for stage in ("coarse", "refined"):
            skill = np.array([m[stage]["psnr"] - m["mean"]["psnr"] for m in per_patient.values()])
            s[f"{stage}_skill_db_mean"], s[f"{stage}_skill_db_std"] = float(skill.mean()), float(skill.std())
    return s


def _rows(s: dict, pm: str) -> list[tuple[str, ...]]:
    stages = s["stages"]
    rows = []
    for k, label in METRICS.items():
        if f"{stages[-1]}_{k}_mean" not in s:
            continue
        cells = []
        for st in stages:
            if f"{st}_{k}_mean" not in s:  # a figure of some stages only (the streak index: refined)
                cells.append("")
                continue
            mean, std, n = s[f"{st}_{k}_mean"], s[f"{st}_{k}_std"], s[f"{st}_{k}_n"]
            cells.append("n/a" if n == 0 else f"{mean:.4f}{pm}{std:.4f}" + ("" if n == s["num_patients"] else f" (n={n})"))
        rows.append((label, *cells))
        if f"truth_{k}_mean" in s:  # what a refiner's streak indices are read against: the truth's own correction
            rows.append((label.replace(" of the correction", ", truth - coarse"), *("",) * (len(stages) - 1),
                         f"{s[f'truth_{k}_mean']:.4f}{pm}{s[f'truth_{k}_std']:.4f}"))
    blank = ("",) * (len(stages) - 1)
    rows.append(("gain (refined - coarse)", *blank, f"{s['gain_db_mean']:+.3f} dB{pm}{s['gain_db_std']:.3f}"))
    if "refined_skill_db_mean" in s:
        rows.append(("skill over mean baseline", *("",) * (len(stages) - 2),
                     f"{s['coarse_skill_db_mean']:+.3f} dB{pm}{s['coarse_skill_db_std']:.3f}",
                     f"{s['refined_skill_db_mean']:+.3f} dB{pm}{s['refined_skill_db_std']:.3f}"))
    rows.append(("refined wins", *blank, f"{s['refined_wins']} / {s['num_patients']}"))
    if "gate_fell_back" in s:
        rows.append(("X-ray consistency (no truth)", *("",) * (len(stages) - 2), f"{s['coarse_xray_consistency_mean']:.4f}",
                     f"{s['refined_xray_consistency_mean']:.4f}"))
        rows.append(("gate fell back to coarse", *blank, f"{s['gate_fell_back']} / {s['num_patients']} "
                                                         f"({s['gate_psnr_change_db']:+.3f} dB)"))
    return rows


def summary_table(s: dict, markdown: bool = False) -> str:
    """Every stage side by side (mean +- std), the gain, the skill and the wins; console text or markdown."""
    n = s["num_patients"]
    names = [STAGE_NAMES[st] for st in s["stages"]]
    split = s.get("split", "test")  # evaluate_dataset records it; the quality benchmark's are test splits
    if markdown:
        rows = _rows(s, " ± ")
        return "\n".join([f"| {split} split (n = {n}) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                          *("| " + " | ".join(r) + " |" for r in rows)])
    rows = _rows(s, " +- ")
    w = max(20, *(len(c) + 2 for r in rows for c in r[1:]))
    return "\n".join([f"{split + ' split (' + str(n) + ' patients)':<28s}" + "".join(f"{x:>{w}s}" for x in names),
                      *(f"{r[0]:<28s}" + "".join(f"{c:>{w}s}" for c in r[1:]) for r in rows)])


def metrics_text(per_patient: dict, s: dict) -> str:
    """``metrics.txt``: a header, one row per patient (PSNR, HF-PSNR per stage and the gain), then the summary."""
    stages = s["stages"]
    cols = [(st, k) for k in ("psnr", "hf_psnr") for st in stages]
    head = f"{'patient':<14s}" + "".join(f"{st + '_' + k:>18s}" for st, k in cols) + f"{'gain_db':>10s}"
    lines = [f"ctrefine inference: {s['num_patients']} patients of split '{s['split']}' from {s['data_path']}",
             f"predictor: {s['predictor']} ({s['source']})",
             "metrics on model-space volumes in [0, 1] (PSNR data range 1); label metrics on HU; "
             "ratios: 1.0 ideal; mean baseline = the voxel-wise mean of the training CTs", "", head]
    for name, m in sorted(per_patient.items()):
        lines.append(f"{name:<14s}" + "".join(f"{m[st][k]:>18.4f}" for st, k in cols)
                     + f"{m['refined']['psnr'] - m['coarse']['psnr']:>+10.3f}")
    lines += ["", summary_table(s)]
    if s.get("error_budget"):
        lines += ["", "where the refined volume's squared error lies (all patients): class, share of the refined "
                      "error, refined / coarse error"]
        lines += [f"  {k:<14s}{v['share_of_refined_error']:>8.1%}{v['refined_over_coarse']:>8.2f}"
                  for k, v in s["error_budget"].items()]
    return "\n".join(lines) + "\n"
