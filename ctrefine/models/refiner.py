"""Stage 2: the DetailRefinementNetwork (coarse CT + the same X-rays -> refined CT).

    start = data_consistency(coarse)          (learned SIRT steps; identity at initialisation)
    refined = clamp(start + residual(start), 0, 1)

The data-consistency steps (:func:`ctrefine.reprojection.sirt_step`, ``model.data_consistency_steps``
of them, each with a learned step size that starts at 0) move the coarse volume towards explaining
the input radiographs -- parameter-free corrections the radiographs dictate. The residual comes
from a small 3D U-Net fed with four things about that starting volume (five with the chest-wall cue):

1. the coarse volume itself;
2. :class:`HighPassBranch` -- its fixed 3D Laplacian (``ctrefine.stencil``: 7-point, replicate
   padding; the same operator as the gradient loss and the Triton kernel), i.e. where the coarse
   volume already has edges;
3. :class:`XrayDetailGuidance` -- detail cues from each radiograph (the image and its 2D Laplacian),
   encoded in 2D, lifted along each view's ray axis and fused across views, i.e. where the radiographs
   say edges are that the coarse volume lacks; with ``guidance_depth="cross-view"`` each feature is placed
   along its ray by weights read from both views and the coarse volume (:mod:`~ctrefine.models.ray_placement`)
   instead of spread evenly; with ``guidance_crossing="mlp"`` both views' neighbourhoods are also read together
   at each voxel (:mod:`~ctrefine.models.crossing_reader`): a vessel, or two shadows crossing;
4. the re-projection residual (:mod:`ctrefine.reprojection`): each normalised input radiograph minus
   the fitted re-projection of the coarse volume, back-projected along the rays it came from, i.e.
   *how much* attenuation the coarse volume lacks or has in excess along each ray, in the acquisition's
   own cone-beam geometry. It enters at every scale of the U-Net (the stem, and a 1x1 injection at
   half and quarter resolution), so the guidance reaches the output by more than one path;
5. optionally (``wall_cue="depth+detail"``, :mod:`~ctrefine.models.chest_wall`) where the chest wall is --
   depth below the body outline, distance to the lung -- and each radiograph's rib edges back-projected
   and kept only there: where along a ray its rib detail can lie.

:class:`~ctrefine.models.blocks.FrequencyAttention` blocks at full and half resolution re-weight
frequency bands (magnitude only, phase preserved). The last convolution is zero-initialised, so an
untrained refiner returns the coarse volume bit-for-bit: training starts from the base's answer and
can only move away from it when that lowers the loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reprojection import SliceProjector, backproject_residual, pool_to, sirt_step
from ..stencil import laplacian2d, laplacian3d
from .blocks import FrequencyAttention, ResBlock, Upsample2x, conv_norm_act, fuse_views
from .chest_wall import CHANNELS as WALL_CHANNELS, ChestWallCue
from .crossing_reader import CrossingReader
from .ray_placement import RayPlacement

HIGHPASS_GAIN = 4.0  # Laplacian of a [0, 1] volume is small (|L| << 1 in soft tissue); scale it to O(1) inputs
# The coarse volume's re-projection residual is ~0.02 (mean |r|, normalised radiograph units, shipped 64^3 base,
# bench/RESULTS-history.md section 10); scale it to O(1) inputs.
RESIDUAL_GAIN = 25.0
# Step sizes are DC_STEP_SCALE * parameter: AdamW moves a parameter by about the learning rate per step, and the
# useful SIRT step is ~1.5 (bench/RESULTS-history.md section 10) -- unscaled, 12 epochs at lr 1e-3 would reach ~0.3.
DC_STEP_SCALE = 10.0


class HighPassBranch(nn.Module):
    """Fixed 3D Laplacian of the coarse volume (no parameters): where edges already are."""

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        return HIGHPASS_GAIN * laplacian3d(coarse)


class XrayDetailGuidance(nn.Module):
    """Per-view 2D detail encoders, lifted along each view's rays and fused across views; ``placement``:
    spread evenly along the rays (``"along-rays"``) or placed in depth from both views and the coarse volume
    (``"cross-view"``, :class:`~ctrefine.models.ray_placement.RayPlacement`); ``crossing="mlp"`` adds a per-voxel
    reading of both views' neighbourhoods together (:class:`~ctrefine.models.crossing_reader.CrossingReader`)."""

    def __init__(self, channels: int = 16, laplacian: bool = True, placement: str = "along-rays",
                 crossing: str = "off"):
        super().__init__()
        if placement not in ("along-rays", "cross-view"):
            raise ValueError(f"guidance_depth must be along-rays or cross-view, got {placement!r}")
        if crossing not in ("off", "mlp"):
            raise ValueError(f"guidance_crossing must be off or mlp, got {crossing!r}")
        self.place = RayPlacement(channels) if placement == "cross-view" else None
        self.laplacian = laplacian  # the 2D high-pass beside the image (off: the image alone, an ablation)
        cues = 2 if laplacian else 1
        self.crossing = CrossingReader(cues, channels) if crossing == "mlp" else None
        self.enc = nn.ModuleDict({v: nn.Sequential(conv_norm_act(cues, channels, 2), conv_norm_act(channels, channels, 2),
                                                   ResBlock(channels, dim=2)) for v in ("pa", "lateral")})
        self.fuse = conv_norm_act(3 * channels, channels, dim=3, k=1)

    def cues(self, img: torch.Tensor) -> torch.Tensor:
        """The image and its 2D high-pass (edges of ribs, vessels, nodules)."""
        return torch.cat([img, HIGHPASS_GAIN * laplacian2d(img)], dim=1) if self.laplacian else img

    def forward(self, xrays: torch.Tensor, volume_size: int, coarse: torch.Tensor,
                highpass: torch.Tensor) -> torch.Tensor:
        feats, cues = [], []
        for i, v in enumerate(("pa", "lateral")):
            c = self.cues(xrays[:, i])
            f = self.enc[v](c)
            if f.shape[-1] != volume_size:
                f = F.adaptive_avg_pool2d(f, volume_size)
            feats.append(f)
            if self.crossing is not None:
                cues.append(c if c.shape[-1] == volume_size else F.adaptive_avg_pool2d(c, volume_size))
        out = self.fuse(fuse_views(*feats) if self.place is None else self.place(*feats, coarse, highpass))
        return out if self.crossing is None else out + self.crossing(*cues)


