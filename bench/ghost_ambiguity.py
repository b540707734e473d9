"""How well can two radiographs tell a lung vessel from a ghost? A ceiling for the hilar fan, beside the refiner.

Crossing voxels: lung voxels (labels lung, airway, vessel, nodule) where both the PA ray (along H) and the lateral
ray (along W) cross a truth vessel or nodule. Each is a vessel (on one, dilated by a voxel) or a ghost (the two
views' shadows cross there, no vessel does): ``ctrefine.anatomy.shadow_crossings``' set and its complement in
the crossings. A small MLP is trained on the training split's crossings to tell them apart from local evidence --
each radiograph's neighbourhood of the voxel's ray (2k+1 pixels square at the volume's size, and again at half
that size), the voxel's position and, with ``--coarse``, the coarse volume's 5^3 neighbourhood -- and its area
under the ROC curve on the test split is set beside the AUC of the refiner's own lift (refined - coarse) on the
same voxels (``--eval``: an ``infer`` result on the test split).

It also reports the mean probability the MLP gives vessels and ghosts: a refiner that predicted the expected
density from that evidence (what a squared error rewards) would lift ghosts by their ratio of its vessel lift; and
the share of the crossing vessels it could draw while drawing one ghost in ten (the true-positive rate at a 10 %
false-positive rate): what a refiner that keeps the fan away could keep of the vessels.

    python bench/ghost_ambiguity.py --data runs/p64v3/data --eval runs/s27/eval_ship
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from ctrefine.anatomy import shadow_crossings
from ctrefine.data.dataset import CTDataset, DatasetHeader
from ctrefine.data.phantoms import LABELS
from ctrefine.metrics import GHOST_LUNG, GHOST_SOURCES


def _load(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def _patches(img: torch.Tensor, k: int) -> torch.Tensor:
    """``(S, S) -> (S, S, (2k+1)^2)``: each pixel's neighbourhood (replicate padding)."""
    p = F.pad(img[None, None], (k, k, k, k), mode="replicate")
    return F.unfold(p, 2 * k + 1).reshape(-1, *img.shape).permute(1, 2, 0)


