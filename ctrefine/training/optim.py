"""The training optimizer: AdamW in the implementation that dispatches the fewest operators on the device.

PyTorch's AdamW has three implementations with identical arithmetic (up to float rounding order):
``for-loop`` (a dozen ATen ops per parameter tensor, and on CUDA a host sync per parameter for the
step count), ``foreach`` (the same ops batched over all tensors: a dozen ops a step) and ``fused``
(one ``_fused_adamw_`` kernel a step; on CUDA and, since torch 2.4, on CPU). Measured with
``bench/step_ops.py`` (CPU, `full` refiner, 5.0M parameters in 150 tensors): for-loop ~1,300 ops a
step, foreach and fused a handful (bench/RESULTS.md, "Host cost of a step").
"""
from __future__ import annotations

import torch

OPTIMIZERS = ("auto", "fused", "foreach", "for-loop")


def make_optimizer(params, device: torch.device, lr: float, weight_decay: float, kind: str = "auto"):
    """AdamW over ``params`` for ``device``. ``auto``: fused (one kernel a step) where PyTorch has it for the
    device (CUDA, CPU), else foreach."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer kind must be one of {OPTIMIZERS}, got {kind!r}")
    if kind == "auto":
        kind = "fused" if device.type in ("cuda", "cpu") else "foreach"
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[kind]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **flags)
