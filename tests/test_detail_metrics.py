"""Detail you can measure: phantom labels, HF-PSNR, band energies, label metrics and the mean baseline,
each checked against an independent computation (numpy / scipy / skimage, not the package's code path)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ctrefine import metrics
from ctrefine.data.dataset import mean_volume
from ctrefine.data.io import load_nifti
from ctrefine.data.phantoms import LABELS, chest_phantom, downsample_area, downsample_labels

ID = {v: k for k, v in LABELS.items()}


def _alignment(ct, lab):
    bone = np.isin(lab, [ID["rib"], ID["vertebra"], ID["other_bone"]])
    lung = lab == ID["lung"]
    assert bone.sum() > 20 and lung.sum() > 500
    return (ct[lung] < -500).mean(), (ct[bone] > 100).mean()  # calibrated bone: elderly marrow is ~80-150 HU


def test_make_data_writes_labels_that_line_up(tiny_dataset):
    """32^3 (10 mm voxels, the test size): partial volume is coarse, so the bars are lower than at 64^3."""
    table = json.loads((tiny_dataset / "dataset.json").read_text())["labels"]
    assert {"lung", "airway", "vessel", "nodule", "heart_blood", "rib", "vertebra", "other_bone", "fat",
            "soft_tissue"} <= set(table.values())
    for folder in sorted(tiny_dataset.glob("patient_*")):
        ct, aff = load_nifti(folder / "ct.nii.gz")
        lab, laff = load_nifti(folder / "labels.nii.gz")
        assert np.array_equal(aff, laff) and lab.shape == ct.shape and set(np.unique(lab).astype(int)) <= set(LABELS)
        lung_ok, bone_ok = _alignment(ct, lab)
        assert lung_ok >= 0.85 and bone_ok >= 0.8, (folder.name, lung_ok, bone_ok)


@pytest.mark.parametrize("seed", [0, 3])
def test_labels_line_up_at_64(seed):
    """At the mission's 64^3: >= 95 % of lung-labelled voxels below -500 HU, >= 90 % of bone-labelled voxels
    above 100 HU (calibrated cancellous bone falls to ~130 HU with age, rib marrow lower)."""
    hu, labels = chest_phantom(seed, size=128, with_labels=True)
    lung_ok, bone_ok = _alignment(downsample_area(hu, 2), downsample_labels(labels, 2))
    assert lung_ok >= 0.95 and bone_ok >= 0.9, (lung_ok, bone_ok)


def test_majority_vote_downsampling():
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[:2, :2, :2] = 3
    lab[0, 0, 0] = 5  # 7 of 8 are 3
    lab[2:, 2:, 2:] = ID["soft_tissue"]
    lab[2, 2:, 2:] = ID["lung"]  # 4 of 8 lung, 4 soft tissue: a tie goes to tissue, not air
    out = downsample_labels(lab, 2)
    assert out[0, 0, 0] == 3 and out[1, 1, 1] == ID["soft_tissue"] and out.dtype == np.uint8
    hu, labels = chest_phantom(4, size=32, with_labels=True)
    assert np.array_equal(hu, chest_phantom(4, size=32))  # labels do not change the CT
    assert downsample_labels(labels, 2).shape == downsample_area(hu, 2).shape


@pytest.mark.parametrize("shape", [(13, 17, 19), (8, 8, 8)])
def test_hf_psnr_matches_scipy(shape):
    rng = np.random.default_rng(0)
    t = ndimage.gaussian_filter(rng.random(shape), 1.5)
    p = np.clip(t + rng.normal(0, 0.02, shape), 0, 1)
    hp = lambda x: x - ndimage.gaussian_filter(x, sigma=1.0, mode="nearest")  # noqa: E731
    expect = 10 * np.log10(1 / np.mean((hp(p) - hp(t)) ** 2))
    got = metrics.hf_psnr(torch.from_numpy(p), torch.from_numpy(t)).item()
    assert got == pytest.approx(expect, abs=1e-6)
    # identical detail bands: infinite
    assert metrics.hf_psnr(torch.from_numpy(t), torch.from_numpy(t)).item() == float("inf")


def test_band_ratios_match_numpy():
    rng = np.random.default_rng(1)
    shape = (11, 14, 9)
    p, t = rng.random(shape), rng.random(shape)
    fd, fh, fw = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    f = np.sqrt(fd**2 + fh**2 + fw**2)
    ep, et = np.abs(np.fft.fftn(p)) ** 2, np.abs(np.fft.fftn(t)) ** 2
    got = metrics.band_ratios(torch.from_numpy(p), torch.from_numpy(t))
    for name, m in (("band_low", f < 0.125), ("band_mid", (f >= 0.125) & (f < 0.25)), ("band_high", f >= 0.25)):
        assert got[name].item() == pytest.approx(ep[m].sum() / et[m].sum(), rel=1e-9)
    smooth = ndimage.gaussian_filter(t, 1.0)
    r = metrics.band_ratios(torch.from_numpy(smooth), torch.from_numpy(t))
    assert r["band_high"] < r["band_mid"] < r["band_low"] <= 1.0 + 1e-9  # blur removes energy, most at high |f|


def test_label_metrics_match_independent_computations():
    from skimage.morphology import ball, binary_dilation, binary_erosion

    rng = np.random.default_rng(2)
    shape = (15, 16, 17)
    lab = np.full(shape, ID["soft_tissue"], np.uint8)
    lab[2:13, 2:8, 2:15] = ID["lung"]
    lab[5:10, 10:14, 4:12] = ID["vertebra"]
    lab[6:8, 4:6, 6:8] = ID["nodule"]
    lab[3, 3, 3:12] = ID["vessel"]
    truth = np.where(lab == ID["lung"], -850.0, 40.0)
    truth[lab == ID["vertebra"]] = 700.0
    truth[lab == ID["nodule"]] = 30.0
    truth[lab == ID["vessel"]] = 45.0
    pred = ndimage.gaussian_filter(truth, 0.8) + rng.normal(0, 20, shape)
    got = metrics.label_metrics(pred, truth, lab, {str(k): v for k, v in LABELS.items()})

    bone = lab == ID["vertebra"]
    pb = pred > 200  # BONE_HU
    assert got["bone_dice"] == pytest.approx(2 * np.sum(bone & pb) / (bone.sum() + pb.sum()))
    band = binary_dilation(bone, ball(1)) & ~binary_erosion(bone, ball(1))
    gp = np.sqrt(sum(g**2 for g in torch.gradient(torch.from_numpy(pred))).numpy())
    gt = np.sqrt(sum(g**2 for g in torch.gradient(torch.from_numpy(truth))).numpy())
    assert got["bone_edge_ratio"] == pytest.approx(gp[band].mean() / gt[band].mean(), rel=1e-9)
    nod = lab == ID["nodule"]
    idx = np.argwhere(nod)
    coords = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    l1 = np.min(np.abs(coords[..., None, :] - idx[None, None, None]).sum(-1), axis=-1)  # L1 distance to the nodule
    shell = (l1 <= 2) & (lab == ID["lung"])
    expect = (pred[nod].mean() - pred[shell].mean()) / (truth[nod].mean() - truth[shell].mean())
    assert got["nodule_contrast_ratio"] == pytest.approx(expect, rel=1e-9)
    lung = lab == ID["lung"]
    assert got["mae_hu_lung"] == pytest.approx(np.abs(pred - truth)[lung].mean())
    assert got["mae_hu_bone"] == pytest.approx(np.abs(pred - truth)[bone].mean())
    # a structure that is absent is NaN, never a made-up number
    none = metrics.label_metrics(pred, truth, np.full(shape, ID["soft_tissue"], np.uint8), {str(k): v for k, v in LABELS.items()})
    assert np.isnan(none["bone_dice"]) and np.isnan(none["nodule_contrast_ratio"]) and np.isnan(none["mae_hu_lung"])


def test_mean_baseline_is_the_train_mean(tiny_dataset):
    names = json.loads((tiny_dataset / "splits.json").read_text())["train"]
    expect = np.mean([load_nifti(tiny_dataset / n / "ct.nii.gz")[0] for n in names], axis=0)
    got = mean_volume(tiny_dataset)
    assert np.allclose(got, expect, atol=1e-3) and (tiny_dataset / "mean_train.nii.gz").exists()
    assert np.array_equal(mean_volume(tiny_dataset), got)  # cached


def test_infer_reports_baseline_and_detail_metrics(tiny_dataset, tmp_path):
    from ctrefine.checkpoint import save_model_file
    from ctrefine.config import load_config
    from ctrefine.models import build_models

    cfg = load_config("cpu-small")
    args = []
    for stage, model in zip(("base", "refine"), build_models(cfg)):
        save_model_file(tmp_path / f"{stage}.pt", stage, model.state_dict(), cfg)
        args += [f"--{'base' if stage == 'base' else 'refinement'}-checkpoint", str(tmp_path / f"{stage}.pt")]
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "ctrefine.cli", "infer", *args, "--data-path", str(tiny_dataset),
                        "--output-dir", str(out), "--quiet", "--no-save-volumes"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "mean baseline" in r.stdout and "skill over mean baseline" in r.stdout and "HF-PSNR" in r.stdout
    data = json.loads((out / "metrics.json").read_text())
    s = data["summary"]
    for key in ("mean_psnr_mean", "coarse_hf_psnr_mean", "refined_band_high_mean", "coarse_bone_dice_mean",
                "refined_mae_hu_lung_mean", "refined_skill_db_mean"):
        assert key in s, key
    assert all(set(m) == {"mean", "coarse", "refined", "truth", "gate"} for m in data["patients"].values())
    assert all(set(m["truth"]) == {"streak", "lung_streak"} and {"streak", "lung_streak", "lung_alignment"} <= set(m["refined"])
               for m in data["patients"].values())
    assert "lung streak index, truth - coarse" in r.stdout
    skill = [m["refined"]["psnr"] - m["mean"]["psnr"] for m in data["patients"].values()]
    assert s["refined_skill_db_mean"] == pytest.approx(np.mean(skill))
    text = (out / "metrics.txt").read_text()
    assert "mean baseline" in text and "mean_hf_psnr" in text


def test_prepare_takes_a_users_segmentation(tmp_path):
    from ctrefine.conventions import canonical_affine
    from ctrefine.data.io import save_nifti

    hu, labels = chest_phantom(2, size=64, with_labels=True)
    aff = canonical_affine(64, 5.0)
    save_nifti(tmp_path / "ct.nii.gz", hu, aff)
    save_nifti(tmp_path / "seg.nii.gz", labels, aff, dtype=np.uint8)
    save_nifti(tmp_path / "bad.nii.gz", np.full_like(labels, 77), aff, dtype=np.uint8)
    base = [sys.executable, "-m", "ctrefine.cli", "prepare", "--ct", str(tmp_path / "ct.nii.gz"), "--size", "32",
            "--xray-size", "32", "--quiet"]
    r = subprocess.run(base + ["--out", str(tmp_path / "ds"), "--labels", str(tmp_path / "seg.nii.gz")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lab, laff = load_nifti(tmp_path / "ds" / "patient_0000" / "labels.nii.gz")
    ct, caff = load_nifti(tmp_path / "ds" / "patient_0000" / "ct.nii.gz")
    assert np.array_equal(laff, caff)
    lung_ok, bone_ok = _alignment(ct, lab)
    assert lung_ok >= 0.8 and bone_ok >= 0.8  # nearest-neighbour labels vs a trilinear CT at 10 mm: a bit looser
    r = subprocess.run(base + ["--out", str(tmp_path / "ds2"), "--labels", str(tmp_path / "bad.nii.gz")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not in ctrefine's table" in r.stderr
    r = subprocess.run(base + ["--out", str(tmp_path / "ds3"), "--labels", str(tmp_path / "seg.nii.gz"),
                               str(tmp_path / "seg.nii.gz")], capture_output=True, text=True)
    assert r.returncode == 2 and "one per CT" in r.stderr


def test_structure_dice_follows_its_written_definition():
    """Per class: a predicted mask only near the class's true voxels, on its side of the threshold, the
    confusable classes' own voxels left out; a structure drawn nowhere scores 0, an absent class NaN."""
    from skimage.morphology import ball, binary_dilation, binary_erosion

    shape = (14, 15, 16)
    table = {str(k): v for k, v in LABELS.items()}
    lab = np.full(shape, ID["lung"], np.uint8)
    lab[4:10, 4:10, 2:6] = ID["vertebra"]
    lab[4:10, 4:10, 6] = ID["rib"]  # touches the vertebra: a bone voxel of one must not count for the other
    lab[2, 2:12, 10] = ID["vessel"]
    truth = np.where(lab == ID["lung"], -850.0, 700.0)
    truth[lab == ID["vessel"]] = 40.0
    pred = truth.copy()
    pred[4:7, 4:10, 2:6] = 100.0  # half the vertebra missed (soft-tissue HU)
    pred[4:10, 4:10, 7] = 500.0   # a bone layer drawn one voxel beside the rib, in the lung
    got = metrics.label_metrics(pred, truth, lab, table)

    def dice(name, predicted):
        t = lab == name
        return 2 * np.sum(predicted & t) / (predicted.sum() + t.sum())

    cube = np.ones((3, 3, 3), bool)
    near_v = ndimage.binary_dilation(lab == ID["vertebra"], cube) & ~np.isin(lab, [ID["rib"], ID["other_bone"]])
    assert got["dice_vertebra"] == pytest.approx(dice(ID["vertebra"], near_v & (pred > 200)))
    assert got["dice_vertebra"] == pytest.approx(2 * 72 / (72 + 144))  # 3 of 6 rows (6x4 each) found, nothing else
    near_r = ndimage.binary_dilation(lab == ID["rib"], cube) & ~np.isin(lab, [ID["vertebra"], ID["other_bone"]])
    assert got["dice_rib"] == pytest.approx(dice(ID["rib"], near_r & (pred > 200)))
    assert got["dice_rib"] == pytest.approx(2 * 36 / (72 + 36))  # the rib, and the layer beside it as extra
    assert got["dice_vessel"] == pytest.approx(1.0)
    assert np.isnan(got["dice_airway"]) and np.isnan(got["edge_airway"]) and np.isnan(got["dice_other_bone"])
    flat = metrics.label_metrics(np.full(shape, -850.0), truth, lab, table)  # nothing drawn
    assert flat["dice_vessel"] == 0.0 and flat["dice_vertebra"] == 0.0 and flat["edge_vertebra"] == 0.0
    band = binary_dilation(lab == ID["vessel"], ball(1)) & ~binary_erosion(lab == ID["vessel"], ball(1))
    gp = np.sqrt(sum(g**2 for g in np.gradient(pred)))
    gt = np.sqrt(sum(g**2 for g in np.gradient(truth)))
    assert got["edge_vessel"] == pytest.approx(gp[band].mean() / gt[band].mean())


