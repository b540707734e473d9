import numpy as np
import pytest
from scipy import ndimage

from ctrefine.data.phantoms import chest_phantom, downsample_area


@pytest.fixture(scope="module")
def vol():
    return chest_phantom(11)


def test_deterministic_per_seed(vol):
    assert np.array_equal(vol, chest_phantom(11))
    other = chest_phantom(12)
    assert np.abs(vol - other).mean() > 20.0


def test_shape_dtype_range(vol):
    assert vol.shape == (128, 128, 128) and vol.dtype == np.float32
    assert vol.min() == pytest.approx(-1000.0) and 600 < vol.max() <= 1000


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
