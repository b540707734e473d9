"""Quality benchmark and ablation: does the refiner add *correct* detail to a converged base, on
patients it never saw?

Two ways to get the frozen base:

    # the mission's size: the shipped 64^3 base and the phantoms it was trained on (its test split is unseen)
    python bench/quality.py --preset cpu-medium --data runs/p64/data --base-checkpoint pretrained:phantom-64 \\
        --out runs/abl --rows seed,all,guided,sharp,no_dc,no_xray_consistency,no_phase_free,augmented

    # from scratch: generate a dataset, train the base to convergence (early stopping), then the rows
    python bench/quality.py --preset cpu-small --num-patients 128 --out runs/quality

Each row is one refiner trained on the frozen base with the settings in :data:`ROWS` (every weight
written out, so a row means the same thing whatever the registry's defaults become), evaluated on the
test split (the refiner's own output: the gate off), and what the safety gate would do to it (its
firings and the PSNR after it are columns). Every row stands beside the mean-training-volume
baseline and the coarse volume; with HF-PSNR (is the detail right?), the high-band energy ratio
(sharper or smoother than the truth?), the bone-edge gradient ratio and the wins.

For the first row that uses re-projection guidance, the guidance test: the refiner fed the right
radiographs, another test patient's, and blank ones (the coarse volume always comes from the right
ones) -- if the radiographs matter, the wrong ones must cost.

Writes ``<out>/quality.md`` (tables for bench/RESULTS.md), ``quality.json`` and ``quality_tradeoff.png``
(PSNR against HF-PSNR and against the high-band energy of every row). Training runs through the
deepspeed launcher; a rerun reuses every finished row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

FIVE = {"l1": 1.0, "frequency": 0.5, "gradient": 0.3, "texture": 0.2, "consistency": 0.1}  # the seed's weights
NEW = {"mse": 0.0, "lung_mse": 0.0, "lung_rim_mse": 0.0, "lung_detail_mse": 0.0, "soft_l1": 0.0, "lung_streak_match": 0.0,
       "xray_consistency": 1.0, "band_energy": 0.005, "gradient_distribution": 0.05, "streak": 0.0, "streak_match": 0.0, "placement": 0.0, "lung_l1": 0.0, "ghost_mse": 0.0,
       "crossing_bce": 0.0, "adversarial": 0.0}
OFF = {k: 0.0 for k in NEW}
SHIPPED = {**FIVE, **NEW, "band_energy": 0.0, "gradient_distribution": 0.0}  # session 12's defaults (no_phase_free)
DEPTH = {**SHIPPED, "xray_consistency": 0.3}  # session 13's defaults: with the depth cues below
S14 = {**DEPTH, "band_energy": 0.005, "streak": 0.002}  # session 14's defaults (+ mse 5: session 16's)
S19 = {**S14, "mse": 5.0, "lung_rim_mse": 30.0}  # session 19's defaults
MATCH = {**S19, "streak": 0.0, "streak_match": 0.002}  # the streak share matched both ways
S21 = {**MATCH, "lung_detail_mse": 60.0, "band_energy": 0.0075, "lung_mse": 10.0, "mse": 10.0}  # session 21's defaults
S22 = {**S21, "soft_l1": 2.0, "lung_streak_match": 0.005, "streak_match": 0.001}  # session 22's defaults
S23 = {**S22, "band_energy": 0.01, "lung_detail_mse": 30.0, "soft_l1": 3.0}  # session 23's defaults


def _row(label: str, weights: dict, reprojection: str = "cone", dc: int = 2, extra: tuple = (),
         dc_weighting: str = "uniform", fusion: str = "views", wall_cue: str = "off",
         guidance_depth: str = "along-rays", residual_weighting: str = "uniform", crossing: str = "off") -> dict:
    """One refiner; the model settings the registry's defaults may change later are written out too."""
    return {"label": label, "weights": weights, "reprojection": reprojection, "dc": dc,
            "extra": [f'model.dc_weighting="{dc_weighting}"', f'model.residual_fusion="{fusion}"',
                      f'model.wall_cue="{wall_cue}"', f'model.guidance_depth="{guidance_depth}"',
                      f'model.residual_weighting="{residual_weighting}"', f'model.guidance_crossing="{crossing}"',
                      *extra]}


