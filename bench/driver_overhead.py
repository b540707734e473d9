"""The training driver's host cost per step, against the isolated step, at a size where compute is negligible.

    python bench/driver_overhead.py --out runs/driver_overhead            # both engines, both stages
    python bench/driver_overhead.py --out runs/oh --engines plain --epochs 3 --patients 48

Volumes of 16^3 from 16^2 radiographs (the smallest the base's five scales allow), the narrowest widths,
batch 1, fp32: a step's arithmetic is a few milliseconds, so what the driver adds to it -- the engine's
gradient and optimizer machinery, logging, the data path -- is what the ratio shows. The driver runs as
a user runs it (``python -m ctrefine.train``, one process) with each engine (``training.engine``); its
``val_log.csv`` gives each epoch's training seconds (the first epoch, with its warm-up, is left out).
The isolated step is the same model, loss, optimizer (fused AdamW, clipping) and batches in a bare loop
in this process. Writes ``<out>/driver_overhead.json`` and prints one line per stage and engine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SETS = ["model.volume_size=16", "model.xray_size=16", "model.base_width=2", "model.hidden_channels=4",
        "model.guidance_channels=2", "model.mid_blocks=1", "training.batch_size=1", "training.warmup_steps=1",
        "logging.tensorboard=false", "logging.log_every=1000000"]


def _driver_ms(stage: str, data: Path, out: Path, engine: str, epochs: int, extra: list[str]) -> float:
    """Median over epochs 2.. of the driver's training seconds per step (ms), one process, fp32."""
    sets = SETS + [f"data.data_path={data}", f"checkpoint.dir={out}", f"training.engine={engine}",
                   f"training.num_epochs={epochs}", f"training.base_num_epochs={epochs}", *extra]
    cmd = [sys.executable, "-m", "ctrefine.train", stage, "--config", "cpu-small", "--precision", "fp32",
           "--no-progress", *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if r.returncode:
        raise SystemExit(f"driver failed ({stage}, {engine}):\n{r.stderr[-2000:]}")
    steps = len(json.loads((data / "splits.json").read_text())["train"])
    with open(out / stage / "val_log.csv") as f:
        secs = sorted(float(row["train_s"]) for row in list(csv.DictReader(f))[1:])
    return 1000 * secs[len(secs) // 2] / steps


def _isolated_ms(stage: str, data: Path, base_ckpt: Path | None, epochs: int) -> float:
    """The same step in a bare loop: forward, loss, backward, clipping, fused AdamW (ms a step, median epoch)."""
    from ctrefine.config import load_config
    from ctrefine.data.dataset import CTDataset, iter_batches
    from ctrefine.losses.loss import DetailRefinementLoss, ReconstructionLoss
    from ctrefine.models import build_base, build_refiner
    from ctrefine.checkpoint import load_model_file
    from ctrefine.training.optim import make_optimizer

    cfg = load_config("cpu-small", SETS + [f"data.data_path={data}"])
    ds = CTDataset(data, "train")
    batches = list(iter_batches(ds, range(len(ds)), 1))
    if stage == "base":
        model, crit = build_base(cfg), ReconstructionLoss()
        step_loss = lambda xr, ct: crit(model(xr), ct)[0]  # noqa: E731
    else:
        frozen = load_model_file(base_ckpt, "base").build()
        with torch.no_grad():
            coarse = [frozen(xr) for xr, _, _ in batches]
        model = build_refiner(cfg)
        crit = DetailRefinementLoss(cfg.loss_weights(), ds.header.geometry, torch.device("cpu"))
        it = iter(range(10 ** 9))
        step_loss = lambda xr, ct: crit(model(coarse[next(it) % len(coarse)], xr), ct,  # noqa: E731
                                        coarse[0], xr)[0]
    opt = make_optimizer(model.parameters(), torch.device("cpu"), 1e-4, 1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(epochs):
        tic = time.perf_counter()
        for xr, ct, _ in batches:
            step_loss(xr, ct).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - tic) / len(batches))
    times = sorted(times[1:])
    return 1000 * times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="a new folder: dataset, runs, driver_overhead.json")
    p.add_argument("--engines", nargs="+", default=["deepspeed", "plain"], choices=("deepspeed", "plain"))
    p.add_argument("--stages", nargs="+", default=["base", "refine"], choices=("base", "refine"))
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    p.add_argument("--patients", type=int, default=40)
    a = p.parse_args(argv)
    from ctrefine.data.dataset import make_dataset
    from ctrefine.device import usable_cores

    torch.set_num_threads(usable_cores())  # what the one-process driver uses
    data = a.out / "data"
    make_dataset(data, a.patients, seed=5, size=16, xray_size=16, workers=1, progress=False)
    report = {"volume": 16, "batch": 1, "precision": "fp32", "threads": usable_cores(), "stages": {}}
    base_ckpt = None
    for stage in a.stages:
        extra = [] if stage == "base" else [f"model.base_model_checkpoint={base_ckpt}"]
        row = {"isolated_ms": None}
        for engine in a.engines:
            run_dir = a.out / f"run_{engine}"
            row[f"{engine}_ms"] = _driver_ms(stage, data, run_dir, engine, a.epochs, extra)
            if stage == "base" and base_ckpt is None:
                base_ckpt = run_dir / "base" / "best_model.pt"
        row["isolated_ms"] = _isolated_ms(stage, data, base_ckpt, a.epochs)
        for engine in a.engines:
            row[f"{engine}_ratio"] = row[f"{engine}_ms"] / row["isolated_ms"]
        report["stages"][stage] = row
        print(f"{stage}: isolated {row['isolated_ms']:.2f} ms/step; " + "; ".join(
            f"{e} driver {row[f'{e}_ms']:.2f} ms ({row[f'{e}_ratio']:.2f}x)" for e in a.engines), flush=True)
    (a.out / "driver_overhead.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
