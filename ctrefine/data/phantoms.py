"""Procedural chest CT phantoms in HU, deterministic per seed.

Why: no CT dataset can be downloaded here, and the refiner only has something to learn if the
ground truth holds fine structure that a coarse reconstruction misses -- ribs 1-3 target voxels
thick, branching lung vessels, airways, small nodules, vertebral cortex and the spinal canal. Every
patient draws its own body size, fat layer, breasts (some), lung shape, breathing depth (diaphragm
height), heart (myocardium around blood-filled chambers), aorta and pulmonary arteries, a trachea
splitting into main, lobar and segmental bronchi, a thoracic spine with kyphosis and vertebrae that
grow caudally (pedicles, transverse and spinous processes), rib spacing and slope, vessel trees,
nodules, a small rotation, and its position in the field. How it was scanned (:class:`Scan`) is drawn
too: IV contrast or not, axial coverage (often shorter than the field, anywhere in it), a flat,
curved or no table, and rarely ECG electrodes (metal).

The volume is generated at the *render* resolution (default 128^3, 2x the 64^3 target) over a fixed
cubic field of view (:data:`ctrefine.conventions.FOV_MM`, 320 mm -> 2.5 mm voxels at 128^3, 5 mm at
64^3). Radiographs are rendered from this volume; the ground truth is its area average on the target
grid (:func:`downsample_area`).

Axes follow the package convention (D sup->inf, H ant->post, W right->left). Internally shapes are
described in millimetres in a *patient frame* centred on the volume; a small rigid rotation maps
it to the array frame. Thin tubular structures are drawn as anti-aliased capsules (partial-volume
occupancy), so sub-voxel vessels still appear with reduced contrast, as in a real CT.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..conventions import FOV_MM
from ..errors import DataError

# Typical tissue values (HU).
AIR, FAT, SOFT, BLOOD, LIVER, LUNG = -1000.0, -100.0, 40.0, 45.0, 60.0, -850.0
CSF, DISC, CANCELLOUS, CORTICAL = 15.0, 90.0, 230.0, 950.0
METAL = 3000.0  # steel / brass of an electrode snap: far above bone, clipped by the HU window like on a scanner

# Structure labels painted with the HU values (uint8; written as labels.nii.gz, table in dataset.json).
LABELS = {0: "background", 1: "lung", 2: "airway", 3: "vessel", 4: "nodule", 5: "heart_blood", 6: "rib",
          7: "vertebra", 8: "other_bone", 9: "fat", 10: "soft_tissue", 11: "gas", 12: "table", 13: "metal"}
L = {name: k for k, name in LABELS.items()}


@dataclass(frozen=True)
class Grid:
    """A cubic voxel grid: ``n`` voxels per side over ``fov`` mm, centred on the origin."""

    n: int
    fov: float = FOV_MM

    @property
    def spacing(self) -> float:
        return self.fov / self.n

    def centers(self) -> np.ndarray:
        return (-self.fov / 2 + (np.arange(self.n) + 0.5) * self.spacing).astype(np.float32)

    def index_of(self, mm: np.ndarray) -> np.ndarray:
        return (np.asarray(mm) + self.fov / 2) / self.spacing - 0.5


PHANTOM_VERSIONS = (2, 3)  # 2: uncalibrated bone (reproduces datasets made before v3); 3: calibrated (below)


@dataclass(frozen=True)
class Materials:
    """Calibrated tissue of one phantom (version 3), drawn per patient from its own random stream so the
    anatomy's geometry is the version-2 phantom's of the same seed.

    Bone is cancellous marrow inside a thin cortex, painted with partial-volume occupancy on the render
    grid so a 0.5 mm shell lifts a 2.5 mm voxel by a fifth of its contrast, as area averaging would.
    Vertebral trabecular attenuation falls with age from ~300 HU in young adults to ~100-160 HU in the
    elderly (Pickhardt et al., Ann Intern Med 2013: L1 trabecular HU, <110 osteoporotic, >160 normal);
    the vertebral cortical shell is ~0.4 mm (Silva et al., Bone 1994); rib cortex ~0.5-1.5 mm; costal
    cartilage calcifies with age. Subcutaneous fat varies from a few mm to several cm (body habitus).
    """

    age: float  # years
    cancellous: float  # vertebral trabecular bone (HU)
    cortical: float  # compact bone (HU)
    shell_mm: float  # vertebral cortical shell and end plates
    rib_cortex_mm: float
    rib_marrow: float  # HU: adult rib marrow is partly fatty, its trabeculae sparser than the vertebrae's
    cartilage: float  # costal cartilage (HU), calcifying with age
    extra_fat_mm: float  # subcutaneous fat beyond the version-2 layer
    lung: float  # parenchyma before texture and the dependent gradient (HU)

    @classmethod
    def draw(cls, seed: int) -> "Materials":
        rng = np.random.default_rng([seed, 3])
        age = rng.uniform(20, 85)
        young = (85 - age) / 65  # 1 at 20 years, 0 at 85
        cancellous = float(np.clip(130 + 140 * young + rng.normal(0, 25), 80, 320))
        return cls(age=age, cancellous=cancellous,
                   cortical=float(np.clip(1150 + 350 * young + rng.normal(0, 80), 950, 1700)),
                   shell_mm=rng.uniform(0.4, 0.9), rib_cortex_mm=rng.uniform(0.3, 0.8),
                   rib_marrow=cancellous * rng.uniform(0.3, 0.7),
                   cartilage=100 + max(0.0, age - 30) * rng.uniform(0.0, 4.0),
                   extra_fat_mm=float(np.clip(rng.gamma(2.0, 4.0), 0, 25)), lung=rng.uniform(-900, -850))

    def mix(self, cortex_share: float) -> float:
        """HU of a bone whose voxels hold ``cortex_share`` compact bone and the rest cancellous."""
        return self.cancellous + cortex_share * (self.cortical - self.cancellous)

    def as_dict(self) -> dict:
        return {k: round(float(v), 3) for k, v in self.__dict__.items()}


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Small random rigid rotation: up to +-5 deg about the body axis (D), +-2 deg tilt about W and H."""
    yaw, pitch, roll = np.deg2rad(rng.uniform(-5, 5)), np.deg2rad(rng.uniform(-2, 2)), np.deg2rad(rng.uniform(-2, 2))
    # Axes order (d, h, w). Rotation about d mixes h and w, about w mixes d and h, about h mixes d and w.
    rd = np.array([[1, 0, 0], [0, np.cos(yaw), -np.sin(yaw)], [0, np.sin(yaw), np.cos(yaw)]])
    rw = np.array([[np.cos(pitch), -np.sin(pitch), 0], [np.sin(pitch), np.cos(pitch), 0], [0, 0, 1]])
    rh = np.array([[np.cos(roll), 0, -np.sin(roll)], [0, 1, 0], [np.sin(roll), 0, np.cos(roll)]])
    return (rd @ rw @ rh).astype(np.float64)


