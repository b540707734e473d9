"""ONNX export of the frozen base + refiner as ONE graph, and its verification in ONNX Runtime.

Graph: inputs ``xray_pa`` and ``xray_lateral`` ``(batch, 1, S, S)`` (normalised as in
:func:`ctrefine.conventions.normalize_xray`), outputs ``coarse`` and ``refined`` ``(batch, 1, V, V, V)``
in model space. Batch is dynamic. The dynamo exporter at opset 18 turns ``rfftn/irfftn`` into ONNX
``DFT`` (the TorchScript exporter cannot export them). ``metadata_props`` make the file
self-describing: intensity window, X-ray normalisation, geometry, sizes, package version.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import conventions as C
from .config import build_models
from .data.io import DataError, atomic_file

OPSET = 18
PARITY_TOL = 1e-4


class TwoStage(nn.Module):
    """Base then refiner: two radiographs in, coarse and refined volumes out."""

    def __init__(self, base: nn.Module, refiner: nn.Module):
        super().__init__()
        self.base, self.refiner = base, refiner

    def forward(self, xray_pa: torch.Tensor, xray_lateral: torch.Tensor):
        x = torch.stack([xray_pa, xray_lateral], dim=1)
        coarse = self.base(x)
        return coarse, self.refiner(coarse, x)


def load_two_stage(base_ckpt, refiner_ckpt) -> tuple[TwoStage, dict]:
    """Build the pipeline from two ``best_model.pt`` files; returns (model in eval mode, refiner config)."""
    from .train import load_model_file

    b = load_model_file(base_ckpt)
    r = load_model_file(refiner_ckpt)
    if b.get("stage") != "base":
        raise DataError(f"{base_ckpt}: holds a {b.get('stage')!r} model, expected the base")
    if r.get("stage") != "refine":
        raise DataError(f"{refiner_ckpt}: holds a {r.get('stage')!r} model, expected the refiner")
    cfg = r["config"]
    if b["config"]["model"]["volume_size"] != cfg["model"]["volume_size"]:
        raise DataError(f"{base_ckpt} and {refiner_ckpt} were trained for different volume sizes")
    base, _ = build_models(b["config"])
    _, refiner = build_models(cfg)
    base.load_state_dict(b["state_dict"])
    refiner.load_state_dict(r["state_dict"])
    model = TwoStage(base, refiner).eval()
    return model, cfg


def _metadata(cfg: dict, geometry: dict | None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("ctrefine")
    except PackageNotFoundError:
        ver = "source"
    m = cfg["model"]
    return {
        "ctrefine_version": ver,
        "volume_size": str(m["volume_size"]),
        "xray_size": str(m["xray_size"]),
        "fov_mm": str(C.FOV_MM),
        "voxel_spacing_mm": str(C.FOV_MM / m["volume_size"]),
        "intensity_window": json.dumps({"hu_min": C.HU_MIN, "hu_max": C.HU_MAX,
                                        "model_space": "clip((HU - hu_min) / (hu_max - hu_min), 0, 1)"}),
        "xray_normalization": json.dumps({"input": "attenuation image (line integral of mu, bone bright)",
                                          "per_image": "(x - p_lo) / (p_hi - p_lo), clipped to [0, 1]",
                                          "percentiles": list(C.XRAY_NORM_PERCENTILES)}),
        "geometry": json.dumps(geometry or {"kind": "cone", "source_isocenter_mm": C.SOURCE_ISOCENTER_MM,
                                            "source_detector_mm": C.SOURCE_DETECTOR_MM}),
        "axes": "volume (B,1,D,H,W): D sup->inf, H ant->post, W right->left; PA image (D,W), lateral (D,H)",
    }


def export_onnx(model: TwoStage, cfg: dict, out, geometry: dict | None = None) -> Path:
    """Export ``model`` to ``out`` (written atomically), add metadata, run ``onnx.checker``."""
    import onnx

    out = Path(out)
    s = cfg["model"]["xray_size"]
    example = (torch.rand(2, 1, s, s), torch.rand(2, 1, s, s))
    batch = torch.export.Dim("batch", min=1, max=1024)
    import logging

    # The exporter logs one line per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with atomic_file(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, str(tmp), dynamo=True, opset_version=OPSET,
                              input_names=["xray_pa", "xray_lateral"], output_names=["coarse", "refined"],
                              dynamic_shapes={"xray_pa": {0: batch}, "xray_lateral": {0: batch}}, verbose=False)
        proto = onnx.load(str(tmp))  # pulls any external-data file back inline (the model is far below 2 GB)
        data_file = tmp.with_name(tmp.name + ".data")
        if data_file.exists():
            data_file.unlink()
        for k, v in _metadata(cfg, geometry).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out


def ort_session(path, threads: int | None = None):
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
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
    return dict(session.get_modelmeta().custom_metadata_map)


def verify(model: TwoStage, onnx_path, inputs: list[torch.Tensor]) -> float:
    """Max |ORT - torch| over both outputs for each ``(B, 2, 1, S, S)`` input batch."""
    sess = ort_session(onnx_path)
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = model(x[:, 0], x[:, 1])
            got = sess.run(None, {"xray_pa": x[:, 0].numpy(), "xray_lateral": x[:, 1].numpy()})
            for a, b in zip(ref, got):
                worst = max(worst, float(np.abs(a.numpy() - b).max()))
    return worst
