"""Model files: ``best_model.pt`` -- write, read (one-line errors), build the model, fingerprint.

A model file is what inference and the refine stage need from training, and nothing DeepSpeed-specific::

    {"format": "ctrefine-model", "stage": "base" | "refine", "weights": "fp32" | "fp16",
     "state_dict": {name: tensor (fp32, or fp16 for weights="fp16"; read back as fp32)},
     "config": <resolved config as a plain dict>, "metrics": {...}, "epoch": int, "global_step": int}

Only tensors and JSON-able values, so it is read with ``torch.load(weights_only=True)``: a ``.pt``
from elsewhere cannot run code. :func:`export_fp32` turns a ZeRO checkpoint (bf16 compute, fp32
master weights sharded across ranks) into such a state dict.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, upgrade_stored
from .outputs import atomic_file
from .errors import ConfigError, DataError
from .models import BUILDERS
from . import pretrained

FORMAT = "ctrefine-model"
STAGES = tuple(BUILDERS)  # ("base", "refine")


@dataclass
class ModelFile:
    """The contents of a model file, validated."""

    path: Path
    stage: str
    state_dict: dict
    config: Config
    metrics: dict = field(default_factory=dict)
    epoch: int | None = None
    global_step: int | None = None
    uncertainty: dict | None = None  # a refiner's calibration (ctrefine.uncertainty.Calibration.as_dict)

    def build(self) -> torch.nn.Module:
        """The model of this file's stage with its weights, in eval mode (one-line error on a mismatch)."""
        model = BUILDERS[self.stage](self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
            raise DataError(f"{self.path}: weights do not fit the {self.stage} model its config describes ({first})") \
                from None
        return model.eval()


WEIGHTS = {"fp32": torch.float32, "fp16": torch.float16}  # how a model file may store its floating weights


def save_model_file(path, stage: str, state_dict: dict, cfg: Config, metrics: dict | None = None,
                    epoch: int | None = None, global_step: int | None = None, weights: str = "fp32",
                    uncertainty: dict | None = None) -> Path:
    """Write a model file atomically (CPU tensors, config as a plain dict). ``weights="fp16"`` stores the
    floating tensors in half precision (half the size, e.g. to carry a 15M-parameter model in one 30 MB
    file); they are read back as fp32 (:func:`load_model_file`)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    dtype = WEIGHTS[weights]
    blob = {"format": FORMAT, "stage": stage, "weights": weights,
            "state_dict": {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
                           for k, v in state_dict.items()},
            "config": cfg.to_dict(), "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "epoch": epoch, "global_step": global_step}
    if uncertainty is not None:
        blob["uncertainty"] = uncertainty
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)
    return path


def load_model_file(path, stage: str | None = None) -> ModelFile:
    """Read a model file (one-line :class:`DataError` if it is missing, unsafe or not one; ``stage`` checked).
    ``path`` may name a shipped model, ``pretrained:NAME`` (:mod:`ctrefine.pretrained`)."""
    path = pretrained.resolve(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a model file (a training run's is <run>/<stage>/best_model.pt)")
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip / safety errors all mean "not a model file we can trust"
        raise DataError(f"{path}: cannot read checkpoint as a ctrefine model file ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict) or not isinstance(obj.get("config"), dict):
        raise DataError(f"{path}: not a ctrefine model file (expected state_dict + config)")
    if obj.get("stage") not in STAGES:
        raise DataError(f"{path}: unknown stage {obj.get('stage')!r}")
    if stage is not None and obj["stage"] != stage:
        want = "the base" if stage == "base" else "the refiner"
        raise DataError(f"{path}: holds a {obj['stage']!r} model, expected {want}")
    try:
        cfg = Config.from_dict(upgrade_stored(obj["config"]), source=f"{path} (stored config)")
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    unc = obj.get("uncertainty")
    if unc is not None and not isinstance(unc, dict):
        raise DataError(f"{path}: its uncertainty entry is not a calibration record")
    return ModelFile(path, obj["stage"], state, cfg, obj.get("metrics") or {}, obj.get("epoch"), obj.get("global_step"),
                     unc)


def load_weights_into(model: torch.nn.Module, path, stage: str) -> str:
    """Copy a model file's weights into ``model`` (a fine-tuning start); a one-line :class:`DataError`
    when its stage or architecture differs. Returns the file's :func:`state_fingerprint`."""
    mf = load_model_file(path, stage=stage)
    mine = model.state_dict()
    odd = sorted(set(mine) ^ set(mf.state_dict)) or [k for k in mine if mine[k].shape != mf.state_dict[k].shape]
    if odd:
        raise DataError(f"{mf.path}: its {stage} model is not this config's architecture (first difference: {odd[0]})")
    model.load_state_dict(mf.state_dict)
    return state_fingerprint(mf.state_dict)


def state_fingerprint(state_dict: dict) -> str:
    """sha256 over the names, dtypes and bytes of every tensor (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


PLAIN_FILE = "plain_states.pt"  # a checkpoint of the single-device engine (ctrefine.training.engine): one file a tag


def checkpoint_globals() -> list:
    """What a training checkpoint of ctrefine holds besides tensors and plain containers: numpy arrays (the
    RNG states in the client state) and three small DeepSpeed records of the ZeRO optimizer."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes, LossScaler,
            ZeroStageEnum, fragment_address]


def export_fp32(ckpt_dir, tag: str) -> dict:
    """The fp32 weights of a saved training checkpoint as a plain state dict: a ZeRO checkpoint's master
    weights (sharded across ranks), or the single-device engine's weights."""
    plain = Path(ckpt_dir) / tag / PLAIN_FILE
    if plain.is_file():
        with torch.serialization.safe_globals(checkpoint_globals()):
            blob = torch.load(plain, map_location="cpu", weights_only=True)
        return {k: v.float().clone() if v.is_floating_point() else v.clone() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress output
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float().clone() for k, v in sd.items()}
