"""Models: the base reconstructor (stage 1), the DetailRefinementNetwork (stage 2), shared blocks.

:func:`build_models` is the one place a config's ``model`` section becomes modules.
"""
from __future__ import annotations


def build_base(cfg):
    """The :class:`~ctrefine.models.base.BaseReconstructor` a :class:`~ctrefine.config.Config` describes."""
    from .base import BaseReconstructor

    m = cfg.model
    return BaseReconstructor(m.volume_size, m.base_width)


def build_refiner(cfg):
    """The :class:`~ctrefine.models.refiner.DetailRefinementNetwork` a config describes."""
    from .refiner import DetailRefinementNetwork

    m = cfg.model
    return DetailRefinementNetwork(m.volume_size, m.hidden_channels, m.guidance_channels, m.freq_bins, m.mid_blocks,
                                   m.reprojection, m.data_consistency_steps, m.xray_guidance,
                                   m.dc_weighting, m.residual_fusion, m.wall_cue, m.guidance_depth,
                                   m.residual_weighting, m.guidance_crossing)


BUILDERS = {"base": build_base, "refine": build_refiner}


def build_models(cfg):
    """``(base, refiner)`` as the config's ``model`` section describes them."""
    return build_base(cfg), build_refiner(cfg)


def describe(cfg, name: str, verbose: bool = False) -> str:
    """``ctrefine info``: the parameter count of both models of a config (``verbose``: of each top-level part)."""
    m = cfg.model
    lines = [f"config: {name} -- volume {m.volume_size}^3, radiographs {m.xray_size}^2"]
    for label, model in zip(("base (BaseReconstructor)", "refiner (DetailRefinementNetwork)"), build_models(cfg)):
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"  {label:36s} {n:>12,d} parameters ({n / 1e6:.2f}M)")
        for child_name, child in (model.named_children() if verbose else ()):
            if k := sum(p.numel() for p in child.parameters()):
                lines.append(f"      {child_name:32s} {k:>12,d}")
    return "\n".join(lines)