class _Canvas:
    """The HU volume being painted plus the patient-frame coordinate arrays and capsule rasteriser."""

    def __init__(self, grid: Grid, rot: np.ndarray, shift=(0.0, 0.0, 0.0)):
        self.grid = grid
        self.rot = rot  # patient = rot @ array-frame - shift
        self.shift = np.asarray(shift, np.float64)  # where the patient lies in the field (mm, patient axes)
        c = grid.centers()
        d, h, w = np.meshgrid(c, c, c, indexing="ij")
        world = np.stack([d, h, w])  # (3, n, n, n)
        pat = np.tensordot(rot.astype(np.float32), world, axes=1) - self.shift.astype(np.float32).reshape(3, 1, 1, 1)
        self.d, self.h, self.w = pat[0], pat[1], pat[2]
        self.vol = np.full((grid.n,) * 3, AIR, np.float32)
        self.labels = np.zeros((grid.n,) * 3, np.uint8)

    def fill(self, mask: np.ndarray, value, label: str) -> None:
        self.vol[mask] = value if np.isscalar(value) else value[mask]
        self.labels[mask] = L[label]

    def capsule_occupancy(self, p0: np.ndarray, p1: np.ndarray, radius: np.ndarray) -> np.ndarray:
        """Max partial-volume occupancy in [0, 1] of a set of capsules (segments with radii), patient mm."""
        g = self.grid
        occ = np.zeros_like(self.vol)
        p0w = (np.asarray(p0, np.float64) + self.shift) @ self.rot  # patient -> array frame (rot is orthonormal)
        p1w = (np.asarray(p1, np.float64) + self.shift) @ self.rot
        c = g.centers().astype(np.float64)
        n, spacing = g.n, g.spacing
        boxes_lo = np.floor(g.index_of(np.minimum(p0w, p1w) - (np.asarray(radius) + spacing)[:, None])).astype(int)
        boxes_hi = np.ceil(g.index_of(np.maximum(p0w, p1w) + (np.asarray(radius) + spacing)[:, None])).astype(int)
        for a, b, r, lo, hi in zip(p0w, p1w, np.asarray(radius, np.float64), boxes_lo.clip(0, n), boxes_hi.clip(0, n)):
            if (hi - lo <= 0).any():
                continue
            # the box's coordinates as broadcastable 1D axes (no meshgrid), relative to the segment's start
            zd = (c[lo[0]:hi[0]] - a[0])[:, None, None]
            zh = (c[lo[1]:hi[1]] - a[1])[None, :, None]
            zw = (c[lo[2]:hi[2]] - a[2])[None, None, :]
            ab = b - a
            t = (zd * ab[0] + zh * ab[1] + zw * ab[2]) * (1.0 / max(float(ab @ ab), 1e-9))
            np.clip(t, 0.0, 1.0, out=t)
            dist = np.sqrt((zd - t * ab[0]) ** 2 + (zh - t * ab[1]) ** 2 + (zw - t * ab[2]) ** 2)
            o = ((r - dist) * (1.0 / spacing) + 0.5).astype(np.float32)
            np.clip(o, 0.0, 1.0, out=o)
            sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
            np.maximum(occ[sl], o, out=occ[sl])
        return occ

    def to_patient(self, arr_mm: np.ndarray) -> np.ndarray:
        """Array-frame point (mm) -> patient frame."""
        return self.rot @ np.asarray(arr_mm, np.float64) - self.shift

    def blend(self, occ: np.ndarray, value, label: str, where: np.ndarray | None = None) -> None:
        """Partial-volume paint; a voxel takes the label when the structure fills at least half of it."""
        if where is not None:
            occ = occ * where
        self.vol += occ * (value - self.vol)
        self.labels[occ >= 0.5] = L[label]


def _polyline(points: np.ndarray, radius) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts = np.asarray(points, np.float64)
    r = np.broadcast_to(np.asarray(radius, np.float64), (len(pts) - 1,))
    return pts[:-1], pts[1:], r


def _vessel_tree(rng, root, direction, length, radius, depth, out):
    """Recursive bifurcating tree; appends (p0, p1, r) segments to ``out``."""
    if depth == 0 or radius < 0.6:
        return
    direction = direction / np.linalg.norm(direction)
    # Slightly curved branch: two sub-segments with a small random bend.
    mid = root + direction * length * 0.5 + rng.normal(0, 0.08 * length, 3)
    end = mid + direction * length * 0.5 + rng.normal(0, 0.08 * length, 3)
    out.append((root, mid, radius))
    out.append((mid, end, radius * 0.93))
    for _ in range(2):
        axis = rng.normal(size=3)
        axis -= axis @ direction * direction
        axis /= np.linalg.norm(axis) + 1e-9
        ang = np.deg2rad(rng.uniform(20, 45))
        new_dir = np.cos(ang) * direction + np.sin(ang) * axis
        _vessel_tree(rng, end, new_dir, length * rng.uniform(0.68, 0.82), radius * rng.uniform(0.66, 0.78), depth - 1, out)