ROWS = {
    "seed": _row("seed's five terms; no re-projection (no guidance, no DC steps)", {**FIVE, **OFF}, "off", 0),
    "guided": _row("five terms + re-projection guidance, no DC steps", {**FIVE, **OFF}, dc=0),
    "sharp": _row("all terms, phase-free 10x / 20x stronger (the sharpness knob), no DC steps",
                  {**FIVE, **OFF, "xray_consistency": 1.0, "band_energy": 0.05, "gradient_distribution": 1.0}, dc=0),
    "all": _row("all terms + guidance + 2 DC steps", {**FIVE, **NEW}),
    "no_dc": _row("all terms + guidance, no DC steps", {**FIVE, **NEW}, dc=0),
    "no_xray_consistency": _row("all - xray_consistency", {**FIVE, **NEW, "xray_consistency": 0.0}),
    "no_phase_free": _row("all - band_energy - gradient_distribution", SHIPPED),
    # the adversarial knob on session 12's defaults: 0.01 is pix2pix's GAN : L1 ratio (1 : 100), 0.1 ten times stronger
    "adversarial_low": _row("defaults + adversarial critic, weight 0.01", {**SHIPPED, "adversarial": 0.01}),
    "adversarial_high": _row("defaults + adversarial critic, weight 0.1", {**SHIPPED, "adversarial": 0.1}),
    "augmented": _row("all terms + guidance + 2 DC steps, trained on augmented radiographs", {**FIVE, **NEW},
                      extra=("augment.enabled=true",)),
    "defaults_augmented": _row("session 12's defaults, trained on augmented radiographs", SHIPPED,
                               extra=("augment.enabled=true",)),
    "no_reprojection": _row("all terms, no re-projection (no guidance, no DC steps)", {**FIVE, **NEW}, "off", 0),
    **{f"no_{t}": _row(f"all - {t}", {**FIVE, **NEW, t: 0.0}) for t in FIVE},
    # where the streaks along the rays come from (issue "detail in place"): session 12's defaults, then one suspect off
    "defaults": _row("session 12's defaults (uniform SIRT, per-view residuals, xray_consistency 1.0)", SHIPPED),
    "guidance_image_only": _row("defaults, X-ray guidance without the lifted 2D Laplacians", SHIPPED,
                                extra=("model.xray_guidance=image",)),
    "no_xray_guidance": _row("defaults, no lifted X-ray guidance at all", SHIPPED, extra=("model.xray_guidance=off",)),
    "defaults_no_xray_consistency": _row("defaults - xray_consistency", {**SHIPPED, "xray_consistency": 0.0}),
    "defaults_no_reprojection": _row("defaults, no re-projection residual and no SIRT steps", SHIPPED, "off", 0),
    # what could place the detail in depth: SIRT steps that spread each deficit by the volume's attenuation,
    # and the product of both views' back-projected residuals (where the PA and lateral rays cross)
    "defaults_no_dc": _row("defaults, no SIRT steps (re-projection residual kept)", SHIPPED, dc=0),
    "density_dc": _row("defaults, density-weighted SIRT steps", SHIPPED, dc_weighting="density"),
    "residual_product": _row("defaults + product of the two views' residuals", SHIPPED, fusion="views+product"),
    "density_dc_product": _row("defaults, density-weighted SIRT steps + residual product", SHIPPED,
                               dc_weighting="density", fusion="views+product"),
    # on top of it: the X-ray consistency term (which matching the projections lets smear) at 0.3, and the
    # phase-free band-energy term (sharpness at the right scale)
    "depth_xc03": _row("density SIRT + residual product, xray_consistency 0.3 (session 13's defaults)", DEPTH,
                       dc_weighting="density", fusion="views+product"),
    "depth_band": _row("density SIRT + residual product, + band_energy 0.005", {**SHIPPED, "band_energy": 0.005},
                       dc_weighting="density", fusion="views+product"),
    "depth_xc03_band": _row("density SIRT + residual product, xray_consistency 0.3, band_energy 0.005",
                            {**DEPTH, "band_energy": 0.005}, dc_weighting="density", fusion="views+product"),
    # a loss that does not reward smearing: the correction's ray-constant share of detail charged above the truth's
    **{f"depth_xc03_band_streak{w:g}".replace(".", ""): _row(
        f"density SIRT + residual product, xray_consistency 0.3, band_energy 0.005, streak {w:g}"
        + (" (session 14's defaults)" if w == 0.002 else ""),
        {**DEPTH, "band_energy": 0.005, "streak": w}, dc_weighting="density", fusion="views+product")
       for w in (0.002, 0.01)},
    # the lung's rim (issue "detail in place"): squared error beside L1, and without the pull to the coarse low band
    **{f"defaults_mse{w:g}": _row(f"session 14's defaults + mse {w:g}", {**S14, "mse": w}, dc_weighting="density",
                                  fusion="views+product") for w in (5, 20)},
    # squared error pulls towards the mean (a blur where the position is unsure): with band_energy raised to hold the
    # top band
    **{f"defaults_mse{m:g}_band{b:g}".replace(".", ""): _row(f"session 14's defaults + mse {m:g}, band_energy {b:g}",
                                                          {**S14, "mse": m, "band_energy": b},
                                                          dc_weighting="density", fusion="views+product")
       for m, b in ((20, 0.02), (20, 0.05))},
    "defaults_no_consistency": _row("session 14's defaults - consistency", {**S14, "consistency": 0.0},
                                    dc_weighting="density", fusion="views+product"),
    # the lung's bias (the refiner adds density to every patient's lung): is it the pull to match the radiographs?
    "defaults_mse5_no_xray_consistency": _row("today's defaults (mse 5) - xray_consistency",
                                              {**S14, "mse": 5.0, "xray_consistency": 0.0},
                                              dc_weighting="density", fusion="views+product"),
    # where along a ray the rib detail can lie: the chest-wall cue (needs --init from a widened file:
    # bench/widen_refiner.py --wall-cue)
    "defaults_mse5_wall_cue": _row("today's defaults (mse 5) + the chest-wall cue", {**S14, "mse": 5.0},
                                   dc_weighting="density", fusion="views+product", wall_cue="depth+detail"),
    # capacity: the U-Net twice as wide (fine-tuned from a narrow file: bench/widen_refiner.py --double-width)
    "defaults_mse5_wide": _row("today's defaults (mse 5), hidden channels 32", {**S14, "mse": 5.0},
                               dc_weighting="density", fusion="views+product", extra=("model.hidden_channels=32",)),
    # the lung weighed more: the blurred rib correction spills rib density one voxel into the lung
    **{f"defaults_mse5_lung{w:g}": _row(f"today's defaults (mse 5) + lung_mse {w:g}",
                                        {**S14, "mse": 5.0, "lung_mse": w},
                                        dc_weighting="density", fusion="views+product") for w in (5, 20)},
    # ... only at the lung's rim in the chest wall (where the ribs are), the deep lung and its vessels left to mse
    **{f"defaults_mse5_lungrim{w:g}": _row(f"today's defaults (mse 5) + lung_rim_mse {w:g}",
                                           {**S14, "mse": 5.0, "lung_rim_mse": w},
                                           dc_weighting="density", fusion="views+product") for w in (20, 30, 40)},
    # the streak share held to the truth's from below as well as above, and the structures inside the deep lung
    # (vessels, nodules) weighed more
    "s19_match": _row("session 19's defaults, streak -> streak_match 0.002", MATCH,
                      dc_weighting="density", fusion="views+product"),
    **{f"s19_match_detail{w:g}": _row(f"session 19's defaults, streak -> streak_match 0.002, + lung_detail_mse {w:g}",
                                      {**MATCH, "lung_detail_mse": w}, dc_weighting="density", fusion="views+product")
       for w in (30, 60)},
    # ... with band_energy raised a little to keep the top band at least the coarse volume's
    **{f"s19_match_detail{w:g}_band{b:g}".replace(".", ""): _row(
        f"session 19's defaults, streak -> streak_match 0.002, + lung_detail_mse {w:g}, band_energy {b:g}",
        {**MATCH, "lung_detail_mse": w, "band_energy": b}, dc_weighting="density", fusion="views+product")
       for w in (0, 30, 60) for b in (0.0075, 0.01)},
    # ... and the whole lung weighed again: the vessels' weight lifts the lung around them
    **{f"s19_match_detail60_band00075_lung{w:g}": _row(
        f"session 19's defaults, streak -> streak_match 0.002, + lung_detail_mse 60, band_energy 0.0075, "
        f"lung_mse {w:g}",
        {**MATCH, "lung_detail_mse": 60.0, "band_energy": 0.0075, "lung_mse": w}, dc_weighting="density",
        fusion="views+product") for w in (5, 10)},
    # session 21's defaults (the rows above with lung_mse 10, mse 10), then the absolute error counted again in flat
    # soft tissue and the lung's streak share on ray segments held to the truth's
    "s21": _row("session 21's defaults", S21, dc_weighting="density", fusion="views+product"),
    "s21_soft2_lstreak0005_match0001": _row(
        "session 21's defaults + soft_l1 2, lung_streak_match 0.005, streak_match 0.001 (session 22's defaults)",
        S22, dc_weighting="density", fusion="views+product"),
    "s22_band001": _row("session 22's defaults with band_energy 0.01 (from 0.0075)",
                        {**S22, "band_energy": 0.01},
                        dc_weighting="density", fusion="views+product"),
    "s23": _row("session 22's defaults with band_energy 0.01, lung_detail_mse 30, soft_l1 3 (session 23's defaults)",
                S23, dc_weighting="density", fusion="views+product"),
    # each lifted radiograph feature placed in depth (models/ray_placement.py), taught by the placement term
    "s23_ray_placement": _row("session 23's defaults + the cross-view ray placement, placement 0.01",
                              {**S23, "placement": 0.01}, dc_weighting="density", fusion="views+product",
                              guidance_depth="cross-view"),
    # the re-projection residual spread along its rays by the coarse volume's attenuation
    "s23_residual_density": _row("session 23's defaults, the residual back-projected by density", S23,
                                 dc_weighting="density", fusion="views+product", residual_weighting="density"),
    # the re-projection residual placed along its rays by learned weights, taught by the placement term
    "s23_residual_placement": _row("session 23's defaults, the residual placed along its rays, placement 0.01",
                                   {**S23, "placement": 0.01}, dc_weighting="density", fusion="views+product",
                                   residual_weighting="learned"),
    # the absolute error counted again in the lung: its optimum the median, no vessel drawn wherever it may be
    "s23_lung_l1": _row("session 23's defaults + lung_l1 20", {**S23, "lung_l1": 20.0}, dc_weighting="density",
                        fusion="views+product"),
    # the squared error counted again where both views' vessel shadows cross but no vessel is (the hilar fan)
    "s23_ghost_mse": _row("session 23's defaults + ghost_mse 300", {**S23, "ghost_mse": 300.0}, dc_weighting="density",
                          fusion="views+product"),
    # both views' neighbourhoods read together at every voxel (models/crossing_reader.py), taught or not which
    # crossings of the vessel shadows hold a vessel
    "s23_crossing_reader": _row("session 23's defaults + the crossing reader", S23, dc_weighting="density",
                                fusion="views+product", crossing="mlp"),
    "s23_crossing_bce": _row("session 23's defaults + the crossing reader, crossing_bce 0.01",
                             {**S23, "crossing_bce": 0.01}, dc_weighting="density", fusion="views+product",
                             crossing="mlp"),
}
COLUMNS = ("psnr", "ssim", "hf_psnr", "band_high", "bone_edge_ratio")


