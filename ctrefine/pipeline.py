"""The deployable two-stage model and its predictors.

* :class:`TwoStage` -- base then refiner as one module: two radiographs in, coarse and refined out,
  and with an uncertainty head (:mod:`ctrefine.uncertainty`) their per-voxel sigma too. This is what
  is exported to ONNX and what the torch predictor runs.
* :func:`load_two_stage` -- build it from two model files (:mod:`ctrefine.checkpoint`).
* :class:`TorchPredictor` / :class:`OnnxPredictor` -- ``(B, 2, 1, S, S)`` radiographs ->
  ``(coarse, refined)`` model-space volumes (``predict``: and their sigma, or None), with torch, or with
  the exported ONNX file in ONNX Runtime or OpenVINO (:mod:`ctrefine.engines`); :func:`make_predictor` picks.
* :func:`reconstruct_batch` -- the one reconstruction step every caller runs: predict, the safety gate
  (:func:`ctrefine.reprojection.safety_gate`), the gated uncertainty; :func:`split_psnr` is it over a split.

Export and inference both build on this module and on :mod:`ctrefine.checkpoint`, never on each other.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import load_model_file
from .device import inference_device, inference_dtype, kernel_choice, kernel_mode
from .config import Config
from .data.dataset import CTDataset, iter_batches
from .engines import COMPUTE, check_graph, checked_metadata, onnx_feed, onnx_header, onnx_runner
from .errors import DataError, UserError
from .metrics import psnr
from .models.norm import use_fused_groupnorm
from .reprojection import SliceProjector, safety_gate
from .uncertainty import Calibration, build_head, gated_std_hu


class TwoStage(nn.Module):
    """Base then refiner: two radiographs in, coarse and refined volumes out; with a ``head``, also the
    sigma of each (model units): ``(coarse, refined, coarse_std, refined_std)``."""

    def __init__(self, base: nn.Module, refiner: nn.Module, head: nn.Module | None = None,
                 calibration: Calibration | None = None):
        super().__init__()
        self.base, self.refiner, self.head = base, refiner, head
        self.calibration = calibration  # the head's record (validation figures), or None

    def forward(self, xray_pa: torch.Tensor, xray_lateral: torch.Tensor, with_std: bool = True):
        x = torch.stack([xray_pa, xray_lateral], dim=1)
        coarse = self.base(x)
        refined = self.refiner(coarse, x)
        if self.head is None or not with_std:
            return coarse, refined
        n = coarse.shape[0]  # one head pass over both answers the safety gate may return
        std = self.head(torch.cat([coarse, coarse]), torch.cat([coarse, refined]), torch.cat([x, x]))
        return coarse, refined, std[:n], std[n:]


def load_two_stage(base_ckpt, refiner_ckpt) -> tuple[TwoStage, Config]:
    """The pipeline from two ``best_model.pt`` files: (model in eval mode, the refiner's config)."""
    kernel_mode()  # a bad CTREFINE_KERNELS fails before any work, not inside the first forward
    b = load_model_file(base_ckpt, stage="base")
    r = load_model_file(refiner_ckpt, stage="refine")
    if b.config.model.volume_size != r.config.model.volume_size or b.config.model.xray_size != r.config.model.xray_size:
        raise DataError(f"{base_ckpt} and {refiner_ckpt} were trained for different volume or radiograph sizes")
    head, cal = build_head(r.uncertainty, str(r.path))
    if cal is not None and cal.volume_size != r.config.model.volume_size:
        raise DataError(f"{r.path}: its uncertainty head is for {cal.volume_size}^3 volumes, the refiner's are "
                        f"{r.config.model.volume_size}^3")
    return TwoStage(b.build(), r.build(), head, cal).eval(), r.config


# ------------------------------------------------------------------------------------- predictors
class TorchPredictor:
    """Base + refiner in torch, fp32, on CPU or CUDA: from two ``best_model.pt`` files, or
    :meth:`from_model` for a pipeline already in memory."""

    kind = "torch"
    precision = "fp32"  # the weights (an ONNX file may carry bf16 or int8 ones)

    def __init__(self, base_ckpt, refiner_ckpt, device: str | None = None, arithmetic: str = "auto"):
        model, cfg = load_two_stage(base_ckpt, refiner_ckpt)
        self._setup(model, cfg, device, f"{base_ckpt} + {refiner_ckpt}", arithmetic)

    @classmethod
    def from_model(cls, model: TwoStage, cfg: Config, device: str | None = None, source: str = "in memory",
                   arithmetic: str = "auto"):
        self = cls.__new__(cls)
        self._setup(model.eval(), cfg, device, source, arithmetic)
        return self

    def _setup(self, model, cfg, device, source, arithmetic):
        """``device`` and ``arithmetic`` (auto, bf16, fp32) as the device policy decides them (ctrefine.device)."""
        self.model, self.cfg, self.source = model, cfg, source
        self.uncertainty = model.calibration
        self.device = inference_device(device or "auto")
        self.dtype = inference_dtype(self.device, arithmetic)
        self.compute = "bf16" if self.dtype == torch.bfloat16 else "f32"  # recorded in metrics.json
        self.model.to(self.device)
        use_fused_groupnorm(self.model, kernel_choice(self.device).groupnorm)
        self.xray_size = cfg.model.xray_size
        # the ray geometry the refiner was trained on (models from before re-projection guidance: cone)
        self.geometry = cfg.model.reprojection if cfg.model.reprojection != "off" else "cone"

    def drop_uncertainty(self) -> None:
        """Run without the uncertainty head (``infer --no-uncertainty``)."""
        self.model.head, self.model.calibration, self.uncertainty = None, None, None

    @torch.no_grad()
    def _run(self, xrays: torch.Tensor, with_std: bool) -> list[torch.Tensor]:
        x = xrays.to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return [t.float().cpu() for t in self.model(x[:, 0], x[:, 1], with_std)]

    def predict(self, xrays: torch.Tensor):
        """``(coarse, refined, coarse_std, refined_std)`` on the CPU, model units; the stds None without a head."""
        out = self._run(xrays, True)
        return tuple(out) if len(out) == 4 else (*out, None, None)

    def __call__(self, xrays: torch.Tensor):
        """``(coarse, refined)`` only: the uncertainty head is not run."""
        return tuple(self._run(xrays, False))


class OnnxPredictor:
    """The exported single graph (fp32, bf16 or int8, :mod:`ctrefine.export`) in ONNX Runtime or OpenVINO,
    computing in the precision the file's tag asks for (:data:`COMPUTE`)."""

    def __init__(self, path, engine: str = "auto", threads: int | None = None):
        meta, inputs, outputs = onnx_header(path)
        self.xray_size, self.geometry = checked_metadata(path, meta)
        check_graph(path, inputs, outputs, self.xray_size)
        self.precision = meta.get("precision", "fp32")  # files from before int8 export carry no tag
        if self.precision not in COMPUTE:
            raise DataError(f"{path}: unknown precision tag {self.precision!r} (this ctrefine reads "
                            f"{', '.join(COMPUTE)})")
        self.engine, self._run, self.compute = onnx_runner(path, engine, threads, COMPUTE[self.precision])
        self.kind = f"onnx:{self.engine}"
        self.source = str(path)
        self.uncertainty = _onnx_calibration(path, meta.get("uncertainty"))
        self._use_std = self.uncertainty is not None

    def drop_uncertainty(self) -> None:
        """Ignore the graph's sigma outputs (``infer --no-uncertainty``; the graph still computes them)."""
        self.uncertainty, self._use_std = None, False

    def predict(self, xrays: torch.Tensor):
        """``(coarse, refined, coarse_std, refined_std)``, model units; the stds None for a graph without them."""
        out = [torch.from_numpy(np.asarray(t)) for t in self._run(onnx_feed(xrays))]
        if not self._use_std:
            return out[0], out[1], None, None
        if len(out) != 4:
            raise DataError(f"{self.source}: its metadata describes an uncertainty head but the graph has "
                            f"{len(out)} outputs, not 4")
        return tuple(out)

    def __call__(self, xrays: torch.Tensor):
        return self.predict(xrays)[:2]


def _onnx_calibration(path, text: str | None) -> Calibration | None:
    """The uncertainty calibration an exported graph carries in its metadata (validated), or None."""
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except ValueError:
        raise DataError(f"{path}: metadata uncertainty is not JSON") from None
    return Calibration.from_dict(raw, str(path))


def make_predictor(base_ckpt=None, refiner_ckpt=None, onnx=None, engine: str = "auto", device: str | None = None,
                   arithmetic: str = "auto"):
    """The ONNX graph in ``engine`` when ``onnx`` is given, torch (on ``device``: by default CUDA when there is
    one) from the two model files when both are, and the best shipped pair
    (:func:`ctrefine.pretrained.default_pair`) when none is."""
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
    return TorchPredictor(base_ckpt, refiner_ckpt, device, arithmetic)


# ------------------------------------------------------------------------------- the reconstruction step
@dataclass
class BatchReconstruction:
    """One batch through both stages and the safety gate: model-space ``(B, 1, V, V, V)`` volumes on the CPU."""

    coarse: torch.Tensor
    ungated: torch.Tensor  # the refiner's own output
    refined: torch.Tensor  # after the gate: the refined volume, or the coarse one where the gate fell back
    records: list[dict]  # per patient: both X-ray consistencies and whether the gate fell back
    std_hu: list[np.ndarray] | None  # per patient: the sigma (HU) of the volume the gate returned; None without a head


@functools.lru_cache(maxsize=4)
def _projector(volume_size: int, geometry: str) -> SliceProjector:
    return SliceProjector(volume_size, geometry=geometry)


def reconstruct_batch(predictor, xrays: torch.Tensor, gate: bool = True, uncertainty: bool = True) -> BatchReconstruction:
    """Predict ``xrays`` ``(B, 2, 1, S, S)`` (normalised radiographs), pass the refined volumes through the safety
    gate (``gate=False``: recorded, never applied) and, where the predictor carries an uncertainty head and
    ``uncertainty`` is asked for, the sigma of whichever volume the gate returned. ``infer`` (both modes), the
    uncertainty fit and :func:`split_psnr` all reconstruct through here."""
    with_std = uncertainty and getattr(predictor, "uncertainty", None) is not None
    coarse, ungated, coarse_std, refined_std = predictor.predict(xrays) if with_std else (*predictor(xrays), None, None)
    refined, records = safety_gate(_projector(coarse.shape[-1], predictor.geometry), xrays, coarse, ungated, gate)
    std = gated_std_hu(coarse_std, refined_std, records) if with_std else None
    return BatchReconstruction(coarse, ungated, refined, records, std)


def split_psnr(predictor, data_path, split: str = "test", batch_size: int = 4) -> dict[str, float]:
    """The refiner's own PSNR (dB, gate off) on each patient of ``split`` against its ground truth: how an engine
    or a precision is judged where bit parity cannot be asked of it (``ctrefine.export``)."""
    ds = CTDataset(data_path, split, cache=False).nonempty()
    out = {}
    for xrays, ct, names in iter_batches(ds, range(len(ds)), batch_size):
        step = reconstruct_batch(predictor, xrays, gate=False, uncertainty=False)
        out.update(zip(names, psnr(step.ungated, ct).tolist()))
    return out
