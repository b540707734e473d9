"""A user's radiograph to the network input, one named step at a time (ctrefine.data.radiograph)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ctrefine.conventions import normalize_xray
from ctrefine.data.io import save_nifti
from ctrefine.data.radiograph import (RawRadiograph, load_radiograph, orient, prepare_radiographs, read_pixels,
                                      square_resize, to_attenuation, xray_affine)
from ctrefine.errors import DataError


def _chest_like(h=40, w=48, seed=0):
    """Line integrals: zero at the edges (air beside the body), up to ~3 in the middle, with a bright band."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    mu = np.clip(3.0 - ((x - w / 2) / (w / 3)) ** 2 * 3.0, 0, None) + 0.5 * (np.abs(y - h / 2) < 3)
    mu[:, :4] = 0.0
    return (mu + 0.01 * g.random((h, w)) * (mu > 0)).astype(np.float32)


def test_to_attenuation_inverts_raw_intensity():
    """``-log(I / I0)`` with I0 the brightest pixel (the unattenuated beam beside the body): back to the line
    integrals exactly, whatever the exposure."""
    mu = _chest_like()
    for i0 in (1.0, 4000.0):
        got = to_attenuation(i0 * np.exp(-mu), "raw", "intensity")
        np.testing.assert_allclose(got, mu, atol=1e-5)
    np.testing.assert_array_equal(to_attenuation(mu, "img"), mu)  # attenuation: as given
    np.testing.assert_allclose(to_attenuation(mu, "img", invert=True), mu.max() - mu)  # MONOCHROME1
    with pytest.raises(DataError, match="img: image is constant"):
        to_attenuation(np.ones((20, 20)), "img")
    with pytest.raises(ValueError, match="convention"):
        to_attenuation(mu, "img", "log")


def test_read_pixels_returns_what_is_stored(tmp_path):
    img = (np.arange(20 * 24).reshape(20, 24) * 50).astype(np.uint16)
    Image.fromarray(img).save(tmp_path / "a.png")
    raw = read_pixels(tmp_path / "a.png")
    assert raw.affine is None and not raw.invert and np.array_equal(raw.pixels, img)
    aff = xray_affine(2.0, "pa", 20)
    save_nifti(tmp_path / "a.nii.gz", img.astype(np.float32)[:, :20], aff)
    raw = read_pixels(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(raw.affine, aff)
    with pytest.raises(DataError, match="no such file"):
        read_pixels(tmp_path / "missing.png")


def test_orient_turns_a_nifti_as_displayed_and_leaves_images_alone():
    shown = _chest_like(32, 32)
    assert orient(RawRadiograph(shown), "a.png") is shown  # PNG / TIFF / DICOM: as displayed
    aff = xray_affine(5.0, "lateral", 32)
    flipped = aff.copy()
    flipped[:3, 0] *= -1  # rows stored running towards superior
    np.testing.assert_array_equal(orient(RawRadiograph(shown[::-1].copy(), flipped), "b.nii", "lateral"), shown)
    with pytest.raises(DataError, match="swapped"):
        orient(RawRadiograph(shown, aff), "b.nii", "pa")


def test_the_chain_is_the_steps(tmp_path):
    """load_radiograph is read -> orient -> to_attenuation; prepare_radiographs adds square_resize and the
    training normalisation, and gives an array the same answer as its file."""
    mu = _chest_like()
    x16 = np.round(mu / mu.max() * 60000).astype(np.uint16)
    Image.fromarray(x16).save(tmp_path / "pa.png")
    raw = read_pixels(tmp_path / "pa.png")
    step = to_attenuation(orient(raw, tmp_path / "pa.png", "pa"), tmp_path / "pa.png")
    np.testing.assert_array_equal(load_radiograph(tmp_path / "pa.png", view="pa"), step)
    x = prepare_radiographs(tmp_path / "pa.png", x16.astype(np.float32), 32)
    assert x.shape == (1, 2, 1, 32, 32)
    expect = normalize_xray(torch.from_numpy(square_resize(step, 32)))
    torch.testing.assert_close(x[0, 0, 0], expect)
    torch.testing.assert_close(x[0, 1, 0], expect)