def row_sets(row: dict) -> list[str]:
    return [f"loss.{k}={v}" for k, v in row["weights"].items()] + [f'model.reprojection="{row["reprojection"]}"',
                                                                   f"model.data_consistency_steps={row['dc']}",
                                                                   *row["extra"]]


def guidance_test(base_ckpt, refiner_ckpt, data_path) -> dict:
    """Mean refined PSNR on the test split with the right radiographs, another test patient's (the next one
    in the split, cyclically) and blank ones; the coarse volume always from the right radiographs."""
    from ctrefine.data.dataset import CTDataset
    from ctrefine.metrics import psnr
    from ctrefine.pipeline import load_two_stage

    model, _ = load_two_stage(base_ckpt, refiner_ckpt)
    ds = CTDataset(data_path, "test")
    xr = torch.stack([ds[i]["xrays"] for i in range(len(ds))])
    ct = torch.stack([ds[i]["ct"] for i in range(len(ds))])
    out = {}
    with torch.no_grad():
        coarse = torch.cat([model.base(xr[i:i + 4]) for i in range(0, len(ds), 4)])
        for name, feed in (("right", xr), ("another patient's", torch.roll(xr, 1, dims=0)),
                           ("blank", torch.zeros_like(xr))):
            ref = torch.cat([model.refiner(coarse[i:i + 4], feed[i:i + 4]) for i in range(0, len(ds), 4)])
            out[name] = float(psnr(ref, ct).mean())
    out["coarse"] = float(psnr(coarse, ct).mean())
    return out


