"""One self-contained HTML page to look at reconstructions: ``viewer.html``.

No network, no external script or font: the page is one file with its volumes inside. Each volume is
quantised to 8 bits over the model window (-1000..1500 HU, ~9.8 HU a step: the HU a 5 mm
reconstruction resolves), gzip-compressed and base64-encoded; the browser inflates it with its own
``DecompressionStream``. A 64^3 layer costs ~60-120 kB, so thirteen patients with coarse, refined and
truth fit in a few MB. Layers: coarse / refined / truth / uncertainty (per-voxel standard deviation in
HU, 4 HU a step up to 1020 HU) where they exist, and |error| = |refined - truth| computed in the page.

The page draws the axial, coronal and sagittal planes (each with a slider; a click on one plane moves
the other two to that point: a shared crosshair) under a window (presets lung / soft tissue / bone, or
a free width and level), the two input radiographs and the patient's metrics. Planes are drawn 1:1 into
64x64 canvases scaled by CSS, so a canvas pixel is a voxel. Opened as ``viewer.html#selftest``, the page
checks itself (draws, moves a slider, draws again) and writes what it drew into ``<pre id="selftest">``:
the browser test compares those pixels with the NIfTI slice under the same window.
"""
from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .conventions import HU_MAX, HU_MIN
from .errors import DataError
from .outputs import atomic_file

LAYERS = ("volume", "coarse", "refined", "truth", "uncertainty")  # "volume": any CT given to `ctrefine view`
PRESETS = {"lung": (1500.0, -600.0), "soft tissue": (400.0, 40.0), "bone": (1800.0, 400.0)}  # (width, level) HU
HU_STEP = (HU_MAX - HU_MIN) / 255.0
STD_STEP = 4.0  # HU a byte step of the uncertainty layer: 0..1020 HU (the head's sigma reaches several hundred HU)


@dataclass
class Case:
    """One patient in the page: HU volumes ``(D, H, W)`` by layer name (:data:`LAYERS`), the two radiographs
    (PA ``(D, W)``, lateral ``(D, H)``; any units, each scaled to its own range), and flat metrics."""

    name: str
    volumes: dict[str, np.ndarray]
    xrays: tuple[np.ndarray, np.ndarray] | None = None
    metrics: dict[str, float | str] = field(default_factory=dict)


