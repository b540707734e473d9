"""DICOM CT series as they come from a scanner or a PACS export: grouped, checked, then stacked.

A folder may hold several series (thin and thick reconstructions, a contrast phase, the scout
image), files without an extension and non-image objects. :func:`list_series` groups the image files
by ``SeriesInstanceUID`` (files recognised by content, not by name) and marks localizers
(``ImageType`` contains LOCALIZER, or a single-slice series); :func:`load_series` stacks one series
after checking that every slice shares orientation, pixel spacing and matrix size and that the
slices are evenly spaced along the normal. A folder with more than one CT series is a one-line error
that lists them, unless the caller names one (its UID or its index in that list).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .limits import MAX_VOLUME_VOXELS, check_declared_size

ORIENTATION_TOL = 1e-3  # direction cosines of slices in one series agree to this
SPACING_TOL = 1e-2  # relative: in-plane spacing per slice, and slice steps along the normal


def _pydicom(where):
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{where}: reading DICOM needs pydicom (pip install pydicom)") from None
    return pydicom


@dataclass
class Series:
    uid: str
    description: str
    modality: str
    files: list = field(default_factory=list)  # pydicom datasets (pixel data read lazily by pydicom)
    localizer: bool = False

    def label(self, index: int) -> str:
        desc = f" {self.description!r}" if self.description else ""
        return f"[{index}] {self.uid} ({self.modality or '?'}, {len(self.files)} slice(s){desc})"


def read_dicom(path):
    """A pydicom dataset if ``path`` is a DICOM file (by content: preamble or a parsable header), else None."""
    pydicom = _pydicom(path)
    try:
        return pydicom.dcmread(str(path), force=False)
    except Exception:
        return None


def list_series(folder) -> list[Series]:
    """Image series in ``folder`` (non-recursive), CT series first, localizers last."""
    folder = Path(folder)
    groups: dict[str, Series] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        ds = read_dicom(f)
        if ds is None or "PixelData" not in ds:
            continue  # DICOMDIR, structured reports, thumbnails, stray files
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "(no SeriesInstanceUID)")
        s = groups.setdefault(uid, Series(uid, str(getattr(ds, "SeriesDescription", "") or ""),
                                          str(getattr(ds, "Modality", "") or "")))
        s.files.append(ds)
        image_type = [str(x).upper() for x in (getattr(ds, "ImageType", None) or [])]
        if "LOCALIZER" in image_type:
            s.localizer = True
    for s in groups.values():
        if len(s.files) < 2 or not all("ImagePositionPatient" in d and "ImageOrientationPatient" in d for d in s.files):
            s.localizer = True  # a scout, a secondary capture or a dose report: not a stackable volume
    return sorted(groups.values(), key=lambda s: (s.localizer, s.modality != "CT", s.uid))


def choose_series(folder, series: str | None = None) -> Series:
    """The one volume series of ``folder``, or the one named by UID / index (one-line errors otherwise)."""
    all_series = list_series(folder)
    if series is not None:
        for i, s in enumerate(all_series):
            if series == s.uid or series == str(i):
                if s.localizer:
                    raise DataError(f"{folder}: series {s.label(i)} is a localizer or single image, not a CT volume")
                return s
        raise DataError(f"{folder}: no series {series!r}; found " + "; ".join(s.label(i) for i, s in enumerate(all_series)))
    volumes = [s for s in all_series if not s.localizer]
    if not volumes:
        raise DataError(f"{folder}: no DICOM series with at least 2 slices found")
    if len(volumes) > 1:
        raise DataError(f"{folder}: holds {len(volumes)} series; choose one with --series UID|INDEX: "
                        + "; ".join(s.label(i) for i, s in enumerate(all_series) if not s.localizer))
    return volumes[0]


def load_series(folder, series: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack one checked series -> (HU array indexed (col, row, slice), voxel->RAS affine); a slice whose
    geometry tags are missing or not numbers is a one-line :class:`DataError`."""
    s = choose_series(folder, series)
    try:
        return _stack(folder, s)
    except DataError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{folder}: series {s.uid} has a slice with a missing or malformed geometry tag "
                        f"({type(exc).__name__}: {str(exc)[:80]})") from None


