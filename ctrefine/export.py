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

from . import __version__
from . import conventions as C
from .config import Config
from .outputs import atomic_file
from .errors import UserError
from .pipeline import TwoStage, ort_session

OPSET = 18
PARITY_TOL = 1e-4


def _metadata(cfg: Config, geometry: dict | None) -> dict[str, str]:
    m = cfg.model
    return {
        "ctrefine_version": __version__,
        "volume_size": str(m.volume_size),
        "xray_size": str(m.xray_size),
        "fov_mm": str(C.FOV_MM),
        "voxel_spacing_mm": str(C.FOV_MM / m.volume_size),
        "intensity_window": json.dumps({"hu_min": C.HU_MIN, "hu_max": C.HU_MAX,
                                        "model_space": "clip((HU - hu_min) / (hu_max - hu_min), 0, 1)"}),
        "xray_normalization": json.dumps({"input": "attenuation image (line integral of mu, bone bright)",
                                          "per_image": "(x - p_lo) / (p_hi - p_lo), clipped to [0, 1]",
                                          "percentiles": list(C.XRAY_NORM_PERCENTILES)}),
        "geometry": json.dumps(geometry or {"kind": "cone", "source_isocenter_mm": C.SOURCE_ISOCENTER_MM,
                                            "source_detector_mm": C.SOURCE_DETECTOR_MM}),
        "axes": "volume (B,1,D,H,W): D sup->inf, H ant->post, W right->left; PA image (D,W), lateral (D,H)",
    }


def export_onnx(model: TwoStage, cfg: Config, out, geometry: dict | None = None) -> Path:
    """Export ``model`` to ``out`` (written atomically), add metadata, run ``onnx.checker``."""
    import onnx

    out = Path(out)
    s = cfg.model.xray_size
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


class ParityError(UserError):
    """The exported graph does not reproduce torch within :data:`PARITY_TOL`."""


def export_and_verify(model: TwoStage, cfg: Config, out, extra_batches: dict | None = None, log=print) -> float:
    """Export, then check ORT against torch on random batches of 1 and 3 (and ``extra_batches``).

    Prints one line per batch through ``log``; raises :class:`ParityError` (the file stays, for
    inspection) when the worst error exceeds :data:`PARITY_TOL`. Returns the worst error.
    """
    s = cfg.model.xray_size
    g = torch.Generator().manual_seed(0)
    batches = {"random batch 1": torch.rand(1, 2, 1, s, s, generator=g),
               "random batch 3": torch.rand(3, 2, 1, s, s, generator=g), **(extra_batches or {})}
    log(f"exporting {out} (dynamo exporter, opset {OPSET}; about half a minute on a CPU) ...")
    path = export_onnx(model, cfg, out)
    log(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB, opset {OPSET}, onnx.checker passed)")
    worst = 0.0
    for name, x in batches.items():
        err = verify(model, path, [x])
        worst = max(worst, err)
        log(f"  ONNX Runtime vs torch, {name}: max |error| = {err:.2e}")
    if worst > PARITY_TOL:
        raise ParityError(f"ONNX parity {worst:.2e} exceeds {PARITY_TOL:.0e} ({path})")
    return worst
