"""Transfer between phantom versions: every model pair on every test set, beside the mean baseline.

    python bench/transfer.py --pair old=runs/old/base.pt,runs/old/refiner.pt \
        --pair new=runs/p64v3/ship/base/best_model.pt,runs/p64v3/ship/refine/best_model.pt \
        --set "v2 test=runs/p64v2/data:test" --set "v3 test=runs/p64v3/data:test" \
        --set "v3 scan shift=runs/shift_v3/scan:all:runs/p64v3/data" --out runs/transfer

A set is ``NAME=DATASET:SPLIT[:BASELINE_DATASET]`` (the mean training volume comes from the set's own
dataset, or from BASELINE_DATASET for a set with no training split of its own, e.g. a shift set).
Each (pair, set) is one :func:`ctrefine.infer.evaluate_dataset` run (torch, safety gate on, no
volumes or figures kept); prints one markdown table and writes ``OUT/transfer.md`` + ``OUT/transfer.json``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ctrefine.infer import evaluate_dataset
from ctrefine.pipeline import TorchPredictor

COLUMNS = (("mean_psnr", "mean baseline"), ("coarse_psnr", "coarse"), ("refined_psnr", "refined"))
EXTRA = (("coarse_hf_psnr", "HF-PSNR coarse"), ("refined_hf_psnr", "HF-PSNR refined"),
         ("coarse_band_high", "band high coarse"), ("refined_band_high", "band high refined"),
         ("coarse_bone_dice", "bone Dice coarse"), ("refined_bone_dice", "bone Dice refined"),
         ("refined_dice_vertebra", "vertebra Dice refined"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", action="append", required=True, help="NAME=BASE.pt,REFINER.pt")
    p.add_argument("--set", action="append", required=True, help="NAME=DATASET:SPLIT[:BASELINE_DATASET]")
    p.add_argument("--out", required=True, help="folder for transfer.md and transfer.json")
    return p.parse_args(argv)


def row(summary: dict) -> dict:
    out = {"n": summary["num_patients"], "gain": summary["gain_db_mean"], "gain_std": summary["gain_db_std"],
           "wins": summary["refined_wins"]}
    for key, _ in COLUMNS + EXTRA:
        if f"{key}_mean" in summary:
            out[key] = summary[f"{key}_mean"]
    return out


def table(results: dict) -> str:
    head = ["pair", "set", "n"] + [label for _, label in COLUMNS] + ["refined - coarse", "wins"] + \
        [label for _, label in EXTRA]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (pair, name), r in results.items():
        cells = [pair, name, str(r["n"])] + [f"{r[k]:.2f}" if k in r else "-" for k, _ in COLUMNS]
        cells += [f"{r['gain']:+.2f} ± {r['gain_std']:.2f}", f"{r['wins']}/{r['n']}"]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k, _ in EXTRA]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse(argv)
    results = {}
    for pair in a.pair:
        name, _, files = pair.partition("=")
        base, refiner = files.split(",")
        pred = TorchPredictor(base, refiner, device="cpu")
        for spec in a.set:
            set_name, _, rest = spec.partition("=")
            data, split, *baseline = rest.split(":")
            with tempfile.TemporaryDirectory() as tmp:
                s = evaluate_dataset(pred, data, Path(tmp) / "r", split=split, save_volumes=False, progress=False,
                                     baseline_data=baseline[0] if baseline else None, figures=0)
            results[(name, set_name)] = row(s)
            print(f"{name} on {set_name}: coarse {s['coarse_psnr_mean']:.2f}, refined {s['refined_psnr_mean']:.2f}",
                  flush=True)
    text = table(results)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.md").write_text(text + "\n")
    (out / "transfer.json").write_text(json.dumps({f"{p} | {s}": r for (p, s), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
