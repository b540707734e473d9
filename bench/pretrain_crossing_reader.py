"""Teach a refiner's crossing reader which crossings of the two views' vessel shadows hold a vessel, before fine-tuning.

The crossing reader (``ctrefine.models.crossing_reader``) reads only the two radiographs, so its vessel logit can be
trained alone, on the crossing voxels only: each view's 2D descriptors are computed once per patient and gathered
at the crossings' rays, which costs a fraction of a refiner step. A fine-tuning leg (~150 steps at 3e-4) moves a
fresh reader too little to learn this (its ``crossing_bce`` stays at ln 2); a few minutes here reach the evidence's
ceiling (``bench/ghost_ambiguity.py``). The loss is the ``crossing_bce`` term's (classes from the truth's
intensities, ``ctrefine.anatomy.vessel_crossings``, each class weighed half).

Only the reader's descriptors, hidden layer and vessel logit change; its output layer stays as it was (zero after
``bench/widen_refiner.py --crossing-reader``), so the refiner computes the same volume and a leg can start from the
file (``training.init_checkpoint``). Prints the logit's AUC (vessel vs ghost) on the test split after each epoch.

    python bench/widen_refiner.py pretrained:phantom-64-refiner runs/s27/init_cross2.pt --crossing-reader
    python bench/pretrain_crossing_reader.py runs/s27/init_cross2.pt runs/s27/init_taught.pt --data runs/p64v3/data
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ctrefine.anatomy import vessel_crossings
from ctrefine.checkpoint import load_model_file, save_model_file
from ctrefine.data.dataset import CTDataset
from ghost_ambiguity import auc  # bench/, beside this script


def patient_crossings(ds: CTDataset, i: int, guidance) -> dict:
    """One patient's reader inputs (each view's cues at the volume's size) and its crossings' indices and classes."""
    item = ds.load(i)
    size = item["ct"].shape[-1]
    cues = [F.adaptive_avg_pool2d(guidance.cues(item["xrays"][None, v].float()), size) for v in (0, 1)]
    vessel, ghost = (m[0, 0] > 0 for m in vessel_crossings(item["ct"][None].float()))
    idx = torch.cat([vessel.nonzero(), ghost.nonzero()])
    y = torch.cat([torch.ones(int(vessel.sum())), torch.zeros(int(ghost.sum()))])
    return {"pa": cues[0], "lateral": cues[1], "idx": idx, "y": y}


def logits(reader, p: dict) -> torch.Tensor:
    """The reader's vessel logit at the patient's crossing voxels (its 3D layers applied to those voxels only)."""
    d, h, w = p["idx"].T
    a = reader.describe["pa"](p["pa"])[0][:, d, w]  # (C, N): PA images are (D, W)
    b = reader.describe["lateral"](p["lateral"])[0][:, d, h]  # lateral (D, H)
    x = (a + b).T[:, :, None, None, None]  # (N, C, 1, 1, 1) for the 1x1x1 layers
    return reader.vessel(reader.read[:-1](x)).flatten()


def balanced_bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The crossing_bce term's form: each class's mean cross-entropy, averaged."""
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    return sum(bce[y == c].mean() for c in (0.0, 1.0) if (y == c).any()) / 2


def train(reader, train_set: list, test_set: list, epochs: int, lr: float, batch: int) -> None:
    params = [p for n, p in reader.named_parameters() if not n.startswith("read.3.")]  # the output layer stays
    opt = torch.optim.AdamW(params, lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        reader.train()
        order = torch.randperm(len(train_set), generator=g).tolist()
        for k in range(0, len(order), batch):
            loss = sum(balanced_bce(logits(reader, train_set[i]), train_set[i]["y"]) for i in order[k:k + batch])
            opt.zero_grad()
            (loss / len(order[k:k + batch])).backward()
            opt.step()
        reader.eval()
        with torch.no_grad():
            z = torch.cat([logits(reader, p) for p in test_set]).numpy()
        y = torch.cat([p["y"] for p in test_set]).numpy()
        print(f"epoch {epoch + 1}: test AUC vessel vs ghost {auc(z, y):.3f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a refiner model file with a crossing reader (bench/widen_refiner.py --crossing-reader)")
    p.add_argument("dst", help="the model file to write")
    p.add_argument("--data", type=Path, required=True, help="its training dataset (ctrefine make-data)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4, help="patients a step")
    a = p.parse_args(argv)
    mf = load_model_file(a.src, stage="refine")
    net = mf.build()
    reader = None if net.guidance is None else net.guidance.crossing
    if reader is None:
        raise SystemExit(f"{a.src}: has no crossing reader (bench/widen_refiner.py --crossing-reader adds one)")
    sets = {s: CTDataset(a.data, s, cache=False).nonempty(f"the {s} split") for s in ("train", "test")}
    with torch.no_grad():
        data = {s: [patient_crossings(ds, i, net.guidance) for i in range(len(ds))] for s, ds in sets.items()}
    before = {k: v.clone() for k, v in reader.read[-1].state_dict().items()}
    train(reader, data["train"], data["test"], a.epochs, a.lr, a.batch)
    assert all(torch.equal(v, reader.read[-1].state_dict()[k]) for k, v in before.items())  # the volume is unchanged
    save_model_file(a.dst, "refine", net.state_dict(), mf.config, metrics=mf.metrics)
    print(f"wrote {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
