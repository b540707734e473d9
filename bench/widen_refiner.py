"""Warm start for a larger refiner: a model file becomes one that also reads the two views' residual product
(``--product``: ``model.residual_fusion="views+product"``) and/or the chest-wall cue (``--wall-cue``:
``model.wall_cue="depth+detail"``), and/or has twice the U-Net's channels (``--double-width``:
``model.hidden_channels`` x2), and/or places its lifted radiograph features in depth (``--ray-placement``:
``model.guidance_depth="cross-view"``) or its back-projected re-projection residuals (``--residual-placement``:
``model.residual_weighting="learned"``), and/or reads both views' neighbourhoods together at each voxel
(``--crossing-reader``: ``model.guidance_crossing="mlp"``), and computes exactly the same volume, ready for
``training.init_checkpoint``. Every new input channel enters the convolutions that read it with zero weights;
each ray placement's logits start at zero (even weights along every ray: the plain lifting); the crossing reader's
last layer starts at zero. Doubling splits every hidden channel
into two copies (:func:`double_channels`). ``--dc-weighting`` also switches its SIRT steps; that one changes the
output, and fine-tuning adapts to it.

    python bench/widen_refiner.py pretrained:phantom-64-refiner runs/s17/init_wall.pt --wall-cue
    python bench/widen_refiner.py pretrained:phantom-64-refiner runs/s18/init_wide.pt --double-width
    python bench/widen_refiner.py pretrained:phantom-64-refiner runs/s24/init_place.pt --ray-placement
    python bench/widen_refiner.py pretrained:phantom-64-refiner runs/s25/init_rplace.pt --residual-placement
    python bench/widen_refiner.py pretrained:phantom-64-refiner runs/s27/init_cross.pt --crossing-reader

Checks the identity on random inputs (same DC weighting) and writes the file atomically; no uncertainty head is
carried over (re-fit it after fine-tuning: ``ctrefine fit-uncertainty``).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ctrefine.checkpoint import load_model_file, save_model_file
from ctrefine.models import build_refiner
from ctrefine.models.blocks import FrequencyAttention
from ctrefine.models.chest_wall import CHANNELS as WALL_CHANNELS

PRODUCT_READERS = ("stem.0.weight", "inject1.weight", "inject2.weight")  # the convolutions that read the residuals


def _zero_inputs(w: torch.Tensor, n: int, at: int | None = None) -> torch.Tensor:
    """``(out, in, ...)`` -> ``(out, in + n, ...)``: ``n`` more input channels with zero weights, inserted before
    input ``at`` (default: last)."""
    at = w.shape[1] if at is None else at
    return torch.cat([w[:, :at], torch.zeros_like(w[:, :1]).expand(-1, n, *w.shape[2:]), w[:, at:]], dim=1)


def double_channels(old: dict, new_shapes: dict, block: dict, seed: int = 0) -> dict:
    """A state dict for the same network with every hidden channel doubled (Net2Net's wider net): hidden channel
    ``k`` becomes channels ``2k`` and ``2k + 1``, copies with the same incoming weights and norm parameters; a layer
    reading them gives the first copy ``a`` and the second ``1 - a`` of the old weight (``a`` drawn in [0.3, 0.7]
    per input channel), so it sums to what it read before. Every group of a GroupNorm holds the copies of one old
    group's channels, or one copy of a one-channel old group (``blocks._groups``: 8 groups once a layer has 8
    channels), so its statistics are unchanged and the output is the same (the identity check in :func:`main`
    refuses a file for which it is not). The unequal split makes the two copies' gradients differ, so training can
    pull them apart.

    ``new_shapes``: name -> the doubled model's shape; ``block``: name -> how many consecutive output rows belong
    to one channel (a FrequencyAttention's per-channel band logits), 1 if absent."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in old.items():
        shape = tuple(new_shapes[name])
        if w.dim() and shape[0] == 2 * w.shape[0]:
            b = block.get(name, 1)
            w = w.reshape(w.shape[0] // b, b, *w.shape[1:]).repeat_interleave(2, dim=0).reshape(-1, *w.shape[1:])
        if w.dim() > 1 and shape[1] == 2 * w.shape[1]:
            a = (0.3 + 0.4 * torch.rand(w.shape[1], generator=g)).view(1, -1, *([1] * (w.dim() - 2)))
            w = torch.stack([a * w, (1 - a) * w], dim=2).flatten(1, 2)
        if tuple(w.shape) != shape:
            raise SystemExit(f"{name}: {tuple(old[name].shape)} does not double to {shape}")
        out[name] = w.to(old[name].dtype)
    return out


def widen(src: str, product: bool, wall_cue: bool, dc_weighting: str | None, double_width: bool = False,
          ray_placement: bool = False, residual_placement: bool = False, crossing_reader: bool = False):
    """``(the source model file, the widened model, its config)``; a SystemExit naming ``src`` when it cannot be."""
    mf = load_model_file(src, stage="refine")
    m = mf.config.model
    if m.reprojection == "off":
        raise SystemExit(f"{src}: a refiner without re-projection has no residuals to widen")
    if product and m.residual_fusion != "views":
        raise SystemExit(f"{src}: already reads the residual product")
    if wall_cue and m.wall_cue != "off":
        raise SystemExit(f"{src}: already reads the chest-wall cue")
    if ray_placement and (m.xray_guidance == "off" or m.guidance_depth != "along-rays"):
        raise SystemExit(f"{src}: has no lifted radiograph features to place, or places them already")
    if residual_placement and m.residual_weighting != "uniform":
        raise SystemExit(f"{src}: spreads its residual by {m.residual_weighting!r}, not evenly: nothing to place")
    if crossing_reader and (m.xray_guidance == "off" or m.guidance_crossing != "off"):
        raise SystemExit(f"{src}: has no radiograph guidance to read, or reads the crossings already")
    if (ray_placement or residual_placement or crossing_reader) and double_width:
        raise SystemExit("a placement or reader and --double-width: widen first, then add the module")
    if not (product or wall_cue or double_width or ray_placement or residual_placement or crossing_reader):
        raise SystemExit("nothing to add: give --product, --wall-cue, --double-width, --ray-placement, "
                         "--residual-placement and/or --crossing-reader")
    update = {**({"residual_fusion": "views+product"} if product else {}),
              **({"hidden_channels": 2 * m.hidden_channels} if double_width else {}),
              **({"wall_cue": "depth+detail"} if wall_cue else {}),
              **({"guidance_depth": "cross-view"} if ray_placement else {}),
              **({"residual_weighting": "learned"} if residual_placement else {}),
              **({"guidance_crossing": "mlp"} if crossing_reader else {}),
              **({"dc_weighting": dc_weighting} if dc_weighting else {})}
    cfg = mf.config.model_copy(update={"model": m.model_copy(update=update)})
    new = build_refiner(cfg)
    state = dict(mf.state_dict)
    # the stem reads [..., residuals, product, wall cue]: the product goes before a cue the file already has
    cue_inputs = WALL_CHANNELS if m.wall_cue != "off" else 0
    for k in PRODUCT_READERS if product else ():
        state[k] = _zero_inputs(state[k], 1, state[k].shape[1] - (cue_inputs if k == "stem.0.weight" else 0))
    if wall_cue:
        state["stem.0.weight"] = _zero_inputs(state["stem.0.weight"], WALL_CHANNELS)
    if double_width:
        bands = {f"{n}.cond.2.{p}": mod.n_bins for n, mod in new.named_modules() if isinstance(mod, FrequencyAttention)
                 for p in ("weight", "bias")}
        state = double_channels(state, {k: v.shape for k, v in new.state_dict().items()}, bands)
    added = ("guidance.place.",) * ray_placement + ("residual_place.",) * residual_placement \
        + ("guidance.crossing.",) * crossing_reader
    # the new modules' own parameters as initialised: zero logits, a zero last layer
    state.update({k: v for k, v in new.state_dict().items() if k.startswith(added)})
    new.load_state_dict(state)
    return mf, new.eval(), cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a refiner model file, or pretrained:NAME")
    p.add_argument("dst", help="the widened model file to write")
    p.add_argument("--product", action="store_true", help="add the two views' residual product")
    p.add_argument("--wall-cue", action="store_true", help="add the chest-wall cue (ctrefine.models.chest_wall)")
    p.add_argument("--double-width", action="store_true", help="twice the U-Net's channels (model.hidden_channels)")
    p.add_argument("--ray-placement", action="store_true",
                   help="place the lifted radiograph features in depth (ctrefine.models.ray_placement)")
    p.add_argument("--residual-placement", action="store_true",
                   help="place the back-projected re-projection residuals along their rays (model.residual_weighting)")
    p.add_argument("--crossing-reader", action="store_true",
                   help="read both views' neighbourhoods together at each voxel (ctrefine.models.crossing_reader)")
    p.add_argument("--dc-weighting", choices=("uniform", "density"), default=None, help="also switch the SIRT steps")
    a = p.parse_args(argv)
    mf, new, cfg = widen(a.src, a.product, a.wall_cue, a.dc_weighting, a.double_width, a.ray_placement,
                          a.residual_placement, a.crossing_reader)
    same_dc = a.dc_weighting in (None, mf.config.model.dc_weighting)
    v, s = cfg.model.volume_size, cfg.model.xray_size
    g = torch.Generator().manual_seed(0)
    coarse, xrays = torch.rand(2, 1, v, v, v, generator=g), torch.rand(2, 2, 1, s, s, generator=g)
    with torch.no_grad():
        old_out, new_out = mf.build()(coarse, xrays), new(coarse, xrays)
    diff = float((old_out - new_out).abs().max())
    # doubling re-associates every sum (a*w*x + (1-a)*w*x): float32 rounding through the network, ~1e-6
    if same_dc and diff > (1e-5 if a.double_width else 1e-6):
        raise SystemExit(f"widened refiner differs from {a.src} by {diff:.2e}: not the identity")
    save_model_file(a.dst, "refine", new.state_dict(), cfg, metrics=mf.metrics)
    added = " and ".join(n for n, on in (("residual product", a.product), ("chest-wall cue", a.wall_cue),
                                         (f"width {cfg.model.hidden_channels}", a.double_width),
                                         ("ray placement", a.ray_placement),
                                         ("residual placement", a.residual_placement),
                                         ("crossing reader", a.crossing_reader)) if on)
    print(f"wrote {a.dst}: {added} added ({'identical output' if same_dc else 'SIRT weighting changed'}; "
          f"max |change| {diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