def test_spine_profile_separates_vertebrae_from_a_column():
    """The detrended slice profile over the spine: the truth scores 1, a smooth column ~0, vertebrae moved
    by half a period far below the truth; no vertebra label gives NaN."""
    from ctrefine.metrics import spine_profile_corr

    d, n = 40, 12
    lab = torch.zeros(d, n, n, dtype=torch.bool)
    truth = torch.full((d, n, n), 40.0, dtype=torch.float64)
    for z in range(2, d - 2):
        if z % 6 != 0:  # a disc every sixth slice
            lab[z, 4:8, 4:8] = True
            truth[z, 4:8, 4:8] = 400.0
    column = torch.where(lab.any(0, keepdim=True).expand_as(lab) & (torch.arange(d)[:, None, None] > 1)
                         & (torch.arange(d)[:, None, None] < d - 2), 330.0, 40.0).double()
    assert float(spine_profile_corr(truth, truth, lab)) == pytest.approx(1.0)
    assert abs(float(spine_profile_corr(column, truth, lab))) < 0.2
    assert float(spine_profile_corr(torch.roll(truth, 3, 0), truth, lab)) < 0.5
    assert torch.isnan(spine_profile_corr(truth, truth, torch.zeros_like(lab)))


# ------------------------------------------------------------------ detail in place: streaks, body, budget
def test_streak_index_flags_detail_copied_along_the_rays_not_anatomy():
    from ctrefine.metrics import streak_index

    g = torch.Generator().manual_seed(0)
    n = 32
    pattern = torch.rand(n, n, generator=g)  # (D, W): a radiograph's detail
    streak = pattern[:, None, :].expand(n, n, n)[None, None].clone()  # copied along H, the PA rays
    blobs = torch.zeros(1, 1, n, n, n)
    idx = torch.randint(2, n - 2, (40, 3), generator=g)
    for d, h, w in idx.tolist():
        blobs[0, 0, d - 1:d + 2, h - 1:h + 2, w - 1:w + 2] += 1.0  # small anatomy-like structures, placed in depth
    s_streak, s_blobs = streak_index(streak).item(), streak_index(blobs).item()
    assert s_streak > 0.45  # the PA share is ~1 (the lateral one ~0): a ray-constant correction
    assert s_blobs < 0.1 and s_blobs < s_streak / 5
    assert streak_index(3.0 * blobs).item() == pytest.approx(s_blobs, rel=1e-6)  # a share, not an energy
    both = torch.cat([streak, blobs])
    assert torch.allclose(streak_index(both), torch.tensor([s_streak, s_blobs], dtype=torch.float64), rtol=1e-6)


