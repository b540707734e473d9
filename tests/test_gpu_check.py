"""bench/gpu_check.sh, the one command for a CUDA machine, checked here in its dry mode (CPU, tiny sizes):
the isolated-step phase and the summary run end to end and the summary carries their figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, DRY="1", PHASES="step summary", PY=sys.executable, OUT=str(tmp_path / "out"),
               W=str(tmp_path / "w"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    timeline = (tmp_path / "w" / "res" / "timeline.txt").read_text()
    assert "step rc=0" in timeline and "summary rc=0" in timeline, timeline
    step = json.loads((tmp_path / "w" / "res" / "step" / "gpu_step.json").read_text())
    assert {"refine/reference", "refine/kernels", "base/reference", "base/kernels"} <= set(step["steps"])
    assert all(v["volumes_per_s"] > 0 for v in step["steps"].values())
    # the kernels variant ran the loss kernels (interpreted: TRITON_INTERPRET=1 from conftest), the reference
    # none, and the first losses agree to the kernels' tolerance
    ref, kern = step["steps"]["refine/reference"], step["steps"]["refine/kernels"]
    assert ref["kernels"] == {"loss": False, "groupnorm": False} and kern["kernels"] == {"loss": True, "groupnorm": False}
    assert kern["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-5)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| refine/kernels |" in summary and "batch 1" in summary
    assert (tmp_path / "out" / "gpu_check.tgz").stat().st_size > 0


def test_gpu_summary_reads_launcher_logs(tmp_path):
    """Busy fraction, volumes/s and validation time per 100 patients, from files shaped as the check writes them."""
    res = tmp_path / "res"
    res.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"val": [f"p{i}" for i in range(40)]}))
    (res / "refine_train_log.csv").write_text("epoch,step,volumes_per_s\n1,1,10\n1,20,310\n1,40,330\n")
    (res / "refine_val_log.csv").write_text("epoch,step,train_s,val_s\n1,40,2.0,0.4\n2,80,2.0,0.6\n")
    (res / "busy_refine.csv").write_text("2026/11/30 10:00:00.000, 90, 1000\n2026/11/30 10:00:00.250, 70, 1000\n")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    assert gpu_summary.main([str(res)]) == 0
    row = next(line for line in (res / "summary.md").read_text().splitlines() if line.startswith("| refine |"))
    assert row == "| refine | 320.0 | 2.00 | 0.50 | 1.25 | 80 |"
