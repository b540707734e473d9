"""Figures: a patient at a glance (``ctrefine preview``) and the coarse / refined / truth comparison.

Both render with matplotlib's Agg backend (no screen needed) and write atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.io import load_nifti
from .outputs import atomic_file
from .errors import DataError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path


def preview_png(patient_folder, out, dpi: int = 80) -> Path:
    """Axial / coronal / sagittal mid-slices of a patient's CT next to its PA and lateral radiographs."""
    folder = Path(patient_folder)
    if not (folder / "ct.nii.gz").is_file():
        raise DataError(f"{folder}: no such patient (no ct.nii.gz)")
    plt = _pyplot()
    ct, _ = load_nifti(folder / "ct.nii.gz")
    pa, _ = load_nifti(folder / "xray_pa.nii.gz")
    lat, _ = load_nifti(folder / "xray_lateral.nii.gz")
    d, h, w = ct.shape
    fig, ax = plt.subplots(1, 5, figsize=(20, 4.4))
    panels = [("axial (D=%d)" % (d // 2), ct[d // 2]), ("coronal (H=%d)" % (h // 2), ct[:, h // 2]),
              ("sagittal (W=%d)" % (w // 2), ct[:, :, w // 2]), ("PA DRR (D x W)", pa), ("lateral DRR (D x H)", lat)]
    for i, (title, img) in enumerate(panels):
        ax[i].imshow(img, cmap="gray", **({"vmin": -1000, "vmax": 1000} if i < 3 else {}))
        ax[i].set_title(title)
        ax[i].axis("off")
    fig.suptitle(f"{folder}  (CT window -1000..1000 HU; radiographs: line integrals of mu)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    try:
        return _save(fig, out, dpi)
    finally:
        plt.close(fig)


def comparison_png(path, coarse, refined, truth, xrays, title: str) -> None:
    """Axial / coronal / sagittal slices of coarse, refined, truth and both error maps, plus the X-rays."""
    plt = _pyplot()
    vols = {"coarse": coarse, "refined": refined, "ground truth": truth,
            "|coarse - truth|": np.abs(coarse - truth), "|refined - truth|": np.abs(refined - truth)}
    d, h, w = truth.shape
    views = {"axial": lambda v: v[d // 2], "coronal": lambda v: v[:, h // 2, :], "sagittal": lambda v: v[:, :, w // 2]}
    fig, axes = plt.subplots(4, 5, figsize=(12.5, 10.5))
    for r, (vname, cut) in enumerate(views.items()):
        for c, (name, vol) in enumerate(vols.items()):
            ax = axes[r, c]
            err = name.startswith("|")
            ax.imshow(cut(vol), cmap="magma" if err else "gray", vmin=0, vmax=0.25 if err else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(vname)
    for c, (name, img) in enumerate(zip(("PA radiograph", "lateral radiograph"), xrays)):
        axes[3, c].imshow(img, cmap="gray")
        axes[3, c].set_title(name)
        axes[3, c].axis("off")
    for c in range(2, 5):
        axes[3, c].axis("off")
    axes[3, 2].text(0, 0.5, title, fontsize=10, family="monospace", va="center")
    fig.subplots_adjust(left=0.04, right=0.99, top=0.96, bottom=0.01, wspace=0.06, hspace=0.12)
    try:
        _save(fig, path, 80)
    finally:
        plt.close(fig)
