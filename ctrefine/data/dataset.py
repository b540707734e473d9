"""The on-disk dataset (one folder per patient + one split file) and its torch Dataset.

Layout of a dataset directory::

    DIR/dataset.json            generation parameters (size, xray_size, geometry, fov, version)
    DIR/splits.json             {"train": [...], "val": [...], "test": [...]} by patient, written once
    DIR/patient_0000/ct.nii.gz  ground truth on the target grid, HU, canonical affine
    DIR/patient_0000/xray_pa.nii.gz, xray_lateral.nii.gz   line-integral radiographs (see data.io)
    DIR/patient_0000/meta.json  seed / source file, geometry, spacing, version
    DIR/patient_0000/labels.nii.gz  phantoms only: structure labels on the target grid (table in dataset.json)
    DIR/mean_train.nii.gz       the voxel-wise mean of the train split's CTs: the trivial baseline every
                                report stands beside (made once, on first use)

A patient folder is built under a temporary name and renamed when complete, so an interrupted run
never leaves a half patient, and a rerun skips every finished one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..device import usable_cores
from ..conventions import FOV_MM, canonical_affine, hu_to_model, normalize_xray
from ..outputs import LOCK_NAME, atomic_dir, check_writable, folder_lock, resolve_path
from ..errors import DataError
from ..jsonio import read_json, write_json
from .io import load_nifti, save_nifti
from .radiograph import xray_affine
from .augment import imaging_chain
from .phantoms import LABELS, PHANTOM_VERSIONS, Materials, Scan, chest_phantom, downsample_area, downsample_labels
from .projector import Geometry, render_drrs

FORMAT_VERSION = 2  # 2: phantoms v2 (airways, curved spine, heart chambers, contrast, scan variation, metal label)
PHANTOM_VERSION = 3  # what make-data paints by default (phantoms.PHANTOM_VERSIONS); a header without one: 2
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}  # the rest is train; >=1 val and >=1 test once N >= 3


def patient_name(index: int) -> str:
    return f"patient_{index:04d}"


def next_patient_index(root: Path) -> int:
    """One past the highest ``patient_NNNN`` in ``root`` -- folders, finished or not, and their temporary
    siblings: a new patient never takes a name that exists or existed, gaps included."""
    names = [p.name for p in (Path(root).iterdir() if Path(root).is_dir() else ())]
    split_path = Path(root) / "splits.json"
    if split_path.is_file():  # a name the splits still hold is taken, even when its folder was deleted
        names += [n for v in read_splits(root).values() for n in v]
    found = [int(m.group(1)) for n in names if (m := re.match(r"\.?patient_(\d{4,})(?:$|\.)", n))]
    return max(found, default=-1) + 1


def patient_seed(dataset_seed: int, index: int) -> int:
    """Per-patient seed: independent of how many patients are generated or in what order."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1)[0])