def _stack(folder, s) -> tuple[np.ndarray, np.ndarray]:
    slices = s.files
    iops = np.array([[float(v) for v in d.ImageOrientationPatient] for d in slices])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        raise DataError(f"{folder}: series {s.uid} mixes slice orientations")
    spacing = np.array([[float(v) for v in getattr(d, "PixelSpacing", [np.nan, np.nan])] for d in slices])
    if not np.all(np.isfinite(spacing)) or np.abs(spacing - spacing[0]).max() > SPACING_TOL * spacing[0].max():
        raise DataError(f"{folder}: series {s.uid} mixes pixel spacings (or lacks PixelSpacing)")
    shapes = {(int(d.Rows), int(d.Columns)) for d in slices}
    if len(shapes) > 1:
        raise DataError(f"{folder}: series {s.uid} mixes image sizes {sorted(shapes)}")
    check_declared_size(folder, (*next(iter(shapes)), len(slices)), MAX_VOLUME_VOXELS)
    row_cos, col_cos = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_cos, col_cos)
    slices = sorted(slices, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    pos = np.array([d.ImagePositionPatient for d in slices], float)
    step = np.diff(pos, axis=0)
    gaps = step @ normal
    if np.any(gaps < 1e-3 * max(1.0, abs(gaps).max())):
        raise DataError(f"{folder}: series {s.uid} has two slices at the same position (duplicates or two series "
                        f"under one UID)")
    if np.ptp(gaps) > SPACING_TOL * gaps.mean():
        raise DataError(f"{folder}: series {s.uid} slices are not evenly spaced "
                        f"(steps {gaps.min():.3g}..{gaps.max():.3g} mm; missing slices?)")
    try:
        vol = np.stack([d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1))
                        + float(getattr(d, "RescaleIntercept", 0)) for d in slices], axis=-1)  # (row, col, slice)
    except Exception as exc:
        raise DataError(f"{folder}: cannot decode pixel data of series {s.uid} ({type(exc).__name__})") from None
    vol = vol.transpose(1, 0, 2)  # (col, row, slice): col follows the row cosine
    dr, dc = spacing[0]  # (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * dc
    lps[:3, 1] = col_cos * dr
    lps[:3, 2] = step.mean(axis=0)
    lps[:3, 3] = pos[0]
    return vol, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS


# ------------------------------------------------------------------------------------------- writing
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SERIES_DESCRIPTION = "ctrefine: from two radiographs, not a CT scan"  # LO: at most 64 characters
COMMENT = ("Reconstructed by ctrefine from two radiographs (PA + lateral) by a neural network; not a CT scan. "
           "Values are estimates, not measurements.")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _slice_geometry(affine: np.ndarray, d: int) -> dict:
    """DICOM geometry of axial slice ``d`` of a ``(D, H, W)`` volume with voxel->RAS ``affine``: its rows
    run along H, its columns along W (DICOM's row cosine is the direction of increasing column index)."""
    a = np.asarray(affine, float)
    col_step, row_step = RAS_TO_LPS @ a[:3, 2], RAS_TO_LPS @ a[:3, 1]  # one column (W), one row (H), in LPS
    origin = RAS_TO_LPS @ (a[:3, :3] @ np.array([d, 0.0, 0.0]) + a[:3, 3])
    return {"ImagePositionPatient": [f"{v:.6f}" for v in origin],
            "ImageOrientationPatient": [f"{v:.8f}" for v in (*col_step / np.linalg.norm(col_step),
                                                              *row_step / np.linalg.norm(row_step))],
            "PixelSpacing": [f"{np.linalg.norm(row_step):.6f}", f"{np.linalg.norm(col_step):.6f}"],
            "SliceThickness": f"{np.linalg.norm(a[:3, 0]):.6f}"}


def _slice_dataset(pydicom, hu_slice: np.ndarray, geometry: dict, uids: dict, index: int, description: str):
    """One CT Image Storage object: int16 HU pixels (slope 1, intercept 0), DERIVED\\SECONDARY."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality, ds.ImageType = "CT", ["DERIVED", "SECONDARY"]
    ds.SeriesDescription, ds.StudyDescription = description[:64], "ctrefine reconstruction"
    ds.ImageComments, ds.DerivationDescription = COMMENT, COMMENT
    ds.PatientName, ds.PatientID = "ctrefine^reconstruction", uids["series"][-16:]
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.Manufacturer, ds.BurnedInAnnotation = "ctrefine", "NO"
    for k, v in geometry.items():
        setattr(ds, k, v)
    ds.Rows, ds.Columns = hu_slice.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = np.clip(np.round(hu_slice), -32768, 32767).astype("<i2").tobytes()
    return ds


def write_series(folder, hu: np.ndarray, affine: np.ndarray, description: str = SERIES_DESCRIPTION) -> list[Path]:
    """A ``(D, H, W)`` HU volume with its voxel->RAS ``affine`` as a DICOM CT series in ``folder`` (one file per
    axial slice, ``slice_NNNN.dcm``, new study / series / frame-of-reference UIDs each call). The caller
    writes ``folder`` atomically (:func:`ctrefine.outputs.atomic_dir`)."""
    pydicom = _pydicom(folder)
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    paths = []
    for d in range(hu.shape[0]):
        ds = _slice_dataset(pydicom, hu[d], _slice_geometry(affine, d), uids, d, description)
        paths.append(folder / f"slice_{d:04d}.dcm")
        pydicom.dcmwrite(paths[-1], ds, enforce_file_format=True)
    return paths
