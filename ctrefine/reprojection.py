"""Re-projection of a model-space volume into the two radiographs, and how well it explains them.

The refiner's one advantage over the base is the radiographs themselves (rendered from the
full-resolution anatomy). This module asks the question directly: *does this volume explain the
input radiographs?* It is used in four places, always through the same two functions:

* the ``xray_consistency`` loss term (:mod:`ctrefine.losses.registry`);
* the refiner's re-projection guidance: the residual "input radiograph minus the coarse volume's
  re-projection", back-projected along the very rays it came from (:class:`SliceProjector.backproject`),
  says where the coarse volume lacks or has too much attenuation;
* the safety gate and per-patient diagnostic of ``infer`` (:func:`xray_consistency`), which needs no
  ground truth;
* the refiner's data-consistency steps (:func:`sirt_step`): the residual, converted back to line
  integrals, spread back along its rays and normalised by ray length and ray count (one SIRT
  iteration). Parameter-free, two iterations of it lift the shipped 64^3 base's test PSNR by 0.3 dB
  (bench/RESULTS-history.md section 10); the refiner learns how far to take each step.

:class:`SliceProjector` is the dataset's cone-beam geometry (:mod:`ctrefine.data.projector`) written
as matrix products: slice ``k`` of the volume along a view's ray axis, seen from a point source, is
the slice magnified by ``(src - a_k) / src`` -- a separable bilinear resampling ``R_k X_k R_k^T`` --
and the radiograph is the sum over slices times the slice thickness and each ray's obliquity. No
``grid_sample``: the whole projector (and its adjoint) is two batched MatMuls per view, differentiable,
fast on CPU and exportable to ONNX like every other layer. It samples once per slice (at the slice
centre) where the reference renderer samples every half voxel; bench/RESULTS.md states the measured
difference.

Radiographs enter the networks normalised per image (:func:`ctrefine.conventions.normalize_xray`:
an affine map of the line integrals, clipped), so a re-projection is compared with them after the
per-image affine map that fits it best (:func:`fit_affine`). That removes exactly what the
normalisation removes (exposure, calibration) and keeps every structure.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conventions import FOV_MM, HU_MAX, HU_MIN, MU_WATER, SOURCE_ISOCENTER_MM

VIEWS = ("pa", "lateral")
# model space x in [0, 1] -> mu = MU_WATER * (1 + HU / 1000) = MU_PER_UNIT * x (linear: the window starts at air)
MU_PER_UNIT = MU_WATER * (HU_MAX - HU_MIN) / 1000.0


def _interp_matrix(coords_mm: torch.Tensor, n: int, fov_mm: float) -> torch.Tensor:
    """``(S, n)`` linear-interpolation weights sampling a length-``n`` row (voxel centres over ``fov_mm``)
    at ``coords_mm``; zero outside the field, as ``grid_sample(padding_mode="zeros", align_corners=False)``."""
    voxel = fov_mm / n
    p = (coords_mm + fov_mm / 2) / voxel - 0.5  # continuous voxel index
    i0 = torch.floor(p)
    w1 = p - i0
    m = torch.zeros(len(coords_mm), n, dtype=torch.float64)
    rows = torch.arange(len(coords_mm))
    for idx, w in ((i0, 1.0 - w1), (i0 + 1, w1)):
        ok = (idx >= 0) & (idx < n)
        m[rows[ok], idx[ok].long()] += w[ok]
    return m


class SliceProjector(nn.Module):
    """``volume (B, 1, N, N, N)`` in model space -> line integrals ``(B, 2, 1, S, S)`` (PA, lateral).

    ``geometry`` is ``"cone"`` (the datasets' default: point source ``SOURCE_ISOCENTER_MM`` from the
    isocentre, PA source posterior, lateral source on the patient's right) or ``"parallel"``.
    Images are indexed by the isocentre-plane coordinate, as in :mod:`ctrefine.data.projector`.
    """

    def __init__(self, volume_size: int, image_size: int | None = None, geometry: str = "cone",
                 fov_mm: float = FOV_MM, source_isocenter_mm: float = SOURCE_ISOCENTER_MM):
        super().__init__()
        if geometry not in ("cone", "parallel"):
            raise ValueError(f"geometry must be 'cone' or 'parallel', got {geometry!r}")
        n, s = volume_size, image_size or volume_size
        self.volume_size, self.image_size, self.geometry = n, s, geometry
        half, voxel = fov_mm / 2, fov_mm / n
        a = -half + (torch.arange(n, dtype=torch.float64) + 0.5) * voxel  # slice centres along the ray axis (mm)
        u = -half + (torch.arange(s, dtype=torch.float64) + 0.5) * (fov_mm / s)  # detector pixel centres (mm)
        rr, cc = torch.meshgrid(u, u, indexing="ij")
        r, w = [], []
        for src in (source_isocenter_mm, -source_isocenter_mm):  # PA source posterior, lateral on the right
            if geometry == "cone":
                scale = (src - a) / src  # magnification of the isocentre-plane offset at depth a
                stretch = torch.sqrt(1.0 + (rr**2 + cc**2) / src**2)  # oblique path length per unit depth
            else:
                scale, stretch = torch.ones(n, dtype=torch.float64), torch.ones_like(rr)
            r.append(torch.stack([_interp_matrix(u * k, n, fov_mm) for k in scale]))  # (N slices, S, N)
            w.append(stretch * voxel * MU_PER_UNIT)  # line integral of mu = sum over slices * thickness * obliquity
        # both views' slices stacked (PA's N, then the lateral's N): every product below is one batched MatMul
        r = torch.cat(r)
        self.register_buffer("r", r.float(), persistent=False)  # (2N, S, N)
        self.register_buffer("rt", r.transpose(1, 2).contiguous().float(), persistent=False)  # (2N, N, S)
        self.register_buffer("w", torch.stack(w)[:, None].float(), persistent=False)  # (2, 1, S, S)
        # SIRT normalisers: each ray's integral of a unit volume, and each voxel's summed back-projected weight
        self.register_buffer("ray_sum", self.forward(torch.ones(1, 1, n, n, n)).clamp_min(1e-6), persistent=False)
        self.register_buffer("voxel_sum", self.backproject(self.w[None]).sum(1, keepdim=True).clamp_min(1e-6),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves follow the module; dtype casts (DeepSpeed's bf16 mode casts every buffer) do not: the geometry
        stays float32, unrounded, so the products run in float32 in training as in inference."""
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1 or tuple(x.shape[-3:]) != (self.volume_size,) * 3:
            raise ValueError(f"expected a volume (B, 1, {self.volume_size}^3), got {tuple(x.shape)}")
        b, n, s = x.shape[0], self.volume_size, self.image_size
        v = x[:, 0].float()  # (B, D, H, W)
        # slices along each view's ray axis as (slice, row D, batch x column): PA slices H, lateral slices W
        sl = torch.cat([v.permute(2, 1, 0, 3), v.permute(3, 1, 0, 2)]).reshape(2 * n, n, b * n)
        img = (self.r @ sl).view(2 * n, s * b, n) @ self.rt  # (2N, S x B, S): each slice magnified onto the detector
        img = img.view(2, n, s, b, s).sum(1).permute(2, 0, 1, 3)  # sum over slices -> (B, 2, S, S)
        return (img * self.w[:, 0]).unsqueeze(2)

    def backproject(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 2, 1, S, S)`` -> ``(B, 2, N, N, N)``: each view's image spread back along its own rays
        (the projector's adjoint without the path-length weights: a pixel's value lands on every voxel
        its ray crosses, in proportion to the interpolation weights)."""
        b, n, s = images.shape[0], self.volume_size, self.image_size
        im = images[:, :, 0].float().permute(1, 2, 0, 3).reshape(2, s, b * s)  # (view, S, B x S)
        # every slice's rows at once: (2, N slices x D, S) @ (2, S, B x S), then each slice's own columns
        sl = (self.rt.view(2, n * n, s) @ im).view(2 * n, n * b, s) @ self.r  # (2N, D x B, N)
        sl = sl.view(2, n, n, b, n)  # (view, slice, D, B, other axis)
        return torch.stack([sl[0].permute(2, 1, 0, 3), sl[1].permute(2, 1, 3, 0)], dim=1)


def pool_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 2, 1, S, S)`` radiographs area-averaged to ``size``^2 (``S`` a multiple of ``size``)."""
    b, v, c, s, _ = images.shape
    if s == size:
        return images.float()
    if s % size:
        raise ValueError(f"radiograph side {s} is not a multiple of the re-projection size {size}")
    return F.avg_pool2d(images.float().reshape(b * v, c, s, s), s // size).reshape(b, v, c, size, size)


def _affine(proj: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a * proj + b, a)`` with the per-image ``(a, b)`` that best fits ``target`` in least squares."""
    p, t = proj.flatten(-2), target.flatten(-2)
    pm, tm = p.mean(-1, keepdim=True), t.mean(-1, keepdim=True)
    a = ((p - pm) * (t - tm)).mean(-1, keepdim=True) / ((p - pm) ** 2).mean(-1, keepdim=True).clamp_min(1e-12)
    return (a * (p - pm) + tm).view_as(proj), a.unsqueeze(-1)


def fit_affine(proj: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``a * proj + b`` with the per-image ``(a, b)`` that best fits ``target`` in least squares."""
    return _affine(proj, target)[0]


def xray_residual(projector: SliceProjector, volume: torch.Tensor, xrays: torch.Tensor) -> torch.Tensor:
    """Normalised input radiographs minus the fitted re-projection of ``volume``: ``(B, 2, 1, S, S)``,
    positive where the radiograph sees more attenuation than the volume has."""
    target = pool_to(xrays, projector.image_size)
    return target - fit_affine(projector(volume), target)


def backproject_residual(projector: SliceProjector, volume: torch.Tensor, xrays: torch.Tensor,
                         weighting: str = "uniform") -> torch.Tensor:
    """:func:`xray_residual` of ``volume`` spread back along the rays it came from, ``(B, 2, N, N, N)``.

    ``weighting="uniform"``: each ray's residual lands evenly on every voxel it crossed. ``"density"``: in
    proportion to the volume's own attenuation along the ray (as :func:`sirt_step`'s density weighting; a volume of
    ones gets the uniform spread exactly), so lung and air receive little of it and tissue most."""
    if weighting not in ("uniform", "density"):
        raise ValueError(f"weighting must be 'uniform' or 'density', got {weighting!r}")
    target = pool_to(xrays, projector.image_size)
    proj = projector(volume)
    residual = target - fit_affine(proj, target)
    if weighting == "uniform":
        return projector.backproject(residual)
    along = proj.clamp_min(1e-3 * projector.ray_sum)
    return volume.float() * projector.backproject(residual * projector.ray_sum / along)


def sirt_step(projector: SliceProjector, volume: torch.Tensor, xrays: torch.Tensor,
              weighting: str = "uniform") -> torch.Tensor:
    """One SIRT update ``(B, 1, N, N, N)`` (model-space units) towards explaining both radiographs.

    The residual is mapped back to line integrals with the fitted gain (normalised images carry no
    physical scale), divided by each ray's length, back-projected with the path weights of both views
    together, and divided by each voxel's total weight.

    ``weighting="uniform"`` spreads each ray's deficit evenly along it: a feature seen in one view lands
    at every depth of its ray (a streak across the lungs for a rib). ``"density"`` spreads it in
    proportion to the volume's own attenuation along the ray (the multiplicative, MLEM-like form: the
    deficit is divided by the ray's integral of ``volume`` instead of its length, and the back-projection
    multiplied by ``volume``), so air and lung receive little and tissue and bone most; both change each
    ray's integral by the same first-order amount.
    """
    if weighting not in ("uniform", "density"):
        raise ValueError(f"weighting must be 'uniform' or 'density', got {weighting!r}")
    target = pool_to(xrays, projector.image_size)
    proj = projector(volume)
    fitted, gain = _affine(proj, target)
    deficit = (target - fitted) / gain.clamp_min(1e-6)  # line integral the volume lacks along each ray
    if weighting == "uniform":
        back = projector.backproject(deficit / projector.ray_sum * projector.w).sum(1, keepdim=True)
        return back / projector.voxel_sum
    # the volume's own integral along each ray (ray_sum is that of a unit volume: a volume of ones gets the
    # uniform update exactly); floored so a ray through air does not divide by zero
    along = proj.clamp_min(1e-3 * projector.ray_sum)
    back = projector.backproject(deficit / along * projector.w).sum(1, keepdim=True)
    return volume.float() * back / projector.voxel_sum


def xray_consistency(projector: SliceProjector, volume: torch.Tensor, xrays: torch.Tensor) -> torch.Tensor:
    """Per-volume mean |residual| over both views (``(B,)``, in normalised radiograph units): how badly
    ``volume`` explains the radiographs. Needs no ground truth; the truth itself scores near zero."""
    return xray_residual(projector, volume, xrays).abs().flatten(1).mean(1)


def safety_gate(projector: SliceProjector, xrays: torch.Tensor, coarse: torch.Tensor, refined: torch.Tensor,
                enabled: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """The refined volume where it explains the radiographs at least as well as the coarse one, else the
    coarse volume; with one record per patient of both consistencies and whether the gate fell back.

    The refiner is trained to add detail the radiographs support. A refined volume that explains them
    *worse* than its own input has added something they contradict -- the case to distrust on a
    patient unlike the training set -- and needs no ground truth to detect. ``enabled=False`` records
    the same figures and never falls back.
    """
    with torch.no_grad():
        cc = xray_consistency(projector, coarse, xrays)
        cr = xray_consistency(projector, refined, xrays)
    fire = (cr > cc) & enabled
    out = torch.where(fire.view(-1, *([1] * (refined.dim() - 1))), coarse.to(refined.dtype), refined)
    return out, [{"xray_consistency_coarse": float(a), "xray_consistency_refined": float(b), "fell_back": bool(f)}
                 for a, b, f in zip(cc, cr, fire)]
