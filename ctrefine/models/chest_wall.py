"""Where ribs can be: cues that place the radiographs' rib detail in depth (issue "detail in place").

A rib's shadow on the PA radiograph says *at which height and width* a rib is, not where along the ray;
lifted along the ray, it paints a band across the lung. Ribs lie in the chest wall: on the demo's 13 test
patients 97 % of rib voxels are at most 7 erosions (35 mm) below the coarse volume's body outline,
against 34 % of the lung's interior -- but 93 % of the lung voxels beside ribs, so the wall says where along a
ray a rib can be, not which voxel of the wall it fills (``python bench/lung_error.py``, bench/RESULTS.md). The
refiner gets four channels computed from the coarse volume and the radiographs, without parameters:

1. ``depth``: how far inside the body each voxel is (erosions of the body outline survived, / the shell);
2. ``to_lung``: how far each voxel is from lung-dense tissue inside the body (dilations needed, / the shell);
3-4. each view's 2D high-pass back-projected along its rays and *gated to the chest wall* (less than the
     shell deep): the rib edges of the radiograph where ribs can be, and nowhere else.

The body outline, its depth, the chest wall and the lung-dense voxels come from :mod:`ctrefine.anatomy`.
Thresholds have no gradient, so all of it is computed without one, in float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..anatomy import body_depth, chest_wall, lung_dense, shell_voxels
from ..stencil import laplacian2d

DETAIL_GAIN = 8.0  # the radiographs' 2D Laplacian back-projected is ~0.1 at rib edges: scale it to O(1)
CHANNELS = 4


def _dilation_distance(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """How many 3^3 dilations of ``mask`` it takes to reach each voxel (0 inside), at most ``steps``."""
    dist, m = torch.zeros_like(mask), mask
    for _ in range(steps):
        dist = dist + (1.0 - m)
        m = F.max_pool3d(m, 3, 1, 1)
    return dist


class ChestWallCue(nn.Module):
    """``(volume (B,1,V,V,V), radiographs (B,2,1,V,V), projector) -> (B, 4, V, V, V)``; no parameters.

    ``projector``: the refiner's :class:`~ctrefine.reprojection.SliceProjector`, whose ``backproject``
    spreads each view's image back along its rays, so the gated detail lands in the acquisition's own
    cone-beam geometry."""

    @torch.no_grad()
    def forward(self, volume: torch.Tensor, pooled: torch.Tensor, projector) -> torch.Tensor:
        shell = shell_voxels(volume.shape[-1])
        inside, depth = body_depth(volume)
        to_lung = _dilation_distance(lung_dense(volume, inside), shell)
        wall = chest_wall(depth)
        b, views, c, n, _ = pooled.shape
        detail = laplacian2d(pooled.float().reshape(b * views, c, n, n)).reshape(pooled.shape)
        gated = DETAIL_GAIN * projector.backproject(detail) * wall
        return torch.cat([depth / shell, to_lung / shell, gated], dim=1).to(volume.dtype)
