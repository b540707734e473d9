"""The second hostile-user audit: every case is one line naming the file or key, a non-zero exit, nothing
lost, nothing half-written, nothing read outside the given folders, no code run."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctrefine.config import load_config
from ctrefine.data.io import save_nifti
from ctrefine.errors import DataError, UserError


@pytest.fixture(scope="module")
def ckpts(random_pair):
    return random_pair


@pytest.fixture(scope="module")
def predictor(ckpts):
    from ctrefine.pipeline import TorchPredictor

    return TorchPredictor(*ckpts, device="cpu")


@pytest.fixture
def ds(tiny_dataset, tmp_path):
    """A private copy of the session's tiny dataset, free to damage."""
    out = tmp_path / "ds"
    shutil.copytree(tiny_dataset, out)
    return out


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "ctrefine.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=None if env is None else {**os.environ, **env}, cwd=cwd)


def one_error_line(r, needle):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and " error: " in lines[0], r.stderr[-800:]
    assert needle in lines[0], lines[0]


def first(ds, split="test"):
    return json.loads((ds / "splits.json").read_text())[split][0]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ------------------------------------------------------------------- code execution, reads outside the folders
from test_safety import _Engine, _Planted  # noqa: E402  (the planted pickle and a stand-in engine, shared)


def _run_with_checkpoint(tmp_path):
    run = tmp_path / "run"
    tag = run / "ckpt" / "epoch_0001"
    tag.mkdir(parents=True)
    (run / "latest.json").write_text(json.dumps({"tag": "epoch_0001", "epoch": 1, "global_step": 3}))
    torch.save({"module": {"w": torch.ones(2)}}, tag / "mp_rank_00_model_states.pt")
    return run, tag


def test_a_pickle_planted_below_the_checkpoint_folder_is_never_loaded(tmp_path):
    from ctrefine.training.checkpointing import Checkpointer

    run, tag = _run_with_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (tag / "zero").mkdir()
    torch.save({"optimizer": _Planted(marker)}, tag / "zero" / "optimizer_state.pt")
    engine = _Engine()
    with pytest.raises(UserError, match="refusing to resume"):
        Checkpointer(run, 2, 0, 1).resume(engine)
    assert not marker.exists() and not engine.loaded
    shutil.rmtree(tag / "zero")
    torch.save({"w": torch.ones(1)}, tmp_path / "elsewhere.pt")
    (tag / "link.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(UserError, match="a symbolic link inside a checkpoint"):
        Checkpointer(run, 2, 0, 1).resume(_Engine())


def test_a_deepspeed_config_that_changes_how_checkpoints_load_is_refused(tiny_dataset, tmp_path):
    ds_cfg = tmp_path / "ds.json"
    ds_cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}}))
    r = cli("train", "base", "--config", "cpu-small", "--deepspeed-config", ds_cfg, "--set",
            f"data.data_path={tiny_dataset}", "--set", f"checkpoint.dir={tmp_path / 'ck'}")
    one_error_line(r, f'{ds_cfg}: "checkpoint" is not supported')
    assert not (tmp_path / "ck").exists()


def test_a_checkpoint_tag_linking_to_another_run_is_refused(tmp_path):
    from ctrefine.training.checkpointing import Checkpointer

    other, _ = _run_with_checkpoint(tmp_path / "other")
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "epoch_0001").symlink_to(other / "ckpt" / "epoch_0001", target_is_directory=True)
    (run / "latest.json").write_text(json.dumps({"tag": "epoch_0001"}))
    engine = _Engine()
    with pytest.raises(UserError, match="is a symbolic link"):
        Checkpointer(run, 2, 0, 1).resume(engine)
    assert not engine.loaded


def test_a_file_link_inside_a_patient_folder_is_refused(ds, tmp_path):
    from ctrefine.data.dataset import CTDataset

    name = first(ds, "train")
    outside = tmp_path / "secret.nii.gz"
    shutil.move(ds / name / "ct.nii.gz", outside)
    (ds / name / "ct.nii.gz").symlink_to(outside)
    with pytest.raises(DataError, match=f"{name}/ct.nii.gz: is a symbolic link"):
        CTDataset(ds, "train")[json.loads((ds / "splits.json").read_text())["train"].index(name)]


