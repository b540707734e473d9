"""bench/train_full.sh, one GPU window of the relay (`make gpu-window`), in its dry mode (CPU, 32^3, one epoch a
stage): every phase runs, the model files come back in fp16 parts that join into loadable model files with the
relay log, the summary carries the held-out evaluation beside the mean baseline, and a second window continues
from the first one's parts on new patients."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _window(tmp_path, name, relay):
    out = tmp_path / name
    env = dict(os.environ, DRY="1", PY=sys.executable, OUT=str(out), W=str(tmp_path / f"w_{name}"), RELAY=str(relay),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "bench" / "train_full.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, (tmp_path / f"w_{name}" / "res" / "timeline.txt").read_text()


def test_two_relay_windows_dry_run(tmp_path):
    out, timeline = _window(tmp_path, "first", tmp_path / "relay")  # no relay yet: window 0 starts from scratch
    for phase in ("data_a", "data_b", "data_heldout", "train_base", "train_refine", "eval_full", "pack_base",
                  "pack_refine", "relay_log"):
        assert f"{phase} rc=0" in timeline, timeline
    assert "join_base" not in timeline
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import pack_model
        import relay
    finally:
        sys.path.pop(0)
    from ctrefine.checkpoint import load_model_file

    for stage in ("base", "refine"):
        model = pack_model.join(out / "relay" / f"{stage}.parts.json", tmp_path / f"{stage}_fp16.pt")
        assert load_model_file(model, stage=stage).build() is not None
    summary = (out / "summary.md").read_text()
    assert "mean baseline" in summary and "| base |" in summary and "| refine |" in summary
    log = relay.read_log(out / "relay")
    assert len(log) == 1 and log[0]["window"] == 0 and log[0]["base"]["volumes_seen"] > 0
    assert log[0]["heldout"]["relay"]["refined"]["psnr"] is not None

    # the session commits OUT/relay as relay/; the next window continues from it on new patients
    out2, timeline2 = _window(tmp_path, "second", out / "relay")
    assert "join_base rc=0" in timeline2 and "join_refine rc=0" in timeline2, timeline2
    assert "initialised from" in (tmp_path / "w_second" / "res" / "train_base.log").read_text()
    log2 = relay.read_log(out2 / "relay")
    assert [w["window"] for w in log2] == [0, 1] and log2[1]["seeds"] != log2[0]["seeds"]
    assert log2[1]["heldout_seed"] == log2[0]["heldout_seed"]
    assert log2[1]["volumes_seen_total"] > log2[0]["volumes_seen_total"]
    assert "| 1 |" in relay.show(out2 / "relay")
