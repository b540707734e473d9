"""The training step and inference at the speed of the device: the isolated step's variants side by
side, its profile, the share of the project's kernels, and inference throughput -- one run, one JSON.

    python bench/gpu_step.py --out runs/gpu_step                  # CUDA: `full` models, batch 8
    python bench/gpu_step.py --out runs/smoke --smoke             # any machine: cpu-small, batch 2, 2 steps

A step is what the training driver runs under DeepSpeed's bf16 mode: the module and its inputs in
bf16 (the refine stage's coarse volume from a frozen base computed beforehand), the stage's loss,
backward, AdamW. (``--smoke`` runs fp32 off CUDA: a bf16 *module* takes slow convolution paths on a
CPU, and the smoke run only checks the script.) Variants (each measured after its warm-up, losses of the first
step compared; the kernels given to the model and the loss at construction, as the driver does):

* ``reference`` -- PyTorch's GroupNorm + SiLU and the reference losses (``CTREFINE_KERNELS=0``);
* ``kernels`` -- what ``auto`` runs on CUDA (the loss kernels; ``ctrefine.device.AUTO_ON_CUDA``); on a CPU
  under ``TRITON_INTERPRET=1`` the same kernels, interpreted (the dry run's check of the dispatch);
* ``all-kernels`` -- and the fused GroupNorm + SiLU kernel (``CTREFINE_KERNELS=1``);
* ``kernels+channels-last`` -- and 3D convolutions in channels-last-3d (:mod:`ctrefine.models.layout`);
* ``kernels+compile`` -- and ``torch.compile`` of the module (``training.compile=on``).

Writes ``<out>/gpu_step.json`` (every figure) and ``<out>/profile_<stage>.txt`` (torch.profiler's table
of the ``kernels`` step, device time first).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ctrefine.config import load_config
from ctrefine.device import AUTO_ON_CUDA, Kernels
from ctrefine.losses.loss import DetailRefinementLoss, ReconstructionLoss
from ctrefine.models import build_base, build_refiner
from ctrefine.models.layout import channels_last_layers
from ctrefine.models.norm import use_fused_groupnorm
from ctrefine.pipeline import TwoStage

VARIANTS = ("reference", "kernels", "all-kernels", "kernels+channels-last", "kernels+compile")
OWN_KERNELS = ("_laplacian_l1", "_spectral", "_moments", "_apply_fwd", "_reduce_bwd", "_apply_bwd")  # Triton names


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def variant_kernels(variant: str) -> Kernels:
    """The kernels a variant runs: none, every family, or what ``auto`` picks on CUDA (``AUTO_ON_CUDA``) for
    ``kernels`` and the variants built on it -- on a CPU too, where they run under ``TRITON_INTERPRET=1``."""
    if variant == "reference":
        return Kernels()
    return Kernels(True, True) if variant == "all-kernels" else Kernels(**AUTO_ON_CUDA)


def runnable(variant: str, device) -> bool:
    """Every variant on CUDA; on a CPU the reference, and ``kernels`` when Triton's interpreter is on."""
    if device.type == "cuda":
        return True
    return variant == "reference" or (variant == "kernels" and os.environ.get("TRITON_INTERPRET") == "1")