def test_infer_never_writes_into_the_baseline_dataset(ckpts, tiny_dataset, tmp_path):
    base = tmp_path / "base_ds"
    shutil.copytree(tiny_dataset, base)
    before = snapshot(base)
    one_error_line(cli("infer", "--base-checkpoint", ckpts[0], "--refinement-checkpoint", ckpts[1], "--data-path",
                       tiny_dataset, "--output-dir", base / "res", "--baseline-data", base, "--quiet"), "overlaps")
    assert snapshot(base) == before


# -------------------------------------------------------------------------------------------- data loss
def test_two_radiograph_runs_to_one_output_never_both_succeed(predictor, tiny_dataset, tmp_path):
    from ctrefine.api import Reconstructor
    from ctrefine.outputs import path_lock

    name = first(tiny_dataset)
    pa, lat = (tiny_dataset / name / f"xray_{v}.nii.gz" for v in ("pa", "lateral"))
    out = tmp_path / "ct.nii.gz"
    rec = Reconstructor(predictor)

    def infer_radiographs(predictor, pa, lat, out):
        return rec.reconstruct_to(pa, lat, out)

    with path_lock(out, "output file"):  # the first run is still working
        with pytest.raises(UserError, match="another ctrefine command is writing"):
            infer_radiographs(predictor, pa, lat, out)
    assert not out.exists()
    infer_radiographs(predictor, pa, lat, out)
    kept = out.read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        infer_radiographs(predictor, pa, lat, out)
    assert out.read_bytes() == kept


def test_only_temporaries_ctrefine_recorded_are_cleaned_up(tmp_path):
    from ctrefine.outputs import atomic_dir, atomic_file

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID whose process has ended
    lookalikes = [tmp_path / f".res.tmp-{dead}-x", tmp_path / f".ct.nii.gz.{dead}-keep"]
    lookalikes[0].mkdir()
    (lookalikes[0] / "thesis.tex").write_text("mine")
    lookalikes[1].write_text("mine")
    # a writer killed inside its block leaves its temporaries and their records
    killed = ("import os, sys; from ctrefine.outputs import atomic_dir, atomic_file\n"
              f"with atomic_file({str(tmp_path / 'ct.nii.gz')!r}) as t:\n    t.write_text('half'); os._exit(9)\n")
    subprocess.run([sys.executable, "-c", killed])
    subprocess.run([sys.executable, "-c", killed.replace("atomic_file(", "atomic_dir(").replace(
        "'ct.nii.gz'", "'res'").replace("t.write_text('half')", "(t / 'a').write_text('half')")])
    orphans = sorted(p.name for p in tmp_path.iterdir() if p not in lookalikes)
    assert len(orphans) == 4, orphans  # two temporaries, two records
    with atomic_file(tmp_path / "ct.nii.gz") as t:
        t.write_text("new")
    with atomic_dir(tmp_path / "res") as t:
        (t / "metrics.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ct.nii.gz", "res", *(p.name for p in lookalikes)])
    assert (lookalikes[0] / "thesis.tex").read_text() == "mine" and lookalikes[1].read_text() == "mine"


def test_overwrite_keeps_a_result_the_user_edited(predictor, tiny_dataset, tmp_path):
    from ctrefine.infer import evaluate_dataset

    res = tmp_path / "res"
    evaluate_dataset(predictor, tiny_dataset, res, progress=False, figures=0, num_patients=1)
    evaluate_dataset(predictor, tiny_dataset, res, progress=False, figures=0, num_patients=1, overwrite=True)
    patient = next(p for p in res.iterdir() if p.name.startswith("patient_"))
    for edited in (res / "metrics.txt", patient / "refined.nii.gz"):
        original = edited.read_bytes()
        edited.write_bytes(original + b" my notes")
        before = snapshot(res)
        with pytest.raises(UserError, match=edited.name):
            evaluate_dataset(predictor, tiny_dataset, res, progress=False, figures=0, num_patients=1, overwrite=True)
        assert snapshot(res) == before
        edited.write_bytes(original)