class DetailRefinementNetwork(nn.Module):
    """``(coarse (B,1,V,V,V), xrays (B,2,1,S,S)) -> refined (B,1,V,V,V)`` in [0, 1]."""

    def __init__(self, volume_size: int = 64, hidden_channels: int = 64, guidance_channels: int = 16,
                 freq_bins: int = 16, mid_blocks: int = 4, reprojection: str = "cone", data_consistency_steps: int = 0,
                 xray_guidance: str = "image+laplacian", dc_weighting: str = "uniform", residual_fusion: str = "views",
                 wall_cue: str = "off", guidance_depth: str = "along-rays", residual_weighting: str = "uniform",
                 guidance_crossing: str = "off"):
        super().__init__()
        if volume_size % 4:
            raise ValueError(f"volume_size must be divisible by 4, got {volume_size}")
        h, v = hidden_channels, volume_size
        c0, c1, c2 = h // 2, h, 2 * h
        self.volume_size = v
        self.highpass = HighPassBranch()
        if xray_guidance not in ("image+laplacian", "image", "off"):
            raise ValueError(f"xray_guidance must be image+laplacian, image or off, got {xray_guidance!r}")
        # "off": no lifted radiograph cues at all (the re-projection residual still brings the radiographs in)
        self.guidance = None if xray_guidance == "off" else \
            XrayDetailGuidance(guidance_channels, xray_guidance == "image+laplacian", guidance_depth, guidance_crossing)
        g = 0 if self.guidance is None else guidance_channels
        # "off": no re-projection guidance (models trained before it existed, and the ablation)
        self.projector = None if reprojection == "off" else SliceProjector(v, v, reprojection)
        if data_consistency_steps and self.projector is None:
            raise ValueError("data-consistency steps need a re-projection geometry (reprojection='off')")
        # step sizes start at 0: the identity at initialisation (no parameter at all without steps: older files)
        self.dc_step = nn.Parameter(torch.zeros(data_consistency_steps)) if data_consistency_steps else None
        if dc_weighting not in ("uniform", "density"):
            raise ValueError(f"dc_weighting must be uniform or density, got {dc_weighting!r}")
        if residual_fusion not in ("views", "views+product"):
            raise ValueError(f"residual_fusion must be views or views+product, got {residual_fusion!r}")
        self.dc_weighting, self.residual_product = dc_weighting, residual_fusion == "views+product"
        if residual_weighting not in ("uniform", "density", "learned"):
            raise ValueError(f"residual_weighting must be uniform, density or learned, got {residual_weighting!r}")
        self.residual_weighting = residual_weighting  # how the re-projection residual is spread along its rays
        # "learned": spread evenly, then placed along each ray as the lifted features can be (one group per view)
        self.residual_place = RayPlacement(1, groups=1) \
            if residual_weighting == "learned" and self.projector is not None else None
        n_res = 0 if self.projector is None else 2 + self.residual_product
        if wall_cue not in ("off", "depth+detail"):
            raise ValueError(f"wall_cue must be off or depth+detail, got {wall_cue!r}")
        if wall_cue != "off" and self.projector is None:
            raise ValueError("the chest-wall cue needs a re-projection geometry (reprojection='off')")
        # no parameters: the cue channels enter the stem last (a model without them widens with zero weights)
        self.wall = ChestWallCue() if wall_cue != "off" else None
        n_wall = 0 if self.wall is None else WALL_CHANNELS
        self.stem = conv_norm_act(2 + g + n_res + n_wall, c0, 3)
        if n_res:
            self.inject1, self.inject2 = nn.Conv3d(n_res, c1, 1), nn.Conv3d(n_res, c2, 1)
        self.enc0 = nn.Sequential(ResBlock(c0), FrequencyAttention(c0, (v, v, v), freq_bins))
        self.down1 = conv_norm_act(c0, c1, 3, stride=2)
        self.enc1 = nn.Sequential(ResBlock(c1), FrequencyAttention(c1, (v // 2,) * 3, freq_bins))
        self.down2 = conv_norm_act(c1, c2, 3, stride=2)
        self.mid = nn.Sequential(*[ResBlock(c2) for _ in range(mid_blocks)])
        self.up1 = conv_norm_act(c2, c1, 3)
        self.dec1 = nn.Sequential(conv_norm_act(2 * c1, c1, 3), ResBlock(c1))
        self.up0 = conv_norm_act(c1, c0, 3)
        self.dec0 = nn.Sequential(conv_norm_act(2 * c0, c0, 3), ResBlock(c0))
        self.upsample = Upsample2x()
        self.head = nn.Conv3d(c0, 1, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # identity start: residual == 0 exactly
        nn.init.zeros_(self.head.bias)

    def data_consistency(self, coarse: torch.Tensor, xrays: torch.Tensor) -> torch.Tensor:
        """``coarse`` after the learned SIRT steps (float32 arithmetic; returned in ``coarse``'s dtype).
        ``xrays`` may already be at the re-projection size (:func:`pool_to`): then nothing is reduced again."""
        if self.dc_step is None:
            return coarse
        x = coarse.float()
        for step in self.dc_step:
            x = torch.clamp(x + DC_STEP_SCALE * step.float() * sirt_step(self.projector, x, xrays,
                                                                                   self.dc_weighting), 0.0, 1.0)
        return x.to(coarse.dtype)

    def reprojection_guidance(self, coarse: torch.Tensor, xrays: torch.Tensor,
                              highpass: torch.Tensor) -> list[torch.Tensor]:
        """Each view's re-projection residual of ``coarse`` back along its rays, ``(B, 2, V, V, V)`` at full,
        half and quarter resolution (computed in float32: CPU pooling has no bf16 kernel); with
        ``residual_fusion="views+product"`` a third channel, the two back-projections' product. A PA ray and
        a lateral ray at the same height cross at one voxel, so the product is large only where *both* views
        miss attenuation: where along each ray the deficit lies, which neither view says alone. With
        ``residual_weighting="learned"`` each view's even spread is then placed along its rays
        (:class:`~ctrefine.models.ray_placement.RayPlacement`, reading ``coarse`` and its ``highpass``)."""
        learned = self.residual_place is not None
        bp = RESIDUAL_GAIN * backproject_residual(self.projector, coarse.float(), xrays,
                                                  "uniform" if learned else self.residual_weighting)
        if learned:
            placed = self.residual_place.place_lifted(bp[:, :1].to(coarse.dtype), bp[:, 1:].to(coarse.dtype),
                                                      coarse, highpass)
            bp = torch.cat(placed, dim=1).float()
        if self.residual_product:
            bp = torch.cat([bp, bp[:, :1] * bp[:, 1:]], dim=1)
        return [v.to(coarse.dtype) for v in (bp, F.avg_pool3d(bp, 2), F.avg_pool3d(bp, 4))]

    def residual(self, coarse: torch.Tensor, xrays: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The correction of ``coarse``; ``pooled``: the radiographs at the re-projection size, if at hand."""
        inputs = [coarse, self.highpass(coarse)]
        if self.guidance is not None:
            inputs.append(self.guidance(xrays, self.volume_size, *inputs))
        if pooled is None and self.projector is not None:
            pooled = pool_to(xrays, self.projector.image_size)
        bp = None if self.projector is None else self.reprojection_guidance(coarse, pooled, inputs[1])
        if bp is not None:
            inputs.append(bp[0])
        if self.wall is not None:
            inputs.append(self.wall(coarse, pooled, self.projector))
        x0 = self.enc0(self.stem(torch.cat(inputs, dim=1)))
        x1 = self.down1(x0)
        if bp is not None:
            x1 = x1 + self.inject1(bp[1])
        x1 = self.enc1(x1)
        x = self.down2(x1)
        if bp is not None:
            x = x + self.inject2(bp[2])
        x = self.mid(x)
        x = self.up1(self.upsample(x))
        x = self.dec1(torch.cat([x, x1], dim=1))
        x = self.up0(self.upsample(x))
        x = self.dec0(torch.cat([x, x0], dim=1))
        return self.head(x)

    def placement_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ray placement's weights of the last forward pass in training mode (for the ``placement`` loss
        term); None in eval mode or without a placement."""
        places = (None if self.guidance is None else self.guidance.place, self.residual_place)
        found = [p.last_weights for p in places if p is not None and p.last_weights is not None]
        # both placements learn the same thing (where along each ray the missing detail lies): one set of groups
        return tuple(torch.cat(views, dim=1) for views in zip(*found)) if found else None

    def crossing_logits(self) -> torch.Tensor | None:
        """The crossing reader's vessel logits ``(B, 1, D, H, W)`` of the last forward pass in training mode (for the
        ``crossing_bce`` loss term); None in eval mode or without a reader."""
        reader = None if self.guidance is None else self.guidance.crossing
        return None if reader is None else reader.last_logits

    def start_and_refined(self, coarse: torch.Tensor, xrays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(start, refined)``: the coarse volume after the SIRT steps, and the refiner's output from it."""
        # the radiographs at the re-projection size, reduced once for every SIRT step and the guidance
        pooled = None if self.projector is None else pool_to(xrays, self.projector.image_size)
        start = self.data_consistency(coarse, xrays if pooled is None else pooled)
        return start, torch.clamp(start + self.residual(start, xrays, pooled).to(start.dtype), 0.0, 1.0)

    def forward(self, coarse: torch.Tensor, xrays: torch.Tensor) -> torch.Tensor:
        if coarse.dim() != 5 or coarse.shape[1] != 1 or coarse.shape[-1] != self.volume_size:
            raise ValueError(f"expected coarse (B, 1, {self.volume_size}^3), got {tuple(coarse.shape)}")
        if xrays.dim() != 5 or xrays.shape[1:3] != (2, 1):
            raise ValueError(f"expected xrays (B, 2, 1, S, S), got {tuple(xrays.shape)}")
        return self.start_and_refined(coarse, xrays)[1]
