"""How many ATen operators one training step dispatches, phase by phase: a CPU proxy for the host cost
of a GPU step (each dispatched op is at least one kernel launch and its Python/C++ overhead there).

    python bench/step_ops.py                              # `full` widths, 64^3, batch 2, both stages
    python bench/step_ops.py --config cpu-small --batch 1 --json runs/ops.json --top 15

A step is what the training driver runs on one device (:class:`ctrefine.training.engine.PlainEngine`):
the stage's module in the compute dtype the driver would use (bf16 where the CPU has it), forward, the
stage's loss, backward, the engine's optimizer step (gradients into fp32 masters, clipping, fused AdamW,
masters back). Each phase is counted under a ``TorchDispatchMode`` that sees every ATen call below
autograd, in the second step (the first builds lazy state: one-hot matrices, the optimizer's moments).

``detach`` is listed apart: the counting mode itself makes autograd call it once for every tensor saved
for backward (torch.profiler, which adds no mode, records none in the same step), so the totals are
given both with it (comparable with earlier counts made the same way) and without it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ctrefine.config import load_config
from ctrefine.device import DevicePolicy
from ctrefine.jsonio import write_json
from ctrefine.losses.loss import DetailRefinementLoss, ReconstructionLoss
from ctrefine.models import build_base, build_refiner
from ctrefine.training.engine import PlainEngine
from ctrefine.training.optim import make_optimizer


class OpCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _inputs(cfg, batch: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    v, s = cfg.model.volume_size, cfg.model.xray_size
    xr = torch.rand(batch, 2, 1, s, s, generator=g).to(dtype)
    ct = torch.rand(batch, 1, v, v, v, generator=g)
    coarse = (ct + 0.05 * torch.randn(ct.shape, generator=g)).clamp(0, 1).to(dtype)
    return xr, ct, coarse


def _for_loop_adamw(engine: PlainEngine) -> None:
    """Swap the engine's fused AdamW for PyTorch's for-loop one over the same masters (the optimizer the driver
    handed DeepSpeed before the plain engine: what e20c2d9's counts were made with)."""
    engine.optimizer = make_optimizer(engine.masters, torch.device("cpu"), 1e-4, 1e-4, kind="for-loop")
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: 1.0)


def stage_step(stage: str, cfg, batch: int, dtype: torch.dtype, for_loop: bool = False):
    """``(phases, step)``: ``step(counter_for_phase)`` runs one training step of the single-device engine,
    each phase inside the context ``counter_for_phase(name)`` returns."""
    xr, ct, coarse = _inputs(cfg, batch, dtype)
    policy = DevicePolicy(torch.device("cpu"), dtype)
    if stage == "base":
        model, crit = build_base(cfg), ReconstructionLoss()
        engine = PlainEngine(model, policy, 1e-4, 1e-4, lambda step: 1.0, gradient_clipping=1.0)
        forward = lambda: engine(xr)  # noqa: E731
        loss_fn = lambda out: crit(out, ct)[0]  # noqa: E731
    else:
        model = build_refiner(cfg)
        crit = DetailRefinementLoss(cfg.loss_weights(), "cone", torch.device("cpu"))
        engine = PlainEngine(model, policy, 1e-4, 1e-4, lambda step: 1.0, gradient_clipping=1.0)
        forward = lambda: engine(coarse, xr)  # noqa: E731
        loss_fn = lambda out: crit(out, ct, coarse, xr)[0]  # noqa: E731
    if for_loop:
        _for_loop_adamw(engine)

    def step(phase):
        with phase("forward"):
            out = forward()
        with phase("loss"):
            loss = loss_fn(out)
        with phase("backward"):
            engine.backward(loss)
        with phase("optimizer"):
            engine.step()

    return ("forward", "loss", "backward", "optimizer"), step


def count_step(stage: str, cfg, batch: int, dtype: torch.dtype, for_loop: bool = False) -> dict[str, OpCounter]:
    phases, step = stage_step(stage, cfg, batch, dtype, for_loop)
    step(lambda name: contextlib.nullcontext())  # warm-up: lazy buffers, optimizer state
    counters = {p: OpCounter() for p in phases}
    step(lambda name: counters[name])
    return counters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="full", help="preset whose model widths are counted (default full)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--stages", nargs="+", default=["refine", "base"], choices=("base", "refine"))
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: the driver's choice on this CPU (bf16 where it is native)")
    p.add_argument("--for-loop-adamw", action="store_true", help="count PyTorch's for-loop AdamW in place of the "
                   "engine's fused one (the e20c2d9 baseline of bench/RESULTS-history.md section 17)")
    p.add_argument("--top", type=int, default=10, help="the most frequent ops of each phase to print")
    p.add_argument("--json", type=Path, default=None, help="write every count here")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    precision = {"auto": "auto", "bf16": "bf16", "fp32": "fp32"}[a.dtype]
    dtype = DevicePolicy.for_run(torch.device("cpu"), {"bf16": {"enabled": True}}, precision).dtype
    report = {"config": a.config, "batch": a.batch, "dtype": str(dtype), "stages": {}}
    for stage in a.stages:
        counters = count_step(stage, cfg, a.batch, dtype, a.for_loop_adamw)
        totals = {k: c.total for k, c in counters.items()}
        step_ops = totals["forward"] + totals["loss"] + totals["backward"]
        detach = sum(counters[k].ops["detach"] for k in ("forward", "loss", "backward"))
        print(f"{stage}: forward {totals['forward']}, loss {totals['loss']}, backward {totals['backward']} "
              f"= {step_ops} ops (forward + loss + backward; {step_ops - detach} without the counting mode's "
              f"{detach} detach); optimizer {totals['optimizer']}")
        for k, c in counters.items():
            print(f"  {k:9s} " + ", ".join(f"{n} {m}" for n, m in c.ops.most_common(a.top)))
        report["stages"][stage] = {"totals": totals, "step_ops": step_ops, "step_ops_without_detach": step_ops - detach,
                                   "ops": {k: dict(c.ops.most_common()) for k, c in counters.items()}}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
