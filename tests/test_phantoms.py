import numpy as np
import pytest
from scipy import ndimage

from ctrefine.data.phantoms import LABELS, METAL, Scan, chest_phantom, downsample_area

ID = {v: k for k, v in LABELS.items()}
MM = 320.0 / 128  # voxel size of a 128^3 phantom


@pytest.fixture(scope="module")
def vol():
    return chest_phantom(11)


def test_deterministic_per_seed(vol):
    assert np.array_equal(vol, chest_phantom(11))
    other = chest_phantom(12)
    assert np.abs(vol - other).mean() > 20.0


def test_shape_dtype_range(vol):
    assert vol.shape == (128, 128, 128) and vol.dtype == np.float32
    assert vol.min() == pytest.approx(-1000.0) and 600 < vol.max() <= METAL


def test_tissue_ordering(vol):
    air = vol[vol < -990]
    lung = vol[(vol > -950) & (vol < -700)]
    soft = vol[(vol > -20) & (vol < 100)]
    bone = vol[vol > 300]
    assert len(lung) > 10000 and len(soft) > 50000 and len(bone) > 2000 and len(air) > 0
    assert lung.mean() < soft.mean() < bone.mean()
    assert -900 < lung.mean() < -780  # lung parenchyma about -850 HU


def test_thin_structures_present(vol):
    """Ribs and other thin bone: bright voxels that a radius-2 opening removes."""
    bone = vol > 300
    ball = ndimage.generate_binary_structure(3, 1)
    ball = ndimage.iterate_structure(ball, 2)
    thick = ndimage.binary_opening(bone, structure=ball)
    thin = bone & ~thick
    assert thin.sum() > 0.3 * bone.sum()
    # Lung vessels: soft-tissue-density voxels surrounded by lung, removed by the same opening.
    vessels = (vol > -500) & (vol < 200)
    lungish = ndimage.binary_dilation(vol < -700, iterations=2)
    thin_vessels = vessels & lungish & ~ndimage.binary_opening(vessels, structure=ball)
    assert thin_vessels.sum() > 500


def test_downsample_area_mean_preserving(vol):
    small = downsample_area(vol, 2)
    assert small.shape == (64, 64, 64)
    assert small.mean() == pytest.approx(vol.mean(), rel=1e-5)
    assert small[0, 0, 0] == pytest.approx(vol[:2, :2, :2].mean())


# ---------------------------------------------------------------------------------- anatomy v2
@pytest.fixture(scope="module")
def plain():
    """A full-coverage, tableless, contrast-free, metal-free patient with its labels."""
    return chest_phantom(5, with_labels=True, scan=Scan(contrast=False, coverage_mm=320.0, table="none", metal=False))


def _coords(mask):
    return np.argwhere(mask).astype(float) * MM  # (N, 3) in mm: d, h, w


def test_ribs_descend_anteriorly(plain):
    """Ribs leave the spine posteriorly and run down as they come forward: d grows as h falls."""
    _, lab = plain
    comps, n = ndimage.label(lab == ID["rib"], structure=np.ones((3, 3, 3)))
    drops = []
    for k in range(1, n + 1):
        c = _coords(comps == k)
        if len(c) < 60:  # a fragment, not a rib
            continue
        post, ant = c[c[:, 1] >= np.percentile(c[:, 1], 85)], c[c[:, 1] <= np.percentile(c[:, 1], 15)]
        drops.append(ant[:, 0].mean() - post[:, 0].mean())
    assert len(drops) >= 12
    assert np.mean(np.array(drops) > 0) >= 0.8 and np.median(drops) > 15.0  # each rib's front end lies lower


def test_spine_is_kyphotic_and_grows_caudally(plain):
    _, lab = plain
    vert = lab == ID["vertebra"]
    rows = [(i * MM, _coords(vert[i:i + 1])) for i in range(8, 120) if vert[i].sum() > 40]
    z = np.array([r[0] for r in rows])
    front = np.array([np.percentile(r[1][:, 1], 5) for r in rows])  # anterior edge of the vertebral bodies
    a, b, _ = np.polyfit(z, front, 2)
    assert a < 0  # middle further back than both ends: a kyphotic arc (h grows posteriorly)
    sag = -a * (np.ptp(z) / 2) ** 2
    assert 3.0 < sag < 40.0, sag  # the drawn Cobb range (20-45 deg over the field) is 14-30 mm of sagitta
    width = np.array([np.ptp(r[1][np.abs(r[1][:, 1] - np.percentile(r[1][:, 1], 15)) < 6, 2]) for r in rows])
    assert width[-15:].mean() > 1.15 * width[:15].mean()  # lower vertebral bodies are wider