def test_a_second_train_into_a_live_run_folder_is_refused(tiny_dataset, tmp_path):
    from ctrefine.outputs import path_lock

    run = tmp_path / "ck" / "base"
    (run / "ckpt" / ".tmp_epoch_0002").mkdir(parents=True)  # the live run is saving a checkpoint
    (run / "ctrefine_run.json").write_text(json.dumps({"kind": "ctrefine training run", "stage": "base"}))
    with path_lock(run, "training run"):
        r = cli("train", "base", "--config", "cpu-small", "--set", f"data.data_path={tiny_dataset}", "--set",
                f"checkpoint.dir={tmp_path / 'ck'}")
    one_error_line(r, "another ctrefine command is writing this training run")
    assert (run / "ckpt" / ".tmp_epoch_0002").is_dir()


# ------------------------------------------------------------------------------------ silent wrong results
def test_latest_json_never_names_an_epoch_whose_best_model_is_missing(tmp_path):
    from ctrefine.training.checkpointing import Checkpointer

    class Engine:
        def save_checkpoint(self, folder, tag, client_state, save_latest):
            (Path(folder) / tag).mkdir(parents=True)

    ck = Checkpointer(tmp_path / "run", 2, 0, 1)
    ck.mark("base")
    ck.save(Engine(), 1, {"global_step": 3})

    def interrupted(tag):
        raise KeyboardInterrupt  # Ctrl-C while the best model file is written

    with pytest.raises(KeyboardInterrupt):
        ck.save(Engine(), 2, {"global_step": 6}, interrupted)
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["tag"] == "epoch_0001"


def test_prepare_never_reuses_a_name_the_splits_hold(tmp_path):
    from ctrefine.conventions import canonical_affine
    from ctrefine.data.dataset import make_dataset, next_patient_index
    from ctrefine.data.ingest import ingest_dataset
    from ctrefine.data.phantoms import chest_phantom

    root = tmp_path / "ds"
    make_dataset(root, 4, size=16, xray_size=16, workers=1, progress=False)
    last = max(n for v in json.loads((root / "splits.json").read_text()).values() for n in v)
    shutil.rmtree(root / last)
    assert next_patient_index(root) == 4
    ct = tmp_path / "a.nii.gz"
    save_nifti(ct, chest_phantom(3, size=32), canonical_affine(32, 10.0))
    (tmp_path / "img").mkdir()
    done, failed = ingest_dataset([ct, tmp_path / "img" / ".." / "a.nii.gz"], root, size=16, xray_size=16,
                                  progress=False)
    assert done == ["patient_0004"] and failed == 0  # the same CT given twice lands once
    splits = json.loads((root / "splits.json").read_text())
    assert "patient_0004" in splits["test"] and "patient_0004" not in splits["train"]


def test_prepare_and_make_data_never_interleave(tmp_path):
    from ctrefine.data.dataset import make_dataset
    from ctrefine.data.ingest import ingest_dataset
    from ctrefine.outputs import folder_lock

    root = tmp_path / "ds"
    with folder_lock(root, "dataset"):  # prepare is writing it
        with pytest.raises(UserError, match="another ctrefine command is writing"):
            make_dataset(root, 4, size=16, xray_size=16, workers=1, progress=False)
    make_dataset(root, 2, size=16, xray_size=16, workers=1, progress=False)
    (root / "splits.json").unlink()  # as an interrupted make-data leaves it
    with pytest.raises(DataError, match="make-data has not finished"):
        ingest_dataset([tmp_path / "x.nii.gz"], root, size=16, xray_size=16, progress=False)


def _png(path, img, mode):
    from PIL import Image

    Image.fromarray(img).convert(mode).save(path)