def render_patient(hu_render: np.ndarray, size: int, xray_size: int, geometry: Geometry, fov: float):
    """High-resolution HU volume -> (ground truth HU on the ``size`` grid, DRRs ``(2, S, S)``).

    DRRs come from the high-resolution volume so they carry detail the target grid lacks; the
    ground truth is the area average (physical partial-volume) on the target grid.
    """
    n = hu_render.shape[0]
    if n % size:
        raise ValueError(f"render grid {n} is not a multiple of the target size {size}")
    with torch.no_grad():
        drr = render_drrs(torch.from_numpy(np.ascontiguousarray(hu_render))[None, None], fov, xray_size, geometry)
    return downsample_area(hu_render, n // size), drr[0, :, 0].numpy()


def write_patient(root: Path, name: str, ct_hu: np.ndarray, xrays: np.ndarray, meta: dict,
                  affine: np.ndarray | None = None, labels: np.ndarray | None = None) -> Path:
    """Write one patient folder atomically (temporary folder, then rename)."""
    with atomic_dir(Path(root) / name) as tmp:
        size = ct_hu.shape[0]
        fov = meta["fov_mm"]
        affine = canonical_affine(size, fov / size) if affine is None else affine
        save_nifti(tmp / "ct.nii.gz", ct_hu, affine)
        if labels is not None:
            save_nifti(tmp / "labels.nii.gz", labels, affine, dtype=np.uint8)
        s = xrays.shape[-1]
        save_nifti(tmp / "xray_pa.nii.gz", xrays[0], xray_affine(fov / s, "pa", s))
        save_nifti(tmp / "xray_lateral.nii.gz", xrays[1], xray_affine(fov / s, "lateral", s))
        write_json(tmp / "meta.json", meta)
    return Path(root) / name


def is_complete(folder: Path) -> bool:
    return (folder / "meta.json").exists()


def _make_one(args) -> str:
    """Worker: generate, render and write one phantom patient (skips a finished one)."""
    root, index, dataset_seed, size, xray_size, geometry, fov, render_factor, scan, realism, version = args
    torch.set_num_threads(1)  # one patient per core; the pool provides the parallelism
    name = patient_name(index)
    if is_complete(Path(root) / name):
        return name
    seed = patient_seed(dataset_seed, index)
    hu, labels = chest_phantom(seed, size * render_factor, fov, with_labels=True, scan=Scan(**(scan or {})),
                               version=version)
    ct, xrays = render_patient(hu, size, xray_size, geometry, fov)
    if realism:  # a fixed, non-ideal imaging chain per patient (a test set unlike the training DRRs)
        chain = imaging_chain(torch.from_numpy(xrays), SimpleNamespace(**realism), torch.Generator().manual_seed(seed))
        xrays = chain.numpy()
    meta = {"version": FORMAT_VERSION, "source": "phantom", "seed": seed, "size": size, "xray_size": xray_size,
            "render_size": size * render_factor, "fov_mm": fov, "spacing_mm": fov / size,
            "geometry": geometry.as_dict(), "xray_units": "line integral of mu (dimensionless)",
            "phantom_version": version}
    if version >= 3:
        meta["anatomy"] = Materials.draw(seed).as_dict()
    write_patient(Path(root), name, ct, xrays, meta, labels=downsample_labels(labels, render_factor))
    return name


def _phantom_version(root: Path, asked: int | None) -> int:
    """The phantom version a (new or resumed) dataset is made with; a resumed one keeps its own."""
    have = DatasetHeader.read(root).phantom_version if (root / "dataset.json").exists() else None
    version = asked if asked is not None else (have or PHANTOM_VERSION)
    if version not in PHANTOM_VERSIONS:
        raise DataError(f"--phantom-version {version}: not one of {', '.join(map(str, PHANTOM_VERSIONS))}")
    if have is not None and version != have:
        raise DataError(f"{root}: existing dataset has phantom version {have}, asked for {version}; use a new --out")
    return version


def make_splits(names: list[str], seed: int) -> dict:
    """Deterministic split by patient: ~10 % val, ~10 % test (at least one each when N >= 3)."""
    names = sorted(names)
    n = len(names)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * n)) if n >= 3 else 0
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * n)) if n >= 3 else 0
    pick = [names[i] for i in perm]
    return {"val": sorted(pick[:n_val]), "test": sorted(pick[n_val:n_val + n_test]),
            "train": sorted(pick[n_val + n_test:])}


def ensure_dataset_header(root: Path, params: dict, compare=None) -> None:
    """Create dataset.json, or check that an existing dataset was made with the same parameters
    (all of ``params``, or only the keys in ``compare``)."""
    path = root / "dataset.json"
    if path.exists():
        old = read_json(path)
        keys = params if compare is None else compare
        diff = {k: (old.get(k), params[k]) for k in keys if old.get(k) != params[k]}
        if diff:
            k, (a, b) = next(iter(diff.items()))
            raise DataError(f"{root}: existing dataset has {k}={a!r}, asked for {b!r}; use a new --out")
    else:
        write_json(path, params)


def check_dataset_dir(root: Path) -> None:
    """A dataset is made or extended only in a missing or empty folder, or in an existing dataset."""
    root = Path(root)
    check_writable(root, "dataset folder")
    if root.exists() and (not root.is_dir() or (any(p.name != LOCK_NAME for p in root.iterdir())
                                                 and not (root / "dataset.json").exists())):
        raise DataError(f"{root}: exists and is not a ctrefine dataset (no dataset.json); choose a new or empty folder")


