"""One fp32 training step of a `cpu-medium`-width model at 64^3 (batch 2, channels-last convolutions, as the
driver trains narrow models on a CPU): the median of N steps. Written to compare two trees side by side:

    PYTHONPATH=/path/to/old python bench/ab_step.py refine 5
    PYTHONPATH=.            python bench/ab_step.py refine 5
"""
import statistics
import sys
import time

import torch

from ctrefine.config import load_config
from ctrefine.losses.loss import DetailRefinementLoss, ReconstructionLoss
from ctrefine.models import build_base, build_refiner
from ctrefine.models.layout import channels_last_layers

torch.set_num_threads(2)
stage, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
cfg = load_config("cpu-medium")
torch.manual_seed(0)
m = build_base(cfg) if stage == "base" else build_refiner(cfg)
if stage == "refine":
    with torch.no_grad():
        m.head.weight.normal_(0, 0.02)  # a live head: the backward reaches every layer
channels_last_layers(m)
v, s = cfg.model.volume_size, cfg.model.xray_size
g = torch.Generator().manual_seed(1)
x, t = torch.rand(2, 2, 1, s, s, generator=g), torch.rand(2, 1, v, v, v, generator=g)
c = (t + 0.05).clamp(0, 1)
loss_fn = ReconstructionLoss() if stage == "base" else DetailRefinementLoss(cfg.loss_weights())
opt = torch.optim.AdamW(m.parameters(), lr=1e-5)


def step() -> float:
    loss, _ = loss_fn(m(x), t) if stage == "base" else loss_fn(m(c, x), t, c, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


first = step()
times = []
for _ in range(n):
    a = time.perf_counter()
    step()
    times.append(time.perf_counter() - a)
med = statistics.median(times)
print(f"{stage} first_loss {first:.6f} median_step_s {med:.3f} vol_s {2 / med:.3f}")
