"""Ingest users' real CTs into the same on-disk layout as the phantoms.

One resampling step maps any input -- NIfTI in any orientation and voxel spacing, or a DICOM series
folder -- onto the canonical grid: world-aligned ('I','P','L') axes, isotropic voxels, cubic field of
view centred on the body. Chaining "reorient, then resample, then crop" would interpolate more than
once; composing the affines and sampling once (trilinear, after a Gaussian anti-alias prefilter when
the input is finer than the output) does not. DRRs are rendered from this 2x render grid (the same
resolution phantoms use), and the ground truth is its area average on the target grid, exactly as
for phantoms, so real and synthetic patients are interchangeable downstream.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..conventions import FOV_MM, HU_MIN, canonical_affine
from .dataset import FORMAT_VERSION, DatasetHeader, MEAN_VOLUME, check_dataset_dir, mean_volume, ensure_dataset_header, is_complete, make_splits, \
    next_patient_index, patient_name, read_splits, render_patient, \
    write_patient
from .dicom import load_series
from ..outputs import LOCK_NAME, folder_lock
from ..errors import DataError
from ..jsonio import read_json, write_json
from .io import load_nifti
from .phantoms import LABELS
from .projector import Geometry

BODY_THRESHOLD_HU = -500.0  # above this: patient (and table); below: air / lung excluded from centring


def load_ct(path, series: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate a CT (NIfTI file or DICOM folder) -> (HU float32 3D, voxel->RAS affine).

    ``series`` picks one series (UID or index) of a DICOM folder that holds several.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    data, affine = load_series(path, series) if path.is_dir() else load_nifti(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 8:
        raise DataError(f"{path}: expected a 3D CT volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: contains NaN or Inf values")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise DataError(f"{path}: degenerate affine (no valid voxel spacing / orientation)")
    # Scanner padding outside the reconstruction circle (-2048 or -3024 HU) is air, not a denser-than-air
    # void: set it to the window floor so no interpolation blends it into the body or the ground truth.
    data = np.maximum(data, HU_MIN)
    lo, hi = np.percentile(data, [1, 99.5])
    if lo > -500 or hi < 100 or hi > 5000:
        raise DataError(f"{path}: does not look like a CT in HU (1st..99.5th percentile {lo:.0f}..{hi:.0f})")
    return data, affine


def body_center_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centroid of the body (voxels above -500 HU) in RAS mm; the volume centre if none."""
    idx = np.argwhere(data > BODY_THRESHOLD_HU)
    c = idx.mean(axis=0) if len(idx) else (np.array(data.shape) - 1) / 2.0
    return affine[:3, :3] @ c + affine[:3, 3]


def resample_canonical(data: np.ndarray, affine: np.ndarray, n: int, fov: float = FOV_MM,
                       center_ras=None) -> tuple[np.ndarray, np.ndarray]:
    """Resample a CT onto an ``n^3`` canonical grid over ``fov`` mm centred on ``center_ras``.

    Returns (HU array, its affine). Outside the input is air (-1000 HU).
    """
    center = body_center_ras(data, affine) if center_ras is None else np.asarray(center_ras, float)
    out_aff = canonical_affine(n, fov / n, center)
    m = np.linalg.inv(affine) @ out_aff  # output voxel -> input voxel
    in_spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # Output voxel size measured in input voxels along each input axis -> anti-alias sigma.
    ratio = (fov / n) / in_spacing
    sigma = np.maximum(0.0, (ratio - 1.0) / 2.0)
    src = ndimage.gaussian_filter(data, sigma) if np.any(sigma > 0) else data
    out = ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=(n, n, n), order=1,
                                   cval=HU_MIN, prefilter=False)
    return out.astype(np.float32), out_aff


