"""Where does the refined volume have detail that the coarse one lacks? A figure that points at it.

For one test patient: the improvement map ``|coarse - truth| - |refined - truth|`` (3^3-averaged) is
searched inside the bone boundary band and inside the vessel label (the phantom's label map) for the
places where the refiner moved the volume most towards the truth; each of them gets a row of close-up
axial crops (truth, coarse, refined, improvement) with the spot circled and its local error before and
after. The same search also reports the places where the refiner moved *away* from the truth most, so
the picture cannot only show the good side.

    python bench/detail_figure.py --data runs/p64/data --base-checkpoint pretrained:phantom-64 \\
        --refinement-checkpoint runs/abl/guided/refine/best_model.pt --out bench/figures/detail_64.png

Prints one line per spot (label, position, local mean |error| coarse -> refined) and writes the PNG.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

CROP = 14  # half-width of each close-up, voxels (70 mm at 5 mm voxels)
SPOTS = 3  # spots per structure
MIN_APART = 8  # voxels between two spots of one structure


def _spots(score: np.ndarray, mask: np.ndarray, n: int, largest: bool) -> list[tuple[int, int, int]]:
    s = np.where(mask, score if largest else -score, -np.inf)
    out = []
    for idx in np.argsort(s, axis=None)[::-1]:
        p = np.unravel_index(idx, s.shape)
        if not np.isfinite(s[p]) or len(out) == n:
            break
        if all(max(abs(a - b) for a, b in zip(p, q)) >= MIN_APART for q in out):
            out.append(tuple(int(x) for x in p))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--base-checkpoint", required=True)
    p.add_argument("--refinement-checkpoint", required=True)
    p.add_argument("--patient", default=None, help="test patient (default: the one with the largest PSNR gain)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    from ctrefine.data.dataset import CTDataset
    from ctrefine.jsonio import read_json
    from ctrefine.metrics import psnr
    from ctrefine.outputs import atomic_file
    from ctrefine.pipeline import load_two_stage

    model, _ = load_two_stage(a.base_checkpoint, a.refinement_checkpoint)
    ds = CTDataset(a.data, "test")
    ids = {name: int(k) for k, name in read_json(ds.root / "dataset.json")["labels"].items()}
    items = [ds[i] for i in range(len(ds))] if a.patient is None else [ds[ds.names.index(a.patient)]]
    with torch.no_grad():
        best = None
        for it in items:
            c, r = model(it["xrays"][None, 0], it["xrays"][None, 1])
            g = float(psnr(r, it["ct"][None]) - psnr(c, it["ct"][None]))
            if best is None or g > best[0]:
                best = (g, it, c[0, 0].numpy(), r[0, 0].numpy())
    gain, it, c, r = best
    t, lab = it["ct"][0].numpy(), it["labels"].numpy()
    imp = np.abs(c - t) - np.abs(r - t)
    imp_s = F.avg_pool3d(torch.from_numpy(imp)[None, None], 3, 1, 1, count_include_pad=False)[0, 0].numpy()
    bone = np.isin(lab, [ids[n] for n in ("rib", "vertebra", "other_bone")])
    edge = ndimage.binary_dilation(bone) & ~ndimage.binary_erosion(bone)
    vessel = lab == ids["vessel"]
    # only where the truth itself has an edge (the upper quartile of its gradient inside the structure),
    # away from the first and last slices: removing a false blob from air is not "adding detail"
    grad = np.sqrt(sum(g**2 for g in np.gradient(t)))
    inner = np.zeros_like(edge)
    inner[4:-4, 4:-4, 4:-4] = True
    edge, vessel = ((m & inner & (grad >= np.percentile(grad[m], 75))) for m in (edge, vessel))
    rows = []
    for name, mask in (("bone edge", edge), ("vessel", vessel)):
        rows += [(name, "better", q) for q in _spots(imp_s, mask, SPOTS, True)]
        rows += [(name, "worse", q) for q in _spots(imp_s, mask, 1, False)]
    print(f"{it['name']}: PSNR gain {gain:+.3f} dB")
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)))
    lim = max(1e-3, float(np.percentile(np.abs(imp), 99.5)))
    for row, (name, kind, (d, h, w)) in zip(axes, rows):
        sl = (d, slice(max(0, h - CROP), h + CROP), slice(max(0, w - CROP), w + CROP))
        nb = tuple(slice(max(0, x - 1), x + 2) for x in (d, h, w))
        ec, er = float(np.abs(c - t)[nb].mean()), float(np.abs(r - t)[nb].mean())
        print(f"  {name:9s} {kind:6s} at (D,H,W)=({d},{h},{w}): local mean |error| coarse {ec:.4f} -> refined {er:.4f}")
        for ax, img, title in zip(row, (t, c, r, imp), ("truth", "coarse", "refined", "|c-t| - |r-t|")):
            kw = dict(cmap="RdBu", vmin=-lim, vmax=lim) if title.startswith("|") else dict(cmap="gray", vmin=0, vmax=0.8)
            ax.imshow(img[sl], **kw)
            ax.add_patch(plt.Circle((w - sl[2].start, h - sl[1].start), 2.5, fill=False, color="yellow", lw=1.5))
            ax.set_title(f"{title}" if title != "truth" else f"{name}, refined {kind}: axial {d}", fontsize=8)
            ax.axis("off")
        row[2].set_xlabel(f"{ec:.3f} -> {er:.3f}")
        row[3].text(1, 3, f"|err| {ec:.3f} -> {er:.3f}", color="black", fontsize=7, backgroundcolor="white")
    fig.suptitle(f"{it['name']} (PSNR gain {gain:+.2f} dB): spots where the refiner moved bone edges / vessels\n"
                 f"most towards the truth (better) and most away (worse); right column blue = refined closer", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_file(a.out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
