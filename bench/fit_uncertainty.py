"""Train and calibrate a refiner's uncertainty head, store it in a copy of the refiner's model file, and
measure the calibration on held-out sets (ctrefine.uncertainty, ctrefine.training.uncertainty_fit).

    python bench/fit_uncertainty.py --base B.pt --refiner R.pt --data runs/p64v3/data --out R_unc.pt \
        --set "test=runs/p64v3/data:test" --set "scan shift=runs/shift_v3/scan:all" \
        --figure bench/figures/uncertainty_reliability.png

The pair runs (safety gate on) over ``--data``'s train split, whose errors teach the head, and its val
split, which sets the one scale factor. Report, per set and pooled: 90 % interval coverage overall and per
structure class (pooled voxels, classes with >= 1,000), the voxel rank correlation of sigma with |error|,
the patient rank correlation of mean sigma with PSNR, a reliability diagram (coverage at nominal
10..95 %), and the time the head adds to one pipeline pass, measured side by side. The refined volume does
not change: the head only reads it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctrefine.data.phantoms import LABELS
from ctrefine.pipeline import TwoStage
from ctrefine.training.uncertainty_fit import NOMINAL, collect, fit_uncertainty, measure, predict_std_hu
from ctrefine.uncertainty import spearman


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--refiner", required=True)
    p.add_argument("--data", required=True, help="dataset whose train split teaches and val split calibrates")
    p.add_argument("--out", required=True, help="the refiner's model file with its uncertainty head")
    p.add_argument("--set", action="append", default=[], help="NAME=DATASET:SPLIT, measured after the fit")
    p.add_argument("--figure", default=None, help="reliability diagram PNG")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--class-power", type=float, default=0.25, help="weight structure classes by frequency^-power")
    p.add_argument("--max-train", type=int, default=None, help="at most this many training patients")
    return p.parse_args(argv)


def head_cost(model: TwoStage, size: int, pairs: int = 8) -> tuple[float, float, float]:
    """What the head adds to one pipeline pass (batch 1), as a fraction: ``pairs`` passes without and with it,
    interleaved so that drifting machine load hits both alike; the median and the range of the pair ratios."""
    x = torch.rand(1, 1, size, size)
    head, ratios = model.head, []
    with torch.no_grad():
        model(x, x)
        for _ in range(pairs):
            took = []
            for h in (None, head):
                model.head = h
                t0 = time.perf_counter()
                model(x, x)
                took.append(time.perf_counter() - t0)
            ratios.append(took[1] / took[0] - 1.0)
    model.head = head
    return float(np.median(ratios)), min(ratios), max(ratios)


def figure(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    for name, r in results.items():
        ax.plot(NOMINAL, [r["reliability"][str(q)] for q in NOMINAL], "o-", label=name)
    ax.set_xlabel("nominal central interval")
    ax.set_ylabel("fraction of body voxels inside")
    ax.set_title("uncertainty reliability (64^3)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(name: str, r: dict) -> str:
    classes = "" if "by_class" not in r else ", classes " + ", ".join(f"{k} {v:.3f}" for k, v in r["by_class"].items())
    rho = f", patient rho(mean std, PSNR) {r['spearman_patient_psnr']:.3f}" if "spearman_patient_psnr" in r else ""
    return f"{name}: n={r['patients']} coverage90 {r['coverage90']:.3f}, voxel rho {r['spearman_voxel']:.3f}{classes}{rho}"


def main(argv=None) -> None:
    a = parse(argv)
    pred, head, cal, val_figures, minutes = fit_uncertainty(a.base, a.refiner, a.data, a.out, a.channels, a.epochs,
                                                            a.class_power, a.max_train)
    results = {"val (fit)": val_figures}
    print(f"uncertainty head: {a.channels} channels, {cal.train_patients} training patients, {a.epochs} epochs in "
          f"{minutes:.1f} min; scale {cal.scale:.3f} -> {a.out}")
    pooled = []
    for spec in a.set:
        name, _, rest = spec.partition("=")
        data, split = rest.rsplit(":", 1)
        pats = collect(pred, data, split)
        pooled += pats
        results[name] = measure(predict_std_hu(head, pats), pats, LABELS)
    if pooled:
        r = results["held-out pooled"] = measure(predict_std_hu(head, pooled), pooled, LABELS)
        r["spearman_patient_psnr"] = spearman(np.array(r["mean_std"]), np.array(r["psnr"]))
    model = TwoStage(pred.model.base, pred.model.refiner, head, cal).eval()
    extra = head_cost(model, pred.xray_size)
    for name, r in results.items():
        print(report(name, r))
    print(f"the head adds {100 * extra[0]:.0f} % to one pipeline pass (median of 8 interleaved pairs, "
          f"{100 * extra[1]:.0f}-{100 * extra[2]:.0f} %; batch 1, CPU)")
    Path(a.out).with_suffix(".uncertainty.json").write_text(json.dumps(
        {"calibration": cal.as_dict(), "train_minutes": minutes, "extra_time": extra, "results": results}, indent=1))
    if a.figure:
        figure(results, a.figure)


if __name__ == "__main__":
    main()
