"""Never lose a user's data, and every failure is one clear line (the findings of the safety issue)."""
import json
import os
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from ctrefine.data.io import load_nifti, save_nifti
from ctrefine.data.radiograph import load_radiograph, orient_radiograph, xray_affine
from ctrefine.errors import DataError, UserError
from ctrefine.outputs import atomic_dir, check_writable


@pytest.fixture(scope="module")
def ckpts(random_pair):
    return ["--base-checkpoint", str(random_pair[0]), "--refinement-checkpoint", str(random_pair[1])]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ctrefine.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def one_error_line(r, needle):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("ctrefine") and " error: " in lines[0], \
        r.stderr[-800:]
    assert needle in lines[0], lines[0]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ outputs
def test_infer_never_replaces_a_users_folder(ckpts, tiny_dataset, tmp_path):
    user = tmp_path / "project"
    user.mkdir()
    (user / "notes.txt").write_text("my thesis")
    before_data = snapshot(tiny_dataset)
    one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", user, "--quiet"), "not empty")
    one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", user, "--quiet", "--overwrite"),
                   "never replaces")
    one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", tiny_dataset, "--quiet"),
                   "overlaps")
    one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", tiny_dataset / "res", "--quiet"),
                   "overlaps")
    one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", ".", "--quiet", cwd=user),
                   "current directory")
    assert (user / "notes.txt").read_text() == "my thesis" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert snapshot(tiny_dataset) == before_data


def test_infer_replaces_its_own_result_only_when_asked(ckpts, tiny_dataset, tmp_path):
    out = tmp_path / "res"
    assert cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", out, "--quiet", "--no-save-volumes",
               "--num-patients", "1").returncode == 0
    first = (out / "metrics.json").stat().st_mtime_ns
    one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", out, "--quiet"), "--overwrite")
    r = cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", out, "--quiet", "--no-save-volumes",
            "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "metrics.json").stat().st_mtime_ns != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old copy left


def test_radiograph_mode_checks_outputs_before_inference(ckpts, tiny_dataset, tmp_path):
    name = json.loads((tiny_dataset / "splits.json").read_text())["test"][0]
    pa, lat = (tiny_dataset / name / f"xray_{v}.nii.gz" for v in ("pa", "lateral"))
    (tmp_path / "ct.nii.gz").write_bytes(b"the user's earlier scan")
    one_error_line(cli("infer", *ckpts, "--xray-pa", pa, "--xray-lateral", lat, "--out", tmp_path / "ct.nii.gz"),
                   "--overwrite")
    assert (tmp_path / "ct.nii.gz").read_bytes() == b"the user's earlier scan"
    (tmp_path / "afile").write_text("x")
    one_error_line(cli("infer", *ckpts, "--xray-pa", pa, "--xray-lateral", lat, "--out", tmp_path / "afile" / "ct.nii.gz"),
                   "is a file, not a folder")
    r = cli("infer", *ckpts, "--xray-pa", pa, "--xray-lateral", lat, "--out", tmp_path / "ct.nii.gz", "--overwrite")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr  # a real DRR raises no plausibility warning
    assert nib.load(str(tmp_path / "ct.nii.gz")).shape == (32, 32, 32)


def test_unwritable_location_is_refused_before_work(tmp_path, monkeypatch):
    """The check itself, then a real command: make-data into a folder it may not write fails on the check,
    before the first phantom is made or anything (folder, lock) is created."""
    from ctrefine.data import dataset

    monkeypatch.setattr(os, "access", lambda p, mode: False)  # root ignores permission bits: simulate read-only
    with pytest.raises(UserError, match="permission denied"):
        check_writable(tmp_path / "new" / "out.onnx")
    work = []
    monkeypatch.setattr(dataset, "_make_dataset", lambda *a, **k: work.append(a))
    with pytest.raises(UserError, match="permission denied"):
        dataset.make_dataset(tmp_path / "ds", 2, size=16, xray_size=16, progress=False)
    assert work == [] and list(tmp_path.iterdir()) == []


