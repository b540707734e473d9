"""How realistic a set of CTs is: the realism report, for phantoms and prepared real CTs alike.

Every figure is measured the same way on any dataset whose patients carry ``labels.nii.gz``
(``make-data`` phantoms, ``prepare --labels`` CTs), so a phantom set and a real set can be read
side by side against published reference ranges (:data:`REFERENCES`, each with its source):

* per structure label: the HU distribution inside the label on the stored (target) grid -- and, for
  phantoms, on the 2x render grid too, regenerated from each patient's seed;
* the bone, lung and fat shares of the body (body: the largest air-separated object, holes filled);
* rib thickness and vertebral body width by level, measured on the label masks (at 5 mm voxels these
  are coarse: a 10 mm rib is two voxels -- the render grid halves that error);
* the enhanced-scan fraction (a scan counts as enhanced when its blood pool's median exceeds 120 HU);
* for phantoms, the drawn anatomy (age, bone densities, cortex thickness) from each ``meta.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..jsonio import read_json
from .phantoms import L, Scan, chest_phantom

BONE_LABELS = ("rib", "vertebra", "other_bone")
FAT_HU = (-190.0, -30.0)  # adipose tissue window of CT body-composition studies (Yoshizumi et al., Radiology 1999)
ENHANCED_HU = 120.0  # unenhanced blood is 30-60 HU; any contrast phase lifts the pool well past this

# Published ranges the report checks against: quantity -> (low, high, source). Label medians are on
# the 64^3 target grid (5 mm voxels), where a label's voxels are the majority-vote blocks of the
# render grid: thin cortex is averaged into the marrow, as in any 5 mm reconstruction.
REFERENCES = {
    "median_hu/vertebra": (120.0, 300.0, "adult vertebral cancellous bone ~100-300 HU, falling with age "
                           "(Pickhardt et al., Ann Intern Med 2013: L1 trabecular HU, <110 HU osteoporotic, "
                           ">160 HU normal); the cortical shell is ~0.4 mm (Silva et al., Bone 1994), "
                           "so it barely lifts a 5 mm voxel"),
    "median_hu/rib": (120.0, 300.0, "ribs are marrow inside a ~0.5-1.5 mm cortex; at 5 mm voxels their "
                      "label median sits near the marrow's value (cancellous ranges as for vertebrae)"),
    "median_hu/lung": (-900.0, -750.0, "healthy inspiratory lung parenchyma -900 to -750 HU (mean lung "
                       "density ~ -850 HU at full inspiration; emphysema index threshold -950 HU)"),
    "median_hu/fat": (-150.0, -50.0, "adipose tissue -150 to -50 HU (body-composition window -190..-30)"),
    "median_hu/soft_tissue": (0.0, 80.0, "muscle, unenhanced organs and fluid 0-80 HU"),
    "median_hu/heart_blood/unenhanced": (30.0, 60.0, "unenhanced blood 30-60 HU (haematocrit dependent)"),
    "median_hu/heart_blood/enhanced": (150.0, 400.0, "blood pool of contrast-enhanced chest CT 150-400 HU "
                                       "(venous phase ~150-200, CT angiography >= 250)"),
    "fraction/bone": (0.05, 0.08, "no published figure found for the bone share of a chest field at 5 mm; "
                      "the range brackets the one real chest CT quoted in issue 26 (6.3 %)"),
    "enhanced_fraction": (0.4, 0.7, "a large share of clinical chest CTs are contrast-enhanced (staging, "
                          "angiography); the real chest CTs the project is judged on are enhanced"),
    "render_rib_thickness_mm": (5.0, 16.0, "as rib_thickness_mm, on the 2.5 mm render grid"),
    "vertebral_width_mm/middle": (28.0, 45.0, "thoracic vertebral body width ~28 (T1) to ~40 mm (T12) "
                                  "(Panjabi et al., Spine 1991)"),
    "fraction/fat": (0.12, 0.35, "adult body fat ~15-35 % of body mass by DXA, men to women (Kelly et al., "
                     "PLoS One 2009, NHANES reference values); a chest field holds less (its lungs), so a lower bound "
                     "of 12 %"),
    "rib_thickness_mm": (8.0, 16.0, "mid-shaft rib cross-section ~10-15 mm high x 5-8 mm thick; the "
                         "label's inscribed thickness lies between the two"),
}


@dataclass
class PatientStats:
    """What the report measures on one patient (stored grid; ``render``: the phantom's 2x grid)."""

    name: str
    labels: dict = field(default_factory=dict)  # label -> {"n", "mean", "median", "p10", "p90"}
    render_labels: dict = field(default_factory=dict)
    fractions: dict = field(default_factory=dict)  # bone / lung / fat share of the body
    rib_thickness_mm: float | None = None
    render_rib_thickness_mm: float | None = None
    vertebral_width_mm: dict = field(default_factory=dict)  # top / middle / bottom third
    enhanced: bool | None = None
    anatomy: dict = field(default_factory=dict)  # phantoms v3: the drawn parameters


def label_hu(hu: np.ndarray, labels: np.ndarray) -> dict:
    """Per structure label present: voxel count and HU mean / median / 10th / 90th percentile."""
    out = {}
    for name, k in L.items():
        v = hu[labels == k]
        if v.size:
            p10, med, p90 = np.percentile(v, (10, 50, 90))
            out[name] = {"n": int(v.size), "mean": float(v.mean()), "median": float(med), "p10": float(p10),
                         "p90": float(p90)}
    return out


def body_mask(hu: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """The patient's body: tissue denser than -400 HU, the largest connected object (so the table and
    electrodes' leads are left out), its holes (lungs, airways, gas) filled slice by slice."""
    tissue = hu > -400.0
    if labels is not None:
        tissue &= (labels != L["table"]) & (labels != L["metal"])
    comp, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    body = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def fractions(hu: np.ndarray, labels: np.ndarray) -> dict:
    """Bone (labels), lung (air inside the body) and fat (:data:`FAT_HU`) shares of the body's voxels."""
    body = body_mask(hu, labels)
    n = max(int(body.sum()), 1)
    bone = np.isin(labels, [L[b] for b in BONE_LABELS]) & body
    return {"bone": float(bone.sum() / n), "lung": float(((hu < -400.0) & body).sum() / n),
            "fat": float(((hu >= FAT_HU[0]) & (hu <= FAT_HU[1]) & body).sum() / n)}


def rib_thickness_mm(labels: np.ndarray, spacing: float) -> float | None:
    """Median inscribed thickness of the ribs: twice the distance to the mask's edge on its medial axis
    (voxels whose distance is a local maximum), in mm; ``None`` without rib voxels."""
    rib = labels == L["rib"]
    if rib.sum() < 10:
        return None
    dist = ndimage.distance_transform_edt(rib) * spacing
    ridge = rib & (dist == ndimage.maximum_filter(dist, size=3))
    return float(2.0 * np.median(dist[ridge]))


def vertebral_width_mm(labels: np.ndarray, spacing: float, depth_mm: float = 25.0) -> dict:
    """Width (right-left) of the vertebral bodies, median per third (top / middle / bottom) of the slices
    that hold vertebra. In each axial slice the body is the vertebra within ``depth_mm`` of its most
    anterior voxel (the posterior arch and processes lie further back)."""
    widths = []
    for s in labels == L["vertebra"]:
        hh, ww = np.nonzero(s)
        if hh.size == 0:
            continue
        front = ww[hh <= hh.min() + depth_mm / spacing]
        widths.append((front.max() - front.min() + 1) * spacing)
    if len(widths) < 3:
        return {}
    thirds = np.array_split(np.asarray(widths), 3)
    return {part: float(np.median(t)) for part, t in zip(("top", "middle", "bottom"), thirds)}


def patient_stats(folder: Path, render=None) -> PatientStats:
    """Measure one patient folder (``ct.nii.gz`` + ``labels.nii.gz``); ``render``: its ``(hu, labels,
    spacing)`` on the render grid when it can be regenerated."""
    from .dataset import DatasetHeader, read_ct, read_labels

    if not (folder / "labels.nii.gz").exists():
        raise DataError(f"{folder / 'labels.nii.gz'}: missing; the realism report needs label maps (make-data, or "
                        f"prepare --labels)")
    hu, aff = read_ct(folder, DatasetHeader.read(folder.parent).size)
    labels = read_labels(folder, hu.shape)
    spacing = float(abs(aff[0, 0]) or abs(aff[:3, 0]).max())
    meta = read_json(folder / "meta.json") if (folder / "meta.json").exists() else {}
    blood = label_hu(hu, labels).get("heart_blood")
    st = PatientStats(folder.name, label_hu(hu, labels), fractions=fractions(hu, labels),
                      rib_thickness_mm=rib_thickness_mm(labels, spacing),
                      vertebral_width_mm=vertebral_width_mm(labels, spacing),
                      enhanced=None if blood is None else blood["median"] > ENHANCED_HU,
                      anatomy=meta.get("anatomy", {}))
    if render is not None:
        st.render_labels = label_hu(render[0], render[1])
        st.render_rib_thickness_mm = rib_thickness_mm(render[1], render[2])
    return st


def _regenerate(folder: Path, header):
    """A phantom patient's volume and labels on its render grid, rebuilt from its seed (``None`` for an
    ingested CT, whose render grid is not stored)."""
    meta = read_json(folder / "meta.json")
    if meta.get("source") != "phantom":
        return None
    hu, labels = chest_phantom(int(meta["seed"]), int(meta["render_size"]), float(meta["fov_mm"]), with_labels=True,
                               scan=Scan(**(header.raw.get("scan") or {})), version=header.phantom_version)
    return hu, labels, float(meta["fov_mm"]) / int(meta["render_size"])


def dataset_stats(root, max_patients: int | None = None, render: bool = False, progress: bool = False):
    """:class:`PatientStats` of the dataset's finished patients (sorted by name, the first
    ``max_patients``); ``render``: phantoms also on their render grid."""
    from tqdm import tqdm

    from .dataset import DatasetHeader, is_complete

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a dataset folder")
    header = DatasetHeader.read(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("patient_") and is_complete(p))
    folders = folders[:max_patients] if max_patients else folders
    if not folders:
        raise DataError(f"{root}: holds no finished patient folder")
    return [patient_stats(f, _regenerate(f, header) if render else None)
            for f in tqdm(folders, desc=root.name, unit="pt", disable=not progress)]


def _spread(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return None
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "n": int(v.size)}


def summarize_stats(stats: list[PatientStats]) -> dict:
    """Dataset level: every quantity as the median and 10th-90th percentile over patients (label HU:
    of the per-patient medians; the blood pool split into enhanced and unenhanced scans)."""
    out = {"patients": len(stats)}
    for name in L:
        for grid, key in (("labels", "median_hu"), ("render_labels", "render_median_hu")):
            if name == "heart_blood":
                for kind, flag in (("enhanced", True), ("unenhanced", False)):
                    s = _spread(getattr(p, grid)[name]["median"] for p in stats
                                if name in getattr(p, grid) and p.enhanced is flag)
                    if s:
                        out[f"{key}/{name}/{kind}"] = s
            s = _spread(getattr(p, grid)[name]["median"] for p in stats if name in getattr(p, grid))
            if s:
                out[f"{key}/{name}"] = s
    for part in ("bone", "lung", "fat"):
        out[f"fraction/{part}"] = _spread(p.fractions.get(part) for p in stats)
    out["rib_thickness_mm"] = _spread(p.rib_thickness_mm for p in stats)
    out["render_rib_thickness_mm"] = _spread(p.render_rib_thickness_mm for p in stats)
    for part in ("top", "middle", "bottom"):
        out[f"vertebral_width_mm/{part}"] = _spread(p.vertebral_width_mm.get(part) for p in stats)
    flags = [p.enhanced for p in stats if p.enhanced is not None]
    out["enhanced_fraction"] = {"median": float(np.mean(flags)), "p10": None, "p90": None, "n": len(flags)} \
        if flags else None
    for key in sorted({k for p in stats for k in p.anatomy}):
        out[f"anatomy/{key}"] = _spread(p.anatomy.get(key) for p in stats)
    return {k: v for k, v in out.items() if v is not None}


def _cell(s: dict | None, key: str) -> str:
    if not s:
        return "-"
    pct = key.startswith("fraction/") or key == "enhanced_fraction"
    f = (lambda x: f"{100 * x:.1f} %") if pct else (lambda x: f"{x:.0f}" if abs(x) >= 20 else f"{x:.1f}")
    if s.get("p10") is None:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['p10'])} .. {f(s['p90'])})"


