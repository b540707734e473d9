"""Reading and writing volumes, radiographs and JSON -- always atomically, never without an affine.

On-disk formats
    * CT volumes: NIfTI (``.nii.gz``), float32 HU, voxel->RAS affine in both qform and sform
      (code 1, scanner), so ITK / 3D Slicer open them with the same orientation and spacing.
    * Radiographs: 2D NIfTI (``xray_pa.nii.gz``, ``xray_lateral.nii.gz``), float32 attenuation line
      integrals ``integral mu dl`` (dimensionless, air = 0, bone bright). Rows run superior->inferior;
      columns run patient right->left (PA, a coronal plane) or anterior->posterior (lateral, a
      sagittal plane), and the affine says so (:func:`xray_affine`): pixel pitch at the isocenter
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
from .dicom import read_dicom
from .limits import MAX_IMAGE_PIXELS, MAX_VOLUME_VOXELS, check_declared_size

__all__ = ["save_nifti", "load_nifti", "load_radiograph", "square_resize", "xray_affine"]


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


def _nifti(path, limit: int):
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
        img = _nifti(path, MAX_VOLUME_VOXELS)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return data, np.asarray(img.affine, np.float64)


def xray_affine(pixel_mm: float, view: str = "pa", size: int = 1) -> np.ndarray:
    """Affine of a stored radiograph ``(rows, cols)`` of ``size`` pixels a side, in RAS mm.

    Rows run towards inferior (-z). PA (coronal plane): columns run towards the patient's left (-x),
    the absent third axis is the beam direction (+y). Lateral (sagittal plane): columns run towards
    posterior (-y), third axis +x. The image centre sits at the isocenter (the origin).
    """
    a = np.eye(4)
    a[:3, 0] = [0.0, 0.0, -pixel_mm]
    if view == "pa":
        a[:3, 1], a[:3, 2] = [-pixel_mm, 0.0, 0.0], [0.0, 1.0, 0.0]
    elif view == "lateral":
        a[:3, 1], a[:3, 2] = [0.0, -pixel_mm, 0.0], [1.0, 0.0, 0.0]
    else:
        raise ValueError(f"view must be 'pa' or 'lateral', got {view!r}")
    mid = (size - 1) / 2.0
    a[:3, 3] = -(a[:3, :2] @ [mid, mid])
    return a


_AXIS_NAMES = ("left-right", "anterior-posterior", "head-foot")


def _is_legacy_drr_affine(aff: np.ndarray) -> bool:
    """An older ctrefine DRR file: affine ``diag(pitch, pitch, 1, 1)`` (no anatomical axes), rows first, as stored."""
    return aff[0, 0] > 0 and np.allclose(aff, np.diag([aff[0, 0], aff[0, 0], 1.0, 1.0]))


def orient_radiograph(img: np.ndarray, affine: np.ndarray, path, view: str | None = None) -> np.ndarray:
    """A 2D NIfTI radiograph as ``(rows superior->inferior, cols right->left | anterior->posterior)``.

    The affine decides: the in-plane axis that runs head-foot becomes the rows; the other must run
    left-right for a PA (coronal) image and front-back for a lateral (sagittal) one -- a mismatch means
    the views are swapped and is an error. A file without a head-foot axis in its plane cannot be
    placed and is refused (except ctrefine's own older DRR files, read as stored).
    """
    d0, d1 = np.asarray(affine, float)[:3, 0], np.asarray(affine, float)[:3, 1]
    ax0, ax1 = int(np.argmax(np.abs(d0))), int(np.argmax(np.abs(d1)))
    if 2 not in (ax0, ax1) or ax0 == ax1:
        if _is_legacy_drr_affine(np.asarray(affine, float)):
            return img
        raise DataError(f"{path}: 2D NIfTI whose axes run {_AXIS_NAMES[ax0]} and {_AXIS_NAMES[ax1]} (no head-foot "
                        f"axis): cannot tell how to orient it; give PNG/TIFF/DICOM, or a NIfTI with a coronal (PA) or "
                        f"sagittal (lateral) affine")
    if ax1 == 2:  # stored (cols, rows): transpose
        img, d0, d1, ax1 = img.T, d1, d0, ax0
    if d0[2] > 0:  # rows run towards superior
        img = img[::-1]
    plane = {0: "pa", 1: "lateral"}[ax1]  # the column axis: left-right (coronal) or front-back (sagittal)
    if view is not None and view != plane:
        raise DataError(f"{path}: given as the {view} view but it is a {'coronal' if plane == 'pa' else 'sagittal'} "
                        f"image (PA is coronal, lateral is sagittal): are the two views swapped?")
    if d1[ax1] > 0:  # columns must run towards the patient's left (-x) / posterior (-y)
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def load_radiograph(path, convention: str = "attenuation", view: str | None = None) -> np.ndarray:
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

    Orientation: images (PNG/TIFF/JPEG/DICOM) are taken as displayed -- head up; PA with the
    patient's right on the image left; lateral with the patient's front (anterior) on the image left.
    A 2D NIfTI is oriented by its affine (:func:`orient_radiograph`; ``view`` checks its plane).
    DICOM files are recognised by content, with or without a ``.dcm`` extension.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = path.name.lower()
    invert = False
    try:
        ds = None if name.endswith((".nii", ".nii.gz")) else read_dicom(path)  # by content, any extension
        if name.endswith((".nii", ".nii.gz")):
            nimg = _nifti(path, MAX_IMAGE_PIXELS)
            img = np.squeeze(np.asarray(nimg.dataobj, dtype=np.float32))
            if img.ndim == 2:
                img = orient_radiograph(img, nimg.affine, path, view)
        elif ds is not None:
            check_declared_size(path, (ds.Rows, ds.Columns), MAX_IMAGE_PIXELS)
            img = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
                getattr(ds, "RescaleIntercept", 0))
            invert = str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1"
        else:
            from PIL import Image

            with Image.open(path) as im:  # opening reads the header only
                check_declared_size(path, im.size, MAX_IMAGE_PIXELS)
                im.load()
                img = np.asarray(_grey_or_rgb(im, path))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__})") from None
    return radiograph_values(img, path, convention, invert)


def radiograph_values(img, where, convention: str = "attenuation", invert: bool = False) -> np.ndarray:
    """Pixel values of a radiograph (read from a file, or an array a caller gives) as the attenuation image
    the models read: grey (an RGB export of a grey image is taken as grey), 2D, at least 16 pixels a side,
    finite, ``-log(I / I0)`` for ``convention="intensity"``, inverted for MONOCHROME1 (``invert``), not
    constant. ``where`` names the image in the one-line errors."""
    try:
        img = np.squeeze(np.asarray(img, dtype=np.float32))
    except (TypeError, ValueError):
        raise DataError(f"{where}: not an array of numbers ({type(img).__name__})") from None
    if img.ndim == 3 and img.shape[-1] in (3, 4):  # RGB(A) export of a grey image
        rgb = img[..., :3]
        if np.abs(rgb - rgb[..., :1]).max() > 1e-3 * max(1.0, float(np.abs(rgb).max())):
            raise DataError(f"{where}: is a colour image ({img.shape[-1]} channels that differ); expected a grey radiograph")
        img = rgb[..., 0]
    if img.ndim != 2:
        raise DataError(f"{where}: expected a 2D radiograph, got shape {img.shape}")
    if min(img.shape) < 16:
        raise DataError(f"{where}: radiograph too small ({img.shape[0]}x{img.shape[1]})")
    if not np.all(np.isfinite(img)):
        raise DataError(f"{where}: contains NaN or Inf values")
    if convention == "intensity":
        i0 = float(img.max())
        img = -np.log(np.clip(img, 1e-6 * max(i0, 1e-6), None) / max(i0, 1e-6))
    elif convention != "attenuation":
        raise ValueError(f"convention must be 'attenuation' or 'intensity', got {convention!r}")
    if invert:
        img = img.max() - img
    if np.ptp(img) == 0:
        raise DataError(f"{where}: image is constant")
    return img


def _grey_or_rgb(im, path: Path):
    """A PIL image as grey or RGB(A) pixel values: a palette image through its palette (a grey palette gives
    its grey levels, a colour one is refused below like any colour image), grey + alpha as grey; CMYK and
    other colour models are refused, since their numbers are not intensities."""
    if im.mode in ("P", "PA"):
        return im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if im.mode == "LA":
        return im.getchannel("L")
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        raise DataError(f"{path}: is a {im.mode} image; export the radiograph as greyscale (PNG, TIFF or DICOM)")
    return im


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
