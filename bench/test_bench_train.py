"""Training throughput: volumes/s of one optimisation step per stage, kernels on vs off.

A step = forward, loss, backward, AdamW update, in bf16 autocast (what DeepSpeed's bf16 mode does to
the arithmetic) or fp32, at the preset's batch size: ``full`` on CUDA, ``cpu-small`` on CPU. Both
precisions are measured because CPUs differ: with AMX / AVX512-BF16 bf16 is the fast path, on an
AVX2-only CPU it is emulated and far slower (the training driver picks by hardware). The kernel
switch only matters on CUDA (on CPU the reference runs either way, so only "off" is measured).
This isolates the model + loss cost from DeepSpeed's communication; the end-to-end figure of the
deepspeed launcher is the ``volumes_per_s`` column of ``train_log.csv``.
"""
import pytest
import torch
import torch.nn.functional as F

from ctrefine.config import load_config
from ctrefine.losses.loss import DetailRefinementLoss
from ctrefine.models import build_models
from ctrefine.models.norm import use_fused_groupnorm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("kernels", ["0", "1"] if CUDA else ["0"])
@pytest.mark.parametrize("stage", ["base", "refine"])
def test_train_step(benchmark, stage, kernels, precision):
    cfg = load_config("full" if CUDA else "cpu-small")
    base, refiner = build_models(cfg)
    v, s, b = cfg.model.volume_size, cfg.model.xray_size, cfg.training.batch_size
    g = torch.Generator().manual_seed(0)
    coarse, target = torch.rand(2, b, 1, v, v, v, generator=g).to(DEVICE)
    xrays = torch.rand(b, 2, 1, s, s, generator=g).to(DEVICE)
    model = (base if stage == "base" else refiner).to(DEVICE)
    use_fused_groupnorm(model, kernels == "1")
    crit = DetailRefinementLoss(cfg.loss_weights(), kernels=kernels == "1")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if stage == "base":
                loss = F.l1_loss(model(xrays).float(), target)
            else:
                loss, _ = crit(model(coarse, xrays), target, coarse, xrays)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    slow = precision == "bf16" and not CUDA  # emulated bf16 on AVX2-only CPUs: seconds a step
    benchmark.pedantic(step, rounds=30 if CUDA else (2 if slow else 5), iterations=1, warmup_rounds=1 if slow else 2)
    benchmark.extra_info.update({"volumes_per_s": b / benchmark.stats.stats.mean, "batch": b, "volume": v,
                                 "device": torch.cuda.get_device_name() if CUDA else "cpu"})