def _verdict(s: dict | None, key: str) -> str:
    ref = REFERENCES.get(key)
    if not s or not ref:
        return ""
    return " ✓" if ref[0] <= s["median"] <= ref[1] else " ✗"


def format_report(summaries: dict) -> str:
    """Markdown: one row per quantity, one column per dataset (median over patients, 10th..90th
    percentile in brackets, ✓/✗ against the reference range), then the reference and its source."""
    keys = sorted({k for s in summaries.values() for k in s if k != "patients"}, key=_row_order)
    names = list(summaries)
    head = "| quantity | " + " | ".join(f"{n} ({summaries[n]['patients']} pts)" for n in names) + " | reference |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for key in keys:
        ref = REFERENCES.get(key)
        cells = " | ".join(_cell(summaries[n].get(key), key) + _verdict(summaries[n].get(key), key) for n in names)
        pct = key.startswith("fraction/") or key == "enhanced_fraction"
        lo_hi = "" if not ref else (f"{100 * ref[0]:.0f}-{100 * ref[1]:.0f} %" if pct else f"{ref[0]:g}..{ref[1]:g}")
        lines.append(f"| {key} | {cells} | {lo_hi} |")
    lines += ["", "Sources of the reference ranges:"]
    lines += [f"- {key}: {ref[2]}" for key, ref in REFERENCES.items()]
    return "\n".join(lines)


