"""The uncertainty head: how far each voxel of a reconstruction may be off, from one cheap pass.

Input: the coarse volume and the answer (the refined volume, or the coarse one where the safety gate
fell back), model space ``(B, 1, D, H, W)``, and the two radiographs. Features: both volumes, the size
of the refiner's correction ``|answer - coarse|``, the answer's edge strength (a misplaced edge costs
its contrast), the voxel's position (the same anatomy sits in the same place: the mediastinum's vessels
and the airway are guessed, the lung field is not), and what the radiographs say of the answer: each
view's re-projection residual back-projected along its rays (where along which rays attenuation is
missing or in excess) and the answer's mean X-ray consistency (how well the whole volume explains its
radiographs: a patient the pipeline reads badly shows here). A full-resolution stem, three dilated
convolutions at half resolution (receptive field ~30 voxels), an upsampled skip, and a 1x1 output give
``log q``, the predicted ``quantile`` (0.9) of ``|answer - truth|``; trained with the pinball loss
(:func:`ctrefine.training.uncertainty_fit.train_head`), so a heavy-tailed error needs no Gaussian assumption.
The output is a standard deviation in model units, ``scale * q / z`` (``z`` the Gaussian quantile of
the central 90 % interval; ``scale`` fitted on validation patients), so ``+-1.645 sigma`` is the
central 90 % interval: the same as ``q`` after calibration.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reprojection import SliceProjector, pool_to, xray_residual
from ..stencil import gradient_magnitude3d

EDGE_GAIN = 4.0  # correction and edge strength are ~0.05 in model units at edges: scale them to O(0.2..1) inputs
INIT_Q = 0.03  # the untrained head predicts |error| 0.03 (75 HU) everywhere
DILATIONS = (1, 2, 4)  # of the half-resolution convolutions
RESIDUAL_GAIN = 25.0  # the re-projection residual is ~0.02 (normalised radiograph units): scale it to O(1)
FEATURES = 10  # coarse, answer, |correction|, edge strength, 3 coordinates, 2 back-projected residuals, consistency


def voxel_coordinates(like: torch.Tensor) -> torch.Tensor:
    """``(B, 3, D, H, W)`` voxel-centre positions in [-1, 1] along each axis of ``like``."""
    b, _, d, h, w = like.shape
    axes = [(torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) * (2.0 / n) - 1.0 for n in (d, h, w)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.unsqueeze(0).expand(b, 3, d, h, w)


def half_resolution(x: torch.Tensor) -> torch.Tensor:
    """2x2x2 average pooling. A channels-last input (the head in eager CPU) is pooled as the mean of its eight
    sub-grids: the same values, the layout kept, several times faster than PyTorch's CPU pooling of such a
    tensor (which returns NCDHW). Otherwise ``avg_pool3d``, which an exported graph's engine runs faster."""
    if x.is_contiguous():
        return F.avg_pool3d(x, 2)
    total = None
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                part = x[:, :, i::2, j::2, k::2]
                total = part if total is None else total + part
    return total * 0.125


class UncertaintyHead(nn.Module):
    """``(coarse, answer, radiographs) -> sigma`` in model units, ``(B, 1, D, H, W)``, always positive."""

    def __init__(self, volume_size: int, geometry: str = "cone", channels: int = 16,
                 dilations: tuple[int, ...] = DILATIONS, scale: float = 1.0, z: float = 1.6448536):
        super().__init__()
        self.projector = SliceProjector(volume_size, volume_size, geometry)  # no stored weights: geometry only
        self.stem = nn.Sequential(nn.Conv3d(FEATURES, channels, 3, padding=1), nn.GELU())
        layers: list[nn.Module] = []
        for d in dilations:
            layers += [nn.Conv3d(channels, channels, 3, padding=d, dilation=d), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv3d(channels, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, math.log(INIT_Q))
        self.register_buffer("scale", torch.tensor(float(scale)))  # fitted on validation patients
        self.z = z

    def xray_features(self, answer: torch.Tensor, xrays: torch.Tensor) -> torch.Tensor:
        """``(B, 3, D, H, W)``: each view's back-projected re-projection residual of ``answer`` and its mean
        |residual| (the X-ray consistency) everywhere, both scaled by :data:`RESIDUAL_GAIN`."""
        res = xray_residual(self.projector, answer.float(), pool_to(xrays, self.projector.image_size))
        consistency = res.abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1).expand(-1, 1, *answer.shape[-3:])
        return RESIDUAL_GAIN * torch.cat([self.projector.backproject(res), consistency], dim=1)

    def log_quantile(self, coarse: torch.Tensor, answer: torch.Tensor, xfeats: torch.Tensor,
                     coords: torch.Tensor | None = None):
        """Log of the predicted error quantile (model units) from :meth:`xray_features`; ``coords`` for
        crops of a larger volume (default: this volume's own voxel positions)."""
        feats = torch.cat([coarse, answer, EDGE_GAIN * (answer - coarse).abs(), EDGE_GAIN * gradient_magnitude3d(answer),
                           voxel_coordinates(answer) if coords is None else coords, xfeats], dim=1)
        if feats.device.type == "cpu" and not torch.compiler.is_exporting():
            # eager CPU: oneDNN's 3D convolutions, the stem ~2x faster channels-last (RESULTS §16); an exported
            # graph leaves the layout to its engine
            feats = feats.contiguous(memory_format=torch.channels_last_3d)
        s = self.stem(feats)
        h = self.body(half_resolution(s))
        # ``out`` is a 1x1 linear map and nearest up-sampling commutes with it, so out(s + up(h)) is
        # out(s) + up(W h): the 16-channel full-resolution up-sampling and sum are never formed
        return self.out(s) + F.interpolate(F.conv3d(h, self.out.weight), scale_factor=2.0, mode="nearest")

    def forward(self, coarse: torch.Tensor, answer: torch.Tensor, xrays: torch.Tensor) -> torch.Tensor:
        """Sigma (model units) of ``answer``; ``xrays`` the normalised ``(B, 2, 1, S, S)`` radiographs."""
        # |error| in model space is at most 1 (both volumes lie in [0, 1]): a larger quantile is an extrapolation
        q = torch.exp(self.log_quantile(coarse, answer, self.xray_features(answer, xrays)).clamp(max=0.0))
        return self.scale * q / self.z
