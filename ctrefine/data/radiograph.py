"""Radiographs in: a user's file or array to the normalised network input, in named steps.

    read_pixels (file -> stored values)  ->  orient (as displayed)  ->  to_attenuation (bone bright)
    ->  square_resize  ->  normalize_xray (ctrefine.conventions: the one normalisation, shared with training)

:func:`load_radiograph` is the first three, :func:`prepare_radiographs` the whole chain for a PA + lateral
pair. :func:`xray_affine` is the affine ctrefine stores its own radiographs with, which :func:`orient_radiograph`
reads back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..conventions import normalize_xray
from ..errors import DataError
from .dicom import read_dicom
from .io import open_nifti
from .limits import MAX_IMAGE_PIXELS, check_declared_size


@dataclass
class RawRadiograph:
    """A radiograph file's pixel values as stored, with its affine (NIfTI) and whether bone is dark (DICOM
    MONOCHROME1)."""

    pixels: np.ndarray
    affine: np.ndarray | None = None
    invert: bool = False


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
    raw = read_pixels(path)
    return to_attenuation(orient(raw, path, view), path, convention, raw.invert)


def read_pixels(path) -> RawRadiograph:
    """Step 1, read: the pixel values of a radiograph file (PNG/TIFF/JPEG, NIfTI, or DICOM, recognised by content,
    with or without a ``.dcm`` extension), as stored, with what the file says about them. Sizes are checked
    from the header before the pixels are decoded."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            nimg = open_nifti(path, MAX_IMAGE_PIXELS)
            return RawRadiograph(np.squeeze(np.asarray(nimg.dataobj, dtype=np.float32)), np.asarray(nimg.affine, float))
        ds = read_dicom(path)  # None when the file is not DICOM
        if ds is not None:
            check_declared_size(path, (ds.Rows, ds.Columns), MAX_IMAGE_PIXELS)
            img = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
                getattr(ds, "RescaleIntercept", 0))
            return RawRadiograph(img, invert=str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1")
        from PIL import Image

        with Image.open(path) as im:  # opening reads the header only
            check_declared_size(path, im.size, MAX_IMAGE_PIXELS)
            im.load()
            return RawRadiograph(np.asarray(_grey_or_rgb(im, path)))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__})") from None


def orient(raw: RawRadiograph, path, view: str | None = None) -> np.ndarray:
    """Step 2, orient: images are taken as displayed (head up; PA with the patient's right on the image left;
    lateral with the front on the image left); a 2D NIfTI is turned that way by its affine
    (:func:`orient_radiograph`, which also checks it is the ``view`` it was given as)."""
    if raw.affine is not None and raw.pixels.ndim == 2:
        return orient_radiograph(raw.pixels, raw.affine, path, view)
    return raw.pixels


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


def to_attenuation(img, where, convention: str = "attenuation", invert: bool = False) -> np.ndarray:
    """Step 3: pixel values of a radiograph (read from a file, or an array a caller gives) as the attenuation image
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


def intensity_suspicion(img: np.ndarray) -> float | None:
    """How much brighter the image's side strips are than its centre, if they are (else None).

    In an attenuation image (bone bright) the body's centre -- spine, mediastinum -- attenuates most and
    the air beside the chest least; raw detector intensity is the reverse. Measured on 40 phantoms
    (``make-data --seed 11``, 128^2 DRRs): centre minus sides >= 0.40 (normalised) for all 80 PA and
    lateral DRRs, and every ``exp(-DRR)`` intensity image flagged. Not yet checked on real radiographs,
    hence a warning, not an error.
    """
    x = (img - np.percentile(img, 0.5)) / max(1e-6, float(np.percentile(img, 99.5) - np.percentile(img, 0.5)))
    h, w = x.shape
    centre = x[h // 4: 3 * h // 4, 3 * w // 8: 5 * w // 8].mean()
    sides = np.concatenate([x[h // 4: 3 * h // 4, : w // 10], x[h // 4: 3 * h // 4, -(w // 10):]], axis=1).mean()
    return float(sides - centre) if sides > centre else None


def prepare_radiographs(pa_path, lateral_path, size: int, convention: str = "attenuation", warn=None) -> torch.Tensor:
    """Two radiographs -> ``(1, 2, 1, size, size)`` normalised exactly like training inputs. Each is a file
    (:func:`load_radiograph`) or a 2D numpy array as displayed (head up; PA with the
    patient's right on the left, lateral with the front on the left).

    ``warn(message)`` receives a line for each image that looks like raw intensity in attenuation mode.
    """
    imgs = []
    for view, p in zip(("pa", "lateral"), (pa_path, lateral_path)):
        img = to_attenuation(p, f"the {view} array", convention) if isinstance(p, np.ndarray) else \
            load_radiograph(p, convention, view=view)
        if warn and convention == "attenuation" and intensity_suspicion(img) is not None:
            warn(f"{p}: its sides are brighter than its centre, as in raw detector intensity (bone dark); if so, "
                 f"pass --xray-convention intensity")
        imgs.append(square_resize(img, size))
    return normalize_xray(torch.from_numpy(np.stack(imgs)))[None, :, None]
