"""The DeepSpeed config a training run accepts: an allow-list, checked before any work.

DeepSpeed validates its config lazily (some mistakes surface only after an epoch, at the first
checkpoint) and several of its options change what it reads or writes: ``checkpoint.load_universal``
unpickles files that :func:`~ctrefine.training.checkpointing.verify_checkpoint` never saw, NVMe
offload writes swap files to a path of its own. So the driver accepts exactly the subset it was built
and tested with, each key checked for its type and range, and refuses everything else in one line
that names the file and the key. Batch size, gradient accumulation, optimizer and LR schedule belong
to the ctrefine config (``training.*``): the driver fills them in.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError

# keys the driver sets itself from the ctrefine config: "auto" (or the driver's own value) only
DRIVER_OWNED = {"train_micro_batch_size_per_gpu": "training.batch_size", "train_batch_size": "training.batch_size",
                "gradient_accumulation_steps": "1 (the driver steps once per batch)",
                "optimizer": "training.learning_rate / weight_decay", "scheduler": "training.warmup_* / min_lr_ratio"}
ZERO_KEYS = {"stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
             "reduce_scatter", "allgather_partitions", "round_robin_gradients"}
SUPPORTED = {"gradient_clipping", "bf16", "fp16", "zero_optimization", "steps_per_print", "wall_clock_breakdown",
             *DRIVER_OWNED}


def _fail(path: Path, msg: str):
    raise UserError(f"{path}: {msg}")


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_count(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _enabled(path: Path, ds: dict, key: str) -> bool:
    sec = ds.get(key, {})
    if not isinstance(sec, dict) or set(sec) - {"enabled"}:
        _fail(path, f'"{key}" must be {{"enabled": true|false}} (ctrefine supports no other {key} option), '
                    f'got {sec!r}')
    v = sec.get("enabled", False)
    if not _is_bool(v):
        _fail(path, f'"{key}.enabled" must be true or false, got {v!r}')
    return v


def _check_zero(path: Path, zero) -> None:
    """The ZeRO section: stage 1 or 2, and the few tuning keys that change no file read or written."""
    if not isinstance(zero, dict):
        _fail(path, f'"zero_optimization" must be an object, got {zero!r}')
    extra = sorted(set(zero) - ZERO_KEYS)
    if extra:
        _fail(path, f'"zero_optimization.{extra[0]}" is not supported by ctrefine\'s driver (supported: '
                    f'{", ".join(sorted(ZERO_KEYS))}; offloading and ZeRO-3 are not)')
    stage = zero.get("stage", 0)
    if not _is_count(stage, 1) or stage > 2:
        _fail(path, f'"zero_optimization.stage" must be 1 or 2, got {stage!r} (the best model file is exported from '
                    f'ZeRO\'s fp32 master weights, which stage 0 does not keep; stage 3 partitions the model that '
                    f'rank 0 validates)')
    for k in ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions", "round_robin_gradients"):
        if k in zero and not _is_bool(zero[k]):
            _fail(path, f'"zero_optimization.{k}" must be true or false, got {zero[k]!r}')
    for k in ("reduce_bucket_size", "allgather_bucket_size"):
        if k in zero and not _is_count(zero[k], 1):
            _fail(path, f'"zero_optimization.{k}" must be a positive integer, got {zero[k]!r}')


def check_ds_config(ds: dict, path) -> dict:
    """Refuse (one line naming ``path`` and the key) anything the driver does not support; returns ``ds``."""
    path = Path(path)
    extra = sorted(set(ds) - SUPPORTED)
    if extra:
        _fail(path, f'"{extra[0]}" is not supported by ctrefine\'s driver (it accepts: '
                    f'{", ".join(sorted(SUPPORTED - set(DRIVER_OWNED)))})')
    for key, owner in DRIVER_OWNED.items():
        allowed = ("auto", 1) if key == "gradient_accumulation_steps" else ("auto",)
        if key in ds and (isinstance(ds[key], bool) or ds[key] not in allowed):
            _fail(path, f'remove "{key}" (or set it to "auto"): the driver owns it -- {owner}')
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        _fail(path, f'"gradient_clipping" must be a finite number >= 0 (0: off), got {clip!r}')
    if _enabled(path, ds, "fp16"):
        _fail(path, '"fp16.enabled" is not supported: ctrefine trains in bf16 or fp32 (use --precision)')
    _enabled(path, ds, "bf16")
    _check_zero(path, ds.get("zero_optimization", {}))
    if "steps_per_print" in ds and not _is_count(ds["steps_per_print"], 1):
        _fail(path, f'"steps_per_print" must be a positive integer, got {ds["steps_per_print"]!r}')
    if "wall_clock_breakdown" in ds and not _is_bool(ds["wall_clock_breakdown"]):
        _fail(path, f'"wall_clock_breakdown" must be true or false, got {ds["wall_clock_breakdown"]!r}')
    return ds