def test_palette_and_cmyk_images_are_read_as_grey_or_refused(tmp_path):
    from PIL import Image

    from ctrefine.data.radiograph import load_radiograph

    grey = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")  # a grey palette
    assert np.array_equal(load_radiograph(tmp_path / "palette.png"), load_radiograph(tmp_path / "grey.png"))
    colour = Image.fromarray(np.stack([grey, 255 - grey, grey // 2], -1)).convert("P", palette=Image.ADAPTIVE)
    colour.save(tmp_path / "colour_palette.png")
    with pytest.raises(DataError, match="colour image"):
        load_radiograph(tmp_path / "colour_palette.png")
    Image.fromarray(grey).convert("CMYK").save(tmp_path / "scan.jpg")
    with pytest.raises(DataError, match="scan.jpg: is a CMYK image"):
        load_radiograph(tmp_path / "scan.jpg")


def test_damaged_dataset_files_are_refused_naming_them(ds):
    from ctrefine.data.dataset import CTDataset, mean_volume

    name = first(ds, "train")
    folder = ds / name
    idx = json.loads((ds / "splits.json").read_text())["train"].index(name)
    labels = nib.load(str(folder / "labels.nii.gz"))
    lab = np.asarray(labels.dataobj, np.float32)
    cases = [
        ("labels.nii.gz", lambda: save_nifti(folder / "labels.nii.gz", np.where(lab == 0, np.nan, lab), labels.affine),
         "NaN"),
        ("labels.nii.gz", lambda: save_nifti(folder / "labels.nii.gz", lab[:16], labels.affine), "label map is 16x32x32"),
        ("xray_pa.nii.gz", lambda: save_nifti(folder / "xray_pa.nii.gz", np.zeros((64, 64)), np.eye(4)),
         "radiograph is constant"),
        ("xray_lateral.nii.gz", lambda: save_nifti(folder / "xray_lateral.nii.gz", np.random.rand(48, 48), np.eye(4)),
         "radiograph is 48\\^2 but the dataset's is 64\\^2"),
        ("ct.nii.gz", lambda: save_nifti(folder / "ct.nii.gz", np.zeros((48, 48, 48)), np.eye(4)),
         "volume is 48\\^3 but the dataset's size is 32\\^3"),
    ]
    for fname, damage, needle in cases:
        keep = (folder / fname).read_bytes()
        damage()
        with pytest.raises(DataError, match=f"{fname}: .*{needle}"):
            CTDataset(ds, "train")[idx]
        (folder / fname).write_bytes(keep)
    mean = nib.load(str(ds / "mean_train.nii.gz"))
    save_nifti(ds / "mean_train.nii.gz", np.full(mean.shape, np.nan, np.float32), mean.affine)
    with pytest.raises(DataError, match="mean_train.nii.gz: contains NaN"):
        mean_volume(ds)


@pytest.mark.parametrize("field, value, needle", [("geometry", "cone", "'geometry' must be"),
                                                  ("geometry", None, "'geometry' must be"),
                                                  ("labels", 5, "'labels' must be"),
                                                  ("phantom_version", "x", "'phantom_version' must be"),
                                                  ("size", 48.5, "'size' must be")])
def test_wrong_typed_dataset_json_is_one_line(ds, field, value, needle):
    from ctrefine.data.dataset import CTDataset, make_dataset

    header = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**header, field: value}))
    with pytest.raises(DataError, match=f"dataset.json: {needle}"):
        CTDataset(ds, "train")
    if field == "phantom_version":
        with pytest.raises(DataError, match="phantom_version"):
            make_dataset(ds, 6, seed=7, size=32, xray_size=64, workers=1, progress=False)


def test_bad_names_in_splits_say_what_is_wrong(ds, tmp_path):
    from ctrefine.data.dataset import read_splits

    splits = json.loads((ds / "splits.json").read_text())
    (ds / "splits.json").write_text(json.dumps({**splits, "test": ["Müller 01"]}))
    with pytest.raises(DataError, match="may hold only ASCII letters"):
        read_splits(ds)
    (ds / "loop").symlink_to(ds / "loop")
    (ds / "splits.json").write_text(json.dumps({**splits, "test": ["loop"]}))
    with pytest.raises(UserError, match="cannot follow its symbolic links"):
        read_splits(ds)