def test_airway_lumen_is_air_and_connected(plain):
    hu, lab = plain
    air = lab == ID["airway"]
    assert air.sum() > 500 and hu[air].mean() < -700
    comps, n = ndimage.label(air, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comps.ravel())[1:]
    assert sizes.max() >= 0.9 * air.sum()  # one tree, not fragments
    tree = comps == (sizes.argmax() + 1)
    top = np.argwhere(tree)[:, 0].min()
    assert top <= 2  # the trachea enters from the neck, at the top of the field
    assert np.ptp(np.argwhere(tree)[:, 2]) * MM > 60  # and the bronchi spread to both lungs


def test_contrast_lights_the_blood_pool_not_the_myocardium():
    on_hu, on = chest_phantom(6, with_labels=True, scan=Scan(contrast=True, table="none", metal=False))
    off_hu, off = chest_phantom(6, with_labels=True, scan=Scan(contrast=False, table="none", metal=False))
    assert on_hu[on == ID["heart_blood"]].mean() > 140 and off_hu[off == ID["heart_blood"]].mean() < 80
    # the myocardium (soft tissue next to the chambers) stays soft tissue in both
    ring = ndimage.binary_dilation(on == ID["heart_blood"], iterations=2) & (on == ID["soft_tissue"])
    assert 20 < np.median(on_hu[ring]) < 80


@pytest.mark.parametrize("coverage", [240.0, 280.0])
def test_short_coverage_leaves_air_outside_the_scan(coverage):
    hu, lab = chest_phantom(8, with_labels=True, scan=Scan(coverage_mm=coverage, table="none"))
    scanned = (hu > -999).any(axis=(1, 2))
    assert abs(scanned.sum() - coverage / MM) <= 1
    idx = np.flatnonzero(scanned)
    assert np.ptp(idx) + 1 == scanned.sum()  # one contiguous slab
    assert (lab[~scanned] == 0).all()


def test_scan_fields_are_honoured_and_drawn():
    hu, lab = chest_phantom(9, with_labels=True, scan=Scan(metal=True, table="curved", coverage_mm=320.0))
    assert (lab == ID["metal"]).sum() > 0 and hu.max() == pytest.approx(METAL, rel=0.05)
    assert (lab == ID["table"]).sum() > 0
    assert (chest_phantom(9, with_labels=True, scan=Scan(table="none"))[1] == ID["table"]).sum() == 0
    draws = [Scan().draw(np.random.default_rng(s), 320.0) for s in range(200)]
    assert 0.25 < np.mean([d.contrast for d in draws]) < 0.55
    assert 0.3 < np.mean([d.coverage_mm < 320.0 for d in draws]) < 0.7
    assert {d.table for d in draws} == {"flat", "curved", "none"} and 0 < np.mean([d.metal for d in draws]) < 0.2


@pytest.mark.parametrize("seed", [5, 7])
def test_neck_shoulders_and_arms(seed):
    """Top of the field: a neck narrower than the chest; raised arms beside it (each with its humerus);
    arms down: no arms beside the neck, but soft tissue reaching the field's lateral edges along the chest."""
    scans = {arms: chest_phantom(seed, with_labels=True, scan=Scan(arms=arms, coverage_mm=320.0, table="none",
                                                                    metal=False))[1] for arms in ("raised", "down")}

    def parts(lab, row):  # connected body cross-sections of one axial row, with their voxel counts
        comps, n = ndimage.label(lab[row] != ID["background"])
        return comps, [k for k in range(1, n + 1) if (comps == k).sum() > 30]

    def central_width(lab, row):
        comps, _ = parts(lab, row)
        return np.ptp(np.flatnonzero((comps == comps[64, 64]).any(0))) * MM

    up = scans["raised"]
    assert central_width(up, 2) < 0.6 * central_width(up, 64)  # neck vs chest
    comps, big = parts(up, 2)
    arms = [k for k in big if comps[64, 64] != k]
    assert len(arms) == 2 and all(((comps == k) & (up[2] == ID["other_bone"])).any() for k in arms)
    down = scans["down"]
    assert len(parts(down, 2)[1]) == 1
    def both_edges(lab):  # share of chest rows with tissue at both lateral edges of the field
        return np.mean([(lab[i][:, :2] != 0).any() and (lab[i][:, -2:] != 0).any() for i in range(40, 90)])

    assert both_edges(down) > 0.9 and both_edges(up) < 0.1
