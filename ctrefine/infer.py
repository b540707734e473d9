"""Inference with torch or ONNX Runtime, and the comparison outputs.

Two entry points:

* :func:`evaluate_dataset` -- patients of one split (``test`` by default: never training patients)
  of a ctrefine dataset. Writes, atomically (a temporary folder renamed at the end)::

      output_dir/metrics.txt    per patient and mean +- std of PSNR/SSIM/MAE/HF-ratio, coarse vs refined,
                                the gain and the refined-wins count
      output_dir/metrics.json   the same numbers, machine-readable
      output_dir/patient_XXXX/{coarse,refined,ground_truth}.nii.gz   HU, the patient's own affine
      output_dir/patient_XXXX/patient_XXXX_comparison.png            slices, error maps, both X-rays

* :func:`infer_radiographs` -- a user's own PA + lateral radiograph files, no ground truth: writes the
  refined CT (and the coarse one beside it) as NIfTI in HU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .conventions import FOV_MM, canonical_affine, model_to_hu, normalize_xray
from .data.dataset import CTDataset
from .data.io import DataError, atomic_dir, load_radiograph, save_nifti, square_resize, write_json
from .metrics import all_metrics

METRIC_KEYS = ("psnr", "ssim", "mae", "hf_ratio")


class TorchPredictor:
    """Base + refiner from two ``best_model.pt`` files, fp32, on CPU or CUDA."""

    kind = "torch"

    def __init__(self, base_ckpt, refiner_ckpt, device: str | None = None):
        from .export import load_two_stage

        self.model, self.cfg = load_two_stage(base_ckpt, refiner_ckpt)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.xray_size = self.cfg["model"]["xray_size"]
        self.source = f"{base_ckpt} + {refiner_ckpt}"

    @torch.no_grad()
    def __call__(self, xrays: torch.Tensor):
        x = xrays.to(self.device)
        c, r = self.model(x[:, 0], x[:, 1])
        return c.float().cpu(), r.float().cpu()


class OnnxPredictor:
    """The exported single graph in ONNX Runtime (CUDA provider when available, else CPU)."""

    kind = "onnx"

    def __init__(self, path):
        from .export import onnx_metadata, ort_session

        self.session = ort_session(path)
        meta = onnx_metadata(self.session)
        if "xray_size" not in meta:
            raise DataError(f"{path}: not a ctrefine ONNX model (no xray_size metadata)")
        self.xray_size = int(meta["xray_size"])
        self.source = str(path)

    def __call__(self, xrays: torch.Tensor):
        x = xrays.float().numpy()
        c, r = self.session.run(None, {"xray_pa": x[:, 0], "xray_lateral": x[:, 1]})
        return torch.from_numpy(c), torch.from_numpy(r)


def make_predictor(base_ckpt=None, refiner_ckpt=None, onnx=None):
    if onnx:
        return OnnxPredictor(onnx)
    if not (base_ckpt and refiner_ckpt):
        raise DataError("give --onnx MODEL, or both --base_checkpoint and --refinement_checkpoint")
    return TorchPredictor(base_ckpt, refiner_ckpt)


# ------------------------------------------------------------------------------------------ figures
def comparison_png(path, coarse, refined, truth, xrays, title: str) -> None:
    """Axial / coronal / sagittal slices of coarse, refined, truth and both error maps, plus the X-rays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ dataset
def _fmt_row(name, m):
    return (f"{name:<14s}" + "".join(f"{m['coarse'][k]:>17.4f}{m['refined'][k]:>17.4f}" for k in METRIC_KEYS)
            + f"{m['refined']['psnr'] - m['coarse']['psnr']:>+10.3f}")


