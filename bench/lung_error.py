"""Where the lung's squared error lies: at the lung's rim (beside which structure) or inside it, for the coarse
and the refined volumes of an inference folder (``ctrefine infer ... --output-dir DIR`` keeps each test
patient's ``ground_truth`` / ``coarse`` / ``refined.nii.gz``), with the label maps of the dataset it read.

    python bench/lung_error.py --results runs/eval --data runs/p64v3/data

Each lung voxel is assigned to the first structure (in the order below) found in its 3^3 neighbourhood, or to
"interior" when every neighbour is lung: ribs before soft tissue, so a lung voxel that touches both counts as
the rib's. Prints, per neighbour, the lung voxels, their share of the refined volume's lung error, the
refined / coarse error there and which way each stage is off there (mean truth − coarse and refined − coarse,
HU); and the lung error of the detail band alone (``ctrefine.stencil.highpass``) and of the rest (their shares
do not add up to 100 %: the two parts of an error are not orthogonal on a mask).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HU_PER_UNIT = 2500.0  # the volumes are read in HU / 2500 (model units: the squared errors compare with PSNR's)
NEIGHBOURS = ("rib", "vertebra", "other_bone", "vessel", "airway", "nodule", "heart_blood", "soft_tissue", "fat", "gas")


def _volume(path: Path) -> torch.Tensor:
    import nibabel as nib

    return torch.from_numpy(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))[None, None] / HU_PER_UNIT


def patient_sums(folder: Path, labels: torch.Tensor, ids: dict) -> dict:
    """Squared-error sums of one patient, ``STAGE/beside/NEIGHBOUR`` and ``STAGE/band/BAND``, the signed error
    sums ``STAGE/signed/NEIGHBOUR`` (model units), the voxel counts ``n/NEIGHBOUR`` and of them in the chest wall
    ``wall/NEIGHBOUR`` (``n/rib voxels``, ``wall/rib voxels``: the ribs themselves)."""
    from ctrefine.conventions import hu_to_model
    from ctrefine.anatomy import body_depth, chest_wall
    from ctrefine.stencil import highpass

    truth = _volume(folder / "ground_truth.nii.gz")
    lung = labels == ids["lung"]
    owner = torch.full_like(labels, -1)
    for name in NEIGHBOURS:
        if name in ids:
            near = F.max_pool3d((labels == ids[name]).float(), 3, 1, 1) > 0
            owner = torch.where(lung & near & (owner < 0), torch.full_like(owner, ids[name]), owner)
    groups = {"interior": lung & (owner < 0), **{n: lung & (owner == ids[n]) for n in NEIGHBOURS if n in ids}}
    out = {}
    volumes = {stage: _volume(folder / f"{stage}.nii.gz") for stage in ("coarse", "refined")}
    depth = body_depth(hu_to_model(HU_PER_UNIT * volumes["coarse"]))[1]
    wall = chest_wall(depth) > 0
    counted = {**groups, **({"rib voxels": labels == ids["rib"]} if "rib" in ids else {})}
    out.update({f"wall/{g}": float((m & wall).sum()) for g, m in counted.items()})
    out.update({f"n/{g}": float(m.sum()) for g, m in counted.items()})
    for stage, volume in volumes.items():
        err = volume - truth
        detail = highpass(err.double()).float()
        for g, m in groups.items():
            out[f"{stage}/beside/{g}"] = float((err ** 2 * m).sum())
            out[f"{stage}/signed/{g}"] = float((err * m).sum())
        out[f"{stage}/band/detail band"] = float((detail ** 2 * lung).sum())
        out[f"{stage}/band/below it"] = float(((err - detail) ** 2 * lung).sum())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="an infer --output-dir holding patient_*/ volumes")
    p.add_argument("--data", required=True, help="the dataset it evaluated (its label maps and dataset.json)")
    a = p.parse_args(argv)
    import nibabel as nib

    from ctrefine.data.dataset import read_labels

    index = Path(a.data) / "dataset.json"
    if not index.is_file():
        print(f"{index}: no dataset index (give --data the dataset folder the results were inferred from)",
              file=sys.stderr)
        return 2
    table = json.loads(index.read_text())["labels"]
    ids = {name: int(k) for k, name in table.items()}
    total: dict[str, float] = {}
    folders = sorted(Path(a.results).glob("patient_*/"))
    bare = [f for f in folders if not all((f / f"{v}.nii.gz").is_file() for v in ("ground_truth", "coarse", "refined"))]
    if bare:
        print(f"{bare[0]}: no ground_truth / coarse / refined .nii.gz (infer without --no-save-volumes keeps them)",
              file=sys.stderr)
        return 2
    for folder in folders:
        shape = nib.load(str(folder / "ground_truth.nii.gz")).shape  # the header only
        found = read_labels(Path(a.data) / folder.name, shape)
        if found is None:
            print(f"{Path(a.data) / folder.name}: no label map for {folder.name}", file=sys.stderr)
            return 2
        labels = torch.from_numpy(found.astype(np.int64))[None, None]
        for k, v in patient_sums(folder, labels, ids).items():
            total[k] = total.get(k, 0.0) + v
    if not folders:
        print(f"{a.results}: no patient_* folders with volumes", file=sys.stderr)
        return 2
    lung_refined = sum(v for k, v in total.items() if k.startswith("refined/beside/"))
    lung_coarse = sum(v for k, v in total.items() if k.startswith("coarse/beside/"))
    print(f"{len(folders)} patients; lung squared error refined / coarse {lung_refined / lung_coarse:.3f}")
    print(f"{'lung voxels beside':14s} {'voxels':>9s} {'share of refined':>17s} {'refined / coarse':>17s} "
          f"{'truth - coarse':>15s} {'refined - coarse':>17s}  (mean HU)")
    for g in ["interior", *NEIGHBOURS]:
        if n := total.get(f"n/{g}"):
            hu = {s: HU_PER_UNIT * total[f"{s}/signed/{g}"] / n for s in ("coarse", "refined")}
            print(f"{g:14s} {n:9.0f} {total[f'refined/beside/{g}'] / lung_refined:17.1%} "
                  f"{total[f'refined/beside/{g}'] / max(total[f'coarse/beside/{g}'], 1e-20):17.2f} "
                  f"{-hu['coarse']:15.1f} {hu['refined'] - hu['coarse']:17.1f}")
    wall = {g: total[f"wall/{g}"] / total[f"n/{g}"] for g in ("rib voxels", "rib", "interior") if total.get(f"n/{g}")}
    print("in the chest wall (the cue's gate): " + ", ".join(
        f"{'ribs themselves' if g == 'rib voxels' else 'lung beside ribs' if g == 'rib' else 'lung interior'} "
        f"{v:.1%}" for g, v in wall.items()))
    for band in ("detail band", "below it"):
        print(f"{band:14s} {'':9s} {total[f'refined/band/{band}'] / lung_refined:17.1%} "
              f"{total[f'refined/band/{band}'] / total[f'coarse/band/{band}']:17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