def make_dataset(out, num_patients: int, seed: int = 0, size: int = 64, xray_size: int = 128,
                 geometry: str = "cone", workers: int | None = None, fov: float = FOV_MM,
                 render_factor: int = 2, progress: bool = True, scan: dict | None = None,
                 xray_realism: dict | None = None, phantom_version: int | None = None) -> dict:
    """Generate ``num_patients`` phantom patients under ``out`` (resumable); returns the splits.

    ``scan`` fixes fields of :class:`~ctrefine.data.phantoms.Scan` for every patient (e.g.
    ``{"contrast": True, "coverage_mm": 250}``); ``xray_realism`` (the fields of
    :class:`ctrefine.config.AugmentConfig`) passes every radiograph once through
    :func:`~ctrefine.data.augment.imaging_chain`. Both are recorded in ``dataset.json``: a dataset is
    only ever resumed with the same ones. ``phantom_version`` picks the phantoms
    (:data:`~ctrefine.data.phantoms.PHANTOM_VERSIONS`): by default the existing dataset's, else
    :data:`PHANTOM_VERSION`.
    """
    root = Path(out)
    check_dataset_dir(root)
    with folder_lock(root, "dataset"):  # not while `prepare` (or another make-data) writes it
        return _make_dataset(root, num_patients, seed, size, xray_size, geometry, workers, fov, render_factor,
                             progress, scan, xray_realism, phantom_version)


def _make_dataset(root: Path, num_patients, seed, size, xray_size, geometry, workers, fov, render_factor, progress,
                  scan, xray_realism, phantom_version) -> dict:
    """:func:`make_dataset` under the dataset's lock."""
    from multiprocessing import get_context

    from tqdm import tqdm

    geo = Geometry(geometry)
    version = _phantom_version(root, phantom_version)
    params = {"version": FORMAT_VERSION, "source": "phantom", "seed": seed, "size": size, "xray_size": xray_size,
              "fov_mm": fov, "geometry": geo.as_dict(), "render_factor": render_factor, "num_patients": num_patients,
              "scan": scan or None, "xray_realism": xray_realism or None, "phantom_version": version,
              "labels": {str(k): v for k, v in LABELS.items()}}
    # older datasets: no label table, no phantom version (checked above)
    ensure_dataset_header(root, params, compare=[k for k in params if k not in ("labels", "phantom_version")])
    jobs = [(str(root), i, seed, size, xray_size, geo, fov, render_factor, scan, xray_realism, version)
            for i in range(num_patients)]
    todo = [j for j in jobs if not is_complete(root / patient_name(j[1]))]
    if todo and (root / "splits.json").exists():
        split = {n for v in read_splits(root).values() for n in v}
        stray = [patient_name(j[1]) for j in todo if patient_name(j[1]) not in split]
        if stray:
            raise DataError(f"{root / 'splits.json'}: the dataset is already split and {stray[0]} is in no split; "
                            f"make-data only regenerates patients of its own split (use a new --out)")
    workers = max(1, min(workers or usable_cores(), len(todo) or 1))
    bar = tqdm(total=num_patients, initial=num_patients - len(todo), desc="patients", unit="pt", disable=not progress)
    if workers == 1:
        for j in todo:
            _make_one(j)
            bar.update()
    else:
        with get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_make_one, todo):
                bar.update()
    bar.close()
    split_path = root / "splits.json"
    if not split_path.exists():  # written once, never recomputed
        write_json(split_path, make_splits([patient_name(i) for i in range(num_patients)], seed))
    splits = read_splits(root)
    if splits.get("train") and not (root / MEAN_VOLUME).exists():
        mean_volume(root, write_cache=True)
    return splits