def evaluate_dataset(predictor, data_path, output_dir, num_patients: int | None = None, split: str = "test",
                     save_volumes: bool = True, batch_size: int = 4, progress: bool = True) -> dict:
    """Run ``predictor`` on a split, write the comparison outputs, return the summary dict."""
    from tqdm import tqdm

    ds = CTDataset(data_path, split)
    if len(ds) == 0:
        raise DataError(f"{data_path}: split {split!r} is empty")
    first = ds[0]
    if first["xrays"].shape[-1] != predictor.xray_size:
        raise DataError(f"{data_path}: radiographs are {first['xrays'].shape[-1]}^2 but the model expects "
                        f"{predictor.xray_size}^2")
    n = len(ds) if num_patients is None else min(num_patients, len(ds))
    per_patient: dict[str, dict] = {}
    with atomic_dir(output_dir) as tmp:
        bar = tqdm(total=n, desc=f"infer ({predictor.kind})", unit="pt", disable=not progress)
        for i0 in range(0, n, batch_size):
            items = [ds[i] for i in range(i0, min(n, i0 + batch_size))]
            x = torch.stack([it["xrays"] for it in items])
            coarse, refined = predictor(x)
            for it, c, r in zip(items, coarse, refined):
                gt = it["ct"]
                m = {"coarse": {k: float(v) for k, v in all_metrics(c[None], gt[None]).items()},
                     "refined": {k: float(v) for k, v in all_metrics(r[None], gt[None]).items()}}
                name = it["name"]
                per_patient[name] = m
                folder = tmp / name
                folder.mkdir()
                aff = it["affine"].numpy()
                if save_volumes:
                    for fname, vol in (("coarse", c), ("refined", r), ("ground_truth", gt)):
                        save_nifti(folder / f"{fname}.nii.gz", model_to_hu(vol[0].numpy()), aff)
                title = "\n".join(f"{k:9s} coarse {m['coarse'][k]:7.3f}  refined {m['refined'][k]:7.3f}"
                                  for k in METRIC_KEYS)
                comparison_png(folder / f"{name}_comparison.png", c[0].numpy(), r[0].numpy(), gt[0].numpy(),
                               it["xrays"][:, 0].numpy(), f"{name}\n{title}")
                bar.update()
        bar.close()
        summary = summarize(per_patient)
        summary.update({"split": split, "data_path": str(data_path), "predictor": predictor.kind,
                        "source": predictor.source})
        write_json(tmp / "metrics.json", {"summary": summary, "patients": per_patient})
        (tmp / "metrics.txt").write_text(metrics_text(per_patient, summary))
    return summary


def summarize(per_patient: dict) -> dict:
    s = {}
    for stage in ("coarse", "refined"):
        for k in METRIC_KEYS:
            v = np.array([m[stage][k] for m in per_patient.values()])
            s[f"{stage}_{k}_mean"], s[f"{stage}_{k}_std"] = float(v.mean()), float(v.std())
    gains = np.array([m["refined"]["psnr"] - m["coarse"]["psnr"] for m in per_patient.values()])
    s.update({"gain_db_mean": float(gains.mean()), "gain_db_std": float(gains.std()),
              "refined_wins": int((gains > 0).sum()), "num_patients": len(per_patient)})
    return s


def metrics_text(per_patient: dict, s: dict) -> str:
    head = f"{'patient':<14s}" + "".join(f"{'coarse_' + k:>17s}{'refined_' + k:>17s}" for k in METRIC_KEYS) + f"{'gain_db':>10s}"
    lines = [f"ctrefine inference: {s['num_patients']} patients of split '{s['split']}' from {s['data_path']}",
             f"predictor: {s['predictor']} ({s['source']})",
             "metrics on model-space volumes in [0, 1]: PSNR (dB, data range 1), 3D SSIM, MAE, "
             "HF-energy ratio (1.0 ideal)", "", head]
    lines += [_fmt_row(name, m) for name, m in sorted(per_patient.items())]
    lines.append("")
    for stage in ("coarse", "refined"):
        lines.append(f"{stage:<8s} mean +- std: " + "  ".join(
            f"{k} {s[f'{stage}_{k}_mean']:.4f} +- {s[f'{stage}_{k}_std']:.4f}" for k in METRIC_KEYS))
    lines.append(f"gain (refined - coarse PSNR): {s['gain_db_mean']:+.3f} +- {s['gain_db_std']:.3f} dB")
    lines.append(f"refined wins (higher PSNR): {s['refined_wins']}/{s['num_patients']}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- user radiographs
def prepare_radiographs(pa_path, lateral_path, size: int, convention: str = "attenuation") -> torch.Tensor:
    """Two radiograph files -> ``(1, 2, 1, size, size)`` normalised exactly like training inputs."""
    imgs = [square_resize(load_radiograph(p, convention), size) for p in (pa_path, lateral_path)]
    return normalize_xray(torch.from_numpy(np.stack(imgs)))[None, :, None]


def infer_radiographs(predictor, pa_path, lateral_path, out_path, convention: str = "attenuation") -> tuple[Path, Path]:
    """Reconstruct a CT from two radiograph files; writes ``out`` (refined) and ``*_coarse`` beside it."""
    x = prepare_radiographs(pa_path, lateral_path, predictor.xray_size, convention)
    coarse, refined = predictor(x)
    out = Path(out_path)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise DataError(f"{out}: output must be a .nii or .nii.gz file")
    v = refined.shape[-1]
    aff = canonical_affine(v, FOV_MM / v)
    stem = out.name[:-7] if out.name.endswith(".nii.gz") else out.name[:-4]
    coarse_path = out.with_name(f"{stem}_coarse.nii.gz")
    save_nifti(out, model_to_hu(refined[0, 0].numpy()), aff)
    save_nifti(coarse_path, model_to_hu(coarse[0, 0].numpy()), aff)
    return out, coarse_path
