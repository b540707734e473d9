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
                                   m.reprojection, m.data_consistency_steps, m.xray_guidance)


BUILDERS = {"base": build_base, "refine": build_refiner}


def build_models(cfg):
    """``(base, refiner)`` as the config's ``model`` section describes them."""
    return build_base(cfg), build_refiner(cfg)
