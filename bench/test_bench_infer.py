"""Inference latency per volume: torch eager vs ONNX Runtime, base + refiner at the full 64^3 size.

Weights are untrained (latency does not depend on their values). Batch 1 and 8. On CPU the ORT
session uses all cores, as does torch. ``test_ort_op_profile`` breaks the ORT time down by operator
type, to see whether the FFT (ONNX ``DFT``) dominates.
"""
import json

import pytest
import torch

from ctrefine.config import resolve
from ctrefine.export import export_onnx
from ctrefine.models import build_models
from ctrefine.pipeline import TwoStage, ort_session

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    cfg = resolve()
    torch.manual_seed(0)
    model = TwoStage(*build_models(cfg)).eval()
    path = export_onnx(model, cfg, tmp_path_factory.mktemp("onnx") / "full.onnx")
    return model, cfg, path


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_latency(benchmark, full_model, engine, batch):
    model, cfg, path = full_model
    s = cfg.model.xray_size
    x = torch.rand(batch, 2, 1, s, s)
    if engine == "torch":
        m = model.to(DEVICE)
        xd = x.to(DEVICE)

        def run():
            with torch.no_grad():
                out = m(xd[:, 0], xd[:, 1])
            if CUDA:
                torch.cuda.synchronize()
            return out
    else:
        sess = ort_session(path)
        feed = {"xray_pa": x[:, 0].numpy(), "xray_lateral": x[:, 1].numpy()}

        def run():
            return sess.run(None, feed)

    benchmark.pedantic(run, rounds=3 if batch == 8 else 5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"ms_per_volume": benchmark.stats.stats.mean / batch * 1e3,
                                 "providers": ",".join(ort_session(path).get_providers()) if engine != "torch" else DEVICE})


def test_ort_op_profile(full_model, tmp_path):
    import onnxruntime as ort

    _, cfg, path = full_model
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    s = cfg.model.xray_size
    x = torch.rand(1, 2, 1, s, s)
    for _ in range(3):
        sess.run(None, {"xray_pa": x[:, 0].numpy(), "xray_lateral": x[:, 1].numpy()})
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
    assert total > 0