@dataclass(frozen=True)
class Scan:
    """How one patient was scanned; every field ``None`` is drawn per patient from the seed.

    ``contrast``: IV contrast in the blood pool (arterial phase); ``coverage_mm``: axial length of the
    scan (the field is :data:`~ctrefine.conventions.FOV_MM`; outside the covered slab there is no data,
    i.e. air); ``table``: ``"flat"``, ``"curved"`` or ``"none"``; ``metal``: ECG electrodes on the skin;
    ``arms``: ``"raised"`` above the head (the usual chest CT position) or ``"down"`` along the sides.
    """

    contrast: bool | None = None
    coverage_mm: float | None = None
    table: str | None = None
    metal: bool | None = None
    arms: str | None = None

    @classmethod
    def parse(cls, items: list[str]) -> dict:
        """``["contrast=true", "coverage_mm=250"]`` -> the fields as typed values (one-line error otherwise)."""
        kinds = {"contrast": "bool", "metal": "bool", "coverage_mm": "float", "table": ("flat", "curved", "none"),
                 "arms": ("raised", "down")}
        out = {}
        for item in items:
            key, _, text = item.partition("=")
            kind = kinds.get(key)
            if kind is None or not text:
                raise DataError(f"--scan {item!r}: expected KEY=VALUE with KEY one of {', '.join(kinds)}")
            if kind == "bool" and text.lower() in ("true", "false", "1", "0", "yes", "no"):
                out[key] = text.lower() in ("true", "1", "yes")
            elif kind == "float" and text.replace(".", "", 1).isdigit() and 50 <= float(text) <= FOV_MM:
                out[key] = float(text)
            elif isinstance(kind, tuple) and text in kind:
                out[key] = text
            else:
                raise DataError(f"--scan {item!r}: bad value for {key} "
                                f"({kind if isinstance(kind, str) else '|'.join(kind)}; coverage_mm 50-{FOV_MM:g})")
        return out

    def draw(self, rng: np.random.Generator, fov: float, contrast_share: float = 0.4) -> "Scan":
        """A concrete scan: the given fields kept, the others drawn (draws happen in a fixed order);
        ``contrast_share``: how many scans are contrast-enhanced (common: staging, angiography)."""
        draws = (rng.random() < contrast_share,
                 fov if rng.random() < 0.5 else rng.uniform(0.75, 1.0) * fov,  # short scans: 240-320 mm
                 ("flat", "curved", "none")[rng.choice(3, p=(0.35, 0.35, 0.3))],
                 rng.random() < 0.08,
                 "raised" if rng.random() < 0.8 else "down")  # arms up keeps them out of the chest's beam path
        return Scan(*(v if v is not None else d for v, d in zip(
            (self.contrast, self.coverage_mm, self.table, self.metal, self.arms), draws)))


def _arms(cv: "_Canvas", rng: np.random.Generator, arms: str, shoulder_d: float, bw: float,
          mat: Materials | None) -> None:
    """Both arms: skin and fat around muscle, a humerus (cortex around a fatty marrow) and its head.

    ``"raised"``: the upper arms rise from the shoulders beside the head, so only their proximal part
    shows, lateral to the neck at the top of the field. ``"down"``: they hang against the chest wall and
    run out of the 320 mm field laterally (truncated, as on a scan reconstructed with a small field).
    Upper-arm girth ~26-34 cm (radius ~40-55 mm with soft tissue), humeral shaft ~20-25 mm across with a
    ~45 mm head (standard adult ranges). Version 3 (``mat``) takes its bone densities from the patient's
    :class:`Materials`.
    """
    cortical, head_shell, cancellous = (CORTICAL, 700.0, CANCELLOUS) if mat is None else \
        (mat.cortical, mat.mix(0.5), mat.cancellous)
    arm_r, hum_r, head_r = rng.uniform(38, 50), rng.uniform(10, 12.5), rng.uniform(20, 24)
    for s in (-1, 1):
        if arms == "raised":
            joint = np.array([shoulder_d + 18, rng.uniform(-5, 10), s * (bw - rng.uniform(0, 10))])
            far = joint + np.array([-260.0, rng.uniform(-10, 25), s * rng.uniform(-30, 10)])
        else:
            joint = np.array([shoulder_d + 22, rng.uniform(-10, 5), s * (bw - rng.uniform(0, 8))])
            far = np.array([joint[0] + 300, rng.uniform(-5, 20), s * (bw + 0.6 * arm_r)])
        axis = (far - joint) / np.linalg.norm(far - joint)
        start = joint + axis * 0.5 * head_r  # the arm's soft tissue begins just past the joint
        cv.blend(cv.capsule_occupancy(start[None], far[None], np.array([arm_r])), FAT, "fat")
        cv.blend(cv.capsule_occupancy(start[None], far[None], np.array([arm_r - rng.uniform(5, 12)])),
                 SOFT, "soft_tissue")
        cv.blend(cv.capsule_occupancy(joint[None], far[None], np.array([hum_r])), cortical, "other_bone")
        cv.blend(cv.capsule_occupancy(joint[None] + axis * head_r, far[None], np.array([hum_r - 3.0])),
                 rng.uniform(-40, 60), "soft_tissue")  # yellow (fatty) marrow of the shaft
        cv.blend(cv.capsule_occupancy(joint[None], joint[None], np.array([head_r])), head_shell, "other_bone")
        cv.blend(cv.capsule_occupancy(joint[None], joint[None], np.array([head_r - 2.5])), cancellous, "other_bone")


def spine_offset(d: np.ndarray, sagitta: float, fov: float) -> np.ndarray:
    """Posterior displacement (mm) of the spine's axis at height ``d``: thoracic kyphosis as an arc.

    A circular arc of chord ``fov`` with the given sagitta, shifted to zero mean over the field so the
    spine as a whole stays where the body outline puts it (mid-thorax further back, ends forward).
    """
    u = np.clip(np.asarray(d) / (fov / 2), -1.0, 1.0)
    return sagitta * (1.0 - u ** 2) - sagitta * 2.0 / 3.0


@dataclass
class _Chest:
    """What the anatomy steps of :func:`chest_phantom` share: the patient's random stream, the canvas,
    the scan, and the landmarks one step sets for the later ones (each step draws from ``rng`` in a
    fixed order, so a phantom depends only on its seed)."""

    rng: np.random.Generator
    grid: Grid
    cv: "_Canvas"
    sc: Scan
    mat: Materials | None = None  # version 3; None paints the version-2 phantom
    # set by _body
    bw: float = 0.0  # chest's lateral / AP semi-axes (mm)
    bh: float = 0.0
    apex: float = 0.0  # lung apex (d, mm)
    breath: float = 0.0  # depth of inspiration: where the diaphragm sits
    shoulder_d: float = 0.0
    fat_t: float = 0.0
    muscle: np.ndarray | None = None  # inside the subcutaneous fat
    # set by _abdomen, _lungs, _heart_and_great_vessels, _spine
    dia: np.ndarray | None = None  # diaphragm surface, d of each (h, w)
    dome_l: float = 0.0
    lungs: np.ndarray | None = None
    blood: float = 0.0
    hila: dict | None = None
    arch_d: float = 0.0
    vr0: float = 0.0  # vertebral body radius at the top of the field
    sagitta: float = 0.0  # of the kyphotic arc
    hs0: float = 0.0  # AP position of the vertebral axis before the kyphosis

    @property
    def fov(self) -> float:
        return self.grid.fov

    def spine_h(self, dd):
        """AP position of the vertebral bodies' axis at height ``dd``."""
        return self.hs0 + spine_offset(dd, self.sagitta, self.fov)

    def grow(self, dd):
        """Caudal growth of the vertebrae: 0.8 at the top of the field to 1.25 at the bottom."""
        return 0.8 + 0.45 * np.clip((np.asarray(dd) + self.fov / 2) / self.fov, 0, 1)