def canonical_grid_center(data: np.ndarray, affine: np.ndarray, size: int, fov: float) -> np.ndarray | None:
    """The volume's centre (RAS mm) when its voxels already are those of a canonical ``size``^3 grid over ``fov``
    mm, in any axis order and direction (a series ctrefine wrote, say); None otherwise. Such a volume is kept
    voxel for voxel rather than re-centred on the body and resampled."""
    if data.shape != (size,) * 3:
        return None
    center = affine[:3, :3] @ ((np.array(data.shape) - 1) / 2.0) + affine[:3, 3]
    m = np.linalg.inv(affine) @ canonical_affine(size, fov / size, center)  # canonical voxel -> input voxel
    r = np.round(m[:3, :3])
    permutation = np.allclose(m[:3, :3], r, atol=1e-4) and np.array_equal(np.abs(r).sum(0), np.ones(3))
    return center if permutation and np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-3) else None


def load_labels(path, ct_shape, ct_affine, size: int, fov: float, center) -> np.ndarray:
    """A user's segmentation (NIfTI, ctrefine's label numbering) on the target grid, nearest neighbour."""
    labels, aff = load_nifti(path)
    if labels.shape[:3] != tuple(ct_shape) or not np.allclose(aff, ct_affine, atol=1e-3):
        raise DataError(f"{path}: label map does not match its CT's grid (shape {labels.shape} vs {tuple(ct_shape)}, "
                        f"or another affine)")
    ids = np.unique(labels)
    unknown = sorted(set(ids.astype(int).tolist()) - set(LABELS))
    if unknown or not np.all(ids == np.round(ids)):
        raise DataError(f"{path}: label values {unknown or 'non-integer'} are not in ctrefine's table "
                        f"({', '.join(f'{k}={v}' for k, v in LABELS.items())})")
    out_aff = canonical_affine(size, fov / size, center)
    m = np.linalg.inv(aff) @ out_aff
    out = ndimage.affine_transform(labels, m[:3, :3], offset=m[:3, 3], output_shape=(size,) * 3, order=0, cval=0)
    return out.astype(np.uint8)


def ingest_ct(path, out_root, name: str, size: int = 64, xray_size: int = 128, geometry: str = "cone",
              fov: float = FOV_MM, render_factor: int = 2, series: str | None = None, labels=None) -> Path:
    """Ingest one CT into ``out_root/name`` (patient folder, written atomically); ``labels``: its segmentation."""
    data, affine = load_ct(path, series)
    kept = canonical_grid_center(data, affine, size, fov)
    center = body_center_ras(data, affine) if kept is None else kept
    lab = None if labels is None else load_labels(labels, data.shape, affine, size, fov, center)
    hu_render, _ = resample_canonical(data, affine, size * render_factor, fov, center)
    geo = Geometry(geometry)
    ct, xrays = render_patient(hu_render, size, xray_size, geo, fov)
    if kept is not None:  # the grids coincide: the target is the input itself, voxel for voxel
        ct = resample_canonical(data, affine, size, fov, center)[0]
    meta = {"version": FORMAT_VERSION, "source": "ingested", "input": str(Path(path).resolve()), "size": size,
            "xray_size": xray_size, "render_size": size * render_factor, "fov_mm": fov, "spacing_mm": fov / size,
            "geometry": geo.as_dict(), "center_ras_mm": [float(x) for x in center],
            "xray_units": "line integral of mu (dimensionless)"}
    if labels is not None:
        meta["labels_input"] = str(Path(labels).resolve())
    return write_patient(Path(out_root), name, ct, xrays, meta, affine=canonical_affine(size, fov / size, center),
                         labels=lab)


def _ingested_inputs(root: Path) -> set[str]:
    """Resolved input paths of the patients already in ``root`` (from their meta.json)."""
    out = set()
    for p in sorted(root.iterdir()):
        if p.is_dir() and is_complete(p):
            src = read_json(p / "meta.json").get("input")
            if isinstance(src, str):
                out.add(src)
    return out


def _add_to_splits(root: Path) -> None:
    """Every finished patient into ``splits.json``: a new dataset is split by patient; an existing split
    is never recomputed, so new patients are held out as test data."""
    complete = sorted(p.name for p in root.iterdir() if p.is_dir() and is_complete(p))
    if (root / "splits.json").exists():
        splits = read_splits(root)
        known = {n for names in splits.values() for n in names}
        new = [n for n in complete if n not in known]
        if not new:
            return
        splits["test"] = sorted(set(splits.get("test", [])) | set(new))
    elif complete:
        splits = make_splits(complete, seed=0)
    else:
        return
    write_json(root / "splits.json", splits)
    if splits.get("train") and not (root / MEAN_VOLUME).exists():  # the baseline, once: the train split never changes
        mean_volume(root, write_cache=True)