def crossings(labels: np.ndarray, table: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices (N, 3) of the crossing voxels, 1 on a vessel / 0 on a ghost)``; the lung and its vessels are the
    vessel ghost lift metric's (``ctrefine.metrics``: GHOST_LUNG, GHOST_SOURCES), named in ``table`` (label id ->
    name; default the phantoms'), and the ghosts :func:`ctrefine.anatomy.shadow_crossings`' set."""
    ids = {name: int(k) for k, name in (table or LABELS).items()}
    lung, ves = (np.isin(labels, [ids[n] for n in names if n in ids]) for names in (GHOST_LUNG, GHOST_SOURCES))
    cross = lung & ves.any(1, keepdims=True) & ves.any(2, keepdims=True)
    ghost = shadow_crossings(torch.from_numpy(ves), torch.from_numpy(lung)).numpy() > 0
    return np.argwhere(cross), (~ghost[cross]).astype(np.float32)


def features(xrays: torch.Tensor, idx: np.ndarray, k: int, coarse: np.ndarray | None) -> torch.Tensor:
    """Per crossing voxel: both views' neighbourhoods (at the volume's size and half of it), position, coarse."""
    size = coarse.shape[0] if coarse is not None else xrays.shape[-1] // 2
    d, h, w = (torch.from_numpy(idx[:, i]) for i in range(3))
    out = []
    for view, across in ((0, w), (1, h)):  # PA images are (D, W), lateral (D, H)
        img = F.adaptive_avg_pool2d(xrays[view][None, None], size)[0, 0]
        img = img - img.mean()
        half = F.avg_pool2d(img[None, None], 2)[0, 0]
        out += [_patches(img, k)[d, across], _patches(half, k)[d // 2, across // 2]]
    out.append(torch.from_numpy(idx).float() / size - 0.5)
    if coarse is not None:
        cp = F.pad(torch.from_numpy(coarse)[None, None], (2,) * 6, mode="replicate")[0, 0]
        off = torch.stack(torch.meshgrid(*(torch.arange(5),) * 3, indexing="ij"), -1).reshape(-1, 3)
        at = [torch.from_numpy(idx[:, i])[:, None] + off[None, :, i] for i in range(3)]
        out.append(cp[at[0], at[1], at[2]] / 1000.0)
    return torch.cat(out, 1)


def split_set(data: Path, split: str, k: int, coarse_dir: Path | None, limit: int | None = None):
    """``(features, labels, [(patient, indices)])`` over a split's patients."""
    ds = CTDataset(data, split, cache=False).nonempty(f"the {split} split")
    table = DatasetHeader.read(data).labels
    xs, ys, where = [], [], []
    for i, name in enumerate(ds.names[:limit]):
        idx, y = crossings(_load(data / name / "labels.nii.gz").astype(int), table)
        coarse = None if coarse_dir is None else _load(coarse_dir / name / "coarse.nii.gz")
        xs.append(features(ds.load(i)["xrays"][:, 0].float(), idx, k, coarse))
        ys.append(torch.from_numpy(y))
        where.append((name, idx))
    return torch.cat(xs), torch.cat(ys), where


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney), ``y`` 1 / 0; NaN without both classes."""
    if y.min() == y.max():
        return float("nan")
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at(score: np.ndarray, y: np.ndarray, fpr: float) -> float:
    """The share of positives scored above the threshold that passes ``fpr`` of the negatives."""
    return float((score[y == 1] > np.quantile(score[y == 0], 1 - fpr)).mean())


def train_mlp(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-3)
    for _ in range(epochs):
        net.train()
        for b in torch.randperm(len(y)).split(1024):
            loss = F.binary_cross_entropy_with_logits(net(x[b])[:, 0], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def refiner_lift(eval_dir: Path, where) -> np.ndarray:
    """The refiner's lift (refined - coarse, HU) at each test crossing voxel, in ``where``'s order."""
    out = []
    for name, idx in where:
        c, r = _load(eval_dir / name / "coarse.nii.gz"), _load(eval_dir / name / "refined.nii.gz")
        out.append((r - c)[tuple(idx.T)])
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a dataset with labels (ctrefine make-data)")
    p.add_argument("--eval", type=Path, required=True, help="an `ctrefine infer` result on its test split")
    p.add_argument("--coarse", type=Path, default=None,
                   help="an `infer` result on its training split: add the coarse volume's 5^3 neighbourhood")
    p.add_argument("--k", type=int, default=4, help="neighbourhood half-width in pixels (default 4: 9x9)")
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args(argv)
    if not (a.data / "splits.json").is_file():
        raise SystemExit(f"{a.data}: not a dataset (no splits.json)")
    xtr, ytr, _ = split_set(a.data, "train", a.k, a.coarse)
    xte, yte, where = split_set(a.data, "test", a.k, a.eval if a.coarse else None)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    net = train_mlp((xtr - mu) / sd, ytr, a.epochs)
    with torch.no_grad():
        prob = torch.sigmoid(net((xte - mu) / sd)[:, 0]).numpy()
    y = yte.numpy()
    lift = refiner_lift(a.eval, where)
    ves = y == 1
    print(json.dumps({
        "crossing_voxels": {"train": len(ytr), "test": len(y), "vessel_share": round(float(y.mean()), 3)},
        "auc": {"local_evidence_mlp": round(auc(prob, y), 3), "refiner_lift": round(auc(lift, y), 3)},
        "vessels_drawn_at_one_ghost_in_ten": {"local_evidence_mlp": round(tpr_at(prob, y, 0.1), 3),
                                              "refiner_lift": round(tpr_at(lift, y, 0.1), 3)},
        "mlp_probability": {"vessel": round(float(prob[ves].mean()), 3), "ghost": round(float(prob[~ves].mean()), 3)},
        "refiner_lift_hu": {"vessel": round(float(lift[ves].mean()), 1), "ghost": round(float(lift[~ves].mean()), 1)},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
