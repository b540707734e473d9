"""Inference engines side by side at the full size (64^3 from 128^2, 15.2M + 5.0M parameters), one run.

Engines: torch fp32 eager, torch bf16 autocast, and the exported graph in ONNX Runtime and OpenVINO,
fp32, bf16 (OpenVINO only: ONNX Runtime's CPU provider has no bf16 convolutions) and int8
(:mod:`ctrefine.quantize`); each ONNX engine computes in the precision the file is tagged with. Batch 1 and 8; seconds per volume, volumes/s and the peak
resident memory the engine added (``VmHWM`` reset before it is built, Linux). Weights are untrained
(speed does not depend on their values) and the int8 ranges come from random radiographs; what int8
costs in dB is measured on trained models by ``ctrefine export-onnx --precision int8`` and recorded
in bench/RESULTS-history.md section 4. ``test_ort_op_profile`` breaks ONNX Runtime's time down by operator.

torch bf16 runs only where bf16 is native (CUDA, AMX / AVX512-BF16): on a CPU that emulates it one
batch-1 volume did not finish in 11 minutes (AVX2 machine, 2026-11-25), so it is skipped there.
"""
import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrefine.config import resolve
from ctrefine.export import export_onnx, verify
from ctrefine.models import build_models
from ctrefine.engines import COMPUTE, onnx_feed, onnx_runner
from ctrefine.pipeline import TwoStage
from ctrefine.quantize import quantize_int8
from ctrefine.device import cpu_has_native_bf16

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ENGINES = ["torch-fp32", "torch-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "onnxruntime-int8",
           "openvino-int8"]


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    cfg = resolve()
    torch.manual_seed(0)
    model = TwoStage(*build_models(cfg)).eval()
    with torch.no_grad():  # a live refiner head: otherwise refined == coarse and the refiner's path goes unchecked
        model.refiner.head.weight.normal_(0, 0.02)
    folder = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(model, cfg, folder / "full.onnx")
    g = np.random.default_rng(0)
    s = cfg.model.xray_size
    feeds = [{k: g.random((1, 1, s, s), dtype=np.float32) for k in ("xray_pa", "xray_lateral")} for _ in range(4)]
    int8 = quantize_int8(fp32, folder / "full-int8.onnx", feeds, {"precision": "int8"})
    bf16 = export_onnx(model, cfg, folder / "full-bf16.onnx", precision="bf16")
    return model, cfg, {"fp32": fp32, "int8": int8, "bf16": bf16}


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset the peak resident set (Linux >= 4.0) and return the current one, KiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ENGINES)
def test_engine(benchmark, full_model, engine, batch):
    model, cfg, files = full_model
    kind, precision = engine.split("-")
    if precision == "bf16" and not (CUDA or cpu_has_native_bf16()):
        pytest.skip("bf16 is emulated on this CPU (no AMX / AVX512-BF16): one torch volume took over 11 minutes")
    s = cfg.model.xray_size
    x = torch.rand(batch, 2, 1, s, s, generator=torch.Generator().manual_seed(1))
    rss0 = _reset_peak()
    if kind == "torch":
        m, xd = model.to(DEVICE), x.to(DEVICE)

        def run():
            with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = m(xd[:, 0], xd[:, 1])
            if CUDA:
                torch.cuda.synchronize()
            return out
        compute = "bf16" if precision == "bf16" else "f32"
    else:
        if kind == "openvino":
            pytest.importorskip("openvino")
        _, runner, compute = onnx_runner(files[precision], kind, compute=COMPUTE[precision])
        feed = onnx_feed(x)

        def run():
            return runner(feed)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    out = run()
    assert tuple(out[1].shape) == (batch, 1, *(cfg.model.volume_size,) * 3)
    sec = benchmark.stats.stats.median / batch
    benchmark.extra_info.update({"engine": engine, "batch": batch, "s_per_volume": sec, "volumes_per_s": 1 / sec,
                                 "peak_rss_added_mib": (_status("VmHWM") - rss0) / 1024, "compute": compute,
                                 "device": DEVICE})


def test_fp32_graph_matches_torch_in_both_engines(full_model):
    """The exported fp32 graph (FFTs as MatMul) agrees with torch's FFT path in every engine."""
    model, cfg, files = full_model
    x = torch.rand(1, 2, 1, cfg.model.xray_size, cfg.model.xray_size, generator=torch.Generator().manual_seed(2))
    for engine in ("onnxruntime", "openvino"):
        pytest.importorskip(engine)
        assert verify(model, files["fp32"], [x], engine) <= 1e-4


def test_ort_op_profile(full_model, tmp_path):
    import onnxruntime as ort

    _, cfg, files = full_model
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(str(files["fp32"]), so, providers=["CPUExecutionProvider"])
    s = cfg.model.xray_size
    x = torch.rand(1, 2, 1, s, s)
    for _ in range(3):
        sess.run(None, onnx_feed(x))
    prof = json.loads(open(sess.end_profiling()).read())
    by_op = {}
    for ev in prof:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            op = ev["args"].get("op_name", "?")
            by_op[op] = by_op.get(op, 0) + ev["dur"]
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    print("\nORT CPU time by op (3 runs, batch 1):")
    for op, us in top:
        print(f"  {op:24s} {us / 3e3:9.1f} ms/run  {100 * us / total:5.1f} %")
    assert "DFT" not in by_op, "the exported graph should carry the FFTs as MatMul"
    assert total > 0
