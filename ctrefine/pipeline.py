"""The deployable two-stage model and the engines that run it.

* :class:`TwoStage` -- base then refiner as one module: two radiographs in, coarse and refined out.
  This is what is exported to ONNX and what the torch predictor runs.
* :func:`load_two_stage` -- build it from two model files (:mod:`ctrefine.checkpoint`).
* :class:`TorchPredictor` / :class:`OnnxPredictor` -- ``(B, 2, 1, S, S)`` radiographs ->
  ``(coarse, refined)`` model-space volumes, with torch, or with the exported ONNX file in ONNX Runtime
  or OpenVINO (:func:`choose_engine`); :func:`make_predictor` picks.

Export and inference both build on this module and on :mod:`ctrefine.checkpoint`, never on each other.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


# ------------------------------------------------------------------------------- ONNX engines
ENGINES = ("onnxruntime", "openvino")


def ort_session(path, threads: int | None = None):
    """An ONNX Runtime session (CUDA provider when available, else CPU); one-line error if unreadable."""
    import onnxruntime as ort

    path = _existing(path)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:
        raise DataError(f"{path}: cannot load ONNX model ({type(exc).__name__})") from None


def openvino_model(path, threads: int | None = None, compute: str = "f32"):
    """The ONNX file compiled by the OpenVINO runtime for the CPU; one-line error if unreadable.

    ``compute`` is the precision of its float layers, set explicitly: left to itself OpenVINO computes
    in bf16 on any CPU with native bf16 (AMX or AVX512-BF16), which moves the output by ~5e-2 --
    a precision the file's owner chose at export (:data:`COMPUTE`), not one the engine may pick.
    On a CPU without native bf16 a ``bf16`` request runs in f32; :func:`onnx_runner` reports which.
    """
    import openvino as ov

    path = _existing(path)
    config = {"INFERENCE_PRECISION_HINT": compute}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:
        raise DataError(f"{path}: OpenVINO cannot load this ONNX model ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


# The file's precision tag (metadata ``precision``) -> the precision an engine computes float layers in.
# ``bf16`` files hold the fp32 graph; only the arithmetic differs, where the engine and CPU support it.
COMPUTE = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}


def _existing(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an ONNX file")
    if not path.is_file():
        raise DataError(f"{path}: ONNX model not found")
    return path


def installed_engines() -> list[str]:
    """The :data:`ENGINES` importable here (ONNX Runtime always is: it is a dependency)."""
    import importlib.util

    return [e for e in ENGINES if importlib.util.find_spec(e)]


def onnx_feed(xrays: torch.Tensor) -> dict:
    """``(B, 2, 1, S, S)`` radiographs -> the graph's inputs ``{"xray_pa", "xray_lateral"}`` as numpy."""
    x = xrays.float().numpy()
    return {"xray_pa": np.ascontiguousarray(x[:, 0]), "xray_lateral": np.ascontiguousarray(x[:, 1])}


def set_onnx_metadata(proto, metadata: dict[str, str]) -> None:
    """Replace the ``metadata_props`` of an ONNX ``ModelProto`` (what :func:`onnx_metadata` reads back)."""
    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def onnx_metadata(path) -> dict:
    """The ``metadata_props`` ctrefine writes into its ONNX files (window, normalisation, sizes...)."""
    import onnx

    path = _existing(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise DataError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    return {p.key: p.value for p in proto.metadata_props}


def checked_metadata(path, meta: dict) -> tuple[int, str]:
    """``(xray_size, geometry kind)`` from an ONNX file's metadata, validated like a config (the file may
    come from anywhere): a missing, malformed or out-of-range value is a one-line :class:`DataError`."""
    from pydantic import ValidationError

    from .config import ModelConfig

    if "xray_size" not in meta:
        raise DataError(f"{path}: not a ctrefine ONNX model (no xray_size metadata)")
    try:
        xray_size = ModelConfig(xray_size=int(meta["xray_size"])).xray_size
    except ValidationError as exc:  # (a ValueError too: caught first)
        raise DataError(f"{path}: metadata xray_size={meta['xray_size'][:40]!r} is not a radiograph size "
                        f"({exc.errors()[0]['msg']})") from None
    except ValueError:
        raise DataError(f"{path}: metadata xray_size={meta['xray_size'][:40]!r} is not an integer") from None
    try:
        geo = json.loads(meta.get("geometry") or '{"kind": "cone"}')
    except ValueError:
        geo = None
    kind = geo.get("kind", "cone") if isinstance(geo, dict) else None
    if kind not in ("cone", "parallel"):
        raise DataError(f"{path}: metadata geometry={meta.get('geometry', '')[:40]!r} is not a ray geometry "
                        f"(cone or parallel)")
    return xray_size, kind


def choose_engine(engine: str = "auto") -> str:
    """``auto``: ONNX Runtime where it has CUDA, else OpenVINO when installed (faster on CPU: bench/RESULTS.md
    section 4), else ONNX Runtime. A named engine that is not installed is a one-line error."""
    if engine == "auto":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return "onnxruntime"
        return "openvino" if "openvino" in installed_engines() else "onnxruntime"
    if engine not in ENGINES:
        raise UserError(f"unknown ONNX engine {engine!r}; choose from auto, {', '.join(ENGINES)}")
    if engine not in installed_engines():
        raise UserError(f"ONNX engine {engine!r} is not installed (pip install {engine})")
    return engine


def onnx_runner(path, engine: str = "auto", threads: int | None = None, compute: str = "f32"):
    """``(engine, run, compute)``: ``run(feed: dict of numpy) -> [coarse, refined]`` numpy arrays, and the
    precision the engine really computes float layers in. ``compute="bf16"`` is honoured by OpenVINO on
    CPUs with native bf16; ONNX Runtime's CPU provider has no bf16 convolutions and computes f32."""
    engine = choose_engine(engine)
    if engine == "openvino":
        compiled = openvino_model(path, threads, compute)
        request = compiled.create_infer_request()
        outputs = list(compiled.outputs)

        def run(feed):
            res = request.infer(feed)
            return [res[o] for o in outputs]
        compute = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32" or "bf16"
    else:
        sess = ort_session(path, threads)

        def run(feed):
            return sess.run(None, feed)
        compute = "f32"
    return engine, run, compute


# ---------------------------------------------------------------------------------------- engines
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

    def __call__(self, xrays: torch.Tensor):
        c, r = self._run(onnx_feed(xrays))
        return torch.from_numpy(np.asarray(c)), torch.from_numpy(np.asarray(r))


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
