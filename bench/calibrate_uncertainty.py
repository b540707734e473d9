"""Calibrate a refiner's uncertainty on validation patients, store it in a copy of its model file, and
measure the calibration on held-out sets (ctrefine.uncertainty).

    python bench/calibrate_uncertainty.py --base B.pt --refiner R.pt --data runs/p64v3/data --out R_cal.pt \
        --set "test=runs/p64v3/data:test" --set "scan shift=runs/shift_v3/scan:all" \
        --figure bench/figures/uncertainty_reliability.png

Fit: the pair runs on ``--data``'s val split (safety gate on) with ``passes`` perturbed passes a patient;
:func:`ctrefine.uncertainty.fit` sets floor and scale from the body voxels. Report, per set and pooled:
90 % interval coverage overall and per structure class (pooled voxels, classes with >= 1,000), the
voxel rank correlation of sigma with |error|, the patient rank correlation of mean sigma with PSNR,
a reliability diagram (coverage at nominal 10..95 %), and the wall time of the uncertainty passes
beside one plain pass. The refined volume is the unperturbed pass: its PSNR does not change.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from ctrefine.checkpoint import load_model_file, save_model_file
from ctrefine.conventions import model_to_hu
from ctrefine.data.dataset import CTDataset, iter_items
from ctrefine.data.phantoms import LABELS
from ctrefine.metrics import psnr
from ctrefine.pipeline import TorchPredictor
from ctrefine.reprojection import SliceProjector, safety_gate
from ctrefine.uncertainty import PASSES, body, coverage, fit, signals, spearman

NOMINAL = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--refiner", required=True)
    p.add_argument("--data", required=True, help="dataset whose val split calibrates")
    p.add_argument("--out", required=True, help="the refiner's model file with its calibration")
    p.add_argument("--set", action="append", default=[], help="NAME=DATASET:SPLIT, measured after the fit")
    p.add_argument("--figure", default=None, help="reliability diagram PNG")
    p.add_argument("--passes", type=int, default=PASSES)
    return p.parse_args(argv)


def collect(pred, data, split, passes: int) -> list[dict]:
    """Per patient: body voxels' |error| and raw spread (HU), their labels, refined PSNR, and timing."""
    ds = CTDataset(data, split).nonempty()
    proj, out = None, []
    for items in iter_items(ds, range(len(ds)), 4):
        x = torch.stack([it["xrays"] for it in items])
        t0 = time.perf_counter()
        coarse, ungated = pred(x)
        t1 = time.perf_counter()
        proj = proj or SliceProjector(coarse.shape[-1], geometry=pred.geometry)
        refined, recs = safety_gate(proj, x, coarse, ungated, True)
        sigs = signals(pred, x, coarse, ungated, recs, passes)
        t2 = time.perf_counter()
        for i, (it, rec, sig) in enumerate(zip(items, recs, sigs)):
            pred_hu, truth_hu = model_to_hu(refined[i, 0].numpy()), model_to_hu(it["ct"][0].numpy())
            m = body(truth_hu, pred_hu)
            lab = it.get("labels")
            out.append({"name": it["name"], "err": np.abs(pred_hu - truth_hu)[m], "sig": {k: v[m] for k, v in sig.items()},
                        "labels": None if lab is None else np.asarray(lab).reshape(m.shape)[m].astype(int),
                        "psnr": float(psnr(refined[i:i + 1], it["ct"][None]).item()),
                        "plain_s": (t1 - t0) / len(items), "spread_s": (t2 - t1) / len(items)})
    return out


def _std(cal, p) -> np.ndarray:
    return cal.std_hu(cal.raw(p["sig"]))


def measure(cal, pats: list[dict]) -> dict:
    err = np.concatenate([p["err"] for p in pats])
    std = np.concatenate([_std(cal, p) for p in pats])
    pick = np.random.default_rng(0).permutation(err.size)[:200_000]
    out = {"patients": len(pats), "coverage90": coverage(err, std), "spearman_voxel": spearman(std[pick], err[pick]),
           "reliability": {str(q): coverage(err, std, norm.ppf(0.5 + q / 2)) for q in NOMINAL},
           "mean_std": [float(_std(cal, p).mean()) for p in pats],
           "psnr": [p["psnr"] for p in pats], "extra_time": float(np.mean([p["spread_s"] / p["plain_s"] for p in pats]))}
    if pats[0]["labels"] is not None:
        labels = np.concatenate([p["labels"] for p in pats])
        out["by_class"] = {LABELS[k]: coverage(err[labels == k], std[labels == k])
                           for k in np.unique(labels) if (labels == k).sum() >= 1000}
    return out


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


def main(argv=None) -> None:
    a = parse(argv)
    pred = TorchPredictor(a.base, a.refiner, device="cpu")
    val = collect(pred, a.data, "val", a.passes)
    cal = fit(np.concatenate([p["err"] for p in val]),
              {k: np.concatenate([p["sig"][k] for p in val]) for k in val[0]["sig"]}, a.passes)
    cal = dataclasses.replace(cal, val_mean_std_hu=tuple(float(_std(cal, p).mean()) for p in val))
    mf = load_model_file(a.refiner, stage="refine")
    save_model_file(a.out, "refine", mf.state_dict, mf.config, mf.metrics, mf.epoch, mf.global_step,
                    uncertainty=cal.as_dict())
    print(f"calibration on {len(val)} val patients: weights grad {cal.w_grad:g}, correction {cal.w_corr:g}; "
          f"scale {cal.scale:.3f}, floor {cal.floor_hu:.1f} HU -> {a.out}")
    results, pooled = {"val (fit)": measure(cal, val)}, []
    for spec in a.set:
        name, _, rest = spec.partition("=")
        data, split = rest.split(":")
        pats = collect(pred, data, split, a.passes)
        pooled += pats
        results[name] = measure(cal, pats)
    if pooled:
        results["held-out pooled"] = measure(cal, pooled)
        r = results["held-out pooled"]
        r["spearman_patient_psnr"] = spearman(np.array(r["mean_std"]), np.array(r["psnr"]))
    for name, r in results.items():
        worst = "" if "by_class" not in r else ", classes " + ", ".join(f"{k} {v:.3f}" for k, v in r["by_class"].items())
        print(f"{name}: n={r['patients']} coverage90 {r['coverage90']:.3f}, voxel rho {r['spearman_voxel']:.3f}, "
              f"extra time x{r['extra_time']:.2f}" + worst +
              (f", patient rho(mean std, PSNR) {r['spearman_patient_psnr']:.3f}" if "spearman_patient_psnr" in r else ""))
    Path(a.out).with_suffix(".calibration.json").write_text(json.dumps(
        {"calibration": cal.as_dict(), "results": results}, indent=1))
    if a.figure:
        figure(results, a.figure)


if __name__ == "__main__":
    main()