def quantise_hu(hu: np.ndarray) -> np.ndarray:
    """HU -> uint8 over the model window (the page maps a byte ``q`` back to ``HU_MIN + q * HU_STEP``)."""
    return np.round((np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / HU_STEP).astype(np.uint8)


def _pack(arr: np.ndarray) -> dict:
    return {"shape": list(arr.shape), "data": base64.b64encode(gzip.compress(np.ascontiguousarray(arr).tobytes(),
                                                                            9, mtime=0)).decode("ascii")}


def _case_payload(case: Case) -> dict:
    shapes = {tuple(v.shape) for v in case.volumes.values()}
    if len(shapes) != 1:
        raise DataError(f"{case.name}: its volumes differ in shape ({sorted(shapes)}); the viewer overlays them")
    vols = {}
    for layer in LAYERS:
        v = case.volumes.get(layer)
        if v is None:
            continue
        if v.ndim != 3:
            raise ValueError(f"{case.name}: layer {layer} is {v.ndim}-D, expected a volume")
        vols[layer] = _pack(quantise_std(v) if layer == "uncertainty" else quantise_hu(v))
    xrays = []
    for img in case.xrays or ():
        lo, hi = float(np.min(img)), float(np.max(img))
        xrays.append(_pack(np.round((img - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)))
    metrics = {k: (round(float(v), 4) if isinstance(v, (int, float, np.floating)) else str(v))
               for k, v in case.metrics.items()}
    return {"name": case.name, "volumes": vols, "xrays": xrays, "metrics": metrics}


def quantise_std(std_hu: np.ndarray) -> np.ndarray:
    """Sigma (HU) -> uint8 at :data:`STD_STEP` HU a step (the page maps a byte ``q`` back to ``q * STD_STEP``);
    larger sigmas show as the largest step."""
    return np.round(np.clip(std_hu, 0.0, 255 * STD_STEP) / STD_STEP).astype(np.uint8)


def viewer_html(cases: list[Case], title: str = "ctrefine viewer") -> str:
    """The page as one string (template + the cases as JSON)."""
    if not cases:
        raise ValueError("the viewer needs at least one case")
    payload = {"title": title, "hu_min": HU_MIN, "hu_step": HU_STEP, "std_step": STD_STEP, "presets": PRESETS,
               "cases": [_case_payload(c) for c in cases]}
    blob = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    template = (Path(__file__).parent / "viewer_template.html").read_text()
    return template.replace("__TITLE__", _escape(title)).replace("__PAYLOAD__", blob)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_viewer(path, cases: list[Case], title: str = "ctrefine viewer") -> Path:
    """Write the page atomically; returns its path."""
    path = Path(path)
    html = viewer_html(cases, title)
    with atomic_file(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path


def window_gray(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """What the page draws for HU under a window: ``round(255 * clip((HU - (L - W/2)) / W, 0, 1))`` -- the
    reference the browser test holds the page to."""
    return np.round(np.clip((hu - (level - width / 2.0)) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    return HU_MIN + q.astype(np.float32) * HU_STEP


def load_view_volume(path) -> np.ndarray:
    """A NIfTI volume in HU turned (by axis permutation and flips only, no resampling) to ctrefine's array
    orientation: D superior->inferior, H anterior->posterior, W right->left."""
    import nibabel as nib

    from .data.io import load_nifti

    data, aff = load_nifti(path)
    if data.ndim != 3:
        raise DataError(f"{path}: is {data.ndim}-D; the viewer shows 3-D volumes")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf values (the viewer would draw them as air)")
    if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise DataError(f"{path}: its affine (sform/qform) has no usable axes (all zero or singular): the volume "
                        f"cannot be oriented")
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(aff),
                                           nib.orientations.axcodes2ornt(("I", "P", "L")))
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt), np.float32)


# what `infer` writes, by layer: in a patient folder of a dataset result, and beside a radiograph result
RESULT_FILES = {"coarse": "coarse.nii.gz", "refined": "refined.nii.gz", "truth": "ground_truth.nii.gz",
                "uncertainty": "uncertainty.nii.gz"}
SIBLINGS = {"coarse": "_coarse.nii.gz", "uncertainty": "_std.nii.gz"}


def _patient_case(folder: Path, metrics: dict) -> Case:
    vols = {layer: load_view_volume(folder / f) for layer, f in RESULT_FILES.items() if (folder / f).is_file()}
    m = metrics.get(folder.name, {})
    flat = {f"{stage} {k}": m[stage][k] for stage in ("mean", "coarse", "refined") if isinstance(m.get(stage), dict)
            for k in ("psnr", "ssim", "hf_psnr") if k in m[stage]}
    if isinstance(m.get("gate"), dict):
        flat["gate"] = "fell back to coarse" if m["gate"].get("fell_back") else "refined kept"
    return Case(folder.name, vols, metrics=flat)


def cases_from_paths(paths) -> list[Case]:
    """What `ctrefine view` shows: an ``infer`` result folder (every patient folder in it, with its
    metrics), a patient folder of one, or NIfTI files (each a case; a radiograph result's ``_coarse`` and
    ``_std`` companions join it as layers)."""
    from .jsonio import read_json

    cases = []
    for path in map(Path, paths):
        if path.is_dir():
            metrics_file = next((p / "metrics.json" for p in (path, path.parent) if (p / "metrics.json").is_file()), None)
            metrics = read_json(metrics_file).get("patients", {}) if metrics_file else {}
            folders = [path] if any((path / f).is_file() for f in RESULT_FILES.values()) else \
                sorted(p for p in path.iterdir() if p.is_dir() and any((p / f).is_file() for f in RESULT_FILES.values()))
            if not folders:
                raise DataError(f"{path}: holds no volumes to view (an infer result, or NIfTI files)")
            cases += [_patient_case(f, metrics) for f in folders]
        elif path.name.endswith((".nii", ".nii.gz")):
            stem = path.name[:-7] if path.name.endswith(".nii.gz") else path.name[:-4]
            vols = {"volume": load_view_volume(path)}
            for layer, suffix in SIBLINGS.items():
                if (path.parent / f"{stem}{suffix}").is_file():
                    vols[layer] = load_view_volume(path.parent / f"{stem}{suffix}")
            cases.append(Case(stem, vols))
        else:
            raise DataError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a folder of infer results")
    return cases
