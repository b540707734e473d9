"""Warm start for a refiner with the residual product: a model file trained with ``model.residual_fusion="views"``
becomes one with ``"views+product"`` that computes exactly the same volume (the new input channel enters the
stem and both injections with zero weights), ready for ``training.init_checkpoint``. ``--dc-weighting`` also
switches its SIRT steps (that one changes the output: fine-tuning adapts to it).

    python bench/widen_refiner.py pretrained:phantom-64-refiner runs/p64v3/init_product.pt --dc-weighting density

Checks the identity on random inputs (same DC weighting) and writes the file atomically; no uncertainty head is
carried over (re-fit it after fine-tuning: ``ctrefine fit-uncertainty``).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ctrefine.checkpoint import load_model_file, save_model_file
from ctrefine.models import build_refiner

GROWN = ("stem.0.weight", "inject1.weight", "inject2.weight")  # the convolutions that read the residual channels


def widen(src: str, dc_weighting: str | None):
    mf = load_model_file(src, stage="refine")
    if mf.config.model.residual_fusion != "views" or mf.config.model.reprojection == "off":
        raise SystemExit(f"{src}: not a refiner with per-view residuals only (residual_fusion views, re-projection on)")
    model = mf.config.model.model_copy(update={"residual_fusion": "views+product",
                                               **({"dc_weighting": dc_weighting} if dc_weighting else {})})
    cfg = mf.config.model_copy(update={"model": model})
    new = build_refiner(cfg)
    state = dict(mf.state_dict)
    for k in GROWN:  # (out, in, ...) -> one more input channel, last, with zero weights
        w = state[k]
        state[k] = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    new.load_state_dict(state)
    return mf, new.eval(), cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a refiner model file, or pretrained:NAME")
    p.add_argument("dst", help="the widened model file to write")
    p.add_argument("--dc-weighting", choices=("uniform", "density"), default=None, help="also switch the SIRT steps")
    a = p.parse_args(argv)
    mf, new, cfg = widen(a.src, a.dc_weighting)
    same_dc = a.dc_weighting in (None, mf.config.model.dc_weighting)
    v, s = cfg.model.volume_size, cfg.model.xray_size
    g = torch.Generator().manual_seed(0)
    coarse, xrays = torch.rand(2, 1, v, v, v, generator=g), torch.rand(2, 2, 1, s, s, generator=g)
    with torch.no_grad():
        old_out, new_out = mf.build()(coarse, xrays), new(coarse, xrays)
    diff = float((old_out - new_out).abs().max())
    if same_dc and diff > 1e-6:
        raise SystemExit(f"widened refiner differs from {a.src} by {diff:.2e}: not the identity")
    save_model_file(a.dst, "refine", new.state_dict(), cfg, metrics=mf.metrics)
    print(f"wrote {a.dst}: residual product added ({'identical output' if same_dc else 'SIRT weighting changed'}; "
          f"max |change| {diff:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
