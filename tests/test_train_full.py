"""bench/train_full.sh, the one-call recipe for the mission's models on a GPU, in its dry mode (CPU, 32^3,
one epoch a stage): every phase runs, the model files come back in fp16 parts that join into loadable
model files, and the summary carries the test-split evaluation beside the mean baseline."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_train_full_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DRY="1", PY=sys.executable, OUT=str(out), W=str(tmp_path / "w"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "bench" / "train_full.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    timeline = (tmp_path / "w" / "res" / "timeline.txt").read_text()
    for phase in ("data", "train_base", "train_refine", "eval_full", "pack_base", "pack_refine"):
        assert f"{phase} rc=0" in timeline, timeline
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import pack_model
    finally:
        sys.path.pop(0)
    from ctrefine.checkpoint import load_model_file

    for stage in ("base", "refine"):
        model = pack_model.join(out / f"{stage}.parts.json", tmp_path / f"{stage}_fp16.pt")
        assert load_model_file(model, stage=stage).build() is not None
    summary = (out / "summary.md").read_text()
    assert "## Evaluation: full pair, test split" in summary and "mean baseline" in summary
    assert "| base |" in summary and "| refine |" in summary