def summarize(root) -> str:
    """Human-readable summary of a dataset directory."""
    root = Path(root)
    header = DatasetHeader.read(root)
    hdr = header.raw
    splits = read_splits(root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and is_complete(p))
    lines = [f"dataset {root}: {len(names)} patients, target {hdr['size']}^3 over {hdr['fov_mm']:.0f} mm "
             f"({hdr['fov_mm'] / hdr['size']:.2f} mm voxels), radiographs {hdr['xray_size']}^2, "
             f"geometry {hdr['geometry']['kind']}"
             + (f", phantoms v{header.phantom_version}" if header.phantom_version else ""),
             "splits: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())]
    if names:
        ct, aff = load_nifti(root / names[0] / "ct.nii.gz")
        fr = {k: float(np.mean(m)) for k, m in (("lung", (ct < -500) & (ct > -950)), ("bone", ct > 300))}
        lines.append(f"{names[0]}: HU range [{ct.min():.0f}, {ct.max():.0f}], lung fraction {fr['lung']:.3f}, "
                     f"bone fraction {fr['bone']:.4f}, spacing {abs(aff[0, 2]):.2f} mm")
    return "\n".join(lines)


def _checked_header(raw, path: Path) -> dict:
    """``dataset.json``'s content with every field a reader uses of the right type (one-line error naming it)."""
    def bad(key, want):
        raise DataError(f"{path}: {key!r} must be {want}, got {raw[key]!r}")

    if not isinstance(raw, dict):
        raise DataError(f"{path}: must hold a JSON object")
    for key in ("size", "xray_size", "phantom_version"):
        if key in raw and raw[key] is not None and (isinstance(raw[key], bool) or not isinstance(raw[key], int)
                                                     or raw[key] < 1):
            bad(key, "a positive integer")
    if "fov_mm" in raw and (isinstance(raw["fov_mm"], bool) or not isinstance(raw["fov_mm"], (int, float))
                            or not 0 < raw["fov_mm"] < 1e4):
        bad("fov_mm", "a positive number of millimetres")
    if "geometry" in raw and not (isinstance(raw["geometry"], dict) and raw["geometry"].get("kind") in ("cone", "parallel")):
        bad("geometry", 'an object with "kind" "cone" or "parallel"')
    if "labels" in raw and raw["labels"] is not None and not (
            isinstance(raw["labels"], dict) and all(isinstance(v, str) for v in raw["labels"].values())):
        bad("labels", "an object of label id -> structure name")
    if "source" in raw and not isinstance(raw["source"], str):
        bad("source", "a string")
    return raw


@dataclass(frozen=True)
class DatasetHeader:
    """A dataset's ``dataset.json``, read in this one place: how its patients were made. A folder
    without one (a hand-made dataset) reads as empty: no grid to check, cone geometry, no label table."""

    raw: dict

    @classmethod
    def read(cls, root) -> "DatasetHeader":
        path = Path(root) / "dataset.json"
        return cls(_checked_header(read_json(path), path) if path.exists() else {})

    @property
    def size(self) -> int | None:
        return self.raw.get("size")

    @property
    def xray_size(self) -> int | None:
        return self.raw.get("xray_size")

    @property
    def geometry(self) -> str:
        """The ray geometry (``cone`` / ``parallel``) its radiographs were rendered with (``cone``, the
        default of every maker here, without a header)."""
        return self.raw.get("geometry", {}).get("kind", "cone")

    @property
    def phantom_version(self) -> int | None:
        """Which phantoms its patients are (2 for phantom datasets made before versions were recorded;
        ``None`` for ingested CTs)."""
        if self.raw.get("source") != "phantom":
            return None
        return int(self.raw.get("phantom_version", 2))

    @property
    def labels(self) -> dict | None:
        """Label id (as a string) -> structure name, where the patients have label maps."""
        return self.raw.get("labels")


def iter_items(ds: "CTDataset", indices, batch_size: int):
    """The patients at ``indices``, in order, as lists of at most ``batch_size`` item dicts: the one walk
    over a split (:func:`iter_batches` stacks what training and judging need; ``infer`` keeps the items)."""
    indices = list(indices)
    for i in range(0, len(indices), batch_size):
        yield [ds[j] for j in indices[i:i + batch_size]]


def iter_batches(ds: "CTDataset", indices, batch_size: int, raw: bool = False):
    """``(xrays (B,2,1,S,S), ct (B,1,D,H,W), names)`` over ``indices`` in order, ``batch_size`` at a time.

    ``raw``: the radiographs as stored (line integrals, for :mod:`ctrefine.data.augment`), not normalised.
    """
    key = "xrays_raw" if raw else "xrays"
    for items in iter_items(ds, indices, batch_size):
        yield (torch.stack([it[key] for it in items]), torch.stack([it["ct"] for it in items]),
               [it["name"] for it in items])


class ResidentSplit:
    """One split stacked into tensors once, kept where the training step reads them.

    ``xrays (N, 2, 1, S, S)`` normalised in ``xray_dtype`` and ``ct (N, 1, D, H, W)`` float32 on
    ``device`` (or in pinned host memory, copied per batch without blocking, when ``resident`` is
    false); ``xrays_raw`` (as stored, for :mod:`ctrefine.data.augment`, which runs on the host) only
    when ``raw``. A batch is then one ``index_select`` per tensor: no per-step host work, no casts.
    Values are exactly :func:`iter_batches`'s, in the same order.
    """

    def __init__(self, ds: "CTDataset", device: torch.device, xray_dtype: torch.dtype = torch.float32,
                 raw: bool = False, resident: bool = True):
        items = [ds[i] for i in range(len(ds))]
        self.names = [it["name"] for it in items]
        self.device = torch.device(device)
        home = self.device if resident else torch.device("cpu")
        pin = not resident and self.device.type == "cuda"

        def stack(key, dtype=None):
            t = torch.stack([it[key] for it in items]).to(home, dtype)
            return t.pin_memory() if pin else t

        self.xrays, self.ct = stack("xrays", xray_dtype), stack("ct")
        self.xrays_raw = torch.stack([it["xrays_raw"] for it in items]) if raw else None

    @staticmethod
    def nbytes(ds: "CTDataset", xray_dtype: torch.dtype = torch.float32) -> int:
        """What :class:`ResidentSplit` of ``ds`` holds on the device (read from its first patient)."""
        if len(ds) == 0:
            return 0
        it = ds[0]
        per = it["xrays"].numel() * torch.empty((), dtype=xray_dtype).element_size() + it["ct"].numel() * 4
        return per * len(ds)

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, indices, batch_size: int):
        """``(xrays, ct, names)`` over ``indices`` in order (``xrays`` raw when the split keeps them)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            jd = j.to(self.xrays.device)
            ct = self.ct.index_select(0, jd).to(self.device, non_blocking=True)
            if self.xrays_raw is not None:
                xr = self.xrays_raw.index_select(0, j)
            else:
                xr = self.xrays.index_select(0, jd).to(self.device, non_blocking=True)
            yield xr, ct, [self.names[k] for k in j.tolist()]


MEAN_VOLUME = "mean_train.nii.gz"


def mean_volume(root, split: str = "train", write_cache: bool = False) -> np.ndarray:
    """Voxel-wise mean HU of the ``split`` patients' CTs (the trivial baseline), read from the cache beside
    splits.json when there is one.

    Predicting this one volume for every patient is what any model must beat. The commands that write a
    dataset (``make-data``, ``prepare``) write the cache (``write_cache``; atomically), since the
    training split never changes; readers (``infer``) never write into a dataset.
    """
    root = Path(root)
    path = root / MEAN_VOLUME
    if path.exists() or path.is_symlink():
        mean = _finite(_inside_file(root, MEAN_VOLUME))[0]
        _check_grid(path, mean, DatasetHeader.read(root).size)
        return mean
    names = read_splits(root).get(split) or []
    if not names:
        raise DataError(f"{root}: split {split!r} is empty: no mean-volume baseline")
    total, aff = None, None
    for n in names:
        ct, aff = load_nifti(root / n / "ct.nii.gz")
        total = ct.astype(np.float64) if total is None else total + ct
    mean = (total / len(names)).astype(np.float32)
    if write_cache:
        save_nifti(path, mean, aff)
    return mean


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_splits(root: Path, splits: dict) -> dict:
    """``splits.json``'s content, checked: lists of plain patient-folder names (no separators, no ``..``,
    no absolute paths) whose folders lie inside ``root`` (a link leading out is refused). A dataset never
    makes ctrefine read or write outside its own folder."""
    path = Path(root) / "splits.json"
    real_root = resolve_path(Path(root), "dataset folder")
    if not isinstance(splits, dict):
        raise DataError(f"{path}: must hold an object of split name -> patient names")
    for split, names in splits.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: split {split!r} must be a list of patient names")
        for n in names:
            if not _PLAIN_NAME.fullmatch(n):
                raise DataError(f"{path}: patient {n!r} in split {split!r} is not a folder name inside the dataset: "
                                f"a patient name may hold only ASCII letters, digits, '.', '_' and '-' (rename the "
                                f"folder and its entry here)")
            if resolve_path(Path(root) / n, "patient folder").parent != real_root:
                raise DataError(f"{path}: patient {n!r} in split {split!r} is a link to a folder outside the dataset")
    return splits


def _finite(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_nifti` of a dataset file whose every value must be finite (NaN / Inf: one-line error)."""
    data, affine = load_nifti(path)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf values (damaged? regenerate or re-ingest this patient)")
    return data, affine