def test_baseline_data_must_exist_and_share_the_grid(ckpts, predictor, tiny_dataset, tmp_path):
    from ctrefine.data.dataset import make_dataset
    from ctrefine.infer import evaluate_dataset

    with pytest.raises(DataError, match="--baseline-data .*nosuchdir: not a ctrefine dataset"):
        evaluate_dataset(predictor, tiny_dataset, tmp_path / "r1", baseline_data=tmp_path / "nosuchdir",
                         progress=False)
    other = tmp_path / "other"
    make_dataset(other, 3, size=16, xray_size=16, workers=1, progress=False)
    with pytest.raises(DataError, match="mean training volume is 16\\^3 but the patients are 32\\^3"):
        evaluate_dataset(predictor, tiny_dataset, tmp_path / "r2", baseline_data=other, progress=False)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


# ------------------------------------------------------------------------------------------- tracebacks
def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    from ctrefine.outputs import atomic_dir, atomic_file
    from ctrefine.training.checkpointing import Checkpointer

    with pytest.raises(UserError, match="out.onnx: cannot write it .No space left on device"):
        with atomic_file(tmp_path / "out.onnx"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match="res: cannot write it .the write failed: is the disk full"):
        with atomic_dir(tmp_path / "res"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 256: "
                               "PytorchStreamWriter failed writing file data/0: file write failed")
    assert sorted(os.listdir(tmp_path)) == []

    class FullDisk:
        def save_checkpoint(self, folder, tag, client_state, save_latest):
            (Path(folder) / tag).mkdir(parents=True)
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    ck = Checkpointer(tmp_path / "run", 2, 0, 1)
    ck.mark("base")
    with pytest.raises(UserError, match="cannot save the checkpoint of epoch 1"):
        ck.save(FullDisk(), 1, {"global_step": 5})
    assert list((tmp_path / "run" / "ckpt").iterdir()) == []
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        with atomic_file(tmp_path / "x.bin"):
            raise RuntimeError("a bug")


@pytest.mark.parametrize("key", ["training.learning_rate", "training.weight_decay", "training.time_budget_s"])
def test_infinite_config_values_are_refused(key):
    from ctrefine.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key}': input should be a finite number"):
        load_config("cpu-small", [f"{key}=Infinity"])


def test_a_stored_run_config_of_the_wrong_shape_is_one_line(tmp_path):
    from ctrefine.training.checkpointing import Checkpointer

    run, _ = _run_with_checkpoint(tmp_path)
    (run / "config.json").write_text('{"model": 5}')
    with pytest.raises(UserError, match="config.json: holds no \"model\" section"):
        Checkpointer(run, 2, 0, 1).check_compatible(load_config("cpu-small"))


@pytest.mark.parametrize("ds_cfg, needle", [
    ({"zero_optimization": {"stage": 7}}, '"zero_optimization.stage" must be 1 or 2'),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, '"zero_optimization.stage" must be 1 or 2'),
    ({"zero_optimization": {"stage": 2}, "bf16": "yes"}, '"bf16" must be {"enabled": true|false}'),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": "abc"}, '"gradient_clipping" must be a finite number'),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 3}, 'remove "train_batch_size"'),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}, "bf16": {"enabled": True}},
     '"fp16.enabled" is not supported'),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}}, "must be a positive integer"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "offload_optimizer\" is not"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, 'remove "optimizer"'),
])
def test_deepspeed_configs_outside_the_supported_subset_are_refused(ds_cfg, needle):
    from ctrefine.training.ds_config import check_ds_config

    with pytest.raises(UserError, match="^my_ds.json: ") as exc:
        check_ds_config(ds_cfg, "my_ds.json")
    assert needle in str(exc.value)