def _body(ch: _Chest) -> None:
    """Body outline along the axis (neck, sloping shoulders, chest, upper abdomen), fat over muscle, the
    arms, and sometimes breasts.

    Adult chest ~260-300 mm wide and ~180-225 mm deep, neck ~105-125 mm wide (anthropometric survey
    ranges, e.g. Gordon et al., ANSUR II 2014). The lung apex rises 2-3 cm above the medial clavicle, the
    acromia sit 0.5-2 cm below the apex, and the trapezius line climbs ~4-7 cm from them to the neck.
    """
    rng, cv, fov = ch.rng, ch.cv, ch.fov
    d, h, w = cv.d, cv.h, cv.w
    ch.bw, ch.bh = bw, bh = rng.uniform(128, 150), rng.uniform(88, 112)  # before any extra fat (version 3)
    ch.apex = apex = -fov / 2 + rng.uniform(25, 45)  # a few cm below the top of the field
    ch.breath = breath = rng.uniform(30, 85)  # deeper inspiration -> lower diaphragm (larger d)
    ch.shoulder_d = shoulder_d = apex + rng.uniform(5, 20)  # acromion level
    slope = rng.uniform(40, 70)
    neck_w, neck_h = rng.uniform(52, 62), rng.uniform(48, 58)
    up = np.clip((shoulder_d - d) / slope, 0, 1) ** 0.5  # 0 at and below the shoulders, 1 on the neck (rounded)
    waist = 1.0 - rng.uniform(0.03, 0.08) * np.clip((d - breath - 30) / 90, 0, 1)  # upper abdomen narrows a little
    half_w, half_h = (bw + (neck_w - bw) * up) * waist, bh + (neck_h - bh) * up
    centre_h = up * rng.uniform(8, 18)  # the neck sits behind the chest's centre, over the spine
    body_r = (w / half_w) ** 2 + ((h - centre_h) / half_h) ** 2
    ch.fat_t = fat_t = rng.uniform(6, 20)
    if ch.mat is not None:  # habitus: more fat widens the body and thickens its layer; the neck keeps its size
        extra = ch.mat.extra_fat_mm * (1 - up)
        half_w, half_h, fat_t = half_w + extra, half_h + 0.8 * extra, fat_t + extra
        # the landmarks inside the fat (spine, ribs, sternum) keep their places: bh - fat_t is unchanged
        ch.bw, ch.bh, ch.fat_t = bw + ch.mat.extra_fat_mm, bh + ch.mat.extra_fat_mm, ch.fat_t + ch.mat.extra_fat_mm
        body_r = (w / half_w) ** 2 + ((h - centre_h) / half_h) ** 2
    inner_r = (w / (half_w - fat_t)) ** 2 + ((h - centre_h) / (half_h - fat_t * 0.8)) ** 2
    cv.fill(body_r <= 1, FAT, "fat")
    ch.muscle = inner_r <= 1
    cv.fill(ch.muscle, SOFT + rng.normal(0, 3), "soft_tissue")
    _arms(cv, rng, ch.sc.arms, shoulder_d, ch.bw, ch.mat)
    if rng.random() < 0.45:  # breasts: fatty-glandular mounds on the anterior wall at heart level
        bd, bwid, bproj = rng.uniform(-10, 40), rng.uniform(45, 65), rng.uniform(25, 60)
        for side in (-1, 1):
            mound = (((d - bd) / (bwid * 0.9)) ** 2 + ((w - side * rng.uniform(55, 75)) / bwid) ** 2
                     + ((h + ch.bh * 0.85) / bproj) ** 2) < 1
            cv.fill(mound & (h < 0) & ~(body_r <= 1), rng.uniform(-90, -30), "fat")


def _table(ch: _Chest) -> None:
    """The scanner table: a carbon-fibre shell around a foam core; a curved one cradles the back."""
    if ch.sc.table == "none":
        return
    rng, cv, fov = ch.rng, ch.cv, ch.fov
    h, w = cv.h, cv.w
    top = ch.bh + rng.uniform(3, 10)
    if ch.sc.table == "curved":  # surface rises towards the sides (h grows posteriorly)
        top = top - rng.uniform(20, 40) * (w / (0.5 * fov)) ** 2
    shell = (h >= top) & (h < top + 12) & (np.abs(w) < 0.55 * fov) & (cv.labels == L["background"])
    core = (h >= top + 2) & (h < top + 10)
    cv.fill(shell, 250.0, "table")
    cv.fill(shell & core, -750.0, "table")


def _abdomen(ch: _Chest) -> None:
    """The diaphragm's two domes (the right one higher, over the liver) and the upper abdomen below them:
    liver, spleen (both enhancing with contrast), and a stomach with an air-fluid level."""
    rng, cv = ch.rng, ch.cv
    d, h, w = cv.d, cv.h, cv.w
    dome_r = ch.breath + rng.uniform(-4, 4) - 12.0
    ch.dome_l = dome_l = ch.breath + rng.uniform(-4, 4)

    def dome(center_w, top_d):
        r2 = ((w - center_w) / 85.0) ** 2 + ((h - 5) / 95.0) ** 2
        return top_d + 55.0 * np.clip(r2, 0, 1.5)

    ch.dia = np.where(w < 0, dome(-60, dome_r), dome(60, dome_l))
    abdomen = ch.muscle & (d > ch.dia)
    liver = abdomen & (w < 30 + 0.2 * (d - dome_r)) & (((w + 40) / 110) ** 2 + ((h + 5) / 85) ** 2 < 1)
    cv.fill(abdomen, SOFT, "soft_tissue")
    enhance = rng.uniform(30, 60) if ch.sc.contrast else 0.0  # portal-venous uptake of liver and spleen
    cv.fill(liver, LIVER + enhance, "soft_tissue")
    spleen = (((d - dome_l - rng.uniform(25, 40)) / 45) ** 2 + ((h - 35) / 30) ** 2 + ((w - 80) / 25) ** 2) < 1
    cv.fill(spleen & abdomen, 45.0 + enhance, "soft_tissue")
    stomach = (((d - dome_l - 25) / 30) ** 2 + ((h + 10) / 35) ** 2 + ((w - 65) / 35) ** 2) < 1
    # supine: swallowed air floats anteriorly (small h) over the fluid, a horizontal level in the AP axis
    level = rng.uniform(-30, 5)
    cv.fill(stomach & abdomen & (h < level), -900.0, "gas")
    cv.fill(stomach & abdomen & (h >= level), 20.0, "soft_tissue")