def _inside_file(folder: Path, name: str) -> Path:
    """``folder/name``, refused when it is a symbolic link: a dataset's files must lie inside the dataset."""
    path = folder / name
    if path.is_symlink():
        raise DataError(f"{path}: is a symbolic link; a dataset's files must lie inside it (copy the file in)")
    return path


def _check_grid(path: Path, vol: np.ndarray, size: int | None) -> None:
    """A CT (or label map) is a cube of the dataset's size (``dataset.json``)."""
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise DataError(f"{path}: volume is {'x'.join(map(str, vol.shape))}, not a cube")
    if size is not None and vol.shape[0] != size:
        raise DataError(f"{path}: volume is {vol.shape[0]}^3 but the dataset's size is {size}^3 (dataset.json)")


def _radiograph(path: Path, xray_size: int | None) -> np.ndarray:
    """A stored radiograph: finite, square, of the dataset's size, not constant."""
    img = _finite(path)[0]
    if img.ndim != 2 or img.shape[0] != img.shape[1]:
        raise DataError(f"{path}: radiograph is {'x'.join(map(str, img.shape))}, not a square image")
    if xray_size is not None and img.shape[0] != xray_size:
        raise DataError(f"{path}: radiograph is {img.shape[0]}^2 but the dataset's is {xray_size}^2 (dataset.json)")
    if float(img.max()) == float(img.min()):
        raise DataError(f"{path}: radiograph is constant ({float(img.min()):g} everywhere): no image")
    return img


