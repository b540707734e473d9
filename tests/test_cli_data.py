import subprocess
import sys

import nibabel as nib
import numpy as np

from ctrefine.cli import main
from ctrefine.data.io import load_nifti, save_nifti
from ctrefine.jsonio import read_json
from ctrefine.data.phantoms import chest_phantom
from ctrefine.conventions import canonical_affine


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ctrefine.cli", *map(str, args)], capture_output=True, text=True)


def test_make_data_resume_and_mismatch(tmp_path):
    out = tmp_path / "ds"
    assert main(["make-data", "--out", str(out), "--num-patients", "3", "--size", "16", "--xray-size", "16",
                 "--workers", "1", "--quiet"]) == 0
    splits = read_json(out / "splits.json")
    first = (out / "patient_0001" / "ct.nii.gz").stat().st_mtime_ns
    # rerun: nothing regenerated, split unchanged
    assert main(["make-data", "--out", str(out), "--num-patients", "3", "--size", "16", "--xray-size", "16",
                 "--workers", "1", "--quiet"]) == 0
    assert (out / "patient_0001" / "ct.nii.gz").stat().st_mtime_ns == first
    assert read_json(out / "splits.json") == splits
    r = run_cli("make-data", "--out", out, "--num-patients", "3", "--size", "32", "--quiet")
    assert r.returncode != 0 and "existing dataset has size=16" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    meta = read_json(out / "patient_0000" / "meta.json")
    assert meta["geometry"]["kind"] == "cone" and meta["spacing_mm"] == 20.0
    ct, aff = load_nifti(out / "patient_0000" / "ct.nii.gz")
    assert ct.shape == (16, 16, 16) and np.allclose(nib.affines.voxel_sizes(aff), 20.0)


def test_prepare_good_and_bad(tmp_path):
    hu = chest_phantom(2, size=64)
    save_nifti(tmp_path / "good.nii.gz", hu, canonical_affine(64, 5.0))
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "ds"
    r = run_cli("prepare", "--ct", tmp_path / "good.nii.gz", tmp_path / "bad.nii.gz", "--out", out, "--size", "16",
                "--xray-size", "16", "--quiet")
    assert r.returncode == 1
    assert "bad.nii.gz" in r.stderr and "cannot read" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".ctrefine.lock", "dataset.json", "mean_train.nii.gz", "patient_0000",
                                                    "splits.json"]
    assert sorted(p.name for p in (out / "patient_0000").iterdir()) == ["ct.nii.gz", "meta.json", "xray_lateral.nii.gz",
                                                                       "xray_pa.nii.gz"]


def test_help_and_bad_args():
    r = run_cli("--help")
    assert r.returncode == 0 and "make-data" in r.stdout and "prepare" in r.stdout
    r = run_cli("make-data", "--out", "/tmp/x", "--num-patients", "0")
    assert r.returncode == 2 and "num-patients" in r.stderr


def test_preview_png(tiny_dataset, tmp_path):
    from PIL import Image

    out = tmp_path / "p.png"
    assert main(["preview", "--data", str(tiny_dataset), "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 800
    r = run_cli("preview", "--data", tiny_dataset, "--patient", "patient_9999", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "patient_9999" in r.stderr and not (tmp_path / "x.png").exists()
