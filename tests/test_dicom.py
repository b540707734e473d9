"""DICOM CT folders as a scanner or PACS exports them: several series, localizers, no file extensions."""
import numpy as np
import pytest

from ctrefine.data.dicom import list_series, load_series
from ctrefine.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402


def write_series(folder, vol, uid=None, spacing=(2.0, 2.0), step=3.0, prefix="", ext="", orientation=None,
                 image_type=("ORIGINAL", "PRIMARY", "AXIAL"), hu_offset=0.0, spacing_of=None, orientation_of=None):
    """One axial series of ``vol`` (slices, rows, cols) HU; per-slice spacing/orientation overrides for bad cases."""
    folder.mkdir(exist_ok=True)
    uid = uid or generate_uid()
    for k, sl in enumerate(vol):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = folder / f"{prefix}{k:04d}{ext}"
        ds = FileDataset(str(name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.Modality = uid, meta.MediaStorageSOPInstanceUID, "CT"
        ds.SeriesDescription = f"series {prefix}"
        ds.ImageType = list(image_type)
        ds.ImagePositionPatient = [0.0, 0.0, float(k * step)]
        ds.ImageOrientationPatient = list((orientation_of or {}).get(k, orientation or [1, 0, 0, 0, 1, 0]))
        ds.PixelSpacing = list((spacing_of or {}).get(k, spacing))
        ds.Rows, ds.Columns = sl.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.round(sl + hu_offset + 1024).astype(np.int16).tobytes()
        ds.save_as(str(name), enforce_file_format=True)
    return uid


@pytest.fixture
def vol():
    v = np.full((6, 12, 10), -1000.0, np.float32)
    v[:, 3:9, 2:8] = 40.0
    v[2:4, 5:7, 4:6] = 700.0
    return v


def test_files_without_extension_and_a_localizer(tmp_path, vol):
    uid = write_series(tmp_path / "f", vol)  # names like 0000, as PACS exports them
    write_series(tmp_path / "f", vol[:1], prefix="scout_", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    (tmp_path / "f" / "DICOMDIR.txt").write_text("not dicom")
    data, aff = load_series(tmp_path / "f")
    assert data.shape == (10, 12, 6) and np.allclose(np.abs(np.diag(aff)[:3]), [2.0, 2.0, 3.0])
    assert np.allclose(data[..., 3].T, vol[3])  # (col, row, slice) layout
    series = list_series(tmp_path / "f")
    assert series[0].uid == uid and not series[0].localizer and series[-1].localizer


def test_two_interleaved_series_are_refused_then_chosen(tmp_path, vol):
    a = write_series(tmp_path / "f", vol, prefix="a")
    b = write_series(tmp_path / "f", vol, prefix="b", hu_offset=335.0)  # e.g. a contrast phase, same positions
    with pytest.raises(DataError, match="holds 2 series") as exc:
        load_series(tmp_path / "f")
    assert a in str(exc.value) and b in str(exc.value) and "--series" in str(exc.value)
    got_b, _ = load_series(tmp_path / "f", series=b)
    got_a, _ = load_series(tmp_path / "f", series=a)
    assert np.allclose(got_b - got_a, 335.0)
    index = [s.uid for s in list_series(tmp_path / "f")].index(b)
    assert np.array_equal(load_series(tmp_path / "f", series=str(index))[0], got_b)
    with pytest.raises(DataError, match="no series 'nope'"):
        load_series(tmp_path / "f", series="nope")


@pytest.mark.parametrize("case, needle", [
    ("orientation", "mixes slice orientations"),
    ("spacing", "mixes pixel spacings"),
    ("duplicate", "same position"),
    ("gap", "not evenly spaced"),
    ("no_rows", "missing or malformed geometry tag"),
    ("text_orientation", "missing or malformed geometry tag"),
])
def test_inconsistent_series_is_a_one_line_error(tmp_path, vol, case, needle):
    folder = tmp_path / "f"
    if case == "orientation":
        write_series(folder, vol, orientation_of={2: [0, 1, 0, 1, 0, 0]})
    elif case == "spacing":
        write_series(folder, vol, spacing_of={4: (2.5, 2.5)})
    elif case in ("no_rows", "text_orientation"):
        write_series(folder, vol)
        f = sorted(folder.iterdir())[1]
        ds = pydicom.dcmread(str(f))
        if case == "no_rows":
            del ds.Rows
        else:
            del ds.ImageOrientationPatient
            ds.add_new((0x0020, 0x0037), "LO", "a\\b\\c\\d\\e\\f")  # text where numbers belong
        ds.save_as(str(f), enforce_file_format=True)
    elif case == "duplicate":
        uid = write_series(folder, vol, prefix="x")
        write_series(folder, vol[:2], uid=uid, prefix="y")  # two slices again, same positions, same UID
    else:
        uid = write_series(folder, vol[:3], prefix="x")
        write_series(tmp_path / "g", vol[:2], uid=uid, step=3.0)
        for i, f in enumerate(sorted((tmp_path / "g").iterdir())):  # slices 5 and 6: a gap of two missing ones
            ds = pydicom.dcmread(str(f))
            ds.ImagePositionPatient = [0.0, 0.0, float((5 + i) * 3.0)]
            ds.save_as(str(folder / f"z{i}"), enforce_file_format=True)
    with pytest.raises(DataError, match=needle) as exc:
        load_series(folder)
    assert "\n" not in str(exc.value)


def test_prepare_names_the_series_option(tmp_path, vol):
    import subprocess
    import sys

    big = np.full((24, 40, 40), -1000.0, np.float32)
    big[:, 8:32, 6:34] = 40.0
    big[:, 14:26, 10:18] = -850.0
    big[:, 26:30, 18:22] = 700.0
    write_series(tmp_path / "f", big, prefix="a", spacing=(8.0, 8.0), step=8.0)
    b = write_series(tmp_path / "f", big, prefix="b", spacing=(8.0, 8.0), step=8.0)
    cmd = [sys.executable, "-m", "ctrefine.cli", "prepare", "--ct", str(tmp_path / "f"), "--out", str(tmp_path / "ds"),
           "--size", "16", "--xray-size", "16", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1 and "--series" in r.stderr and not (tmp_path / "ds").exists()
    r = subprocess.run(cmd + ["--series", b], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ds" / "patient_0000" / "ct.nii.gz").exists()