def read_ct(folder: Path, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A patient's ``ct.nii.gz`` (HU, affine): inside the folder, finite, a cube of the dataset's ``size``."""
    ct, affine = _finite(_inside_file(folder, "ct.nii.gz"))
    _check_grid(folder / "ct.nii.gz", ct, size)
    return ct, affine


def read_labels(folder: Path, shape: tuple) -> np.ndarray | None:
    """A patient's ``labels.nii.gz`` as uint8 (None without one): inside the folder, finite whole numbers 0-255
    on the CT's grid ``shape``."""
    path = folder / "labels.nii.gz"
    if not (path.exists() or path.is_symlink()):
        return None
    lab = _finite(_inside_file(folder, "labels.nii.gz"))[0]
    if lab.shape != tuple(shape):
        raise DataError(f"{path}: label map is {'x'.join(map(str, lab.shape))}, the CT {'x'.join(map(str, shape))}")
    if lab.min() < 0 or lab.max() > 255 or not np.array_equal(lab, np.round(lab)):
        raise DataError(f"{path}: label map must hold whole numbers 0-255")
    return lab.astype(np.uint8)


def read_splits(root) -> dict:
    """The dataset's ``splits.json``, checked (:func:`check_splits`)."""
    return check_splits(Path(root), read_json(Path(root) / "splits.json"))


class CTDataset(torch.utils.data.Dataset):
    """Patients of one split: ``xrays (2, 1, S, S)`` normalised (``xrays_raw``: as stored), ``ct (1, D, H, W)``
    in model space.

    Everything is small (64^3 float32 = 1 MiB a patient), so items are cached after the first read.
    """

    def __init__(self, root, split: str = "train", cache: bool = True):
        self.root = Path(root)
        split_path = self.root / "splits.json"
        if not split_path.exists():
            raise DataError(f"{self.root}: no splits.json (not a ctrefine dataset, or generation never finished)")
        splits = read_splits(self.root)
        if split == "all":  # every patient: for a set that no model was trained on (e.g. a shifted test set)
            self.names = sorted(n for names in splits.values() for n in names)
        elif split not in splits:
            raise DataError(f"{split_path}: no split named {split!r} (have {sorted(splits)}, or 'all')")
        else:
            self.names = list(splits[split])
        self.split = split
        self.header = DatasetHeader.read(self.root)
        self._cache: dict[int, dict] = {} if cache else None

    def __len__(self) -> int:
        return len(self.names)

    def nonempty(self, purpose: str = "") -> "CTDataset":
        """This dataset, or a one-line :class:`DataError` when its split holds no patient (``purpose``:
        what needed them)."""
        if not self.names:
            raise DataError(f"{self.root}: split {self.split!r} is empty" + (f": {purpose}" if purpose else ""))
        return self

    def load(self, i: int) -> dict:
        folder = self.root / self.names[i]
        ct, affine = read_ct(folder, self.header.size)
        xr = np.stack([_radiograph(_inside_file(folder, f"xray_{v}.nii.gz"), self.header.xray_size)
                       for v in ("pa", "lateral")])
        labels = read_labels(folder, ct.shape)
        labels = None if labels is None else torch.from_numpy(labels)
        raw = torch.from_numpy(xr)[:, None]
        return {"ct": hu_to_model(torch.from_numpy(ct))[None], "xrays": normalize_xray(raw), "xrays_raw": raw,
                "affine": torch.from_numpy(affine), "name": self.names[i], "labels": labels}

    def __getitem__(self, i: int) -> dict:
        if self._cache is None:
            return self.load(i)
        if i not in self._cache:
            self._cache[i] = self.load(i)
        return self._cache[i]