def test_lung_streak_index_flags_a_streak_across_the_lung_that_the_whole_ray_index_misses(chest_scene):
    """A chest whose correction holds rib arcs along the lateral rays in the wall and short vessels in the lung: a
    13-voxel streak across the lung doubles the lung index and leaves the whole-ray index as it was; the same
    streak in the wall leaves the lung index as it was."""
    from ctrefine.metrics import lung_streak_index, streak_index

    truth = chest_scene.tissue
    detail = chest_scene.detail(torch.Generator().manual_seed(3), vessels=20, branches=False)
    lung_streak, wall_streak = detail.clone(), detail.clone()
    lung_streak[0, 0, 16, 12, 8:21] += 0.3
    wall_streak[0, 0, 18, 4, 8:21] += 0.3
    lung = {k: lung_streak_index(v, truth).item() for k, v in
            {"anatomy": detail, "lung streak": lung_streak, "wall streak": wall_streak}.items()}
    assert lung["lung streak"] > 1.8 * lung["anatomy"] and lung["wall streak"] == pytest.approx(lung["anatomy"], rel=0.01)
    assert streak_index(lung_streak).item() < 1.05 * streak_index(detail).item()
    assert lung_streak_index(3.0 * detail, truth).item() == pytest.approx(lung["anatomy"], rel=1e-5)  # a share


