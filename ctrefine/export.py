"""ONNX export of the frozen base + refiner as ONE graph, and its verification in every installed engine.

Graph: inputs ``xray_pa`` and ``xray_lateral`` ``(batch, 1, S, S)`` (normalised as in
:func:`ctrefine.conventions.normalize_xray`), outputs ``coarse`` and ``refined`` ``(batch, 1, V, V, V)``
in model space (and, for a refiner with an uncertainty head, ``coarse_std`` and ``refined_std``: each
volume's per-voxel sigma in model units, :mod:`ctrefine.uncertainty`). Batch is dynamic. Dynamo
exporter, opset 18. The frequency attention's FFTs are exported as real matrix products (:class:`ctrefine.models.blocks.MatmulSpectralGain`), not as ONNX
``DFT``: plain MatMul is what ONNX Runtime *and* OpenVINO read and accelerate. ``metadata_props`` make
the file self-describing: intensity window, X-ray normalisation, geometry, sizes, precision, version.

Precisions: ``fp32`` (parity with torch to 1e-4, f32 arithmetic in every engine); ``bf16`` (the same
graph, tagged so that OpenVINO computes it in bf16 on CPUs with native bf16); ``int8``
(:mod:`ctrefine.quantize`). bf16 and int8 are judged by the PSNR change on held-out patients.
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
from .data.dataset import CTDataset
from .outputs import atomic_file
from .device import onnx_precision
from .errors import DataError, UserError
from .models.blocks import matmul_transforms
from .engines import installed_engines, onnx_feed, onnx_runner, set_onnx_metadata
from .pipeline import OnnxPredictor, TorchPredictor, TwoStage, split_psnr
from .quantize import calibration_batches, quantize_int8

OPSET = 18
PARITY_TOL = 1e-4  # fp32: max |ONNX - torch| in model space [0, 1]
PSNR_TOL_DB = 0.05  # bf16, int8: what a faster file may cost, mean PSNR over the judged split
PRECISIONS = ("fp32", "bf16", "int8")


def _metadata(cfg: Config, geometry: dict | None, precision: str = "fp32", uncertainty: dict | None = None) -> dict[str, str]:
    m = cfg.model
    extra = {"uncertainty": json.dumps(uncertainty)} if uncertainty else {}  # the refiner's calibration, if any
    return {**extra,
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
        "precision": precision,
    }


def output_names(model: TwoStage) -> list[str]:
    """The graph's outputs: the two volumes, and with an uncertainty head their sigma (model units)."""
    return ["coarse", "refined"] + ([] if model.head is None else ["coarse_std", "refined_std"])


def _record(model: TwoStage) -> dict | None:
    return None if model.calibration is None else model.calibration.as_dict()


def export_onnx(model: TwoStage, cfg: Config, out, geometry: dict | None = None, precision: str = "fp32") -> Path:
    """Export ``model`` to ``out`` (written atomically), add metadata (``precision`` tag: fp32 or bf16,
    the same graph), run ``onnx.checker``."""
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
            with matmul_transforms(model):  # the portable form of the FFTs (see MatmulSpectralGain)
                torch.onnx.export(model, example, str(tmp), dynamo=True, opset_version=OPSET,
                                  input_names=["xray_pa", "xray_lateral"], output_names=output_names(model),
                                  dynamic_shapes={"xray_pa": {0: batch}, "xray_lateral": {0: batch}},
                                  verbose=False)
        proto = onnx.load(str(tmp))  # pulls any external-data file back inline (the model is far below 2 GB)
        data_file = tmp.with_name(tmp.name + ".data")
        if data_file.exists():
            data_file.unlink()
        set_onnx_metadata(proto, _metadata(cfg, geometry, precision, _record(model)))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out


def verify(model: TwoStage, onnx_path, inputs: list[torch.Tensor], engine: str = "onnxruntime") -> float:
    """Max |engine - torch| over both outputs for each ``(B, 2, 1, S, S)`` input batch, f32 arithmetic."""
    _, run, _ = onnx_runner(onnx_path, engine, compute="f32")
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = model(x[:, 0], x[:, 1])
            got = run(onnx_feed(x))
            for a, b in zip(ref, got):
                worst = max(worst, float(np.abs(a.numpy() - np.asarray(b)).max()))
    return worst


class ParityError(UserError):
    """The exported graph does not reproduce torch: max |error| above :data:`PARITY_TOL` (fp32), or a
    mean PSNR change above :data:`PSNR_TOL_DB` (int8)."""


