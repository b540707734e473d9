import gzip

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_to_output

from ctrefine.conventions import canonical_affine, hu_to_model
from ctrefine.data.dataset import CTDataset
from ctrefine.data.ingest import ingest_ct, load_ct
from ctrefine.data.io import load_nifti, save_nifti
from ctrefine.errors import DataError
from ctrefine.data.phantoms import chest_phantom


def test_nifti_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(9, 10, 11)).astype(np.float32)
    aff = canonical_affine(9, 2.5, (3.0, -4.0, 5.0))
    save_nifti(tmp_path / "v.nii.gz", data, aff)
    back, aff2 = load_nifti(tmp_path / "v.nii.gz")
    assert np.array_equal(back, data) and np.allclose(aff2, aff)
    assert nib.aff2axcodes(aff2) == ("I", "P", "L")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_canonical_affine_orientation():
    aff = canonical_affine(64, 5.0)
    assert nib.aff2axcodes(aff) == ("I", "P", "L")
    assert np.allclose(nib.affines.voxel_sizes(aff), 5.0)
    assert np.allclose(aff @ [31.5, 31.5, 31.5, 1], [0, 0, 0, 1])


@pytest.fixture(scope="module")
def las_ct(tmp_path_factory):
    """A phantom stored as LAS with anisotropic spacing (1.6 x 1.6 x 3.2 mm), plus its RAS resampled copy."""
    root = tmp_path_factory.mktemp("ingest")
    hu = chest_phantom(5, size=96, fov=153.6)  # (I, P, L) at 1.6 mm
    las = np.flip(hu.transpose(2, 1, 0), axis=(1, 2))  # axes -> (L, A, S)
    las = np.ascontiguousarray(las[:, :, ::2])  # thick slices: 3.2 mm along S
    aff = np.diag([-1.6, 1.6, 3.2, 1.0])
    aff[:3, 3] = [20.0, -10.0, 100.0]  # arbitrary scanner position
    save_nifti(root / "las.nii.gz", las, aff)
    img = nib.load(str(root / "las.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    ras = resample_to_output(img, voxel_sizes=(1.6, 1.6, 1.6), order=1, cval=-1000)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    save_nifti(root / "ras.nii.gz", np.asarray(ras.dataobj, np.float32), ras.affine)
    return root


def test_ingest_las_equals_ras_copy(las_ct, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    kw = dict(size=32, xray_size=32, fov=153.6)
    ingest_ct(las_ct / "las.nii.gz", out, "a", **kw)
    ingest_ct(las_ct / "ras.nii.gz", out, "b", **kw)
    a, aff_a = load_nifti(out / "a" / "ct.nii.gz")
    b, aff_b = load_nifti(out / "b" / "ct.nii.gz")
    assert nib.aff2axcodes(aff_a) == ("I", "P", "L") and np.allclose(nib.affines.voxel_sizes(aff_a), 4.8)
    ma, mb = hu_to_model(a), hu_to_model(b)
    assert np.abs(ma - mb).mean() < 0.01
    assert 10 * np.log10(1 / np.mean((ma - mb) ** 2)) > 30
    assert np.abs(aff_a[:3, 3] - aff_b[:3, 3]).max() < 2.0  # same body centre within a voxel
    xa, _ = load_nifti(out / "a" / "xray_pa.nii.gz")
    xb, _ = load_nifti(out / "b" / "xray_pa.nii.gz")
    assert np.abs(xa - xb).mean() < 0.02 * xa.mean()


def _write(path, data, aff=np.eye(4)):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), aff), str(path))
    return path


