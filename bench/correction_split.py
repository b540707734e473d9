"""Which part of the refiner moves each structure: its SIRT steps or its U-Net residual, on a dataset's test split.

    python bench/correction_split.py --base pretrained:phantom-64 --refiner pretrained:phantom-64-refiner \\
        --data runs/demo_data

The refiner computes ``start = SIRT steps(coarse)`` then ``refined = clamp(start + residual(start))``. For the
voxels of each group -- the lung beside ribs, the lung beside soft tissue (no rib near), all of the lung, the ribs
-- prints the mean signed change in HU of the truth against the coarse volume (what is right), of the SIRT steps
(``start - coarse``), of the U-Net (``refined - start``) and of both (``refined - coarse``). A lung voxel is
"beside" a structure when one lies in its 3^3 neighbourhood (as in ``bench/lung_error.py``).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

HU_PER_UNIT = 2500.0
PARTS = ("truth - coarse", "SIRT steps", "U-Net residual", "refined - coarse")


def groups(labels: torch.Tensor, ids: dict) -> dict[str, torch.Tensor]:
    """The voxel groups of one label map ``(1, 1, D, H, W)``."""
    lung = labels == ids["lung"]
    near = {n: F.max_pool3d((labels == ids[n]).float(), 3, 1, 1) > 0 for n in ("rib", "soft_tissue")}
    return {"lung beside ribs": lung & near["rib"],
            "lung beside soft tissue": lung & near["soft_tissue"] & ~near["rib"],
            "lung": lung, "rib": labels == ids["rib"]}


@torch.no_grad()
def stages(model, xrays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coarse, start, refined)`` of one batch, the refiner's two parts apart."""
    from ctrefine.reprojection import pool_to

    coarse = model.base(xrays)
    r = model.refiner
    pooled = None if r.projector is None else pool_to(xrays, r.projector.image_size)
    start = r.data_consistency(coarse, xrays if pooled is None else pooled)
    return coarse, start, torch.clamp(start + r.residual(start, xrays, pooled), 0.0, 1.0)


def split(base: str, refiner: str, data: str) -> dict[str, dict]:
    """``{group: {"voxels": n, PART: mean HU}}`` over the test split of ``data``."""
    from ctrefine.data.dataset import CTDataset, DatasetHeader, read_labels
    from ctrefine.pipeline import load_two_stage

    model, _ = load_two_stage(base, refiner)
    ds = CTDataset(data, "test").nonempty("the correction split")
    table = DatasetHeader.read(data).labels
    if not table or not {"lung", "rib", "soft_tissue"} <= set(table.values()):
        raise SystemExit(f"{data}: its dataset.json names no lung, rib and soft-tissue labels "
                         "(a phantom dataset has them)")
    ids = {name: int(k) for k, name in table.items()}
    sums: dict[str, np.ndarray] = {}
    for i, name in enumerate(ds.names):
        item = ds[i]
        found = read_labels(ds.root / name, tuple(item["ct"].shape[1:]))
        if found is None:
            raise SystemExit(f"{ds.root / name}: no label map")
        coarse, start, refined = stages(model, item["xrays"][None])
        truth = item["ct"][None]
        for g, m in groups(torch.from_numpy(found.astype(np.int64))[None, None], ids).items():
            s = sums.setdefault(g, np.zeros(1 + len(PARTS)))
            s += [float(m.sum()), *(float((d * m).sum()) for d in
                                    (truth - coarse, start - coarse, refined - start, refined - coarse))]
    return {g: {"voxels": int(s[0]), **{p: HU_PER_UNIT * v / max(s[0], 1) for p, v in zip(PARTS, s[1:])}}
            for g, s in sums.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the base model file, or pretrained:NAME")
    p.add_argument("--refiner", required=True, help="the refiner model file, or pretrained:NAME")
    p.add_argument("--data", required=True, help="a dataset with label maps (its test split is read)")
    a = p.parse_args(argv)
    from ctrefine.errors import DataError

    try:
        table = split(a.base, a.refiner, a.data)
    except DataError as exc:  # a missing or damaged dataset or model file: one line, no traceback
        print(exc, file=sys.stderr)
        return 2
    print(f"{'mean change (HU)':24s} {'voxels':>8s} " + " ".join(f"{c:>16s}" for c in PARTS))
    for g, row in table.items():
        print(f"{g:24s} {row['voxels']:8d} " + " ".join(f"{row[c]:+16.1f}" for c in PARTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
