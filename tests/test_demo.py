"""The main job end to end, as `make demo` runs it on a CPU, at smoke-test size: data -> the shipped base ->
refiner -> ONNX -> inference. (Base training through the launcher: tests/test_train.py and the dry run of
bench/train_full.sh.)"""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_at_64_starts_from_the_shipped_frozen_base(tmp_path):
    """The default CPU demo, as `make demo` runs it: 64^3, the shipped base (not trained, not copied), only
    the refiner trained (fine-tuned from the shipped refiner), ONNX export + inference; a rerun reuses every finished stage; a file the demo did
    not write is never replaced, and a folder that only looks like a demo is refused."""
    import json
    import shutil

    from ctrefine import pretrained
    from ctrefine.launch import SHIPPED_BASE, SHIPPED_REFINER, demo_preset

    assert SHIPPED_BASE["cpu-medium"] in pretrained.SHIPPED and demo_preset("auto") == "cpu-medium"
    assert SHIPPED_REFINER["cpu-medium"] in pretrained.SHIPPED
    out = tmp_path / "demo64"
    cmd = [sys.executable, "-m", "ctrefine.cli", "demo", "--out", str(out), "--num-patients", "6", "--refine-epochs", "1",
           "--ranks", "1", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "preset cpu-medium" in r.stdout and "shipped pretrained:phantom-64, frozen" in r.stdout
    assert "refined wins" in r.stdout and "gain (refined - coarse)" in r.stdout
    assert "initialised from pretrained:phantom-64-refiner" in r.stdout  # the driver's own line: the start it used
    assert not (out / "base").exists()  # nothing trained or copied for the base
    for f in ("data/splits.json", "refine/best_model.pt", "model.onnx", "inference_results/metrics.txt"):
        assert (out / f).exists(), f
    assert list((out / "inference_results").glob("patient_*/patient_*_comparison.png"))
    check = json.loads((out / "refine" / "frozen_base_check.json").read_text())
    assert check["identical"] and check["file"] == str(pretrained.resolve("pretrained:phantom-64"))
    summary = json.loads((out / "inference_results" / "metrics.json").read_text())["summary"]
    assert summary["num_patients"] >= 1 and "coarse_psnr_mean" in summary
    # a rerun reuses every finished stage (the refiner reports it is done at once; the ONNX file is kept)
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0 and "is newer than both checkpoints: reused" in r2.stdout
    # a file the demo did not write, where it would write, is never replaced: the rerun refuses
    (out / "model.onnx").write_bytes(b"the user's own model")
    r3 = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # refused before any work
    assert r3.returncode == 2 and "is not the file this demo exported" in r3.stderr, r3.stderr[-2000:]
    assert (out / "model.onnx").read_bytes() == b"the user's own model"
    # a folder that merely looks like a demo (a ctrefine dataset under data/, a model.onnx) is not one
    other = tmp_path / "looks_like_a_demo"
    shutil.copytree(out / "data", other / "data")
    (other / "model.onnx").write_bytes(b"mine")
    cmd[cmd.index(str(out))] = str(other)
    r4 = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r4.returncode == 2 and "is not an earlier demo run" in r4.stderr
    assert (other / "model.onnx").read_bytes() == b"mine" and not (other / "refine").exists()


def test_the_demo_fine_tunes_the_shipped_refiner_only_on_its_own_base():
    """The shipped refiner is a start only for the base it was trained on: with --train-base, with
    --refiner-from-scratch and for presets without one, the refiner starts from a random init; the user's
    --refine-epochs wins over the fine-tuning's epochs."""
    from ctrefine.launch import FINE_TUNE, refine_sets

    sets, start = refine_sets("cpu-medium", True, False, None)
    assert sets[0] == "training.init_checkpoint=pretrained:phantom-64-refiner" and sets[1:] == list(FINE_TUNE)
    assert "fine-tuned from pretrained:phantom-64-refiner" in start
    assert refine_sets("cpu-medium", True, False, 3)[0][-1] == "training.num_epochs=3"
    for args in (("cpu-medium", False, False, None), ("cpu-medium", True, True, None), ("cpu-small", True, False, None),
                 ("full", False, False, None)):
        assert refine_sets(*args) == ([], "from a random init"), args