def test_lung_detail_alignment_reads_where_the_detail_lies_in_depth(chest_scene):
    """The truth's own lung detail reads 1 at any strength; the same vessels 4 voxels off along the PA rays (what
    matches the PA radiograph without placing anything in depth) read near 0, the vessels' pattern smeared along
    those rays low (each vessel keeps its own voxels' share); half the vessels drawn reads between; a correction with
    no detail reads NaN."""
    from ctrefine.metrics import lung_detail_alignment

    truth = chest_scene.tissue
    vessels = chest_scene.detail(torch.Generator().manual_seed(5), vessels=30, branches=True)
    vessels[..., (3, 28), :] = 0.0  # the lung's detail alone (the rib arcs lie in the wall, outside the lung)
    lung = (slice(None), slice(None), slice(6, 26), slice(6, 26), slice(6, 26))
    smeared = torch.zeros_like(vessels)
    smeared[lung] = vessels[lung].mean(dim=3, keepdim=True).expand_as(vessels[lung])
    half = chest_scene.detail(torch.Generator().manual_seed(5), vessels=15, branches=True)
    half[..., (3, 28), :] = 0.0
    a = {k: lung_detail_alignment(v, vessels, truth).item() for k, v in {
        "same": vessels, "stronger": 2.5 * vessels, "off in depth": torch.roll(vessels, 4, dims=3),
        "smeared": smeared, "half": half}.items()}
    assert a["same"] == pytest.approx(1.0, abs=1e-6) and a["stronger"] == pytest.approx(1.0, abs=1e-6)
    assert abs(a["off in depth"]) < 0.1 and abs(a["smeared"]) < 0.35
    assert a["smeared"] + 0.2 < a["half"] < 0.9
    assert math.isnan(lung_detail_alignment(torch.zeros_like(vessels), vessels, truth).item())