def export_and_verify(model: TwoStage, cfg: Config, out, log=print, precision: str = "fp32", data_path=None,
                      split: str = "test", calibration_patients: int = 16) -> float:
    """Export ``precision`` (fp32; bf16; int8 calibrated on ``data_path``'s training patients), then verify
    it in every installed engine; one line per check through ``log``.

    fp32: max |engine - torch| on random batches of 1 and 3 and on up to 4 patients of ``data_path``'s
    ``split`` must stay within :data:`PARITY_TOL`; returns the worst error. bf16 / int8: the mean refined
    PSNR on ``data_path``'s ``split`` may move by at most :data:`PSNR_TOL_DB` from
    torch fp32; returns the worst change (dB). Raises :class:`ParityError` otherwise (the file stays,
    for inspection).
    """
    if precision == "auto":  # bf16 where this CPU computes it natively, and a dataset can judge it; else fp32
        precision = onnx_precision("auto") if data_path else "fp32"
        log(f"precision auto: {precision}" + ("" if data_path else " (bf16 would need --data-path to judge it)"))
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose from auto, {', '.join(PRECISIONS)}")
    if precision != "fp32":
        return _export_lossy(model, cfg, out, log, precision, data_path, split, calibration_patients)
    s = cfg.model.xray_size
    g = torch.Generator().manual_seed(0)
    batches = {"random batch 1": torch.rand(1, 2, 1, s, s, generator=g),
               "random batch 3": torch.rand(3, 2, 1, s, s, generator=g)}
    if data_path:
        ds = CTDataset(data_path, split)
        batches[f"{split} patients"] = torch.stack([ds[i]["xrays"] for i in range(min(4, len(ds)))])
    log(f"exporting {out} (dynamo exporter, opset {OPSET}; about half a minute on a CPU) ...")
    path = export_onnx(model, cfg, out)
    log(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB, opset {OPSET}, onnx.checker passed)")
    worst = 0.0
    for engine in installed_engines():
        for name, x in batches.items():
            err = verify(model, path, [x], engine)
            worst = max(worst, err)
            log(f"  {engine} vs torch, {name}: max |error| = {err:.2e}")
    if worst > PARITY_TOL:
        raise ParityError(f"ONNX parity {worst:.2e} exceeds {PARITY_TOL:.0e} ({path})")
    return worst


def _export_lossy(model, cfg, out, log, precision, data_path, split, calibration_patients) -> float:
    """bf16 or int8: write the file, then judge it by the PSNR it costs on ``split`` in every engine."""
    import statistics
    import tempfile

    if data_path is None:
        raise UserError(f"--precision {precision} needs --data-path: a dataset whose {split} patients judge the "
                        "result" + (" and whose training patients calibrate the activation ranges"
                                    if precision == "int8" else ""))
    ds = CTDataset(data_path, split).nonempty(f"nothing to judge the {precision} file on")
    size = ds[0]["xrays"].shape[-1]
    if size != cfg.model.xray_size:
        raise DataError(f"{data_path}: radiographs are {size}^2 but the model expects {cfg.model.xray_size}^2")
    out = Path(out)
    if precision == "bf16":
        log(f"exporting {out} (the fp32 graph tagged bf16; dynamo exporter, opset {OPSET}) ...")
        path = export_onnx(model, cfg, out, precision="bf16")
        log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; OpenVINO computes it in bf16 where the CPU "
            "has native bf16)")
    else:
        feeds = calibration_batches(data_path, calibration_patients)
        with tempfile.TemporaryDirectory(prefix=".ctrefine-export-", dir=out.parent) as work:
            log(f"exporting the fp32 graph (dynamo exporter, opset {OPSET}) ...")
            fp32 = export_onnx(model, cfg, Path(work) / "fp32.onnx")
            log(f"quantising Conv to int8 (QDQ, per-channel weights), calibrated on {len(feeds)} training patients ...")
            meta = {**_metadata(cfg, None, "int8", _record(model)),
                    "calibration": f"min/max activation ranges over {len(feeds)} patients of the train split"}
            path = quantize_int8(fp32, out, feeds, meta)
        log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, int8 Conv, fp32 elsewhere)")
    ref = split_psnr(TorchPredictor.from_model(model, cfg, device="cpu"), data_path, split)
    ref_mean = statistics.fmean(ref.values())
    log(f"  torch fp32, {len(ref)} {split} patients: mean refined PSNR {ref_mean:.3f} dB")
    worst = 0.0
    for engine in installed_engines():
        pred = OnnxPredictor(path, engine)
        got = split_psnr(pred, data_path, split)
        delta = statistics.fmean(got.values()) - ref_mean
        worst = max(worst, abs(delta))
        log(f"  {engine} {precision} (computes {pred.compute}): mean refined PSNR {ref_mean + delta:.3f} dB "
            f"({delta:+.3f} dB vs torch fp32; worst patient {min(got[k] - ref[k] for k in ref):+.3f} dB)")
    if worst > PSNR_TOL_DB:
        raise ParityError(f"{precision} changes the mean PSNR by {worst:.3f} dB, more than {PSNR_TOL_DB} dB ({path})")
    return worst
