"""Quality benchmark: does the refiner beat a converged base on patients it never saw?

For one preset and seed: generate a phantom dataset (train/val/test by patient), train the base to
convergence (cosine schedule over ``--base-epochs`` with early stopping on val PSNR), train the
refiner on the frozen base with every registered loss term, then once more with each term switched off
(one-at-a-time ablation), evaluate every refiner on the test split, and check reprojection: DRRs
rendered from the coarse and refined volumes are compared with the input radiographs.

    python bench/quality.py --preset cpu-small --num-patients 128 --out runs/quality

Every figure stands beside the mean-training-volume baseline and the coarse volume, with HF-PSNR
(is the detail *right*?) and the band energy ratios (is it sharper or smoother than the truth?).

Writes ``<out>/quality.md`` (the table for bench/RESULTS.md), ``<out>/quality.json`` and
``<out>/quality_tradeoff.png`` (PSNR against HF-PSNR and high-band energy for the mean baseline, coarse,
refined and each ablation variant). Training runs through the deepspeed launcher, like the demo.
Reruns reuse finished stages.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch



def reprojection_error(predictor, data_path, split="test") -> dict:
    """Mean |normalised DRR(volume) - normalised input radiograph| for coarse, refined and truth volumes."""
    from ctrefine.conventions import FOV_MM, model_to_hu, normalize_xray
    from ctrefine.data.dataset import CTDataset
    from ctrefine.data.io import read_json
    from ctrefine.data.projector import Geometry, render_drrs

    ds = CTDataset(data_path, split)
    geo = read_json(Path(data_path) / "dataset.json")["geometry"]
    geometry = Geometry(geo["kind"], geo["source_isocenter_mm"], geo["source_detector_mm"])
    errs = {"coarse": [], "refined": [], "truth": []}
    for i in range(len(ds)):
        it = ds[i]
        c, r = predictor(it["xrays"][None])
        s = it["xrays"].shape[-1]
        for name, vol in (("coarse", c), ("refined", r), ("truth", it["ct"][None])):
            drr = render_drrs(model_to_hu(vol.float()), FOV_MM, s, geometry)[0, :, 0]
            errs[name].append(float((normalize_xray(drr) - it["xrays"][:, 0]).abs().mean()))
    return {k: float(np.mean(v)) for k, v in errs.items()}


def tradeoff_figure(results: dict, path: Path) -> None:
    """PSNR against HF-PSNR and against high-band energy: the mean baseline, coarse, and every refiner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrefine.outputs import atomic_file

    first = next(iter(results.values()))
    points = [(s, first) for s in ("mean", "coarse") if f"{s}_psnr_mean" in first]
    points += [(label, r) for label, r in results.items()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, name in ((axes[0], "hf_psnr", "HF-PSNR (dB): is the detail right?"),
                          (axes[1], "band_high", "high-band energy ratio (1.0 = as sharp as the truth)")):
        for label, r in points:
            stage = label if label in ("mean", "coarse") else "refined"
            x, y = r[f"{stage}_{key}_mean"], r[f"{stage}_psnr_mean"]
            ax.scatter([x], [y], s=60, marker="s" if stage != "refined" else "o")
            ax.annotate({"mean": "mean baseline"}.get(label, label), (x, y), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel(name)
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[1].axvline(1.0, color="grey", lw=0.8, ls="--")
    fig.suptitle("test split means: up and right is better; a PSNR gain that moves left is smoothing")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def write_report(a, out: Path, results: dict, timings: dict, t0: float, done: bool) -> None:
    """quality.md / quality.json / the trade-off figure from the refiners finished so far."""
    from ctrefine.data.io import read_json
    from ctrefine.report import summary_table

    base_info = read_json(out / "base" / "best.json")
    full = results["all terms"]
    n = full["num_patients"]
    lines = [
        f"Preset `{a.preset}`, {a.num_patients} phantom patients (seed {a.seed}), test split n = {n}; "
        f"base best at epoch {base_info['epoch']} (val PSNR {base_info['psnr']:.2f} dB, early stopping patience "
        f"{a.patience} within a {a.base_epochs}-epoch cosine budget); refiners {a.refine_epochs} epochs.",
        "",
        summary_table(full, markdown=True),
    ]
    lines += ["", f"SSIM {full['refined_ssim_mean'] - full['coarse_ssim_mean']:+.4f}.", ""]
    if len(results) > 1:
        lines += ["| refiner loss | refined PSNR (dB) | gain (dB) | wins | refined HF-PSNR (dB) | refined band high | "
                  "refined HF ratio |", "|---|---|---|---|---|---|---|"]
        for label, r in results.items():
            lines.append(f"| {label} | {r['refined_psnr_mean']:.3f} | {r['gain_db_mean']:+.3f} | {r['refined_wins']}/{n} | "
                         f"{r['refined_hf_psnr_mean']:.3f} | {r['refined_band_high_mean']:.3f} | "
                         f"{r['refined_hf_ratio_mean']:.3f} |")
        lines.append("")
    tradeoff_figure(results, out / "quality_tradeoff.png")
    rp = full["reprojection"]
    lines.append(f"Reprojection (mean |normalised DRR of the volume - input radiograph|, test split): coarse "
                 f"{rp['coarse']:.4f}, refined {rp['refined']:.4f}, ground truth on the same grid {rp['truth']:.4f}.")
    lines.append("")
    lines.append("Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
                 + f"; total {(time.time() - t0) / 60:.1f} min.")
    if not done:
        lines.append(f"(partial: {len(results)} of the planned refiners have finished; rewritten after each one)")
    table = "\n".join(lines) + "\n"
    (out / "quality.md").write_text(table)
    (out / "quality.json").write_text(json.dumps({"results": results, "timings_s": timings, "base": base_info}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-small", help="shipped preset name (cpu-small, cpu-medium, full)")
    p.add_argument("--num-patients", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--base-epochs", type=int, default=100, help="cosine budget of the base (early stopping may end it)")
    p.add_argument("--patience", type=int, default=8, help="base early-stopping patience in epochs")
    p.add_argument("--refine-epochs", type=int, default=15)
    p.add_argument("--ranks", type=int, default=None)
    p.add_argument("--no-ablation", action="store_true", help="skip the one-term-off refiners")
    a = p.parse_args(argv)

    from ctrefine.config import load_config, preset_path
    from ctrefine.data.dataset import make_dataset
    from ctrefine.infer import evaluate_dataset
    from ctrefine.launch import default_ranks, train_stage
    from ctrefine.losses.registry import TERMS
    from ctrefine.pipeline import TorchPredictor

    t0 = time.time()
    cuda = torch.cuda.is_available()
    ranks = a.ranks or default_ranks()
    preset = preset_path(a.preset)
    cfg = load_config(preset)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "quality.log"
    m = cfg.model
    make_dataset(out / "data", a.num_patients, seed=a.seed, size=m.volume_size, xray_size=m.xray_size)
    data = [f"data.data_path={out / 'data'}"]
    timings = {}

    tic = time.time()
    train_stage("base", str(preset), data + [f"checkpoint.dir={out}", f"training.base_num_epochs={a.base_epochs}",
                                             f"training.early_stopping_patience={a.patience}"], ranks, log, progress=False)
    timings["base"] = time.time() - tic
    base_ckpt = out / "base" / "best_model.pt"
    runs = {"all terms": out}
    if not a.no_ablation:
        runs.update({f"without {t}": out / f"ablate_no_{t}" for t in TERMS})
    results = {}
    for label, run_dir in runs.items():
        tic = time.time()
        sets = data + [f"checkpoint.dir={run_dir}", f"model.base_model_checkpoint={base_ckpt}",
                       f"training.num_epochs={a.refine_epochs}"]
        if label.startswith("without "):
            sets.append(f"loss.{label.split()[1]}=0")
        train_stage("refine", str(preset), sets, ranks, log, progress=False)
        timings[label] = time.time() - tic
        pred = TorchPredictor(base_ckpt, run_dir / "refine" / "best_model.pt", device="cuda" if cuda else "cpu")
        results[label] = evaluate_dataset(pred, out / "data", run_dir / "eval_test", save_volumes=False, progress=False,
                                          overwrite=True)
        if label == "all terms":
            results[label]["reprojection"] = reprojection_error(pred, out / "data")
        print(f"{label}: gain {results[label]['gain_db_mean']:+.3f} dB", flush=True)
        write_report(a, out, results, timings, t0, done=len(results) == len(runs))
    print((out / "quality.md").read_text())

    return 0


if __name__ == "__main__":
    sys.exit(main())