def test_body_psnr_and_the_error_budget():
    from ctrefine.metrics import body_psnr, error_by_class
    from ctrefine.report import error_budget

    table = {"0": "background", "1": "lung", "2": "table"}
    labels = torch.zeros(8, 8, 8, dtype=torch.uint8)
    labels[2:6, 2:6, 2:6] = 1
    labels[7] = 2
    truth = torch.full((8, 8, 8), -1000.0)
    truth[labels == 1] = -800.0
    pred = truth.clone()
    pred[labels == 0] += 250.0  # wrong only outside the body (0.1 model units)
    assert body_psnr(pred.double(), truth.double(), labels, table).item() > 150  # the body itself is exact
    coarse = truth.clone()
    coarse[labels == 0] += 500.0
    coarse[labels == 1] += 250.0
    per_patient = {"p": {"refined": {"error_by_class": error_by_class(pred, truth, labels, table)},
                         "coarse": {"error_by_class": error_by_class(coarse, truth, labels, table)}}}
    budget = error_budget(per_patient)
    assert set(budget) == {"background"} and budget["background"]["share_of_refined_error"] == pytest.approx(1.0)
    assert budget["background"]["refined_over_coarse"] == pytest.approx(0.25)  # (0.1 / 0.2)^2


def test_ghost_lift_reads_density_at_shadow_crossings_not_on_vessels():
    """Two vessels in one axial slab, at (h, w) = (4, 4) and (11, 11): the PA shadows (w 4 and 11) and the lateral ones
    (h 4 and 11) also cross at (4, 11) and (11, 4), where no vessel is. Density there is the fan; on the vessels it
    is not; the truth reads 0. Checked against scipy's dilation, not the package's."""
    from ctrefine.metrics import ghost_lift

    labels = np.full((6, 16, 16), ID["lung"], np.uint8)
    labels[2:4, 4, 4] = labels[2:4, 11, 11] = ID["vessel"]
    truth = np.where(labels == ID["vessel"], 40.0, -850.0)
    ghosts = np.zeros_like(labels, bool)
    ghosts[2:4, 4, 11] = ghosts[2:4, 11, 4] = True
    on = ndimage.binary_dilation(labels == ID["vessel"])
    assert not (ghosts & on).any()

    def lift(pred):
        lab = torch.as_tensor(labels)
        return ghost_lift(torch.as_tensor(pred), torch.as_tensor(truth), lab == ID["vessel"], lab > 0).item()

    assert lift(truth) == 0.0
    assert lift(np.where(ghosts, truth + 300.0, truth)) == pytest.approx(300.0)  # a ghost vessel drawn
    assert lift(np.where(on, truth + 300.0, truth)) == 0.0  # the real vessels thickened: not a ghost
    assert lift(truth + 50.0) == pytest.approx(50.0)  # a lifted lung lifts its ghosts too
    assert math.isnan(ghost_lift(torch.as_tensor(truth), torch.as_tensor(truth), torch.zeros(6, 16, 16, dtype=torch.bool),
                                 torch.ones(6, 16, 16, dtype=torch.bool)).item())


