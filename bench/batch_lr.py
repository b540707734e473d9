"""Which learning rate goes with a larger batch: trains one stage at a reference batch and at larger ones, each
larger batch with its peak rate scaled by every rule asked for, all for the same volumes seen (same epochs of
the same patients), and compares the validation curves at equal volumes seen.

    python bench/batch_lr.py --data runs/b32/data --out runs/batch_lr                    # base, cpu-small, 4 vs 32
    python bench/batch_lr.py --data D --out O --stage refine --batches 16 --rules sqrt \\
        --set model.base_model_checkpoint=runs/b32/base/best_model.pt

Rules, for a batch ``k`` times the reference's: ``same`` (the reference's rate), ``sqrt`` (``sqrt(k)`` times
it: the square-root rule for adaptive optimisers, which keeps AdamW's update noise constant), ``linear`` (``k``
times: SGD's rule). The warm-up is kept in volumes, not steps (``warmup_steps / k``, at least one step). Each
run is ``python -m ctrefine.train`` in one process (the plain single-device engine: what one GPU runs);
a rerun reuses every finished run (and its recorded wall). Writes ``<out>/batch_lr.md`` and ``batch_lr.json``: per run the batch,
rate, steps, wall, best and last val PSNR, and the val PSNR at each quarter of the volumes seen.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

RULES = {"same": lambda k: 1.0, "sqrt": math.sqrt, "linear": lambda k: float(k)}


def run_name(batch: int, rule: str) -> str:
    return f"b{batch}_{rule}"


def read_curve(run: Path, stage: str) -> list[dict]:
    """The stage's val log as ``[{"epoch", "psnr"}]`` (the refine stage's refined PSNR)."""
    path = run / stage / "val_log.csv"
    if not path.is_file():
        return []
    key = "psnr" if stage == "base" else "refined_psnr"
    with open(path) as f:
        return [{"epoch": int(r["epoch"]), "psnr": float(r[key])} for r in csv.DictReader(f)]


def train(a, run: Path, batch: int, lr: float, warmup: int, log: Path) -> float:
    """One training run in its own process; its wall seconds (a finished run is reused with its recorded wall)."""
    wall_file = run / "batch_lr_wall_s.txt"
    if len(read_curve(run, a.stage)) >= a.epochs:
        return float(wall_file.read_text()) if wall_file.is_file() else float("nan")
    epochs_key = "base_num_epochs" if a.stage == "base" else "num_epochs"
    sets = [f"data.data_path={Path(a.data).resolve()}", f"checkpoint.dir={run}", f"training.batch_size={batch}",
            f"training.learning_rate={lr}", f"training.warmup_steps={warmup}", f"training.{epochs_key}={a.epochs}",
            "training.early_stopping_patience=0", *a.set]
    cmd = [sys.executable, "-m", "ctrefine.train", a.stage, "--config", a.config, "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    tic = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    if rc != 0:
        raise SystemExit(f"training {run.name} failed (exit {rc}); see {log}")
    wall = time.time() - tic
    wall_file.write_text(f"{wall:.1f}\n")
    return wall


def summarise(curve: list[dict], epochs: int) -> dict:
    quarters = {f"q{q}": next((c["psnr"] for c in curve if c["epoch"] >= math.ceil(q * epochs / 4)), None)
                for q in (1, 2, 3, 4)}
    return {"best": max(c["psnr"] for c in curve), "last": curve[-1]["psnr"], **quarters}


def write_report(out: Path, a, rows: list[dict]) -> None:
    lines = [f"Stage `{a.stage}`, preset `{a.config}`, {a.epochs} epochs of `{a.data}` for every run (same volumes "
             f"seen); val PSNR (dB) at each quarter of the volumes seen.", "",
             "| batch | rule | peak rate | warm-up steps | steps | wall (s) | 1/4 | 1/2 | 3/4 | end | best |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["val"]
        cells = " | ".join("-" if s[q] is None else f"{s[q]:.2f}" for q in ("q1", "q2", "q3", "q4"))
        lines.append(f"| {r['batch']} | {r['rule']} | {r['lr']:.3g} | {r['warmup']} | {r['steps'] or '-'} | "
                     f"{r['wall_s']:.0f} | {cells} | {s['best']:.2f} |")
    tmp = out / "batch_lr.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "batch_lr.md")
    tmp = out / "batch_lr.json.tmp"
    tmp.write_text(json.dumps({"stage": a.stage, "config": a.config, "epochs": a.epochs, "runs": rows}, indent=1))
    tmp.replace(out / "batch_lr.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", required=True, help="a dataset made by `ctrefine make-data` at the preset's size")
    p.add_argument("--out", required=True, help="a folder for the runs and the report (created)")
    p.add_argument("--stage", choices=("base", "refine"), default="base")
    p.add_argument("--config", default="cpu-small", help="preset name or JSON file")
    p.add_argument("--epochs", type=int, default=24, help="epochs of every run (the volumes seen are fixed by them)")
    p.add_argument("--reference-batch", type=int, default=4)
    p.add_argument("--reference-lr", type=float, default=1e-3, help="the reference batch's peak rate")
    p.add_argument("--reference-warmup", type=int, default=10, help="the reference batch's warm-up steps")
    p.add_argument("--batches", type=int, nargs="+", default=[32])
    p.add_argument("--rules", nargs="+", choices=sorted(RULES), default=["same", "sqrt", "linear"])
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE passed to every run")
    a = p.parse_args(argv)
    if not (Path(a.data) / "dataset.json").is_file():
        p.error(f"{a.data}: no dataset.json (make one with `ctrefine make-data`)")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    splits = Path(a.data) / "splits.json"
    n_train = len(json.loads(splits.read_text())["train"]) if splits.is_file() else None
    plan = [(a.reference_batch, "same")] + [(b, r) for b in a.batches for r in a.rules]
    rows = []
    for batch, rule in plan:
        k = batch / a.reference_batch
        lr = a.reference_lr * RULES[rule](k)
        warmup = max(1, round(a.reference_warmup / k))
        run = out / run_name(batch, rule)
        wall = train(a, run, batch, lr, warmup, out / "batch_lr.log")
        curve = read_curve(run, a.stage)
        steps = None if n_train is None else a.epochs * math.ceil(n_train / batch)
        rows.append({"batch": batch, "rule": rule, "lr": lr, "warmup": warmup, "steps": steps, "wall_s": wall,
                     "curve": curve, "val": summarise(curve, a.epochs)})
        print(f"{run.name}: lr {lr:.3g}, best val PSNR {rows[-1]['val']['best']:.2f} dB ({wall:.0f} s)", flush=True)
        write_report(out, a, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