def test_make_data_and_demo_refuse_a_foreign_folder(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"\xff\xd8")
    one_error_line(cli("make-data", "--out", user, "--num-patients", "1", "--size", "16", "--xray-size", "16",
                       "--quiet"), "not a ctrefine dataset")
    one_error_line(cli("demo", "--out", user, "--preset", "cpu-small", "--quiet"), "not an earlier demo run")
    one_error_line(cli("make-data", "--out", tmp_path / "ds", "--num-patients", "1", "--size", "20"), "multiple of 16")
    one_error_line(cli("infer", "--onnx", "m.onnx", "--data_path", "d", "--output_dir", "o", "--num_patients", "0"),
                   "must be >= 1")  # used to print NaN metrics with exit 0
    assert sorted(p.name for p in user.iterdir()) == ["cat.jpg"]


def test_prepare_refuses_another_grid_before_work(tmp_path):
    from ctrefine.conventions import canonical_affine
    from ctrefine.data.phantoms import chest_phantom

    save_nifti(tmp_path / "ct.nii.gz", chest_phantom(1, size=32), canonical_affine(32, 10.0))
    assert cli("prepare", "--ct", tmp_path / "ct.nii.gz", "--out", tmp_path / "ds", "--size", "16", "--xray-size",
               "16", "--quiet").returncode == 0
    before = snapshot(tmp_path / "ds")
    one_error_line(cli("prepare", "--ct", tmp_path / "ct.nii.gz", "--out", tmp_path / "ds", "--size", "32",
                       "--xray-size", "16", "--quiet"), "existing dataset has size=16")
    assert snapshot(tmp_path / "ds") == before


def test_export_onnx_output_rules(ckpts, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"someone's model")
    one_error_line(cli("export-onnx", *ckpts, "--out", tmp_path / "m.onnx"), "--overwrite")
    one_error_line(cli("export-onnx", *ckpts, "--out", tmp_path / "m.txt"), ".onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"someone's model"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        save_nifti(tmp_path / "v.nii.gz", np.zeros((4, 4, 4)), np.eye(4))
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "v.nii.gz") == 0o666 & ~mask
    assert mode(tmp_path / "folder") == 0o777 & ~mask


def test_interrupt_and_os_errors_are_one_line(monkeypatch, capsys):
    from ctrefine import cli as cli_mod

    def interrupted(a):
        raise KeyboardInterrupt

    def disk_full(a):
        raise OSError(28, "No space left on device", "/data/out.nii.gz")

    monkeypatch.setattr(cli_mod, "_cmd_info", interrupted)
    assert cli_mod.main(["info"]) == 130
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setattr(cli_mod, "_cmd_info", disk_full)
    assert cli_mod.main(["info"]) == 2
    assert capsys.readouterr().err == "ctrefine: error: /data/out.nii.gz: No space left on device\n"


def test_tensorboard_missing_is_one_notice(monkeypatch, tmp_path):
    from ctrefine.training.logs import tensorboard_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as when not installed
    said = []
    assert tensorboard_writer(True, tmp_path, said.append) is None and len(said) == 1 and "TensorBoard" in said[0]
    assert tensorboard_writer(False, tmp_path, said.append) is None and len(said) == 1


# ------------------------------------------------------------------------------- radiograph geometry
def test_drr_files_declare_their_planes(tiny_dataset):
    _, pa_aff = load_nifti(tiny_dataset / "patient_0000" / "xray_pa.nii.gz")
    _, lat_aff = load_nifti(tiny_dataset / "patient_0000" / "xray_lateral.nii.gz")
    for aff in (pa_aff, lat_aff):
        assert np.argmax(np.abs(aff[:3, 0])) == 2 and aff[2, 0] < 0  # rows: head -> foot
    assert np.argmax(np.abs(pa_aff[:3, 1])) == 0 and pa_aff[0, 1] < 0  # PA columns: patient right -> left
    assert np.argmax(np.abs(lat_aff[:3, 1])) == 1 and lat_aff[1, 1] < 0  # lateral columns: front -> back


