"""What the uncertainty head adds to one pipeline pass of a shipped (or given) pair, on this machine:
passes without and with the head interleaved, so drifting load hits both alike (batch 1).

    python bench/head_cost.py                      # pretrained:phantom-64 + pretrained:phantom-64-refiner
    python bench/head_cost.py --base B.pt --refiner R.pt --pairs 20
"""
from __future__ import annotations

import argparse

from fit_uncertainty import head_cost

from ctrefine import pretrained
from ctrefine.pipeline import TorchPredictor


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="pretrained:phantom-64")
    p.add_argument("--refiner", default="pretrained:phantom-64-refiner")
    p.add_argument("--pairs", type=int, default=12, help="interleaved passes without / with the head")
    a = p.parse_args(argv)
    pred = TorchPredictor(pretrained.resolve(a.base), pretrained.resolve(a.refiner), device="cpu")
    if pred.model.head is None:
        raise SystemExit(f"{a.refiner} has no uncertainty head")
    median, low, high = head_cost(pred.model, pred.xray_size, a.pairs)
    print(f"the uncertainty head adds {100 * median:.1f} % to one pipeline pass (median of {a.pairs} interleaved "
          f"pairs, range {100 * low:.1f} to {100 * high:.1f} %; batch 1, {pred.device})")


if __name__ == "__main__":
    main()