def _lungs(ch: _Chest) -> None:
    """Both lungs, narrow at the apex, down to the diaphragm, with parenchymal texture and the supine
    gradient (the posterior, dependent lung is denser by a few tens of HU)."""
    rng, cv = ch.rng, ch.cv
    d, h, w = cv.d, cv.h, cv.w
    lungs = np.zeros(d.shape, bool)
    for side in (-1, 1):
        cw = side * rng.uniform(58, 72)
        aw, ah = rng.uniform(42, 55), rng.uniform(62, 80)
        grow = np.sqrt(np.clip((d - ch.apex) / 70.0, 0, 1))  # narrow apex
        shape = ((w - cw) / (aw * grow + 1e-3)) ** 2 + ((h - 8) / (ah * grow + 1e-3)) ** 2
        lungs |= (shape <= 1) & (d > ch.apex) & (d < ch.dia) & ch.muscle
    texture = ndimage.gaussian_filter(rng.normal(0, 1, d.shape).astype(np.float32), 1.2)
    texture *= 35.0 / (texture.std() + 1e-6)
    dependent = rng.uniform(20, 60) * np.clip((h + 60) / 160, 0, 1)
    parenchyma = (LUNG if ch.mat is None else ch.mat.lung) + texture + dependent
    cv.fill(lungs, parenchyma if ch.mat is None else np.maximum(parenchyma, AIR), "lung")  # never below air
    ch.lungs = lungs


def _heart_and_great_vessels(ch: _Chest) -> None:
    """The heart (myocardium around blood-filled chambers), the aorta and the pulmonary arteries to both
    hila. IV contrast (arterial phase) lifts the blood pool to 150-350 HU and leaves the myocardium dark."""
    rng, cv, fov, muscle = ch.rng, ch.cv, ch.fov, ch.muscle
    d, h, w = cv.d, cv.h, cv.w
    ch.blood = blood = rng.uniform(150, 350) if ch.sc.contrast else BLOOD
    hd, hh, hw = ch.dome_l - rng.uniform(35, 50), rng.uniform(-35, -20), rng.uniform(10, 30)
    ang = np.deg2rad(rng.uniform(20, 40))
    u = (w - hw) * np.cos(ang) + (h - hh) * np.sin(ang)
    v = -(w - hw) * np.sin(ang) + (h - hh) * np.cos(ang)
    sd, su, sv = rng.uniform(45, 55), rng.uniform(55, 68), rng.uniform(42, 50)
    heart = (d - hd) ** 2 / sd ** 2 + u ** 2 / su ** 2 + v ** 2 / sv ** 2 < 1
    wall = rng.uniform(8, 12)  # myocardium ~1 cm (left ventricle); the septum divides the two sides
    chambers = ((d - hd) ** 2 / (sd - wall) ** 2 + u ** 2 / (su - wall) ** 2 + v ** 2 / (sv - wall) ** 2 < 1) \
        & (np.abs(u - rng.uniform(-8, 8)) > 4.5)
    cv.fill(heart & muscle, SOFT + 10.0, "soft_tissue")
    cv.fill(chambers & muscle, blood, "heart_blood")
    ch.lungs &= ~heart
    ar = rng.uniform(11, 15)
    ch.arch_d = arch_d = ch.apex + rng.uniform(45, 60)
    aorta_pts = np.array([
        [hd - 30, -15, 8], [arch_d + 25, -18, 5], [arch_d, -5, 10], [arch_d + 3, 22, 22],
        [arch_d + 30, 38, 24], [ch.dome_l + 10, 42, 20], [fov / 2, 45, 15],
    ])
    cv.blend(cv.capsule_occupancy(*_polyline(aorta_pts, ar)), blood, "heart_blood", where=muscle)
    # Pulmonary trunk from the right ventricle's outflow, up and to the left, splitting to both hila.
    ch.hila = {side: np.array([hd - 45 + rng.uniform(-8, 8), 5 + rng.uniform(-5, 5), side * rng.uniform(28, 38)])
               for side in (-1, 1)}
    split = np.array([arch_d + rng.uniform(18, 28), rng.uniform(-12, -4), rng.uniform(8, 16)])
    pa0 = [np.array([hd - 25, hh - 8, hw - 10]), split, split]
    pa1 = [split, ch.hila[-1], ch.hila[1]]
    cv.blend(cv.capsule_occupancy(np.array(pa0), np.array(pa1), np.array([rng.uniform(11, 14), 9.0, 8.5])),
             blood, "heart_blood", where=muscle)
    ch.lungs &= cv.vol < -300  # the great vessels displace lung


def _lung_vessels_and_nodules(ch: _Chest) -> None:
    """Branching vessel trees from each hilum, and one to four nodules (some calcified) in the lungs."""
    rng, cv, grid = ch.rng, ch.cv, ch.grid
    d, h, w = cv.d, cv.h, cv.w
    segs = []
    for side in (-1, 1):
        for direction in ([-1.0, 0.1, side * 0.5], [0.9, 0.2, side * 0.5], [0.1, -0.3, side * 1.0],
                          [0.2, 0.8, side * 0.6], [-0.6, -0.5, side * 0.6], [0.6, -0.1, side * 0.9]):
            _vessel_tree(rng, ch.hila[side], np.array(direction) + rng.normal(0, 0.15, 3), rng.uniform(26, 36),
                         rng.uniform(3.5, 5.0), 7, segs)
    p0, p1, r = (np.array(x) for x in zip(*segs))
    cv.blend(cv.capsule_occupancy(p0, p1, r), ch.blood, "vessel", where=ch.lungs)
    lung_idx = np.argwhere(ndimage.binary_erosion(ch.lungs, iterations=3))
    centers_mm = grid.centers()
    for _ in range(rng.integers(1, 5)):
        if len(lung_idx) == 0:
            break
        c_pat = cv.to_patient(centers_mm[lung_idx[rng.integers(len(lung_idx))]])
        rad = rng.uniform(3, 10)
        hu = 300.0 if rng.random() < 0.15 else rng.uniform(20, 60)  # some nodules are calcified
        dist = np.sqrt((d - c_pat[0]) ** 2 + (h - c_pat[1]) ** 2 + (w - c_pat[2]) ** 2)
        occ = np.clip((rad - dist) / grid.spacing + 0.5, 0, 1).astype(np.float32)
        cv.blend(occ, hu, "nodule")