def test_nifti_radiographs_are_oriented_by_their_affine(tiny_dataset, tmp_path):
    pa, _ = load_nifti(tiny_dataset / "patient_0000" / "xray_pa.nii.gz")
    aff = xray_affine(5.0, "pa", pa.shape[0])
    # the same image written as ITK does (columns first, rows flipped): the affine says so
    itk = np.ascontiguousarray(pa[::-1].T)
    itk_aff = aff.copy()
    itk_aff[:3, 0], itk_aff[:3, 1] = aff[:3, 1], -aff[:3, 0]
    nib.save(nib.Nifti1Image(itk, itk_aff), str(tmp_path / "itk.nii.gz"))
    assert np.array_equal(load_radiograph(tmp_path / "itk.nii.gz", view="pa"), pa)
    with pytest.raises(DataError, match="swapped"):
        load_radiograph(tmp_path / "itk.nii.gz", view="lateral")
    nib.save(nib.Nifti1Image(pa, np.diag([-1.0, -1.0, 1.0, 1.0])), str(tmp_path / "plain.nii.gz"))
    with pytest.raises(DataError, match="no head-foot"):
        load_radiograph(tmp_path / "plain.nii.gz")
    legacy = np.diag([2.5, 2.5, 1.0, 1.0])  # what ctrefine 0.1 wrote: read as stored
    assert np.array_equal(orient_radiograph(pa, legacy, "old.nii.gz", "pa"), pa)


def test_raw_intensity_input_is_flagged(tiny_dataset, tmp_path):
    from ctrefine.data.radiograph import intensity_suspicion

    for name in json.loads((tiny_dataset / "splits.json").read_text())["train"]:
        for v in ("pa", "lateral"):
            drr, _ = load_nifti(tiny_dataset / name / f"xray_{v}.nii.gz")
            assert intensity_suspicion(drr) is None, (name, v)  # attenuation: centre brighter than the sides
            assert intensity_suspicion(np.exp(-drr)) is not None, (name, v)  # raw intensity: the reverse


def test_scanner_padding_is_air(tmp_path):
    from ctrefine.data.ingest import load_ct

    v = np.full((32, 32, 32), -2048.0, np.float32)  # outside the reconstruction circle
    yy, xx = np.mgrid[:32, :32]
    inside = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 15**2
    v[:, inside] = -1000.0
    v[8:24, 10:22, 10:22] = 40.0
    v[12:20, 12:20, 12:20] = 700.0
    save_nifti(tmp_path / "pad.nii.gz", v, np.diag([2.0, 2.0, 2.0, 1.0]))
    data, _ = load_ct(tmp_path / "pad.nii.gz")
    assert data.min() == -1000.0