def test_lung_error_split_names_the_structure_beside_each_lung_voxel(tmp_path):
    """bench/lung_error.py: an error placed on a lung voxel beside a rib is the rib's; one deep inside the lung is
    the interior's; the refined / coarse ratios are those of the planted errors."""

    import nibabel as nib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import lung_error

    n = 12
    ids = {"background": 0, "lung": 1, "rib": 6, "soft_tissue": 10}
    labels = np.full((n, n, n), 10, np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[5, 5, 1] = 6  # a rib voxel on the lung's wall, beside lung voxel (5, 5, 2)
    truth = np.full((n, n, n), -800.0, np.float32)
    coarse, refined = truth.copy(), truth.copy()
    coarse[5, 5, 2] += 250.0  # beside the rib: 0.1 model units, refined halves it
    refined[5, 5, 2] += 125.0
    coarse[6, 6, 6] += 250.0  # deep inside: refined doubles it
    refined[6, 6, 6] += 500.0
    folder = tmp_path / "patient_0000"
    folder.mkdir()
    for name, v in (("ground_truth", truth), ("coarse", coarse), ("refined", refined)):
        nib.save(nib.Nifti1Image(v, np.eye(4)), str(folder / f"{name}.nii.gz"))
    sums = lung_error.patient_sums(folder, torch.from_numpy(labels.astype(np.int64))[None, None], ids)
    assert sums["coarse/beside/rib"] == pytest.approx(0.01, rel=1e-5)
    assert sums["refined/beside/rib"] == pytest.approx(0.0025, rel=1e-5)
    assert sums["coarse/beside/interior"] == pytest.approx(0.01, rel=1e-5)
    assert sums["refined/beside/interior"] == pytest.approx(0.04, rel=1e-5)
    assert sums["n/rib"] == 9 and sums["refined/beside/soft_tissue"] == 0.0  # the rib's 3x3 of wall voxels; no error there
    assert sums["coarse/signed/rib"] == pytest.approx(0.1, rel=1e-5)  # signed: which way each stage is off
    assert sums["refined/signed/interior"] == pytest.approx(0.2, rel=1e-5)
    assert lung_error.main(["--results", str(tmp_path), "--data", str(tmp_path)]) == 2  # no dataset.json: refused
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {str(v): k for k, v in ids.items()}}))
    (tmp_path / "bare" / "patient_0001").mkdir(parents=True)  # an infer run with --no-save-volumes
    assert lung_error.main(["--results", str(tmp_path / "bare"), "--data", str(tmp_path)]) == 2
    assert lung_error.main(["--results", str(tmp_path), "--data", str(tmp_path)]) == 2  # no label map
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(folder / "labels.nii.gz"))
    assert lung_error.main(["--results", str(tmp_path), "--data", str(tmp_path)]) == 0