def _spine(ch: _Chest) -> None:
    """The spine: a kyphotic curve, vertebrae growing caudally with discs between, cortex and end plates,
    the canal, the posterior arch, pedicles and processes.

    Vertebral bodies widen and heighten from T1 to T12 (widths ~28 -> ~40 mm, heights ~15 -> ~23 mm:
    Panjabi et al., Spine 1991); normal thoracic kyphosis is a Cobb angle of about 20-45 degrees
    (Fon et al., Radiology 1980), drawn here as an arc whose sagitta is (chord/2) tan(angle/4).
    """
    rng, cv, fov = ch.rng, ch.cv, ch.fov
    d, h, w = cv.d, cv.h, cv.w
    ch.vr0 = vr0 = rng.uniform(16, 20)
    cobb = np.deg2rad(rng.uniform(20, 45))
    ch.sagitta = fov / 2 * np.tan(cobb / 4)
    ch.hs0 = ch.bh - ch.fat_t - rng.uniform(35, 45) - vr0 * 0.5
    height0, disc0 = rng.uniform(18, 21), rng.uniform(5, 7)
    starts, heights = [], []
    z = -fov / 2 - rng.uniform(0, height0 + disc0) - height0
    while z < fov / 2 + height0:
        starts.append(z)
        heights.append(height0 * ch.grow(z))
        z += (height0 + disc0) * ch.grow(z)
    starts, heights = np.array(starts), np.array(heights)
    k_of = np.clip(np.searchsorted(starts, d, side="right") - 1, 0, len(starts) - 1)
    pos, hk = d - starts[k_of], heights[k_of]
    in_body = pos < hk
    hs, vr = ch.spine_h(d), vr0 * ch.grow(d)
    jitter = rng.normal(0, 20)
    if ch.mat is None:
        ring = np.sqrt((h - hs) ** 2 + w ** 2)
        cv.fill((ring < vr) & ~in_body, DISC, "soft_tissue")
        cv.fill((ring < vr) & in_body, CANCELLOUS + jitter, "vertebra")
        cv.fill((ring < vr) & (ring >= vr - 2.5) & in_body, CORTICAL, "vertebra")
        cv.fill((ring < vr) & in_body & ((pos < 1.6) | (pos > hk - 1.6)), CORTICAL, "vertebra")  # end plates
    else:
        nxt = np.append(starts[1:], np.inf)[k_of]
        _vertebral_bodies(ch, hs, vr, np.where(in_body, np.minimum(pos, hk - pos), -np.minimum(pos - hk, nxt - d)))
    canal = np.sqrt((h - (hs + vr + 10)) ** 2 + w ** 2)
    posterior = 750.0 if ch.mat is None else ch.mat.mix(POSTERIOR_CORTEX)
    cv.fill((canal < 14) & (canal >= 8) & in_body, posterior, "vertebra")  # posterior arch (laminae)
    cv.fill(canal < 8, CSF, "soft_tissue")
    proc0, proc1, proc_r = [], [], []
    for z0, hz in zip(starts, heights):
        zc = z0 + hz / 2
        c_h, vz = float(ch.spine_h(zc) + vr0 * ch.grow(zc) + 10), float(vr0 * ch.grow(zc))
        proc0.append([zc, c_h + 12, 0]); proc1.append([zc + 18, c_h + 38, 0]); proc_r.append(4.0)  # spinous
        for s in (-1, 1):
            proc0.append([zc, c_h, s * 10]); proc1.append([zc - 3, c_h - 2, s * (26 + 0.45 * vz)]); proc_r.append(4.5)  # transverse
            proc0.append([zc, c_h - 14 - 0.3 * vz, s * 0.55 * vz]); proc1.append([zc, c_h - 4, s * 9]); proc_r.append(3.5)  # pedicle
    cv.blend(cv.capsule_occupancy(np.array(proc0), np.array(proc1), np.array(proc_r)),
             700.0 if ch.mat is None else ch.mat.mix(POSTERIOR_CORTEX), "vertebra", where=ch.muscle)


POSTERIOR_CORTEX = 0.1  # share of compact bone in laminae, pedicles and processes (thick cortex, little marrow)
BODY_WIDTH, BODY_DEPTH = 0.9, 0.8  # version 3 vertebral bodies: radii relative to the version-2 round body


def _vertebral_bodies(ch: _Chest, hs, vr, axial) -> None:
    """Version 3 vertebral bodies: elliptic (wider than deep), their back against the canal, cancellous
    bone inside a thin cortical shell and end plates, painted by partial-volume occupancy.

    ``hs``, ``vr``: the version-2 body's axis and radius at each voxel; ``axial``: signed distance (mm)
    to the nearest end plate (positive inside a body, negative in a disc)."""
    cv, mat, sp = ch.cv, ch.mat, ch.grid.spacing
    lat, ap = BODY_WIDTH * vr, BODY_DEPTH * BODY_WIDTH * vr
    dh, dw = ch.cv.h - (hs + vr - ap), ch.cv.w
    rn = np.sqrt((dh / ap) ** 2 + (dw / lat) ** 2)
    radial = np.hypot(dh, dw) * (1.0 / np.maximum(rn, 1e-6) - 1.0)  # along the ray from the axis to the edge

    def occupancy(inset):
        return np.clip(np.minimum(radial - inset, axial - inset) / sp + 0.5, 0, 1).astype(np.float32)

    cv.fill((rn < 1) & (axial <= 0), DISC, "soft_tissue")
    cv.blend(occupancy(0.0), mat.cortical, "vertebra")
    cv.blend(occupancy(mat.shell_mm), mat.cancellous, "vertebra")


