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

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import DataError

__all__ = ["DataError", "atomic_file", "atomic_dir", "save_nifti", "load_nifti", "write_json", "read_json",
           "load_radiograph", "square_resize", "xray_affine"]


@contextlib.contextmanager
def atomic_file(path):
    """Write a file under a temporary name beside ``path`` (same extension, so writers that pick the
    format from it still do); on success rename it to ``path``. On any error nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final):
    """Build a folder under a temporary name beside ``final``; on success replace ``final`` with it.

    On any error the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_nifti(path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` (float32) with ``affine`` atomically; qform and sform both set."""
    path = Path(path)
    if affine is None or np.asarray(affine).shape != (4, 4):
        raise ValueError("refusing to write a volume without a 4x4 affine")
    img = nib.Nifti1Image(np.asarray(data, np.float32), np.asarray(affine, np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_file(path) as tmp:
        nib.save(img, str(tmp))


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
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def load_radiograph(path, convention: str = "attenuation") -> np.ndarray:
    """Read one radiograph (PNG/TIFF/JPEG, NIfTI, or DICOM) -> 2D float32 attenuation image (bone bright).

    How a real radiograph maps to the training convention (line integrals of mu, bone bright):

    * ``convention="attenuation"`` (default): pixel values already increase with attenuation -- DRRs,
      ``-log`` processed data, and the usual displayed radiograph (bone white). DICOM
      ``MONOCHROME1`` images (bone black) are inverted automatically.
    * ``convention="intensity"``: pixel values are detected intensity (bone dark, raw detector data);
      converted with ``-log(I / I0)``, ``I0`` the brightest pixel (unattenuated beam).

    Any linear rescaling is irrelevant: :func:`ctrefine.conventions.normalize_xray` normalises each
    image by its own percentiles. Non-square images are padded to a square with their background
    (the 0.5th percentile) before resizing, so anatomy keeps its aspect ratio.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = path.name.lower()
    invert = False
    try:
        if name.endswith((".nii", ".nii.gz")):
            img = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        elif name.endswith((".dcm", ".dicom")):
            try:
                import pydicom
            except ImportError:
                raise DataError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from None
            ds = pydicom.dcmread(str(path))
            img = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
                getattr(ds, "RescaleIntercept", 0))
            invert = str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1"
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                img = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__})") from None
    img = np.squeeze(np.asarray(img, dtype=np.float32))
    if img.ndim == 3 and img.shape[-1] in (3, 4):  # RGB(A) export of a grey image
        rgb = img[..., :3]
        if np.abs(rgb - rgb[..., :1]).max() > 1e-3 * max(1.0, float(np.abs(rgb).max())):
            raise DataError(f"{path}: is a colour image ({img.shape[-1]} channels that differ); expected a grey radiograph")
        img = rgb[..., 0]
    if img.ndim != 2:
        raise DataError(f"{path}: expected a 2D radiograph, got shape {img.shape}")
    if min(img.shape) < 16:
        raise DataError(f"{path}: radiograph too small ({img.shape[0]}x{img.shape[1]})")
    if not np.all(np.isfinite(img)):
        raise DataError(f"{path}: contains NaN or Inf values")
    if convention == "intensity":
        i0 = float(img.max())
        img = -np.log(np.clip(img, 1e-6 * max(i0, 1e-6), None) / max(i0, 1e-6))
    elif convention != "attenuation":
        raise ValueError(f"convention must be 'attenuation' or 'intensity', got {convention!r}")
    if invert:
        img = img.max() - img
    if np.ptp(img) == 0:
        raise DataError(f"{path}: image is constant")
    return img


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square with the background value, then area/bilinear resize to ``size x size``."""
    import torch
    import torch.nn.functional as F

    h, w = img.shape
    n = max(h, w)
    bg = float(np.percentile(img, 0.5))
    sq = np.full((n, n), bg, np.float32)
    sq[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = img
    t = torch.from_numpy(sq)[None, None]
    mode = "area" if n > size else "bilinear"
    out = F.interpolate(t, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0, 0].numpy()