def ingest_dataset(paths, out, size: int = 64, xray_size: int = 128, geometry: str = "cone",
                   series: str | None = None, progress: bool = True, on_error=None,
                   labels: list | None = None) -> tuple[list[str], int]:
    """Ingest CTs into the dataset ``out`` (created, or extended if its grid matches).

    New patients are numbered after the existing ones. A new dataset gets a split by patient; an
    existing split is never recomputed -- new patients join the test split, so nothing trained on
    changes. A file that fails is reported through ``on_error(DataError)`` and skipped. ``labels``: one
    segmentation per CT (same order) in ctrefine's label numbering, or None -- without labels the
    label metrics are skipped for these patients, not faked. Returns (names ingested, number failed).
    """
    paths = list(paths)
    if labels is not None and len(labels) != len(paths):
        raise DataError(f"--labels gives {len(labels)} file(s) for {len(paths)} CT(s): give one per CT, in order")
    root = Path(out)
    check_dataset_dir(root)
    header = {"version": FORMAT_VERSION, "source": "ingested", "size": size, "xray_size": xray_size, "fov_mm": FOV_MM,
              "geometry": Geometry(geometry).as_dict(), "labels": {str(k): v for k, v in LABELS.items()}}
    grid = ("version", "size", "xray_size", "fov_mm", "geometry")  # real CTs beside phantoms is fine; other grids not
    if (root / "dataset.json").exists():
        ensure_dataset_header(root, header, compare=grid)  # refuse before any work
        if DatasetHeader.read(root).raw.get("source") == "phantom" and not (root / "splits.json").exists():
            raise DataError(f"{root}: its make-data has not finished (no splits.json); rerun that make-data first, "
                            f"then add CTs")
    done, failed = [], 0
    created, new_header = not root.exists(), not (root / "dataset.json").exists()
    try:
        with folder_lock(root, "dataset"):
            # the header first: an interrupted run leaves a dataset that a rerun resumes
            ensure_dataset_header(root, header, compare=grid)
            failed = _ingest_all(root, paths, labels, done, on_error, progress,
                                 dict(size=size, xray_size=xray_size, geometry=geometry, series=series))
            _add_to_splits(root)
    finally:
        if new_header and not any(p.is_dir() and is_complete(p) for p in root.iterdir()):
            _remove_empty_dataset(root, created)  # nothing ingested: leave no dataset behind
    return done, failed


def _remove_empty_dataset(root: Path, created: bool) -> None:
    """Undo what this run made of a dataset that got no patient: its header, lock file and, when this run
    created it, the folder (only if nothing else is in it)."""
    for name in ("dataset.json", LOCK_NAME):
        (root / name).unlink(missing_ok=True)
    if created and not any(root.iterdir()):
        root.rmdir()


def _ingest_all(root: Path, paths, labels, done: list, on_error, progress: bool, opts: dict) -> int:
    """Ingest every input not already in ``root`` under the next free name; returns how many failed."""
    from tqdm import tqdm

    failed = 0
    ingested = _ingested_inputs(root)
    for i, path in enumerate(tqdm(paths, desc="ingest", unit="ct", disable=not progress)):
        if str(Path(path).resolve()) in ingested:  # finished by an earlier, interrupted run, or given twice
            continue
        name = patient_name(next_patient_index(root))
        try:
            ingest_ct(path, root, name, labels=None if labels is None else labels[i], **opts)
            done.append(name)
            ingested.add(str(Path(path).resolve()))
        except (DataError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            failed += 1  # one bad file is reported and skipped; the others are still ingested
            if on_error:
                on_error(exc if isinstance(exc, DataError) else DataError(f"{path}: cannot ingest it "
                                                                          f"({type(exc).__name__}: {exc})"))
    return failed