def _airways(ch: _Chest) -> None:
    """Trachea to the carina, main and lobar bronchi, segmental branches; soft-tissue walls around air.

    Adult trachea ~15-20 mm across with a ~2 mm wall, carina at T4-T5 just below the aortic arch; the
    right main bronchus is short, wide and steep (~25 deg from the axis), the left long and oblique
    (~45 deg) (standard anatomy, e.g. Gray's Anatomy, 41st ed.).
    """
    rng, cv, fov = ch.rng, ch.cv, ch.fov

    def spine_front(dd):  # anterior surface of the vertebral bodies
        return ch.spine_h(dd) - ch.vr0 * ch.grow(dd)

    carina_d, carina_w, gap = ch.arch_d + rng.uniform(10, 20), rng.uniform(-6, 0), rng.uniform(12, 18)
    carina = np.array([carina_d, spine_front(carina_d) - gap, carina_w])
    tz = np.linspace(-fov / 2 - 10, carina_d, 5)  # the trachea keeps its distance in front of the spine
    trachea = np.stack([tz, spine_front(tz) - gap, np.linspace(carina_w + 3, carina_w, 5)], 1)
    air = [(a_, b_, r_) for a_, b_, r_ in zip(*_polyline(trachea, rng.uniform(8, 10)))]

    def branch(root, direction, length, radius):
        direction = np.asarray(direction, float) / np.linalg.norm(direction)
        end = root + direction * length
        air.append((root, end, radius))
        return end

    r_main = branch(carina, [np.cos(np.deg2rad(25)), 0.15, -np.sin(np.deg2rad(25))], rng.uniform(20, 28), 7.0)
    l_main = branch(carina, [np.cos(np.deg2rad(45)), 0.15, np.sin(np.deg2rad(45))], rng.uniform(40, 50), 6.0)
    lobar = [(r_main, [-0.5, 0.0, -1.0], 4.5)]  # right upper lobe
    inter = branch(r_main, [1.0, 0.15, -0.3], rng.uniform(20, 28), 5.0)  # bronchus intermedius
    lobar += [(inter, [0.5, -0.8, -0.4], 3.8), (inter, [1.0, 0.5, -0.2], 4.5),  # middle, lower
              (l_main, [-0.5, -0.3, 1.0], 4.5), (l_main, [1.0, 0.4, 0.3], 4.5)]  # left upper, lower
    for root, direction, radius in lobar:
        end = branch(root, direction, rng.uniform(12, 18), radius)
        segs_air = []
        _vessel_tree(rng, end, np.asarray(direction, float) + rng.normal(0, 0.2, 3), rng.uniform(18, 24),
                     radius * 0.75, 3, segs_air)
        air += segs_air
    a0, a1, ar_ = (np.array(x) for x in zip(*air))
    body_in = ch.muscle & ~((cv.labels == L["vertebra"]) | (cv.labels == L["heart_blood"]))
    wall_occ = cv.capsule_occupancy(a0, a1, ar_)
    cv.blend(wall_occ, SOFT, "soft_tissue", where=body_in)  # bronchial wall ~ soft tissue
    lumen_occ = cv.capsule_occupancy(a0, a1, np.maximum(ar_ - np.maximum(1.0, 0.2 * ar_), 0.4))
    cv.blend(lumen_occ, AIR, "airway", where=body_in)
    ch.lungs &= wall_occ < 0.5


def _ribs(ch: _Chest) -> None:
    """Twelve rib pairs (cortical shell over marrow) whose heads ride the spine, the upper seven joined to
    the sternum by costal cartilage."""
    rng, cv, fov = ch.rng, ch.cv, ch.fov
    spacing = rng.uniform(21, 26)
    drop = rng.uniform(30, 55)
    ew, eh = ch.bw - ch.fat_t - rng.uniform(8, 14), ch.bh - ch.fat_t - rng.uniform(8, 14)
    rib0, rib1, rib_r, cart0, cart1, cart_r = [], [], [], [], [], []
    for k in range(12):
        d0 = ch.apex + 8 + k * spacing
        t_end = np.pi * (0.92 if k < 7 else (0.75 if k < 10 else 0.5))
        rr = rng.uniform(3.0, 5.0)
        for side in (-1, 1):
            th = np.linspace(0.30, t_end, 18)
            pts = np.stack([
                d0 + drop * (th - th[0]) / (np.pi * 0.9 - th[0]) + rng.normal(0, 0.8, len(th)),
                eh * np.cos(th) + 2 + spine_offset(d0, ch.sagitta, fov) * (1 + np.cos(th)) / 2,  # heads ride the spine
                side * ew * np.sin(th) * np.clip(0.6 + 0.4 * th, 0, 1),
            ], 1)
            a, b, r = _polyline(pts, rr)
            rib0.append(a); rib1.append(b); rib_r.append(r)
            if k < 7:  # cartilage to the sternum
                end = pts[-1]
                tgt = np.array([end[0] + 8, -ch.bh + ch.fat_t + 10, side * 14])
                cart0.append(end[None]); cart1.append(tgt[None]); cart_r.append(np.array([rr]))
    mat = ch.mat
    cv.blend(cv.capsule_occupancy(np.concatenate(cart0), np.concatenate(cart1), np.concatenate(cart_r)),
             150.0 if mat is None else mat.cartilage, "soft_tissue")  # costal cartilage
    r0, r1, rr_all = np.concatenate(rib0), np.concatenate(rib1), np.concatenate(rib_r)
    cortex, marrow = rng.uniform(750, 950), rng.uniform(220, 350)
    cortex_mm = 1.5
    if mat is not None:
        cortex, marrow, cortex_mm = mat.cortical, mat.rib_marrow, mat.rib_cortex_mm
    cv.blend(cv.capsule_occupancy(r0, r1, rr_all), cortex, "rib")  # cortical shell ...
    cv.blend(cv.capsule_occupancy(r0, r1, np.maximum(rr_all - cortex_mm, 0.8)), marrow, "rib")  # ... marrow


def _shoulder_girdle_and_sternum(ch: _Chest) -> None:
    """The sternum (a wide manubrium, the body, a small xiphoid; inclined, its top deeper than its lower
    end), S-shaped clavicles and the scapulae on the back."""
    rng, cv, muscle = ch.rng, ch.cv, ch.muscle
    d, h, w = cv.d, cv.h, cv.w
    bh, fat_t, apex = ch.bh, ch.fat_t, ch.apex
    top = apex + rng.uniform(22, 32)  # jugular notch, at T2-T3, a few cm below the apex
    man, bot = top + rng.uniform(35, 45), ch.dome_l - 15
    front = -bh + fat_t + 2 + rng.uniform(6, 12) * np.clip((bot - d) / max(bot - top, 1.0), 0, 1)
    st_half = np.where(d < man, 24.0, 15.0)
    sternum = (np.abs(w) < st_half) & (h > front) & (h < front + 12) & (d > top) & (d < bot)
    mat = ch.mat
    cv.fill(sternum, 450.0 if mat is None else mat.mix(0.15), "other_bone")
    xiphoid = (np.abs(w) < 7) & (h > front) & (h < front + 6) & (d >= bot) & (d < bot + rng.uniform(20, 35))
    cv.fill(xiphoid & muscle, 250.0 if mat is None else mat.cartilage, "other_bone")
    clav0, clav1, clav_r = [], [], []
    for s in (-1, 1):
        # S-shaped: convex forward along its medial two thirds, concave where it turns back to the acromion
        wall = -bh + fat_t  # the anterior chest wall under the fat
        medial = apex + rng.uniform(18, 28)
        a, b, r = _polyline(np.array([[medial, wall + 14, s * 16], [medial - 4, wall + 6, s * 45],
                                      [0.5 * (medial + ch.shoulder_d) - 2, wall + 10, s * 80],
                                      [ch.shoulder_d + 4, -10, s * (ch.bw - 22)]]), 6.5)
        clav0.append(a); clav1.append(b); clav_r.append(r)
    clav0, clav1, clav_r = np.concatenate(clav0), np.concatenate(clav1), np.concatenate(clav_r)
    cv.blend(cv.capsule_occupancy(clav0, clav1, clav_r), 800.0 if mat is None else mat.cortical, "other_bone",
             where=muscle)
    if mat is not None:  # a tubular bone: marrow inside a ~2 mm cortex
        cv.blend(cv.capsule_occupancy(clav0, clav1, clav_r - 2.0), mat.cancellous, "other_bone", where=muscle)
    for s in (-1, 1):
        scap = (((d - apex - 45) / 65) ** 2 + ((w - s * 85) / 45) ** 2 < 1) & \
            (np.abs(h - (bh - fat_t - 14 - 0.15 * np.abs(w - s * 85))) < 3.5)
        cv.fill(scap & muscle, 700.0 if mat is None else mat.mix(POSTERIOR_CORTEX), "other_bone")


