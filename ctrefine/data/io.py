"""Reading and writing volumes, radiographs and JSON -- always atomically, never without an affine.

On-disk formats
    * CT volumes: NIfTI (``.nii.gz``), float32 HU, voxel->RAS affine in both qform and sform
      (code 1, scanner), so ITK / 3D Slicer open them with the same orientation and spacing.
    * Radiographs: 2D NIfTI (``xray_pa.nii.gz``, ``xray_lateral.nii.gz``), float32 attenuation line
      integrals ``integral mu dl`` (dimensionless, air = 0, bone bright). Rows run superior->inferior;
      columns run right->left (PA) or anterior->posterior (lateral). The affine's diagonal holds the
      detector pixel pitch projected to the isocenter plane (mm).

Every writer writes to a temporary file beside the target and renames it, so a crash never leaves
a half-written file under the final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """A user-supplied file is unreadable or not what it claims to be (one-line message)."""


def _atomic_target(path: Path, suffix: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_nifti(path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` (float32) with ``affine`` atomically; qform and sform both set."""
    path = Path(path)
    if affine is None or np.asarray(affine).shape != (4, 4):
        raise ValueError("refusing to write a volume without a 4x4 affine")
    img = nib.Nifti1Image(np.asarray(data, np.float32), np.asarray(affine, np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = _atomic_target(path, ".nii.gz" if path.name.endswith(".gz") else ".nii")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file -> (float32 array, 4x4 affine). Raises :class:`DataError` with the file name."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return data, np.asarray(img.affine, np.float64)


def xray_affine(pixel_mm: float) -> np.ndarray:
    """Affine of a stored radiograph: pixel pitch on the diagonal (isocenter plane)."""
    return np.diag([pixel_mm, pixel_mm, 1.0, 1.0])


def write_json(path, obj) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    path = Path(path)
    tmp = _atomic_target(path, ".json")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