# ------------------------------------------------------------------------------ code in a checkpoint
class _Planted:
    """Unpickling this runs a shell command (what a planted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Engine:
    loaded = False

    def load_checkpoint(self, folder, tag):
        self.loaded = True
        return None, {"epoch": 0}


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    from ctrefine.training.checkpointing import Checkpointer

    run = tmp_path / "run"
    tag = run / "ckpt" / "epoch_0001"
    tag.mkdir(parents=True)
    (run / "latest.json").write_text(json.dumps({"tag": "epoch_0001", "epoch": 1, "global_step": 3}))
    ok = {"module": {"w": torch.ones(2)}, "rng": [{"numpy": np.random.get_state()}]}  # what ctrefine saves: allowed
    torch.save(ok, tag / "mp_rank_00_model_states.pt")
    engine = _Engine()
    assert Checkpointer(run, 2, 0, 1).resume(engine) == {"epoch": 0, "tag": "epoch_0001"} and engine.loaded

    marker = tmp_path / "pwned"
    torch.save({"module": _Planted(marker)}, tag / "mp_rank_00_model_states.pt")
    engine = _Engine()
    with pytest.raises(UserError, match="refusing to resume from it, it would call .*system"):
        Checkpointer(run, 2, 0, 1).resume(engine)
    assert not marker.exists() and not engine.loaded

    (run / "latest.json").write_text(json.dumps({"tag": "../../elsewhere"}))
    with pytest.raises(UserError, match="names no checkpoint"):
        Checkpointer(run, 2, 0, 1).resume(_Engine())


# ------------------------------------------------------------------------------ datasets and their names
def _good_ct(tmp_path, name="good.nii.gz", seed=2):
    from ctrefine.conventions import canonical_affine
    from ctrefine.data.phantoms import chest_phantom

    path = tmp_path / name
    save_nifti(path, chest_phantom(seed, size=64), canonical_affine(64, 5.0))
    return path


def _prepare(ct_paths, out):
    return cli("prepare", "--ct", *ct_paths, "--out", out, "--size", "16", "--xray-size", "16", "--quiet")


def test_prepare_takes_a_new_name_past_a_gap_and_resumes(tmp_path):
    a, b, c = (_good_ct(tmp_path, f"{n}.nii.gz", s) for n, s in (("a", 2), ("b", 3), ("c", 4)))
    out = tmp_path / "ds"
    assert _prepare([a, b], out).returncode == 0
    first = snapshot(out / "patient_0001")
    import shutil

    shutil.rmtree(out / "patient_0000")  # a gap in the numbering: patient_0001 is the only one
    assert _prepare([c], out).returncode == 0
    assert snapshot(out / "patient_0001") == first  # never overwritten
    assert json.loads((out / "patient_0002" / "meta.json").read_text())["input"] == str(c.resolve())
    # an interrupted run (patients written, no splits.json yet) is resumed: finished inputs are not redone
    (out / "splits.json").unlink()
    assert _prepare([c, a], out).returncode == 0
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("patient_"))
    assert names == ["patient_0001", "patient_0002", "patient_0003"]
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(n for v in splits.values() for n in v) == names


def test_prepare_refuses_a_dataset_another_command_is_writing(tmp_path):
    from ctrefine.outputs import folder_lock

    out = tmp_path / "ds"
    with folder_lock(out, "dataset"):
        one_error_line(_prepare([_good_ct(tmp_path)], out), "another ctrefine command is writing")
    assert not (out / "patient_0000").exists()


def test_splits_naming_paths_outside_the_dataset_are_refused(ckpts, tiny_dataset, tmp_path):
    import shutil

    from ctrefine.data.dataset import CTDataset

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    good = json.loads((ds / "splits.json").read_text())
    for bad in ["../../outside", "/etc", "a/b", "..", ".hidden"]:
        (ds / "splits.json").write_text(json.dumps({**good, "test": [bad]}))
        with pytest.raises(DataError, match=f"patient {bad!r} in split 'test' is not a folder name inside"):
            CTDataset(ds, "train")  # checked where a dataset is opened, whichever split is read
    one_error_line(cli("infer", *ckpts, "--data-path", ds, "--output-dir", tmp_path / "res", "--quiet"),
                   "is not a folder name inside the dataset")
    assert not (tmp_path / "res").exists()
    # a patient folder that is a link leading out of the dataset
    (ds / "splits.json").write_text(json.dumps(good))
    victim = good["test"][0]
    shutil.move(ds / victim, tmp_path / "elsewhere")
    (ds / victim).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=f"patient '{victim}'"):
        CTDataset(ds, "test")


def test_empty_dataset_files_are_one_line_errors(ckpts, tiny_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    (ds / "splits.json").write_text("")
    one_error_line(cli("infer", *ckpts, "--data-path", ds, "--output-dir", tmp_path / "res", "--quiet"),
                   "splits.json: not valid JSON")
    shutil.copy(tiny_dataset / "splits.json", ds / "splits.json")
    (ds / "dataset.json").write_text("")
    r = cli("train", "base", "--config", "cpu-small", "--set", f"data.data_path={ds}", "--set",
            f"checkpoint.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "dataset.json: not valid JSON" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-600:]


# ------------------------------------------------------------------------------ hostile or damaged inputs
def test_a_nan_in_a_dataset_is_refused_naming_the_file(ckpts, tiny_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    victim = json.loads((ds / "splits.json").read_text())["test"][0]
    img, aff = load_nifti(ds / victim / "xray_pa.nii.gz")
    img[3, 4] = np.nan
    save_nifti(ds / victim / "xray_pa.nii.gz", img, aff)
    one_error_line(cli("infer", *ckpts, "--data-path", ds, "--output-dir", tmp_path / "res", "--quiet"),
                   f"{victim}/xray_pa.nii.gz: contains NaN")
    assert not (tmp_path / "res").exists()


def test_training_stops_when_the_loss_is_never_finite():
    from ctrefine.training.driver import NONFINITE_STEPS, _stop_if_not_finite

    _stop_if_not_finite(torch.tensor(float(NONFINITE_STEPS - 1)), 50, 0, 49, 1)  # a few bad steps: go on
    with pytest.raises(UserError, match="NaN or Inf for the last 10 steps"):
        _stop_if_not_finite(torch.tensor(float(NONFINITE_STEPS)), 50, 0, 50, 1)
    with pytest.raises(UserError, match="last 3 steps"):  # a short epoch with no finite step at all
        _stop_if_not_finite(torch.tensor(3.0), 3, 0, 3, 1)


def test_images_declaring_a_huge_size_are_refused_before_reading(tmp_path):
    import resource

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((32767, 32767, 1))
    hdr.set_data_dtype(np.float32)
    path = tmp_path / "huge.nii"
    path.write_bytes(hdr.binaryblock + b"\0" * 4)  # ~350 bytes claiming 4 GB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="huge.nii: its header declares 32767 x 32767 x 1"):
        load_nifti(path)
    with pytest.raises(DataError, match="its header declares"):
        load_radiograph(path)
    small = tmp_path / "short.nii"  # within the limit, but the file is shorter than its header says
    hdr.set_data_shape((64, 64, 64))
    small.write_bytes(hdr.binaryblock + b"\0" * 16)
    with pytest.raises(DataError, match="short.nii: holds .* bytes, its header declares"):
        load_nifti(small)
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (12000, 12000)).save(big)
    with pytest.raises(DataError, match="big.png: its header declares 12000 x 12000"):
        load_radiograph(big)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400_000  # KiB: nothing near 2 GB read


# ------------------------------------------------------------------------------ result folders are claimed
def test_overwrite_replaces_only_what_ctrefine_wrote(ckpts, tiny_dataset, tmp_path):
    from ctrefine.infer import evaluate_dataset
    from ctrefine.pipeline import TorchPredictor

    predictor = TorchPredictor(ckpts[1], ckpts[3], device="cpu")
    res = tmp_path / "res"

    def infer(out=res, overwrite=False):
        evaluate_dataset(predictor, tiny_dataset, out, progress=False, save_volumes=False, overwrite=overwrite)

    infer()
    assert (res / "ctrefine_manifest.json").is_file()
    infer(overwrite=True)  # an untouched earlier result is replaced
    patient = next(p for p in res.iterdir() if p.name.startswith("patient_"))
    (patient / "my_annotations.json").write_text("{}")
    (res / "patient_notes").mkdir()
    before = snapshot(res)
    one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", res, "--quiet", "--overwrite"),
                   "my_annotations.json")
    assert snapshot(res) == before  # nothing deleted, nothing replaced
    link = tmp_path / "link"
    (tmp_path / "empty").mkdir()
    link.symlink_to(tmp_path / "empty", target_is_directory=True)
    with pytest.raises(UserError, match="is a symbolic link"):
        infer(link)
    assert link.is_symlink() and not any((tmp_path / "empty").iterdir())


def test_an_output_folder_is_claimed_for_the_whole_run(ckpts, tiny_dataset, tmp_path):
    from ctrefine.infer import evaluate_dataset
    from ctrefine.outputs import path_lock
    from ctrefine.pipeline import TorchPredictor

    res = tmp_path / "res"
    with path_lock(res, "output folder"):  # a second run while the first holds the folder
        one_error_line(cli("infer", *ckpts, "--data-path", tiny_dataset, "--output-dir", res, "--quiet"),
                       "another ctrefine command is writing")
    predictor = TorchPredictor(ckpts[1], ckpts[3], device="cpu")

    class UserWritesMeanwhile:  # the user puts a file into the output folder while inference runs
        def __getattr__(self, name):
            return getattr(predictor, name)

        def predict(self, xrays):
            res.mkdir(exist_ok=True)
            (res / "mine.txt").write_text("keep me")
            return predictor.predict(xrays)

        def __call__(self, xrays):
            return self.predict(xrays)[:2]

    with pytest.raises(UserError, match="mine.txt"):
        evaluate_dataset(UserWritesMeanwhile(), tiny_dataset, res, progress=False, save_volumes=False)
    assert [p.name for p in res.iterdir()] == ["mine.txt"] and (res / "mine.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".res")]  # no temporary or lock left


def test_train_never_writes_into_a_users_folder(tiny_dataset, tmp_path):
    run_dir = tmp_path / "ck" / "base"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text('{"mine": true}')
    (run_dir / "train_log.csv").write_text("my,own,csv\n")
    before = snapshot(tmp_path / "ck")
    r = cli("train", "base", "--config", "cpu-small", "--set", f"data.data_path={tiny_dataset}", "--set",
            f"checkpoint.dir={tmp_path / 'ck'}")
    assert r.returncode == 2 and "not a ctrefine training run" in r.stderr, r.stderr[-800:]
    assert snapshot(tmp_path / "ck") == before


@pytest.mark.parametrize("meta, needle", [({"xray_size": "abc"}, "is not an integer"),
                                          ({"xray_size": "1000000"}, "is not a radiograph size"),
                                          ({"xray_size": "128", "geometry": "{"}, "is not a ray geometry"),
                                          ({"xray_size": "128", "geometry": "[1]"}, "is not a ray geometry")])
def test_onnx_metadata_is_validated(tmp_path, meta, needle):
    import onnx
    from onnx import TensorProto, helper

    from ctrefine.pipeline import OnnxPredictor

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(DataError, match=needle) as exc:
        OnnxPredictor(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_infer_never_writes_into_the_dataset(ckpts, tiny_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    (ds / "mean_train.nii.gz").unlink()  # no baseline cache: infer computes the baseline, and keeps it to itself
    before = snapshot(ds)
    assert cli("infer", *ckpts, "--data-path", ds, "--output-dir", tmp_path / "res", "--quiet",
               "--no-save-volumes").returncode == 0
    assert snapshot(ds) == before and "mean baseline" in (tmp_path / "res" / "metrics.txt").read_text()


# ------------------------------------------------------------------------------ a full disk
def test_outputs_that_belong_together_appear_together(tmp_path):
    import errno

    from ctrefine.outputs import atomic_files

    a, b, c = (tmp_path / n for n in ("ct.nii.gz", "ct_coarse.nii.gz", "ct_gate.json"))
    with pytest.raises(UserError, match="ct.nii.gz: cannot write it .No space left on device"):
        with atomic_files([a, b, c]) as (ta, tb, tc):
            ta.write_text("refined")
            tb.write_text("coarse")
            raise OSError(errno.ENOSPC, "No space left on device", str(tc))
    assert list(tmp_path.iterdir()) == []  # nothing under a final name, no temporary
    with atomic_files([a, b, c]) as tmps:
        for t in tmps:
            t.write_text(t.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "ct_coarse.nii.gz", "ct_gate.json"]


def test_a_checkpoint_that_cannot_be_saved_leaves_nothing_half_written(tmp_path):
    import errno

    from ctrefine.training.checkpointing import Checkpointer

    class FullDisk:
        def save_checkpoint(self, folder, tag, client_state, save_latest):
            (Path(folder) / tag).mkdir(parents=True)
            (Path(folder) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    from pathlib import Path

    ck = Checkpointer(tmp_path / "run", 2, 0, 1)
    ck.mark("base")
    (tmp_path / "run" / "latest.json").write_text('{"tag": "epoch_0001"}')
    with pytest.raises(UserError, match="cannot save the checkpoint of epoch 2 .No space left on device.; the run "
                                        "resumes from"):
        ck.save(FullDisk(), 2, {"global_step": 5})
    assert list((tmp_path / "run" / "ckpt").iterdir()) == []
    assert json.loads((tmp_path / "run" / "latest.json").read_text()) == {"tag": "epoch_0001"}
    (tmp_path / "run" / "ckpt" / ".tmp_epoch_0003").mkdir()  # what a killed process leaves
    ck.mark("base")
    assert list((tmp_path / "run" / "ckpt").iterdir()) == []


def test_a_folder_given_for_a_model_file_says_so(tmp_path):
    from ctrefine.checkpoint import load_model_file
    from ctrefine.pipeline import OnnxPredictor

    with pytest.raises(DataError, match="is a folder, not a model file"):
        load_model_file(tmp_path)
    with pytest.raises(DataError, match="is a folder, not an ONNX file"):
        OnnxPredictor(tmp_path)