def _scan_effects(ch: _Chest) -> None:
    """What the scan adds or takes: ECG electrodes on the skin (snaps with a thin lead), and a shorter
    axial coverage, anywhere in the field, with no data (air) outside it."""
    rng, cv, fov, sc = ch.rng, ch.cv, ch.fov, ch.sc
    if sc.metal:
        m0, m1, mr = [], [], []
        for _ in range(int(rng.integers(3, 6))):
            dz, wz = rng.uniform(-60, 60), rng.uniform(-0.8, 0.8) * ch.bw
            hz = -ch.bh * np.sqrt(max(1e-3, 1 - (wz / ch.bw) ** 2)) - 3.0
            m0 += [[dz, hz, wz], [dz, hz - 1, wz]]
            m1 += [[dz, hz, wz], [dz + rng.uniform(-40, 40), hz - 4, wz + rng.uniform(-60, 60)]]
            mr += [2.5, 0.6]
        cv.blend(cv.capsule_occupancy(np.array(m0), np.array(m1), np.array(mr)), METAL, "metal")
    if sc.coverage_mm < fov:
        centre = rng.uniform(-(fov - sc.coverage_mm) / 2, (fov - sc.coverage_mm) / 2)
        outside = np.abs(ch.grid.centers() - centre) > sc.coverage_mm / 2  # along the scanner axis (array D)
        cv.vol[outside] = AIR
        cv.labels[outside] = L["background"]


# How many scans are contrast-enhanced, by phantom version (v3: most clinical chest CTs the tool is judged
# on are enhanced; 0.55 keeps unenhanced scans common enough to learn).
CONTRAST_SHARE = {2: 0.4, 3: 0.55}

# The anatomy in the order it is painted (a later structure overwrites an earlier one where it lies).
ANATOMY = (_body, _table, _abdomen, _lungs, _heart_and_great_vessels, _lung_vessels_and_nodules, _spine,
           _airways, _ribs, _shoulder_girdle_and_sternum, _scan_effects)


def chest_phantom(seed: int, size: int = 128, fov: float = FOV_MM, with_labels: bool = False,
                  scan: Scan | None = None, version: int = 3):
    """One chest CT phantom, ``(size, size, size)`` float32 in HU, array axes (D, H, W).

    Deterministic in ``seed``. ``size`` is the render resolution (2x the training target by default).
    ``scan`` fixes any of contrast / coverage / table shape / metal / arms (:class:`Scan`; unset fields
    are drawn). ``version`` 3 calibrates bone, fat, lung and the enhanced share (:class:`Materials`);
    version 2 reproduces the phantoms of datasets made before it, bit for bit. The body is painted by the :data:`ANATOMY` steps in turn. With ``with_labels`` returns
    ``(hu, labels)``: the :data:`LABELS` of every voxel, painted with the same geometry (a later
    structure overwrites an earlier one exactly where its HU does).
    """
    if version not in PHANTOM_VERSIONS:
        raise DataError(f"phantom version {version} is not one of {PHANTOM_VERSIONS}")
    rng = np.random.default_rng(seed)
    grid = Grid(size, fov)
    rot = _rotation(rng)
    shift = (0.0, rng.uniform(-10, 10), rng.uniform(-15, 15))  # position on the table: AP and left-right
    sc = (scan or Scan()).draw(rng, fov, contrast_share=CONTRAST_SHARE[version])
    ch = _Chest(rng, grid, _Canvas(grid, rot, shift), sc, Materials.draw(seed) if version >= 3 else None)
    for step in ANATOMY:
        step(ch)
    return (ch.cv.vol, ch.cv.labels) if with_labels else ch.cv.vol


# On a tie in a majority vote the structure you would look for (bone, nodule, vessel) wins over soft
# tissue, and tissue over air: a half-lung, half-wall voxel is ~ -400 HU, not lung-like.
TIE_ORDER = ("metal", "rib", "vertebra", "other_bone", "nodule", "vessel", "heart_blood", "soft_tissue", "fat", "table",
             "lung", "airway", "gas", "background")


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Majority vote of each ``factor^3`` block (ties broken by :data:`TIE_ORDER`): labels on the target grid
    that line up with the area-averaged CT."""
    if factor == 1:
        return labels.astype(np.uint8, copy=False)
    n = labels.shape[0] // factor
    blocks = labels[: n * factor, : n * factor, : n * factor].reshape(n, factor, n, factor, n, factor)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(n, n, n, -1)
    rank = {L[name]: len(TIE_ORDER) - i for i, name in enumerate(TIE_ORDER)}
    # count * (len + 1) + rank: the count decides, the rank only breaks ties
    score = np.stack([(blocks == k).sum(-1) * (len(TIE_ORDER) + 1) + rank[k] for k in sorted(LABELS)], axis=-1)
    return np.asarray(sorted(LABELS), np.uint8)[score.argmax(-1)]


def downsample_area(vol: np.ndarray, factor: int) -> np.ndarray:
    """Area (box) average of a cubic volume by an integer factor: the ground truth on the target grid."""
    if factor == 1:
        return vol.astype(np.float32, copy=False)
    n = vol.shape[0] // factor
    v = vol[: n * factor, : n * factor, : n * factor]
    return v.reshape(n, factor, n, factor, n, factor).mean(axis=(1, 3, 5)).astype(np.float32)