def test_lung_error_says_which_voxels_lie_in_the_chest_wall(tmp_path):
    """bench/lung_error.py: the ribs on the body wall and the lung beside them count in the chest wall (as the
    refiner's cue sees the coarse volume); the lung's deep interior does not."""

    import nibabel as nib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import lung_error

    n = 40  # 8 mm voxels: the wall is the outer 4 (40 mm less one voxel)
    ids = {"background": 0, "lung": 1, "rib": 6, "soft_tissue": 10}
    labels = np.zeros((n, n, n), np.uint8)
    labels[:, 1:39, 1:39] = 10  # the body: air around it in H and W
    labels[:, 4:36, 4:36] = 1  # the lung, from 4 voxels below the skin
    labels[20, 3, 20] = 6  # a rib in the wall, 3 voxels below the skin, beside the lung
    hu = np.choose(labels, [-1000.0, -800.0, 0, 0, 0, 0, 700.0, 0, 0, 0, 0]).astype(np.float32)
    folder = tmp_path / "patient_0000"
    folder.mkdir()
    for name in ("ground_truth", "coarse", "refined"):
        nib.save(nib.Nifti1Image(hu, np.eye(4)), str(folder / f"{name}.nii.gz"))
    sums = lung_error.patient_sums(folder, torch.from_numpy(labels.astype(np.int64))[None, None], ids)
    assert sums["n/rib voxels"] == sums["wall/rib voxels"] == 1
    assert sums["wall/rib"] == sums["n/rib"] > 0  # the lung beside the rib
    assert sums["wall/soft_tissue"] > 0  # the lung's rim on the wall is in it ...
    assert sums["wall/interior"] < 0.5 * sums["n/interior"]  # ... its core is not


