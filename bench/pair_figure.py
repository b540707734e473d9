"""Two model pairs side by side on one test patient: pair A's coarse / refined, pair B's coarse / refined,
the truth -- axial, coronal and a sagittal slice through the spine -- with each volume's PSNR and
vertebra Dice in its title, so "the vertebrae are there" can be looked at as well as read.

    python bench/pair_figure.py --data runs/full/data \\
        --pair narrow pretrained:phantom-64 pretrained:phantom-64-refiner \\
        --pair full pretrained:phantom-64-full pretrained:phantom-64-full-refiner --out bench/figures/pairs.png

The patient is the test split's first unless ``--patient`` names one; the sagittal slice is the one
with the most vertebra voxels of the truth's label map (the spine's mid-plane).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ctrefine.conventions import model_to_hu
from ctrefine.data.dataset import CTDataset
from ctrefine.jsonio import read_json
from ctrefine.metrics import label_metrics, psnr
from ctrefine.pipeline import TorchPredictor
from ctrefine.viz import _pyplot, _save


def volumes(pairs, item) -> dict[str, np.ndarray]:
    """``{"A coarse": hu, "A refined": hu, ..., "truth": hu}`` for one patient."""
    out = {}
    x = item["xrays"][None]
    for name, base, refiner in pairs:
        coarse, refined = TorchPredictor(base, refiner, device="cpu")(x)
        out[f"{name} coarse"], out[f"{name} refined"] = coarse[0, 0], refined[0, 0]
    out["truth"] = item["ct"][0]
    return {k: model_to_hu(v.double().numpy()) for k, v in out.items()}


def draw(vols: dict[str, np.ndarray], labels: np.ndarray, table: dict, title: str, out: Path) -> None:
    plt = _pyplot()
    truth = vols["truth"]
    ids = {n: int(k) for k, n in table.items()}
    d, h, w = truth.shape
    sag = int(np.argmax((labels == ids["vertebra"]).sum(axis=(0, 1))))
    cuts = {"axial": lambda v: v[d // 2], "coronal": lambda v: v[:, h // 2], f"sagittal (W={sag})": lambda v: v[:, :, sag]}
    fig, axes = plt.subplots(3, len(vols), figsize=(3.0 * len(vols), 9.4))
    for c, (name, v) in enumerate(vols.items()):
        if name == "truth":
            head = "truth"
        else:
            m = label_metrics(v, truth, labels, table)
            p = float(psnr(torch.from_numpy((v + 1000) / 2500).clamp(0, 1), torch.from_numpy((truth + 1000) / 2500)))
            head = f"{name}\n{p:.2f} dB, vertebra Dice {m['dice_vertebra']:.2f}"
        for r, (plane, cut) in enumerate(cuts.items()):
            ax = axes[r, c]
            ax.imshow(cut(v), cmap="gray", vmin=-1000, vmax=1000)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(head, fontsize=9)
            if c == 0:
                ax.set_ylabel(plane)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.84, bottom=0.01, wspace=0.04, hspace=0.06)
    try:
        _save(fig, out, 90)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset with labels (its test split)")
    p.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "BASE", "REFINER"))
    p.add_argument("--patient", default=None, help="patient folder name (default: the test split's first)")
    p.add_argument("--out", required=True, help="output .png")
    a = p.parse_args(argv)
    ds = CTDataset(a.data, "test")
    if a.patient and a.patient not in ds.names:
        raise SystemExit(f"{a.data}: no patient {a.patient!r} in the test split")
    item = ds[ds.names.index(a.patient) if a.patient else 0]
    table = read_json(Path(a.data) / "dataset.json")["labels"]
    vols = volumes(a.pair, item)
    title = "\n".join([f"{item['name']}, test split of {a.data}; HU window -1000..1000"]
                      + [f"{n}: {Path(b).name if Path(b).exists() else b} + {Path(r).name if Path(r).exists() else r}"
                         for n, b, r in a.pair])
    draw(vols, item["labels"].numpy(), table, title, Path(a.out))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
