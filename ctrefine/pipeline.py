"""The deployable two-stage model and the engines that run it.

* :class:`TwoStage` -- base then refiner as one module: two radiographs in, coarse and refined out.
  This is what is exported to ONNX and what the torch predictor runs.
* :func:`load_two_stage` -- build it from two model files (:mod:`ctrefine.checkpoint`).
* :class:`TorchPredictor` / :class:`OnnxPredictor` -- ``(B, 2, 1, S, S)`` radiographs ->
  ``(coarse, refined)`` model-space volumes, with torch or ONNX Runtime; :func:`make_predictor` picks.

Export and inference both build on this module and on :mod:`ctrefine.checkpoint`, never on each other.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_model_file
from .config import Config
from .errors import DataError, UserError


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
    return TwoStage(b.build(), r.build()).eval(), r.config


# ------------------------------------------------------------------------------------ ONNX Runtime
def ort_session(path, threads: int | None = None):
    """An ONNX Runtime session (CUDA provider when available, else CPU); one-line error if unreadable."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ONNX model not found")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:
        raise DataError(f"{path}: cannot load ONNX model ({type(exc).__name__})") from None


def onnx_metadata(session) -> dict:
    """The ``metadata_props`` ctrefine writes into its ONNX files (window, normalisation, sizes...)."""
    return dict(session.get_modelmeta().custom_metadata_map)


# ---------------------------------------------------------------------------------------- engines
class TorchPredictor:
    """Base + refiner from two ``best_model.pt`` files, fp32, on CPU or CUDA."""

    kind = "torch"

    def __init__(self, base_ckpt, refiner_ckpt, device: str | None = None):
        self.model, self.cfg = load_two_stage(base_ckpt, refiner_ckpt)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.xray_size = self.cfg.model.xray_size
        self.source = f"{base_ckpt} + {refiner_ckpt}"

    @torch.no_grad()
    def __call__(self, xrays: torch.Tensor):
        x = xrays.to(self.device)
        c, r = self.model(x[:, 0], x[:, 1])
        return c.float().cpu(), r.float().cpu()


class OnnxPredictor:
    """The exported single graph in ONNX Runtime."""

    kind = "onnx"

    def __init__(self, path):
        self.session = ort_session(path)
        meta = onnx_metadata(self.session)
        if "xray_size" not in meta:
            raise DataError(f"{path}: not a ctrefine ONNX model (no xray_size metadata)")
        self.xray_size = int(meta["xray_size"])
        self.source = str(path)

    def __call__(self, xrays: torch.Tensor):
        x = xrays.float().numpy()
        c, r = self.session.run(None, {"xray_pa": x[:, 0], "xray_lateral": x[:, 1]})
        return torch.from_numpy(c), torch.from_numpy(r)


def make_predictor(base_ckpt=None, refiner_ckpt=None, onnx=None):
    """ONNX Runtime when ``onnx`` is given, else torch from the two model files."""
    if onnx:
        if base_ckpt or refiner_ckpt:
            raise UserError("give --onnx MODEL or the two checkpoints, not both")
        return OnnxPredictor(onnx)
    if not (base_ckpt and refiner_ckpt):
        raise UserError("give --onnx MODEL, or both --base-checkpoint and --refinement-checkpoint")
    return TorchPredictor(base_ckpt, refiner_ckpt)
