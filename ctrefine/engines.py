"""ONNX engines: sessions of the exported graph in ONNX Runtime or OpenVINO, its input feed and the
metadata it carries (sizes, geometry, precision), checked before a file is run.

:class:`ctrefine.pipeline.OnnxPredictor` runs a file through :func:`onnx_runner`; :mod:`ctrefine.export`
writes the metadata (:func:`set_onnx_metadata`) and checks parity in every installed engine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, UserError

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
    On an AVX-512 CPU without native bf16 OpenVINO emulates a ``bf16`` request, on older CPUs it runs f32;
    :func:`onnx_runner` reports which.
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


def onnx_header(path) -> tuple[dict, dict, dict]:
    """``(metadata, inputs, outputs)`` of an ONNX file: the ``metadata_props`` ctrefine writes (window,
    normalisation, sizes...) and each graph input's / output's dims (an int, or a name for a symbolic one)."""
    import onnx

    path = _existing(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise DataError(f"{path}: not an ONNX model ({type(exc).__name__})") from None

    def dims(values):
        return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                         for d in v.type.tensor_type.shape.dim] for v in values}
    inits = {t.name for t in proto.graph.initializer}
    inputs = dims(v for v in proto.graph.input if v.name not in inits)
    return {p.key: p.value for p in proto.metadata_props}, inputs, dims(proto.graph.output)


def onnx_metadata(path) -> dict:
    """The ``metadata_props`` ctrefine writes into its ONNX files (window, normalisation, sizes...)."""
    return onnx_header(path)[0]


GRAPH_INPUTS = ("xray_pa", "xray_lateral")  # each (B, 1, S, S)
GRAPH_OUTPUTS = (("coarse", "refined"), ("coarse", "refined", "coarse_std", "refined_std"))  # each (B, 1, V, V, V)


def check_graph(path, inputs: dict, outputs: dict, xray_size: int) -> None:
    """The graph takes the two radiographs at the metadata's ``xray_size`` and returns the volumes ctrefine
    exports (2, or 4 with the uncertainty head): anything else is a one-line :class:`DataError`."""
    if tuple(inputs) != GRAPH_INPUTS:
        raise DataError(f"{path}: graph inputs are {list(inputs)}, not {list(GRAPH_INPUTS)}: not a ctrefine export")
    for name, d in inputs.items():
        if len(d) != 4 or d[1] != 1 or d[2:] != [xray_size, xray_size]:
            raise DataError(f"{path}: graph input {name} is {d}, but the metadata says radiographs of "
                            f"{xray_size}^2 (expected [batch, 1, {xray_size}, {xray_size}])")
    if tuple(outputs) not in GRAPH_OUTPUTS:
        raise DataError(f"{path}: graph outputs are {list(outputs)}, not coarse and refined volumes (+ their std): "
                        f"not a ctrefine export")
    for name, d in outputs.items():
        if len(d) != 5 or d[1] != 1 or len(set(map(str, d[2:]))) != 1:
            raise DataError(f"{path}: graph output {name} is {d}, not a volume [batch, 1, V, V, V]")


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
    """``auto``: ONNX Runtime where it has CUDA, else OpenVINO when installed (faster on CPU: bench/RESULTS-history.md
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
    """``(engine, run, compute)``: ``run(feed: dict of numpy) -> [coarse, refined (, coarse_std, refined_std)]`` numpy arrays, and the
    precision the engine really computes float layers in. ``compute="bf16"`` is honoured by OpenVINO on
    CPUs with native bf16 and emulated on other AVX-512 CPUs (it reports which); ONNX Runtime's CPU provider
    has no bf16 convolutions and computes f32."""
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
