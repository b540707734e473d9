"""Training speed at the mission's 64^3: volumes/s and achieved TFLOP/s of one optimiser step, today's
path against the fast path, side by side in one run, with the machine's attainable matmul rate.

    python bench/train_speed.py --out runs/train_speed            # CPU: 2 threads, batch 2
    python bench/train_speed.py --models refine-16 --variants eager compiled --steps 3

A step = forward, loss, backward, AdamW update, in bf16 autocast (the arithmetic of DeepSpeed's bf16
mode) on the device the machine has. Models at 64^3 from 128^2 radiographs: the base at width 8
(``cpu-medium``) and 32 (``full``, 15.2M), the refiner at hidden 16 (``cpu-medium``) and 64 (``full``,
5.0M); the refiner's five-term loss, the base's L1. Variants:

* ``eager`` -- today's path: the module as built, NCDHW (channels-first) memory.
* ``channels-last`` -- the same module and inputs in channels-last-3d memory.
* ``cl-layers`` -- channels-last-3d inside each 3D convolution and up-sampling only, NCDHW around them
  (:func:`ctrefine.models.layout.channels_last_layers`).
* ``compiled`` -- ``torch.compile`` of the module and of the loss (the fast path the training driver
  uses with ``training.compile``): normalisation, activation and the casts autocast inserts are fused
  into generated loops; convolutions stay with oneDNN.

FLOPs are counted by ``torch.utils.flop_counter`` on one eager step (convolutions and matmuls,
forward + backward), so achieved TFLOP/s = FLOPs / median step time; the matmul row is a 4096^3
bf16 (and fp32) product on the same threads. Losses of the variants on the same batch are compared
(bf16 tolerance) so a faster path that computes something else shows. Writes ``<out>/train_speed.md``
and ``train_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ctrefine.config import load_config
from ctrefine.losses.loss import DetailRefinementLoss, ReconstructionLoss
from ctrefine.models import build_base, build_refiner
from ctrefine.models.layout import channels_last_layers

MODELS = {  # name -> (stage, preset whose model section is used)
    "base-8": ("base", "cpu-medium"),
    "base-32": ("base", "full"),
    "refine-16": ("refine", "cpu-medium"),
    "refine-64": ("refine", "full"),
}
VARIANTS = ("eager", "channels-last", "cl-layers", "compiled")


def matmul_tflops(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e12


class Step:
    """One training step of ``model_name`` in ``variant``; ``__call__`` returns the loss (a float)."""

    def __init__(self, model_name: str, variant: str, batch: int, seed: int = 0):
        stage, preset = MODELS[model_name]
        cfg = load_config(preset)
        torch.manual_seed(seed)
        self.stage = stage
        self.model = build_base(cfg) if stage == "base" else build_refiner(cfg)
        with torch.no_grad():  # a live refiner head: a zero head makes the backward of everything below it trivial
            if stage == "refine":
                self.model.head.weight.normal_(0, 0.02)
        v, s = cfg.model.volume_size, cfg.model.xray_size
        g = torch.Generator().manual_seed(seed)
        self.coarse, self.target = torch.rand(2, batch, 1, v, v, v, generator=g)
        self.xrays = torch.rand(batch, 2, 1, s, s, generator=g)
        self.criterion = ReconstructionLoss() if stage == "base" else DetailRefinementLoss(cfg.loss_weights())
        if variant == "channels-last":
            for m in self.model.modules():  # only 3D convolutions have a channels-last-3d layout
                if isinstance(m, torch.nn.Conv3d):
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            self.coarse = self.coarse.contiguous(memory_format=torch.channels_last_3d)
        if variant == "cl-layers":
            channels_last_layers(self.model)
        self.forward = self.model
        self.loss_fn = self.criterion
        if variant == "compiled":
            self.forward = torch.compile(self.model)
            self.loss_fn = torch.compile(self.criterion)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def __call__(self) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if self.stage == "base":
                loss, _ = self.loss_fn(self.forward(self.xrays), self.target)
            else:
                loss, _ = self.loss_fn(self.forward(self.coarse, self.xrays), self.target, self.coarse, self.xrays)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss)


def count_flops(step: Step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(model_name: str, variant: str, batch: int, steps: int) -> dict:
    step = Step(model_name, variant, batch)
    t0 = time.perf_counter()
    first_loss = step()  # the same batch and weights in every variant: the first loss must agree
    first = time.perf_counter() - t0  # includes compilation for the compiled variant
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"model": model_name, "variant": variant, "batch": batch, "s_per_step": sec, "volumes_per_s": batch / sec,
            "first_step_s": first, "first_loss": first_loss, "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/train_speed", help="folder for train_speed.md / .json")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager", "channels-last", "cl-layers"],
                   help="default: all but compiled (its first step compiles for minutes on a CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = {"bf16": matmul_tflops(torch.bfloat16), "fp32": matmul_tflops(torch.float32)}
    print(f"matmul 4096^3, {torch.get_num_threads()} threads: bf16 {peak['bf16']:.3f} TFLOP/s, "
          f"fp32 {peak['fp32']:.3f} TFLOP/s", flush=True)
    rows = []
    for name in a.models:
        flops = count_flops(Step(name, "eager", a.batch)) / a.batch
        for variant in a.variants:
            r = measure(name, variant, a.batch, a.steps)
            r["gflop_per_volume"] = flops / 1e9
            r["tflops"] = flops * r["volumes_per_s"] / 1e12
            rows.append(r)
            print(f"{name:10s} {variant:14s} {r['volumes_per_s']:6.3f} vol/s  {r['tflops']:.3f} TFLOP/s "
                  f"({100 * r['tflops'] / peak['bf16']:.0f} % of bf16 matmul)  first step {r['first_step_s']:.1f} s  "
                  f"loss {r['first_loss']:.5f}", flush=True)
            (out / "train_speed.json").write_text(json.dumps({"peak_tflops": peak, "rows": rows}, indent=1))
    lines = [f"matmul 4096^3 on {torch.get_num_threads()} threads: bf16 {peak['bf16']:.3f} TFLOP/s, fp32 "
             f"{peak['fp32']:.3f} TFLOP/s", "",
             "| model | variant | vol/s | vs eager | TFLOP/s | % of bf16 matmul | GFLOP/volume | first step s | first loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    eager = {r["model"]: r["volumes_per_s"] for r in rows if r["variant"] == "eager"}
    for r in rows:
        ratio = f"{r['volumes_per_s'] / eager[r['model']]:.2f}x" if r["model"] in eager else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['volumes_per_s']:.3f} | {ratio} | {r['tflops']:.3f} | "
                     f"{100 * r['tflops'] / peak['bf16']:.0f} % | {r['gflop_per_volume']:.0f} | "
                     f"{r['first_step_s']:.1f} | {r['first_loss']:.5f} |")
    (out / "train_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
