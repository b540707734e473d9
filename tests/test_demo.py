"""The main job end to end, at smoke-test size: data -> base -> refiner -> ONNX -> ORT inference."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ctrefine.cli", "demo", "--out", str(out), "--preset", "cpu-small", "--num-patients",
           "8", "--base-epochs", "1", "--refine-epochs", "1", "--ranks", "1", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "refined wins" in r.stdout and "gain (refined - coarse)" in r.stdout
    for f in ("data/splits.json", "base/best_model.pt", "refine/best_model.pt", "model.onnx",
              "inference_results/metrics.txt", "inference_results/metrics.json"):
        assert (out / f).exists(), f
    assert list((out / "inference_results").glob("patient_*/patient_*_comparison.png"))
    # a rerun reuses every finished stage (no retraining: the base reports it is done at once)
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0 and "is newer than both checkpoints: reused" in r2.stdout