def test_correction_split_separates_the_sirt_steps_from_the_unet(tiny_dataset, random_pair, tmp_path):
    """bench/correction_split.py: an untrained refiner moves nothing (both parts 0: the coarse volume); one whose
    head and steps are set moves every group, and its two parts add up to its whole change (no clamp reached)."""

    from ctrefine.checkpoint import load_model_file, save_model_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import correction_split

    untrained = correction_split.split(str(random_pair[0]), str(random_pair[1]), str(tiny_dataset))
    assert set(untrained) == {"lung beside ribs", "lung beside soft tissue", "lung", "rib"}
    for row in untrained.values():
        assert row["voxels"] > 0 and row["truth - coarse"] != 0
        assert row["SIRT steps"] == row["U-Net residual"] == row["refined - coarse"] == 0
    mf = load_model_file(random_pair[1], stage="refine")
    state = dict(mf.state_dict)
    torch.manual_seed(1)
    state["head.weight"] = 1e-3 * torch.randn_like(state["head.weight"])
    state["dc_step"] = torch.full_like(state["dc_step"], 0.01)
    save_model_file(tmp_path / "moved.pt", "refine", state, mf.config)
    moved = correction_split.split(str(random_pair[0]), str(tmp_path / "moved.pt"), str(tiny_dataset))
    for row in moved.values():
        assert row["SIRT steps"] != 0 and row["U-Net residual"] != 0
        assert row["refined - coarse"] == pytest.approx(row["SIRT steps"] + row["U-Net residual"], abs=1e-3)
    oracle = correction_split.blurred_oracle(str(random_pair[0]), str(random_pair[1]), str(tiny_dataset), [0.5, 2.0])
    assert oracle["refiner"]["gain_db"] == 0 and oracle["refiner"]["lung_error"] == pytest.approx(1.0)  # untrained
    sharp, blurred = oracle["oracle, sigma 0.5"], oracle["oracle, sigma 2"]
    # the trivial baseline beside them (here the untrained base's coarse volume is worse than it)
    assert oracle["mean training volume"]["gain_db"] > 0 and oracle["mean training volume"]["lung_error"] < 1
    assert sharp["gain_db"] > blurred["gain_db"] > 0 and sharp["lung_error"] < blurred["lung_error"] < 1
    (tmp_path / "bare").mkdir()
    assert correction_split.main(["--base", str(random_pair[0]), "--refiner", str(random_pair[1]),
                                  "--data", str(tmp_path / "bare")]) == 2


def test_ghost_ambiguity_labels_the_crossings_and_scores_them():
    """bench/ghost_ambiguity.py: the same two vessels as the ghost-lift test. Their crossings are the two vessels
    (label 1) and the two ghosts (label 0); a score that ranks every vessel above every ghost has AUC 1 and draws
    every vessel at one ghost in ten, its reverse AUC 0; and the features read each voxel's own PA and lateral
    pixels."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import ghost_ambiguity as ga

    labels = np.full((6, 16, 16), ID["lung"], np.uint8)
    labels[2:4, 4, 4] = labels[2:4, 11, 11] = ID["vessel"]
    idx, y = ga.crossings(labels)
    got = {tuple(i): v for i, v in zip(idx.tolist(), y.tolist())}
    want = {(d, h, w): float(h == w) for d in (2, 3) for h in (4, 11) for w in (4, 11)}
    assert got == want
    assert ga.auc(y, y) == 1.0 and ga.auc(-y, y) == 0.0 and ga.tpr_at(y, y, 0.1) == 1.0
    xrays = torch.zeros(2, 32, 32)  # the radiographs at twice the volume's size, as the datasets have them
    xrays[0, 4:8, 8:10] = 1.0  # PA: heights 2-3 (of 16), width 4
    f = ga.features(xrays, idx, k=0, coarse=None)  # k = 0: each voxel's own pixel of each view
    pa_own = f[:, 0] - f[:, 0].min()
    assert torch.equal(pa_own > 0, torch.from_numpy(idx[:, 2] == 4))
