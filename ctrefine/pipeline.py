"""The deployable two-stage model and its predictors.

* :class:`TwoStage` -- base then refiner as one module: two radiographs in, coarse and refined out.
  This is what is exported to ONNX and what the torch predictor runs.
* :func:`load_two_stage` -- build it from two model files (:mod:`ctrefine.checkpoint`).
* :class:`TorchPredictor` / :class:`OnnxPredictor` -- ``(B, 2, 1, S, S)`` radiographs ->
  ``(coarse, refined)`` model-space volumes, with torch, or with the exported ONNX file in ONNX Runtime
  or OpenVINO (:mod:`ctrefine.engines`); :func:`make_predictor` picks.

Export and inference both build on this module and on :mod:`ctrefine.checkpoint`, never on each other.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import load_model_file
from .config import Config
from .engines import COMPUTE, checked_metadata, onnx_feed, onnx_metadata, onnx_runner
from .errors import DataError, UserError
from .uncertainty import Calibration


class TwoStage(nn.Module):
    """Base then refiner: two radiographs in, coarse and refined volumes out."""

    def __init__(self, base: nn.Module, refiner: nn.Module):
        super().__init__()
        self.base, self.refiner = base, refiner

    def forward(self, xray_pa: torch.Tensor, xray_lateral: torch.Tensor):
        x = torch.stack([xray_pa, xray_lateral], dim=1)
        coarse = self.base(x)
        return coarse, self.refiner(coarse, x)


def load_two_stage(base_ckpt, refiner_ckpt) -> tuple[TwoStage, Config]:
    """The pipeline from two ``best_model.pt`` files: (model in eval mode, the refiner's config)."""
    b = load_model_file(base_ckpt, stage="base")
    r = load_model_file(refiner_ckpt, stage="refine")
    if b.config.model.volume_size != r.config.model.volume_size or b.config.model.xray_size != r.config.model.xray_size:
        raise DataError(f"{base_ckpt} and {refiner_ckpt} were trained for different volume or radiograph sizes")
    model = TwoStage(b.build(), r.build()).eval()
    model.uncertainty = r.uncertainty  # the refiner's calibration record (or None): predictors and export read it
    return model, r.config


# ------------------------------------------------------------------------------------- predictors
class TorchPredictor:
    """Base + refiner in torch, fp32, on CPU or CUDA: from two ``best_model.pt`` files, or
    :meth:`from_model` for a pipeline already in memory."""

    kind = "torch"
    precision, compute = "fp32", "f32"  # weights; arithmetic (an ONNX engine may compute an fp32 file in bf16)

    def __init__(self, base_ckpt, refiner_ckpt, device: str | None = None):
        model, cfg = load_two_stage(base_ckpt, refiner_ckpt)
        self._setup(model, cfg, device, f"{base_ckpt} + {refiner_ckpt}")

    @classmethod
    def from_model(cls, model: TwoStage, cfg: Config, device: str | None = None, source: str = "in memory"):
        self = cls.__new__(cls)
        self._setup(model.eval(), cfg, device, source)
        return self

    def _setup(self, model, cfg, device, source):
        self.model, self.cfg, self.source = model, cfg, source
        raw = getattr(model, "uncertainty", None)
        self.uncertainty = None if raw is None else Calibration.from_dict(raw, source)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.xray_size = cfg.model.xray_size
        # the ray geometry the refiner was trained on (models from before re-projection guidance: cone)
        self.geometry = cfg.model.reprojection if cfg.model.reprojection != "off" else "cone"

    @torch.no_grad()
    def __call__(self, xrays: torch.Tensor):
        x = xrays.to(self.device)
        c, r = self.model(x[:, 0], x[:, 1])
        return c.float().cpu(), r.float().cpu()


class OnnxPredictor:
    """The exported single graph (fp32, bf16 or int8, :mod:`ctrefine.export`) in ONNX Runtime or OpenVINO,
    computing in the precision the file's tag asks for (:data:`COMPUTE`)."""

    def __init__(self, path, engine: str = "auto", threads: int | None = None):
        meta = onnx_metadata(path)
        self.xray_size, self.geometry = checked_metadata(path, meta)
        self.precision = meta.get("precision", "fp32")  # files from before int8 export carry no tag
        if self.precision not in COMPUTE:
            raise DataError(f"{path}: unknown precision tag {self.precision!r} (this ctrefine reads "
                            f"{', '.join(COMPUTE)})")
        self.engine, self._run, self.compute = onnx_runner(path, engine, threads, COMPUTE[self.precision])
        self.kind = f"onnx:{self.engine}"
        self.source = str(path)
        self.uncertainty = _onnx_calibration(path, meta.get("uncertainty"))

    def __call__(self, xrays: torch.Tensor):
        c, r = self._run(onnx_feed(xrays))
        return torch.from_numpy(np.asarray(c)), torch.from_numpy(np.asarray(r))


def _onnx_calibration(path, text: str | None) -> Calibration | None:
    """The uncertainty calibration an exported graph carries in its metadata (validated), or None."""
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except ValueError:
        raise DataError(f"{path}: metadata uncertainty is not JSON") from None
    return Calibration.from_dict(raw, str(path))


def make_predictor(base_ckpt=None, refiner_ckpt=None, onnx=None, engine: str = "auto"):
    """The ONNX graph in ``engine`` when ``onnx`` is given, torch from the two model files when both are,
    and the best shipped pair (:func:`ctrefine.pretrained.default_pair`) when none is."""
    if onnx:
        if base_ckpt or refiner_ckpt:
            raise UserError("give --onnx MODEL or the two checkpoints, not both")
        return OnnxPredictor(onnx, engine)
    if not base_ckpt and not refiner_ckpt:
        from .pretrained import default_pair

        base_ckpt, refiner_ckpt = default_pair()
    elif not (base_ckpt and refiner_ckpt):
        raise UserError("give both --base-checkpoint and --refinement-checkpoint (or neither, for the best shipped "
                        "pair), or --onnx MODEL")
    return TorchPredictor(base_ckpt, refiner_ckpt)
