"""Which part of the refiner moves each structure: its SIRT steps or its U-Net residual, on a dataset's test split;
and how precisely a correction must be placed to reach a given lung error (the blurred oracle).

    python bench/correction_split.py --base pretrained:phantom-64 --refiner pretrained:phantom-64-refiner \\
        --data runs/demo_data [--oracle-sigmas 1 1.5 2]

The refiner computes ``start = SIRT steps(coarse)`` then ``refined = clamp(start + residual(start))``. For the
voxels of each group -- the lung beside ribs, the lung beside soft tissue (no rib near), all of the lung, the ribs
-- prints the mean signed change in HU of the truth against the coarse volume (what is right), of the SIRT steps
(``start - coarse``), of the U-Net (``refined - start``) and of both (``refined - coarse``). A lung voxel is
"beside" a structure when one lies in its 3^3 neighbourhood (as in ``bench/lung_error.py``).

The blurred oracle: the ideal correction (truth - coarse) blurred by a Gaussian of ``sigma`` voxels, added to the
coarse volume -- every detail of the right size and sign, placed only to within ``sigma``. For each sigma, the
mean PSNR gain over the coarse volume and the lung's squared error against the coarse volume's, beside the
refiner's own: the sigma at which the oracle matches the refiner says how precisely the refiner places what it adds.
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
    coarse = model.base(xrays)
    return (coarse, *model.refiner.start_and_refined(coarse, xrays))


def walk(base: str, refiner: str, data: str):
    """``(truth, coarse, start, refined, groups)`` for each test patient of ``data``."""
    from ctrefine.data.dataset import CTDataset, DatasetHeader, read_labels
    from ctrefine.pipeline import load_two_stage

    model, _ = load_two_stage(base, refiner)
    ds = CTDataset(data, "test").nonempty("the correction split")
    table = DatasetHeader.read(data).labels
    if not table or not {"lung", "rib", "soft_tissue"} <= set(table.values()):
        raise SystemExit(f"{data}: its dataset.json names no lung, rib and soft-tissue labels "
                         "(a phantom dataset has them)")
    ids = {name: int(k) for k, name in table.items()}
    for i, name in enumerate(ds.names):
        item = ds[i]
        found = read_labels(ds.root / name, tuple(item["ct"].shape[1:]))
        if found is None:
            raise SystemExit(f"{ds.root / name}: no label map")
        yield (item["ct"][None], *stages(model, item["xrays"][None]),
               groups(torch.from_numpy(found.astype(np.int64))[None, None], ids))


def split(base: str, refiner: str, data: str) -> dict[str, dict]:
    """``{group: {"voxels": n, PART: mean HU}}`` over the test split of ``data``."""
    sums: dict[str, np.ndarray] = {}
    for truth, coarse, start, refined, masks in walk(base, refiner, data):
        for g, m in masks.items():
            s = sums.setdefault(g, np.zeros(1 + len(PARTS)))
            s += [float(m.sum()), *(float((d * m).sum()) for d in
                                    (truth - coarse, start - coarse, refined - start, refined - coarse))]
    return {g: {"voxels": int(s[0]), **{p: HU_PER_UNIT * v / max(s[0], 1) for p, v in zip(PARTS, s[1:])}}
            for g, s in sums.items()}


def blurred_oracle(base: str, refiner: str, data: str, sigmas) -> dict[str, dict]:
    """``{label: {"gain_db": mean PSNR gain over coarse, "lung_error": lung squared error / coarse's}}`` for the
    dataset's mean training volume (the trivial baseline), the refiner and the truth's correction blurred by each
    sigma (voxels)."""
    from ctrefine.conventions import hu_to_model
    from ctrefine.data.dataset import mean_volume
    from ctrefine.metrics import psnr
    from ctrefine.stencil import highpass

    mean = hu_to_model(torch.from_numpy(mean_volume(data)).float())[None, None]
    rows = {"mean training volume": [], "refiner": [], **{f"oracle, sigma {s:g}": [] for s in sigmas}}
    lung_coarse = 0.0
    for truth, coarse, _, refined, masks in walk(base, refiner, data):
        lung = masks["lung"]
        lung_coarse += float(((coarse - truth) ** 2 * lung).sum())
        ideal = (truth - coarse).double()
        # a Gaussian blur is x - highpass(x)
        blurred = {f"oracle, sigma {s:g}": coarse + (ideal - highpass(ideal, s)) for s in sigmas}
        candidates = {"mean training volume": mean, "refiner": refined, **blurred}
        for label, vol in candidates.items():
            vol = vol.float().clamp(0.0, 1.0)
            gain = float(psnr(vol, truth) - psnr(coarse, truth))
            rows[label].append((gain, float(((vol - truth) ** 2 * lung).sum())))
    return {k: {"gain_db": float(np.mean([g for g, _ in v])), "lung_error": sum(e for _, e in v) / lung_coarse}
            for k, v in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the base model file, or pretrained:NAME")
    p.add_argument("--refiner", required=True, help="the refiner model file, or pretrained:NAME")
    p.add_argument("--data", required=True, help="a dataset with label maps (its test split is read)")
    p.add_argument("--oracle-sigmas", type=float, nargs="*", default=[],
                   help="also the blurred oracle at these Gaussian widths (voxels)")
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
    if a.oracle_sigmas:
        print(f"\n{'placed to within':24s} {'gain (dB)':>10s} {'lung squared error / coarse':>28s}")
        for label, row in blurred_oracle(a.base, a.refiner, a.data, a.oracle_sigmas).items():
            print(f"{label:24s} {row['gain_db']:+10.3f} {row['lung_error']:28.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
