"""The re-projector (matrix-product cone beam), the X-ray consistency it measures, and the safety gate."""
import numpy as np
import pytest
import torch

from ctrefine.conventions import hu_to_model, hu_to_mu, model_to_hu, normalize_xray
from ctrefine.data.io import load_nifti
from ctrefine.data.projector import Geometry, project
from ctrefine.metrics import highpass
from ctrefine.reprojection import SliceProjector, fit_affine, safety_gate, xray_consistency, xray_residual


def _patient(root, name):
    ct, _ = load_nifti(root / name / "ct.nii.gz")
    xr = np.stack([load_nifti(root / name / f"xray_{v}.nii.gz")[0] for v in ("pa", "lateral")])
    return hu_to_model(torch.from_numpy(ct))[None, None], normalize_xray(torch.from_numpy(xr)[:, None])[None]


@pytest.mark.parametrize("geometry", ["cone", "parallel"])
def test_matches_the_reference_renderer(tiny_dataset, geometry):
    """Sampling once per slice instead of every half voxel moves a phantom's line integrals by < 0.5 %."""
    vol, _ = _patient(tiny_dataset, "patient_0000")
    ours = SliceProjector(32, 48, geometry)(vol)
    mu = hu_to_mu(model_to_hu(vol))
    ref = torch.stack([project(mu, 320.0, v, 48, Geometry(geometry)) for v in ("pa", "lateral")], dim=1)
    assert ours.shape == (1, 2, 1, 48, 48)
    assert ((ours - ref).abs().mean() / ref.abs().mean()).item() < 5e-3
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 3e-2


def test_backproject_is_the_adjoint_up_to_path_weights():
    p = SliceProjector(16, 16, "cone")
    a, b = torch.randn(2, 1, 16, 16, 16, dtype=torch.float32), torch.randn(2, 2, 1, 16, 16)
    w = p.w[None]  # (1, 2, 1, S, S): each view's path weights
    lhs = (p(a) * b).sum()
    rhs = (a[:, 0] * p.backproject(b * w).sum(1)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-4)


def test_consistency_ranks_truth_blur_and_another_patient(tiny_dataset):
    """The truth explains its own radiographs best; a blurred copy worse; another patient far worse."""
    p = SliceProjector(32, 32, "cone")
    vol, xr = _patient(tiny_dataset, "patient_0001")
    other, _ = _patient(tiny_dataset, "patient_0002")
    blurred = (vol - highpass(vol.double(), 1.5).float()).clamp(0, 1)
    c = {k: xray_consistency(p, v, xr).item() for k, v in (("truth", vol), ("blur", blurred), ("other", other))}
    assert c["truth"] < c["blur"] < c["other"]
    assert c["truth"] < 0.02  # normalised radiograph units: the 64^2 DRRs of the 64^3 render vs the 32^3 truth


def test_consistency_ignores_the_radiographs_exposure():
    """The per-image affine fit removes what normalisation removes: gain and offset of each image."""
    p = SliceProjector(16, 16, "parallel")
    vol = torch.rand(1, 1, 16, 16, 16)
    xr = p(vol)
    xr2 = torch.stack([3.0 * xr[:, 0] + 0.2, 0.5 * xr[:, 1] - 1.0], dim=1)
    assert xray_residual(p, vol, xr).abs().max() < 1e-4
    assert xray_residual(p, vol, xr2).abs().max() < 1e-4
    assert torch.allclose(fit_affine(xr, xr2), xr2, atol=1e-4)


def test_projector_computes_in_float32_in_a_bf16_model():
    p = SliceProjector(16, 16, "cone").to(torch.bfloat16)
    vol = torch.rand(1, 1, 16, 16, 16)
    ref = SliceProjector(16, 16, "cone")(vol)
    assert p(vol.bfloat16()).dtype == torch.float32
    assert ((p(vol.bfloat16()) - ref).abs().max() / ref.abs().max()).item() < 1e-2  # the input's and the weights' bf16 rounding


def test_safety_gate(tiny_dataset):
    p = SliceProjector(32, 32, "cone")
    vol, xr = _patient(tiny_dataset, "patient_0003")
    coarse = (vol - highpass(vol.double(), 1.0).float()).clamp(0, 1)
    better, worse = vol, coarse.clone()
    worse[..., 10:20, 10:20, 10:20] += 0.3  # attenuation the radiographs do not show
    vols = torch.cat([coarse, coarse]), torch.cat([better, worse])
    out, rec = safety_gate(p, torch.cat([xr, xr]), *vols)
    assert [r["fell_back"] for r in rec] == [False, True]
    assert torch.equal(out[0], better[0]) and torch.equal(out[1], coarse[0])
    assert rec[1]["xray_consistency_refined"] > rec[1]["xray_consistency_coarse"]
    out, rec = safety_gate(p, torch.cat([xr, xr]), *vols, enabled=False)
    assert not any(r["fell_back"] for r in rec) and torch.equal(out, vols[1])


