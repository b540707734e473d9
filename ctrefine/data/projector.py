"""Digitally reconstructed radiographs (DRRs): Beer-Lambert line integrals of mu through a CT.

A radiograph here is the *attenuation image* ``p = integral of mu dl`` (dimensionless, bone bright,
air 0), i.e. ``-log(I/I0)`` of an ideal monochromatic acquisition. Two views, matching the tensor
convention of :mod:`ctrefine.conventions`:

* PA (view 0): rays travel along H from a source behind the patient (posterior) to a detector in
  front; the image is ``(D, W)``.
* lateral (view 1): rays travel along W from a source on the patient's right to a detector on the
  left; the image is ``(D, H)``.

Geometry
    ``cone`` (default) is the X2CT-GAN geometry: point source 541 mm from the isocenter, detector
    949 mm from the source. The detector is sized so that it covers the field of view *at the
    isocenter plane* (its pixel pitch is ``FOV/S * 949/541``); images are indexed by the isocenter-plane
    coordinate, so both geometries share pixel positions and only the ray directions differ.
    ``parallel`` uses rays parallel to the view axis.

Sampling
    Rays are sampled at equal steps of the coordinate along the view axis, at most half a voxel
    apart (midpoint rule), with trilinear interpolation of mu (``grid_sample``); each sample is
    weighted by the path length of the oblique ray per axial step, so the sum is the line
    integral over the ray's chord through the field of view. Outside the volume mu = 0 (air).
    Pure torch, batched, runs wherever the input tensor lives (CPU or CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..conventions import SOURCE_DETECTOR_MM, SOURCE_ISOCENTER_MM, hu_to_mu


@dataclass(frozen=True)
class Geometry:
    """Acquisition geometry. ``kind`` is 'cone' or 'parallel'; distances in mm."""

    kind: str = "cone"
    source_isocenter: float = SOURCE_ISOCENTER_MM
    source_detector: float = SOURCE_DETECTOR_MM

    def __post_init__(self):
        if self.kind not in ("cone", "parallel"):
            raise ValueError(f"geometry must be 'cone' or 'parallel', got {self.kind!r}")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "source_isocenter_mm": self.source_isocenter,
                "source_detector_mm": self.source_detector}


def project(mu: torch.Tensor, fov_mm: float, view: str, size: int = 128, geometry: Geometry = Geometry(),
            step_fraction: float = 0.5, chunk: int = 64) -> torch.Tensor:
    """Line integrals of ``mu`` (``(B, 1, N, N, N)``, mm^-1, cubic FOV of ``fov_mm``) for one view.

    Returns ``(B, 1, size, size)``: PA images are (D, W), lateral images are (D, H).
    ``step_fraction`` is the ray step in voxels (<= 0.5 keeps trilinear sampling honest);
    ``chunk`` bounds memory by integrating that many axial samples at a time.
    """
    if mu.dim() != 5 or mu.shape[1] != 1:
        raise ValueError(f"expected mu of shape (B, 1, D, H, W), got {tuple(mu.shape)}")
    if view not in ("pa", "lateral"):
        raise ValueError(f"view must be 'pa' or 'lateral', got {view!r}")
    n = mu.shape[-1]
    if not (mu.shape[-3] == mu.shape[-2] == n):
        raise ValueError(f"projector expects a cubic volume, got {tuple(mu.shape[-3:])}")
    b, dev = mu.shape[0], mu.device
    dtype = torch.float32
    half = fov_mm / 2.0
    voxel = fov_mm / n
    n_steps = int(torch.ceil(torch.tensor(fov_mm / (voxel * step_fraction))).item())
    dt = fov_mm / n_steps

    # Isocenter-plane detector coordinates (pixel centres): rows -> D, columns -> W (PA) or H (lateral).
    u = -half + (torch.arange(size, device=dev, dtype=dtype) + 0.5) * (fov_mm / size)
    row, col = torch.meshgrid(u, u, indexing="ij")

    # Source sits on the + side of the view axis for PA (posterior, +H) and on the - side for the
    # lateral view (patient's right, -W). For 'parallel' the offsets do not depend on depth.
    src = geometry.source_isocenter if view == "pa" else -geometry.source_isocenter
    out = torch.zeros(b, 1, size, size, device=dev, dtype=dtype)
    mu = mu.to(dtype)
    for s0 in range(0, n_steps, chunk):
        k = torch.arange(s0, min(n_steps, s0 + chunk), device=dev, dtype=dtype)
        a = -half + (k + 0.5) * dt  # axial coordinate of the samples along the view axis (mm)
        if geometry.kind == "cone":
            scale = ((src - a) / src).view(-1, 1, 1)  # magnification of the isocenter-plane offset at depth a
            # Oblique path length per axial step: |ray dir| / |axial component|.
            stretch = torch.sqrt(1.0 + (row**2 + col**2) / src**2)
        else:
            scale = torch.ones(len(k), 1, 1, device=dev, dtype=dtype)
            stretch = torch.ones_like(row)
        rd = row.unsqueeze(0) * scale  # (K, S, S) along D
        cd = col.unsqueeze(0) * scale  # along W (PA) or H (lateral)
        ax = a.view(-1, 1, 1).expand_as(rd)
        if view == "pa":
            dmm, hmm, wmm = rd, ax, cd
        else:
            dmm, hmm, wmm = rd, cd, ax
        # grid_sample wants (x, y, z) = (W, H, D) normalised to [-1, 1] at the FOV edges (align_corners=False).
        grid = torch.stack([wmm, hmm, dmm], dim=-1) / half
        grid = grid.unsqueeze(0).expand(b, -1, -1, -1, -1)
        samples = F.grid_sample(mu, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out += samples.sum(dim=2) * dt * stretch
    return out


def render_drrs(hu: torch.Tensor, fov_mm: float, size: int = 128, geometry: Geometry = Geometry()) -> torch.Tensor:
    """Both views of a HU volume ``(B, 1, N, N, N)`` -> ``(B, 2, 1, size, size)`` line integrals."""
    mu = hu_to_mu(hu.float())
    return torch.stack([project(mu, fov_mm, v, size, geometry) for v in ("pa", "lateral")], dim=1)