def test_the_shipped_deepspeed_config_is_accepted():
    from ctrefine.config import ds_config_path, read_json_object
    from ctrefine.training.ds_config import check_ds_config

    cfg = read_json_object(ds_config_path())
    assert check_ds_config(cfg, ds_config_path()) is cfg


def _onnx_with(tmp_path, inputs, outputs, xray_size=64):
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs]
    nodes = [helper.make_node("Identity", [inputs[0][0]], [o[0]]) for o in outputs]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outs))
    for k, v in {"xray_size": str(xray_size), "geometry": '{"kind": "cone"}'}.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def test_an_onnx_graph_that_is_not_ctrefine_s_is_refused_before_inference(tmp_path):
    from ctrefine.pipeline import OnnxPredictor

    xr = [("xray_pa", ["b", 1, 64, 64]), ("xray_lateral", ["b", 1, 64, 64])]
    vol = ["b", 1, 32, 32, 32]
    with pytest.raises(DataError, match="graph outputs are \\['probabilities'\\]"):
        OnnxPredictor(_onnx_with(tmp_path, xr, [("probabilities", ["b", 10])]))
    with pytest.raises(DataError, match="graph output refined is \\['b', 10\\]"):
        OnnxPredictor(_onnx_with(tmp_path, xr, [("coarse", vol), ("refined", ["b", 10])]))
    with pytest.raises(DataError, match="the metadata says radiographs of 128\\^2"):
        OnnxPredictor(_onnx_with(tmp_path, xr, [("coarse", vol), ("refined", vol)], xray_size=128))


def test_symlink_loops_are_one_line(ckpts, tiny_dataset, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    args = ["infer", "--base-checkpoint", ckpts[0], "--refinement-checkpoint", ckpts[1], "--quiet"]
    one_error_line(cli(*args, "--data-path", tiny_dataset, "--output-dir", loop), "cannot follow its symbolic links")
    r = cli(*args, "--data-path", loop, "--output-dir", tmp_path / "res")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-800:]


def test_view_refuses_nan_and_an_axis_free_affine(tmp_path):
    from ctrefine.viewer import load_view_volume

    vol = np.zeros((8, 8, 8), np.float32)
    vol[2] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", vol, np.eye(4))
    with pytest.raises(DataError, match="nan.nii.gz: contains NaN"):
        load_view_volume(tmp_path / "nan.nii.gz")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((8, 8, 8))
    hdr.set_data_dtype(np.float32)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = 0.0  # an all-zero sform, as some converters write
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), None, hdr), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match="flat.nii.gz: its affine .* has no usable axes"):
        load_view_volume(tmp_path / "flat.nii.gz")


def test_environment_settings_are_checked_before_any_file_is_written(tiny_dataset, tmp_path):
    train = ["train", "base", "--config", "cpu-small", "--set", f"data.data_path={tiny_dataset}", "--set",
             f"checkpoint.dir={tmp_path / 'ck'}"]
    one_error_line(cli(*train, env={"CTREFINE_KERNELS": "garbage"}), "CTREFINE_KERNELS must be 0, 1 or auto")
    one_error_line(cli(*train, env={"LOCAL_RANK": "abc"}), "LOCAL_RANK='abc' is not an integer")
    one_error_line(cli(*train, "--stop-after-epochs", "0"), "--stop-after-epochs: must be >= 1")
    assert not (tmp_path / "ck").exists()
    from ctrefine.device import kernel_mode, kernels_import_error
    from ctrefine.errors import ConfigError

    kernels_import_error()  # the kernels are imported (interpreted, as conftest set it) before the environment changes
    env = {k: os.environ.get(k) for k in ("CTREFINE_KERNELS", "TRITON_INTERPRET")}
    try:
        os.environ.update(CTREFINE_KERNELS="1", TRITON_INTERPRET="0")
        with pytest.raises(ConfigError, match="CTREFINE_KERNELS=1 needs a CUDA GPU"):
            kernel_mode(torch.device("cpu"))
    finally:
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