def gate_stats(per_patient: dict) -> dict:
    """What the safety gate would do to the refiner's own outputs (evaluated with it off): how often it
    falls back to the coarse volume, the mean PSNR after it and the change that makes."""
    pp = list(per_patient.values())
    fire = [m["gate"]["xray_consistency_refined"] > m["gate"]["xray_consistency_coarse"] for m in pp]
    gated = [m["coarse"]["psnr"] if f else m["refined"]["psnr"] for m, f in zip(pp, fire)]
    own = [m["refined"]["psnr"] for m in pp]
    return {"fell_back": int(sum(fire)), "psnr": float(np.mean(gated)), "change": float(np.mean(gated) - np.mean(own)),
            "wins": int(sum(g > m["coarse"]["psnr"] for g, m in zip(gated, pp))),
            "hf_psnr_wins": int(sum(m["refined"]["hf_psnr"] > m["coarse"]["hf_psnr"] for m in pp))}


def tradeoff_figure(results: dict, path: Path) -> None:
    """PSNR against HF-PSNR and against high-band energy: the mean baseline, coarse, and every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrefine.outputs import atomic_file

    first = next(iter(results.values()))["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, name in ((axes[0], "hf_psnr", "HF-PSNR (dB): is the detail right?"),
                          (axes[1], "band_high", "high-band energy ratio (1.0 = as sharp as the truth)")):
        for stage in ("mean", "coarse"):
            if f"{stage}_{key}_mean" in first:
                ax.scatter([first[f"{stage}_{key}_mean"]], [first[f"{stage}_psnr_mean"]], s=60, marker="s")
                ax.annotate({"mean": "mean baseline"}.get(stage, stage),
                            (first[f"{stage}_{key}_mean"], first[f"{stage}_psnr_mean"]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
        for i, (slug, r) in enumerate(results.items()):  # a legend, not labels: rows crowd near the top
            x, y = r["summary"][f"refined_{key}_mean"], r["summary"]["refined_psnr_mean"]
            ax.scatter([x], [y], s=60, marker="ovD^<>p*hX"[i // 10 % 10], color=f"C{i % 10}", label=slug)
        ax.set_xlabel(name)
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[1].axvline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("test split means (the refiners' own outputs): up and right is better; a PSNR gain that moves left is smoothing")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


DETAIL = (("body_psnr", "body PSNR (dB)", ".3f"), ("streak", "streak index", ".4f"), ("mae_hu_lung", "MAE lung (HU)", ".1f"),
          ("mae_hu_soft", "MAE soft (HU)", ".1f"), ("dice_rib", "rib Dice", ".3f"), ("dice_vessel", "vessel Dice", ".3f"))


def lung_error_ratio(patients: dict) -> float:
    """The refined volume's squared error inside the lung over the coarse volume's, summed over the patients
    (the error budget's lung row; NaN without label maps)."""
    sse = [(m["refined"].get("error_by_class", {}).get("sse_lung"), m["coarse"].get("error_by_class", {}).get("sse_lung"))
           for m in patients.values()]
    if not sse or any(r is None or c is None for r, c in sse):
        return float("nan")
    return sum(r for r, _ in sse) / max(sum(c for _, c in sse), 1e-20)


def detail_table(results: dict, s0: dict) -> list[str]:
    """Detail in place: body-only PSNR, the streak index of each row's correction (against the truth's own),
    lung / soft-tissue MAE, the lung's squared error over the coarse volume's and thin-structure Dice, each
    row beside the mean baseline and the coarse volume."""
    def cell(s, stage, key, fmt):
        v = s.get(f"{stage}_{key}_mean")
        return "-" if v is None else format(v, fmt)
    head = "| row | " + " | ".join(label for _, label, _ in DETAIL) + " | lung squared error / coarse |"
    rows = [head, "|---" * (len(DETAIL) + 2) + "|"]
    for stage in ("mean", "coarse"):
        cells = [cell(s0, stage, k, f) if k != "streak" else
                 (f"truth - coarse: {s0['truth_streak_mean']:.4f}" if stage == "coarse" and "truth_streak_mean" in s0
                  else "-") for k, _, f in DETAIL]
        rows.append(f"| {stage} | " + " | ".join(cells) + f" | {'1' if stage == 'coarse' else '-'} |")
    for slug, r in results.items():
        rows.append(f"| `{slug}` | " + " | ".join(cell(r["summary"], "refined", k, f) for k, _, f in DETAIL)
                    + f" | {lung_error_ratio(r.get('patients', {})):.3f} |")
    return rows


def write_report(a, out: Path, results: dict, timings: dict, guidance: dict | None) -> None:
    """quality.md / quality.json / the trade-off figure from the rows finished so far."""
    from ctrefine.report import summary_table

    s0 = next(iter(results.values()))["summary"]
    n = s0["num_patients"]
    base = "mean baseline" if "mean_psnr_mean" in s0 else None
    lines = [f"Preset `{a.preset}`, dataset `{a.data or out / 'data'}`, frozen base `{a.base_checkpoint or out / 'base'}`, "
             f"test split n = {n}, refiners {a.refine_epochs} epochs each"
             + (f", fine-tuned from `{a.init}`" if a.init else ", from a random init")
             + (f" at peak rate {a.learning_rate:g}" if a.learning_rate else "") + ".", ""]
    if base:
        lines.append(f"Mean baseline: PSNR {s0['mean_psnr_mean']:.3f} dB, HF-PSNR {s0['mean_hf_psnr_mean']:.3f} dB, "
                     f"band high {s0['mean_band_high_mean']:.3f}; coarse: PSNR {s0['coarse_psnr_mean']:.3f} dB, SSIM "
                     f"{s0['coarse_ssim_mean']:.4f}, HF-PSNR {s0['coarse_hf_psnr_mean']:.3f} dB, band high "
                     f"{s0['coarse_band_high_mean']:.3f}, bone edge ratio {s0.get('coarse_bone_edge_ratio_mean', float('nan')):.3f}.")
        lines.append("")
    lines += ["| row | refiner | PSNR (dB) | gain (dB) | wins | SSIM | HF-PSNR (dB) | HF-PSNR wins | band high | "
              "bone edge ratio | X-ray consistency (coarse -> refined) | gate fell back | PSNR gated (dB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for slug, r in results.items():
        s, g = r["summary"], r["gate"]
        lines.append(f"| `{slug}` | {ROWS[slug]['label']} | {s['refined_psnr_mean']:.3f} | {s['gain_db_mean']:+.3f} | "
                     f"{s['refined_wins']}/{n} | {s['refined_ssim_mean']:.4f} | {s['refined_hf_psnr_mean']:.3f} | "
                     f"{g['hf_psnr_wins']}/{n} | {s['refined_band_high_mean']:.3f} | "
                     f"{s.get('refined_bone_edge_ratio_mean', float('nan')):.3f} | "
                     f"{s['coarse_xray_consistency_mean']:.4f} -> {s['refined_xray_consistency_mean']:.4f} | "
                     f"{g['fell_back']}/{n} | {g['psnr']:.3f} ({g['change']:+.3f}) |")
    lines += ["", *detail_table(results, s0)]
    lines += ["", "Every column but the last two: the refiner's own output (gate off). Gate: how often it would fall "
              "back to the coarse volume, and the PSNR after it (its change).", ""]
    if guidance:
        lines += [f"Guidance test (`{guidance['row']}`, refined PSNR on the test split, coarse {guidance['coarse']:.3f} dB): "
                  + ", ".join(f"{k} radiographs {v:.3f} dB" for k, v in guidance.items() if k not in ("row", "coarse"))
                  + ".", ""]
    first = next((k for k, v in results.items() if v.get("focus")), next(iter(results)))
    lines += [f"Summary of `{first}`:", "", summary_table(results[first]["summary"], markdown=True), ""]
    lines.append("Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    (out / "quality.json").write_text(json.dumps({"results": {k: {"summary": v["summary"], "gate": v["gate"]}
                                                              for k, v in results.items()},
                                                  "guidance": guidance, "timings_s": timings}, indent=2))
    tradeoff_figure(results, out / "quality_tradeoff.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="cpu-small", help="shipped preset name (cpu-small, cpu-medium, full)")
    p.add_argument("--data", default=None, help="an existing dataset (default: generate <out>/data)")
    p.add_argument("--base-checkpoint", default=None, help="a trained base, e.g. pretrained:phantom-64 (default: train)")
    p.add_argument("--num-patients", type=int, default=128, help="patients to generate (without --data)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (without --data)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--base-epochs", type=int, default=100, help="cosine budget of the base (early stopping may end it)")
    p.add_argument("--patience", type=int, default=8, help="base early-stopping patience in epochs")
    p.add_argument("--refine-epochs", type=int, default=12)
    p.add_argument("--init", default=None, help="fine-tune every row from this refiner file (e.g. "
                   "pretrained:phantom-64-refiner; its architecture must be the rows'), not from a random init")
    p.add_argument("--learning-rate", type=float, default=None, help="the refiners' peak rate (default: the preset's)")
    p.add_argument("--ranks", type=int, default=None)
    p.add_argument("--rows", default="seed,all,guided,sharp,no_dc,no_xray_consistency,no_phase_free,augmented",
                   help=f"comma-separated rows of: {', '.join(ROWS)}")
    a = p.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown row(s) {bad}; choose from {list(ROWS)}")

    from ctrefine.config import load_config, preset_path
    from ctrefine.data.dataset import make_dataset
    from ctrefine.infer import evaluate_dataset
    from ctrefine.launch import default_ranks, train_stage
    from ctrefine.pipeline import TorchPredictor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ranks = a.ranks or default_ranks()
    preset = preset_path(a.preset)
    cfg = load_config(preset)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "quality.log"
    data = Path(a.data).resolve() if a.data else out / "data"
    if not a.data:
        make_dataset(data, a.num_patients, seed=a.seed, size=cfg.model.volume_size, xray_size=cfg.model.xray_size)
    sets = [f"data.data_path={data}"]
    timings: dict[str, float] = {}
    base_ckpt = a.base_checkpoint
    if not base_ckpt:
        tic = time.time()
        train_stage("base", str(preset), sets + [f"checkpoint.dir={out}", f"training.base_num_epochs={a.base_epochs}",
                                                 f"training.early_stopping_patience={a.patience}"], ranks, log, progress=False)
        timings["base"] = time.time() - tic
        base_ckpt = str(out / "base" / "best_model.pt")
    results, guidance = {}, None
    # the row the guidance test and the summary table are about: "all" when it runs, else the first with guidance
    focus = "all" if "all" in rows else next((r for r in rows if ROWS[r]["reprojection"] != "off"), rows[0])
    for slug in rows:
        run_dir = out / slug
        tic = time.time()
        start = ([f"training.init_checkpoint={a.init}"] if a.init else []) + (
            [f"training.learning_rate={a.learning_rate}"] if a.learning_rate else [])
        train_stage("refine", str(preset), sets + [f"checkpoint.dir={run_dir}", f"model.base_model_checkpoint={base_ckpt}",
                                                   f"training.num_epochs={a.refine_epochs}"] + start + row_sets(ROWS[slug]),
                    ranks, log, progress=False)
        timings[slug] = time.time() - tic
        refiner = run_dir / "refine" / "best_model.pt"
        summary = evaluate_dataset(TorchPredictor(base_ckpt, refiner, device=device), data, run_dir / "eval_test",
                                   save_volumes=False, progress=False, overwrite=True, gate=False)
        patients = json.loads((run_dir / "eval_test" / "metrics.json").read_text())["patients"]
        results[slug] = {"summary": summary, "patients": patients, "gate": gate_stats(patients)}
        if slug == focus:
            guidance = {"row": slug, **guidance_test(base_ckpt, refiner, data)}
        results[slug]["focus"] = slug == focus
        print(f"{slug}: gain {summary['gain_db_mean']:+.3f} dB, gate would fall back "
              f"{results[slug]['gate']['fell_back']}/{summary['num_patients']}", flush=True)
        write_report(a, out, results, timings, guidance)
    print((out / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