class Step:
    """One bf16 training step of ``stage`` (``base`` | ``refine``) as the driver runs it."""

    def __init__(self, stage: str, cfg, batch: int, device, variant: str):
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.stage, self.device, self.variant = stage, device, variant
        model = build_base(cfg) if stage == "base" else build_refiner(cfg)
        if stage == "refine":
            with torch.no_grad():
                model.head.weight.normal_(0, 0.02)  # a live head: the backward reaches every layer
        choice = self.kernels = variant_kernels(variant)
        use_fused_groupnorm(model, choice.groupnorm)
        if variant.endswith("channels-last"):
            channels_last_layers(model)
        self.model = model.to(device, dtype)
        if variant.endswith("compile"):
            self.model.compile()
        v, s = cfg.model.volume_size, cfg.model.xray_size
        g = torch.Generator().manual_seed(1)
        self.xrays = torch.rand(batch, 2, 1, s, s, generator=g).to(device, dtype)
        self.target = torch.rand(batch, 1, v, v, v, generator=g).to(device)
        self.coarse = (self.target + 0.05 * torch.randn(self.target.shape, generator=g).to(device)).clamp(0, 1)
        self.coarse = self.coarse.to(dtype)
        self.loss = ReconstructionLoss() if stage == "base" else DetailRefinementLoss(cfg.loss_weights(), device=device,
                                                                                          kernels=choice.loss)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def __call__(self) -> torch.Tensor:
        if self.stage == "base":
            loss, _ = self.loss(self.model(self.xrays), self.target)
        else:
            loss, _ = self.loss(self.model(self.coarse, self.xrays), self.target, self.coarse, self.xrays)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def time_steps(step: Step, warmup: int, steps: int) -> dict:
    first = float(step())
    t0 = time.perf_counter()
    for _ in range(max(0, warmup - 1)):
        step()
    sync(step.device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(step.device)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"first_loss": first, "step_ms": 1e3 * med, "volumes_per_s": step.xrays.shape[0] / med,
            "warmup_s": warm_s}


def profile(step: Step, path: Path, steps: int = 3) -> dict:
    """torch.profiler over ``steps`` steps: the table, kernel launches a step, the own kernels' share."""
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    with prof(activities=acts) as p:
        for _ in range(steps):
            step()
        sync(step.device)
    key = "self_device_time_total" if step.device.type == "cuda" else "self_cpu_time_total"
    ev = p.key_averages()
    path.write_text(ev.table(sort_by=key, row_limit=40))
    dev = [e for e in ev if e.device_type.name == "CUDA"] if step.device.type == "cuda" else list(ev)
    total = sum(getattr(e, key) for e in dev) or 1.0
    own = sum(getattr(e, key) for e in dev if any(k in e.key for k in OWN_KERNELS))
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"own_kernel_share": own / total, "kernel_launches_per_step": launches / steps,
            "device_time_ms_per_step": total / 1e3 / steps}


def inference(cfg, device, batches, reps: int) -> dict:
    base, ref = build_base(cfg), build_refiner(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = TwoStage(base, ref).to(device, dtype).eval()
    s = cfg.model.xray_size
    out = {}
    for b in batches:
        x = torch.rand(b, 2, 1, s, s, device=device).to(dtype)
        with torch.no_grad():
            for _ in range(2):
                model(x[:, 0], x[:, 1])
            sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                model(x[:, 0], x[:, 1])
            sync(device)
        dt = (time.perf_counter() - t) / reps
        out[f"batch_{b}"] = {"ms": 1e3 * dt, "volumes_per_s": b / dt}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="cpu-small, batch 2, few steps: checks the script anywhere")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--stages", nargs="+", choices=("base", "refine"), default=["refine", "base"])
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config("cpu-small" if a.smoke else "full")
    batch, warmup, steps = (1, 1, 1) if a.smoke else (cfg.training.batch_size, 5, 10)
    variants = [v for v in a.variants if runnable(v, device)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": "bf16" if device.type == "cuda" else "fp32",
           "date": time.strftime("%Y-%m-%d"), "preset": "cpu-small" if a.smoke else "full", "batch": batch, "steps": {}}
    save = lambda: (out / "gpu_step.json").write_text(json.dumps(res, indent=1))  # noqa: E731 -- after every row
    for stage in a.stages:
        for v in variants:
            try:
                step = Step(stage, cfg, batch, device, v)
                res["steps"][f"{stage}/{v}"] = {**time_steps(step, warmup, steps), "kernels": vars(step.kernels)}
            except Exception as exc:  # a variant that fails is a finding, not the end of the run
                res["steps"][f"{stage}/{v}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(stage, v, res["steps"][f"{stage}/{v}"], flush=True)
            save()
        res[f"profile_{stage}"] = profile(Step(stage, cfg, batch, device, variants[-1]), out / f"profile_{stage}.txt",
                                          1 if a.smoke else 3)
        print(stage, "profile", res[f"profile_{stage}"], flush=True)
        save()
    res["inference"] = inference(cfg, device, [1] if a.smoke else [1, 8, 32], 1 if a.smoke else 10)
    print("inference", res["inference"], flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
