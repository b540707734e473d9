"""The one config path: defaults here, presets in ``configs/*.json`` override them, validated on load.

Schema (the seed's): ``model / training / loss / data / checkpoint / logging``. A preset only lists
what it changes. An unknown key, or a value of the wrong type, is a one-line :class:`ConfigError`
naming the key -- a typo must never silently fall back to a default.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

DEFAULTS: dict = {
    "model": {
        "volume_size": 64,  # target grid side (voxels); 64^3 at 5 mm covers the 320 mm FOV
        "xray_size": 128,  # radiograph side (pixels); 2x the volume so DRRs carry sub-voxel detail
        "base_width": 32,  # base channel width -> 15.2M parameters at 64^3 (the design's ~16M)
        "hidden_channels": 64,  # refiner width -> 5.0M parameters (the design's ~5M)
        "guidance_channels": 16,  # X-ray detail guidance features per view
        "freq_bins": 16,  # radial frequency bands of each FrequencyAttention gain
        "mid_blocks": 4,  # residual blocks at the refiner's quarter resolution
        "base_model_checkpoint": None,  # refine stage: path to the trained base (.pt state dict)
    },
    "training": {
        "batch_size": 4,  # per rank (DeepSpeed's train_micro_batch_size_per_gpu)
        "num_epochs": 40,
        "base_num_epochs": None,  # epochs of the base stage if it needs a different budget; null = num_epochs
        "learning_rate": 2e-4,  # AdamW; peak of the cosine schedule
        "weight_decay": 1e-4,
        "warmup_steps": 50,  # linear warm-up before the cosine decay
        "min_lr_ratio": 0.05,  # cosine floor as a fraction of the peak LR
        "seed": 0,
        "early_stopping_patience": 0,  # epochs without val improvement before stopping; 0 = never
    },
    "loss": {"l1": 1.0, "frequency": 0.5, "gradient": 0.3, "perceptual": 0.2, "consistency": 0.1},
    "data": {
        "data_path": "runs/demo/data",  # a dataset made by `ctrefine make-data` or `ctrefine prepare`
        "train_split": "train",
        "val_split": "val",
    },
    "checkpoint": {
        "dir": "runs/default",  # checkpoints, CSV log, best model export
        "save_every": 1,  # epochs between periodic checkpoints
        "keep_last": 2,  # periodic checkpoints kept on disk (the best is always kept)
    },
    "logging": {"log_every": 10, "tensorboard": True},
}

_NULLABLE = {("model", "base_model_checkpoint"): str, ("training", "base_num_epochs"): int}


class ConfigError(ValueError):
    """Invalid configuration (one-line message naming the key)."""


def _merge(base: dict, over: dict, prefix: str = "") -> None:
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {key!r} must be an object")
            _merge(base[k], v, key + ".")
            continue
        ref = base[k]
        section, name = (prefix.rstrip("."), k)
        if v is None and (section, name) in _NULLABLE:
            base[k] = None
            continue
        if ref is None:
            want = _NULLABLE[(section, name)]
            if not isinstance(v, want) or isinstance(v, bool):
                raise ConfigError(f"config key {key!r} must be a {want.__name__} or null, got {v!r}")
        elif isinstance(ref, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"config key {key!r} must be true/false, got {v!r}")
        elif isinstance(ref, int):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"config key {key!r} must be an integer, got {v!r}")
        elif isinstance(ref, float):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"config key {key!r} must be a number, got {v!r}")
            v = float(v)
        elif isinstance(ref, str) and not isinstance(v, str):
            raise ConfigError(f"config key {key!r} must be a string, got {v!r}")
        base[k] = v


def resolve(overrides: dict | None = None) -> dict:
    """Defaults with ``overrides`` merged in (validated)."""
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, overrides or {})
    if cfg["model"]["volume_size"] % 16:
        raise ConfigError("model.volume_size must be a multiple of 16")
    if cfg["training"]["batch_size"] < 1 or cfg["training"]["num_epochs"] < 1:
        raise ConfigError("training.batch_size and training.num_epochs must be >= 1")
    return cfg


def read_json_object(path, error=None) -> dict:
    """Read a JSON file that must hold an object; problems become one-line ``error`` (ConfigError)."""
    error = error or ConfigError
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: top level must be an object")
    return raw


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """Apply ``KEY=VALUE`` strings (dotted keys, JSON values; bare strings allowed) to a raw preset."""
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            pass  # a bare string such as a path
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = val
    return raw


def load_config(path, overrides: list[str] | None = None) -> dict:
    """Read a JSON preset, apply ``KEY=VALUE`` overrides, and resolve it against the defaults."""
    raw = read_json_object(path)
    raw.pop("_comment", None)
    try:
        return resolve(apply_overrides(raw, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def build_models(cfg: dict):
    """(base, refiner) as the config's ``model`` section describes them."""
    from .models.base import BaseReconstructor
    from .models.refiner import DetailRefinementNetwork

    m = cfg["model"]
    base = BaseReconstructor(m["volume_size"], m["base_width"])
    refiner = DetailRefinementNetwork(m["volume_size"], m["hidden_channels"], m["guidance_channels"], m["freq_bins"],
                                      m["mid_blocks"])
    return base, refiner
