"""Stage 1: the base reconstructor (dual-view X-rays -> coarse CT), trained first, then frozen.

Direct regression with geometry-aware lifting. Each view has its own 2D encoder producing a feature
pyramid at the 3D decoder's scales (volume/16 ... volume). At every scale the two views are lifted
along their own ray axes and fused (:func:`ctrefine.models.blocks.fuse_views`); the 3D decoder starts
at the coarsest fused scale and, like a U-Net, concatenates the fused features of each finer scale on
its way up. Output: sigmoid -> model space [0, 1].

Default width 32 gives 15.2M parameters for 64^3 volumes from 128^2 radiographs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ResBlock, Upsample2x, conv_norm_act, fuse_views

# Channel multipliers per scale, finest first (volume, /2, /4, /8, /16).
MULTS = (1, 2, 4, 6, 6)


class ViewEncoder(nn.Module):
    """2D encoder of one view: a feature map at every decoder scale, finest first."""

    def __init__(self, width: int, n_scales: int, in_ch: int = 1):
        super().__init__()
        chans = [width * m for m in MULTS[:n_scales]]
        self.stem = conv_norm_act(in_ch, chans[0], dim=2)
        self.stages = nn.ModuleList()
        prev = chans[0]
        for i, c in enumerate(chans):
            down = [] if i == 0 else [conv_norm_act(prev, c, dim=2, stride=2)]
            self.stages.append(nn.Sequential(*down, ResBlock(c, dim=2)))
            prev = c

    def forward(self, img: torch.Tensor, volume_size: int) -> list[torch.Tensor]:
        x = self.stem(img)
        if x.shape[-1] != volume_size:  # radiographs larger than the volume: average down to it
            x = F.adaptive_avg_pool2d(x, volume_size)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class BaseReconstructor(nn.Module):
    """``(B, 2, 1, S, S)`` PA + lateral radiographs -> ``(B, 1, V, V, V)`` coarse CT in [0, 1]."""

    def __init__(self, volume_size: int = 64, width: int = 32, n_scales: int = 5):
        super().__init__()
        if volume_size % 2 ** (n_scales - 1):
            raise ValueError(f"volume_size {volume_size} must be divisible by 2**(n_scales-1) = {2 ** (n_scales - 1)}")
        self.volume_size = volume_size
        chans = [width * m for m in MULTS[:n_scales]]
        self.enc_pa = ViewEncoder(width, n_scales)
        self.enc_lat = ViewEncoder(width, n_scales)
        self.fuse = nn.ModuleList(conv_norm_act(3 * c, c, dim=3, k=1) for c in chans)
        self.bottom = ResBlock(chans[-1])
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(n_scales - 1):
            c_fine, c_coarse = chans[i], chans[i + 1]
            self.up.append(conv_norm_act(c_coarse, c_fine, dim=3))
            self.merge.append(nn.Sequential(conv_norm_act(2 * c_fine, c_fine, dim=3), ResBlock(c_fine)))
        self.upsample = Upsample2x()
        self.head = nn.Conv3d(chans[0], 1, 1)

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:
        if xrays.dim() != 5 or xrays.shape[1:3] != (2, 1):
            raise ValueError(f"expected xrays (B, 2, 1, S, S), got {tuple(xrays.shape)}")
        v = self.volume_size
        fp = self.enc_pa(xrays[:, 0], v)
        fl = self.enc_lat(xrays[:, 1], v)
        fused = [f(fuse_views(a, b)) for f, a, b in zip(self.fuse, fp, fl)]
        x = self.bottom(fused[-1])
        for i in reversed(range(len(self.up))):
            x = self.upsample(x)
            x = self.merge[i](torch.cat([self.up[i](x), fused[i]], dim=1))
        return torch.sigmoid(self.head(x))