def _row_order(key: str):
    group = ("median_hu/", "render_median_hu/", "fraction/", "enhanced", "rib", "render_rib", "vertebral", "anatomy/")
    return (next((i for i, g in enumerate(group) if key.startswith(g)), len(group)), key)


def realism_report(datasets, out: str | None = None, max_patients: int | None = None, render: bool = False,
                   progress: bool = True, overwrite: bool = False) -> dict:
    """``ctrefine realism``: measure each dataset, print the table; with ``out`` also write ``OUT.md`` and
    ``OUT.json`` (together or not at all, an existing one only with ``overwrite``). Returns the summaries."""
    from ..outputs import atomic_files, claim_output_file
    from ..jsonio import write_json

    outs = [Path(out + ext) for ext in (".md", ".json")] if out else []
    for path in outs:
        claim_output_file(path, overwrite)
    names = [Path(d).name or str(d) for d in datasets]
    names = names if len(set(names)) == len(names) else [str(d) for d in datasets]  # two ".../data": full paths
    summaries = {n: summarize_stats(dataset_stats(d, max_patients, render, progress)) for n, d in zip(names, datasets)}
    text = format_report(summaries)
    print(text)
    if outs:
        with atomic_files(outs) as (md, js):
            md.write_text(text + "\n")
            write_json(js, summaries)
        print(f"wrote {outs[0]} and {outs[1]}")
    return summaries
