"""Reading and writing NIfTI volumes and images -- atomically, never without an affine (radiographs from users'
files: :mod:`ctrefine.data.radiograph`; JSON: :mod:`ctrefine.jsonio`).

On-disk formats
    * CT volumes: NIfTI (``.nii.gz``), float32 HU, voxel->RAS affine in both qform and sform
      (code 1, scanner), so ITK / 3D Slicer open them with the same orientation and spacing.
    * Radiographs: 2D NIfTI (``xray_pa.nii.gz``, ``xray_lateral.nii.gz``), float32 attenuation line
      integrals ``integral mu dl`` (dimensionless, air = 0, bone bright). Rows run superior->inferior;
      columns run patient right->left (PA, a coronal plane) or anterior->posterior (lateral, a
      sagittal plane), and the affine says so (:func:`ctrefine.data.radiograph.xray_affine`): pixel pitch at the isocenter
      plane, image centre at the isocenter, so viewers place each view in its anatomical plane.

Every writer writes to a temporary file beside the target and renames it, so a crash never leaves
a half-written file under the final name.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import DataError
from ..outputs import atomic_file
from .limits import MAX_VOLUME_VOXELS, check_declared_size

__all__ = ["save_nifti", "load_nifti", "open_nifti"]


def save_nifti(path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> None:
    """Write ``data`` (float32, or ``dtype`` -- uint8 for label maps) with ``affine`` atomically; qform and
    sform both set."""
    path = Path(path)
    if affine is None or np.asarray(affine).shape != (4, 4):
        raise ValueError("refusing to write a volume without a 4x4 affine")
    img = nib.Nifti1Image(np.asarray(data, dtype), np.asarray(affine, np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_file(path) as tmp:
        nib.save(img, str(tmp))


def open_nifti(path, limit: int):
    """The NIfTI image at ``path`` with its declared size checked before its pixels are read."""
    img = nib.load(str(path))
    check_declared_size(path, img.header.get_data_shape(), limit)
    if not str(path).endswith(".gz"):  # uncompressed: the file must hold what the header declares
        need = int(img.header.get_data_offset()) + int(np.prod(img.header.get_data_shape(), dtype=np.int64)) * \
            img.header.get_data_dtype().itemsize
        if Path(path).stat().st_size < need:
            raise DataError(f"{path}: holds {Path(path).stat().st_size:,} bytes, its header declares {need:,} (truncated?)")
    return img


def load_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file -> (float32 array, 4x4 affine). Raises :class:`DataError` with the file name."""
    path = Path(path)
    try:
        img = open_nifti(path, MAX_VOLUME_VOXELS)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return data, np.asarray(img.affine, np.float64)