def test_sirt_step_moves_a_blurred_volume_towards_the_truth(tiny_dataset):
    """One parameter-free step: the radiographs are explained better and the volume is closer to the truth."""
    from ctrefine.metrics import psnr
    from ctrefine.reprojection import sirt_step

    p = SliceProjector(32, 32, "cone")
    vol, xr = _patient(tiny_dataset, "patient_0004")
    blurred = (vol - highpass(vol.double(), 1.5).float()).clamp(0, 1)
    dimmed = 0.9 * blurred  # and too little attenuation overall: what the projections see best
    for start in (blurred, dimmed):
        for weighting in ("uniform", "density"):
            after = (start + sirt_step(p, start, xr, weighting)).clamp(0, 1)
            assert xray_consistency(p, after, xr) < 0.7 * xray_consistency(p, start, xr), weighting
            assert psnr(after, vol) > psnr(start, vol), weighting


def test_density_weighted_step_places_the_deficit_where_the_attenuation_is(tiny_dataset):
    """A volume of ones gets the uniform step exactly; on a patient, the density-weighted step puts a smaller
    share of its update into the lung and air (where a rib's deficit smeared along the ray would be wrong)."""
    from ctrefine.conventions import hu_to_model
    from ctrefine.reprojection import sirt_step

    p = SliceProjector(32, 32, "cone")
    vol, xr = _patient(tiny_dataset, "patient_0004")
    ones = torch.ones_like(vol)
    torch.testing.assert_close(sirt_step(p, ones, xr, "density"), sirt_step(p, ones, xr, "uniform"))
    start = 0.9 * vol
    low = start < float(hu_to_model(-500.0))  # air and lung
    share = {w: float(sirt_step(p, start, xr, w).abs()[low].sum() / sirt_step(p, start, xr, w).abs().sum())
             for w in ("uniform", "density")}
    assert share["density"] < 0.5 * share["uniform"], share
    with pytest.raises(ValueError, match="weighting"):
        sirt_step(p, start, xr, "random")


def test_density_weighted_residual_lands_where_the_attenuation_is(tiny_dataset):
    """backproject_residual: uniform is the plain back-projection of the residual; density gives a volume of ones
    the same, and on a patient puts a smaller share of the residual into the lung and air."""
    from ctrefine.reprojection import backproject_residual

    p = SliceProjector(32, 32, "cone")
    vol, xr = _patient(tiny_dataset, "patient_0004")
    start = 0.9 * vol
    torch.testing.assert_close(backproject_residual(p, start, xr), p.backproject(xray_residual(p, start, xr)))
    ones = torch.ones_like(vol)
    torch.testing.assert_close(backproject_residual(p, ones, xr, "density"), backproject_residual(p, ones, xr))
    low = (start < float(hu_to_model(-500.0))).expand(-1, 2, -1, -1, -1)  # air and lung
    share = {w: float(backproject_residual(p, start, xr, w).abs()[low].sum()
                      / backproject_residual(p, start, xr, w).abs().sum()) for w in ("uniform", "density")}
    assert share["density"] < 0.5 * share["uniform"], share
    with pytest.raises(ValueError, match="weighting"):
        backproject_residual(p, start, xr, "random")


@pytest.mark.parametrize("variant", [{}, {"dc_weighting": "density", "residual_fusion": "views+product"}])
def test_refiner_data_consistency_starts_as_the_identity_and_learns(variant):
    from ctrefine.models.refiner import DetailRefinementNetwork

    net = DetailRefinementNetwork(16, 8, 4, 4, 1, "cone", data_consistency_steps=2, **variant)
    assert net.stem[0].in_channels == 2 + 4 + (3 if variant else 2)  # coarse, high-pass, guidance, residuals
    c, x = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 2, 1, 32, 32)
    out = net(c, x)
    assert torch.equal(out, c)  # untrained: the coarse volume, bit for bit
    out.sum().backward()
    assert net.dc_step.grad.abs().min() > 0  # the step sizes receive gradient from the first step
    with pytest.raises(ValueError, match="need a re-projection geometry"):
        DetailRefinementNetwork(16, 8, 4, 4, 1, "off", data_consistency_steps=1)