def test_bad_ct_files(tmp_path):
    good = np.full((16, 16, 16), -1000.0, np.float32)
    good[4:12, 4:12, 4:12] = 40
    good[7:9, 7:9, 7:9] = 700
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    _write(tmp_path / "nan.nii.gz", nan)
    _write(tmp_path / "flat.nii.gz", np.zeros((16, 16, 16)) + 0.5)
    _write(tmp_path / "2d.nii.gz", np.zeros((16, 16)))
    _write(tmp_path / "thin.nii.gz", np.zeros((16, 16, 4)))
    raw = gzip.compress(open(_write(tmp_path / "ok.nii", good), "rb").read())
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    for name, msg in [("nan", "NaN"), ("flat", "does not look like a CT"), ("2d", "3D"), ("thin", "3D"), ("trunc", "cannot read"),
                      ("missing", "no such file")]:
        with pytest.raises(DataError, match=msg) as exc:
            load_ct(tmp_path / f"{name}.nii.gz")
        assert str(tmp_path / name) in str(exc.value) and "\n" not in str(exc.value)


def test_dicom_series(tmp_path, las_ct):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ras, aff = load_nifti(las_ct / "ras.nii.gz")  # (R, A, S) at 1.6 mm
    folder = tmp_path / "series"
    folder.mkdir()
    series = generate_uid()
    # DICOM is LPS: columns run R->L (+x_lps), rows A->P (+y_lps), slices I->S.
    for k in range(ras.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        world = aff @ [ras.shape[0] - 1, ras.shape[1] - 1, k, 1]  # voxel at the patient's left-posterior corner
        ds.ImagePositionPatient = [float(-world[0]), float(-world[1]), float(world[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.6, 1.6]
        sl = ras[::-1, ::-1, k].T  # rows: A->P reversed-y ... (row=P index, col=L index)
        ds.Rows, ds.Columns = sl.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.round(sl + 1024).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"{k:03d}.dcm"), enforce_file_format=True)
    out = tmp_path / "ds"
    out.mkdir()
    ingest_ct(folder, out, "dcm", size=32, xray_size=32, fov=153.6)
    ingest_ct(las_ct / "ras.nii.gz", out, "nii", size=32, xray_size=32, fov=153.6)
    a, _ = load_nifti(out / "dcm" / "ct.nii.gz")
    b, _ = load_nifti(out / "nii" / "ct.nii.gz")
    assert np.abs(hu_to_model(a) - hu_to_model(b)).mean() < 0.005


def test_torch_dataset(tiny_dataset):
    ds = CTDataset(tiny_dataset, "train")
    item = ds[0]
    assert item["xrays"].shape == (2, 1, 64, 64) and item["ct"].shape == (1, 32, 32, 32)
    assert 0 <= item["ct"].min() and item["ct"].max() <= 1 and 0 <= item["xrays"].min() and item["xrays"].max() <= 1
    names = {n for s in ("train", "val", "test") for n in CTDataset(tiny_dataset, s).names}
    assert len(names) == 6  # every patient in exactly one split
    with pytest.raises(DataError, match="no split"):
        CTDataset(tiny_dataset, "holdout")


def test_a_volume_on_the_canonical_grid_is_kept_voxel_for_voxel_other_grids_are_recentred():
    import numpy as np

    from ctrefine.conventions import canonical_affine
    from ctrefine.data.ingest import canonical_grid_center

    aff = canonical_affine(16, 20.0, (3.0, -5.0, 7.0))
    data = np.zeros((16, 16, 16), np.float32)
    assert np.allclose(canonical_grid_center(data, aff, 16, 320.0), (3.0, -5.0, 7.0))
    flipped = aff @ np.array([[0, 0, 1, 0], [0, -1, 0, 15], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # axes swapped, one flipped
    assert np.allclose(canonical_grid_center(data, flipped, 16, 320.0), (3.0, -5.0, 7.0))
    assert canonical_grid_center(data, canonical_affine(16, 19.0), 16, 320.0) is None  # another spacing
    assert canonical_grid_center(np.zeros((16, 16, 17), np.float32), aff, 16, 320.0) is None
    tilted = aff.copy()
    c, s_ = np.cos(0.1), np.sin(0.1)
    tilted[:3, :3] = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]) @ aff[:3, :3]  # rotated: resampled as before
    assert canonical_grid_center(data, tilted, 16, 320.0) is None
