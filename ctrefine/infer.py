"""Inference on a dataset split or on a user's two radiographs, with torch or the exported ONNX graph.

* :func:`evaluate_dataset` -- patients of one split (``test`` by default: never training patients)
  of a ctrefine dataset. Writes, atomically (a temporary folder renamed at the end)::

      output_dir/metrics.txt    per patient and mean +- std of PSNR/SSIM/MAE/HF-ratio, coarse vs refined,
                                the gain and the refined-wins count (:mod:`ctrefine.report`)
      output_dir/metrics.json   the same numbers, machine-readable, and per patient the safety gate's
                                record: both volumes' X-ray consistency, whether it fell back to the
                                coarse volume, and the PSNR that choice saved or cost
      output_dir/patient_XXXX/{coarse,refined,ground_truth}.nii.gz   HU, the patient's own affine
      output_dir/patient_XXXX/patient_XXXX_comparison.png            slices, error maps, both X-rays
                                                                      (the first 16 patients; ``figures``)
      output_dir/viewer.html    one self-contained page (:mod:`ctrefine.viewer`) with the same patients
                                (at most ``VIEWER_MAX``): three planes, windows, layers coarse / refined /
                                truth / |error| (/ uncertainty)

* :func:`reconstruct` -- a user's own PA + lateral radiographs, no ground truth: a :class:`Reconstruction`
  (the refined and coarse CT in HU, the affine, the uncertainty, the gate's record) whose ``save`` writes
  them as NIfTI with the gate's record and a viewer page beside them; :mod:`ctrefine.api` and
  ``ctrefine infer --out`` both go through it.

Both pass the refiner's output through the safety gate (:func:`ctrefine.reprojection.safety_gate`, on
by default): a refined volume that explains the input radiographs worse than the coarse one is
replaced by the coarse one. "refined" in every output is what the gate let through.

The predictors come from :mod:`ctrefine.pipeline`; the tables from :mod:`ctrefine.report`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .conventions import FOV_MM, canonical_affine, hu_to_model, model_to_hu
from .data.dataset import MEAN_VOLUME, CTDataset, iter_items, mean_volume, read_splits
from .data.dicom import write_series
from .data.io import save_nifti
from .jsonio import write_json
from .errors import DataError
from .outputs import FIGURES, atomic_dir, atomic_files, claim_output_dir, claim_output_file, is_own_result, path_lock, write_manifest
from .metrics import psnr
from .pipeline import reconstruct_batch
from .report import batch_metrics, metrics_text, summarize
from .uncertainty import dataset_summary as uncertainty_summary, patient_figures
from .viewer import Case, write_viewer
from .viz import comparison_png


RESULT_KIND = "inference result"
NO_UNCERTAINTY = ("none: the refiner file carries no uncertainty head (or --no-uncertainty; a file calibrated by "
                  "test-time perturbation, the earlier method, is read without it)")
VIEWER_MAX = 32  # patients in one viewer.html (~0.3 MB each at 64^3): a page stays a few MB


def is_inference_result(folder: Path) -> bool:
    """``folder`` holds exactly what :func:`evaluate_dataset` wrote, as its manifest lists (so replacing it
    loses nothing of the user's: a file added inside it makes it the user's folder)."""
    return is_own_result(folder, RESULT_KIND)


def evaluate_dataset(predictor, data_path, output_dir, num_patients: int | None = None, split: str = "test",
                     save_volumes: bool = True, batch_size: int = 4, progress: bool = True,
                     overwrite: bool = False, baseline_data=None, gate: bool = True,
                     figures: int | None = FIGURES) -> dict:
    """Run ``predictor`` on a split, write the comparison outputs, return the summary dict.

    ``output_dir`` must be missing, empty, or (with ``overwrite``) an earlier inference result; it may
    not overlap the dataset. Checked before any work. The mean baseline is the mean training volume of
    ``baseline_data`` (default: ``data_path`` itself -- except for ``split="all"``, whose patients
    include that train split: there it is left out unless ``baseline_data`` names the training set).
    ``gate``: fall back to the coarse volume where the refined one explains the radiographs worse.
    ``figures``: comparison PNGs for the first this many patients (None: every one; a PNG costs ~0.3 s of
    CPU, more than the rest of a patient on a GPU).
    """
    inputs = (data_path,) if baseline_data is None else (data_path, baseline_data)
    claim_output_dir(output_dir, RESULT_KIND, is_inference_result, overwrite, protect=inputs)  # before the lock
    with path_lock(output_dir, "output folder"):
        return _evaluate(predictor, data_path, output_dir, num_patients, split, save_volumes, batch_size, progress,
                         overwrite, baseline_data, gate, figures)


def _evaluate(predictor, data_path, output_dir, num_patients, split, save_volumes, batch_size, progress, overwrite,
              baseline_data, gate, figures) -> dict:
    """:func:`evaluate_dataset` under its output lock."""
    from tqdm import tqdm

    def claim():
        inputs = (data_path,) if baseline_data is None else (data_path, baseline_data)
        claim_output_dir(output_dir, RESULT_KIND, is_inference_result, overwrite, protect=inputs)

    claim()
    ds = CTDataset(data_path, split).nonempty()
    first = ds[0]
    if first["xrays"].shape[-1] != predictor.xray_size:
        raise DataError(f"{data_path}: radiographs are {first['xrays'].shape[-1]}^2 but the model expects "
                        f"{predictor.xray_size}^2")
    if ds.header.geometry != predictor.geometry:  # the gate and the refiner re-project in the model's geometry
        raise DataError(f"{data_path}: radiographs rendered in {ds.header.geometry!r} geometry but the model was "
                        f"trained for {predictor.geometry!r} ones")
    n = len(ds) if num_patients is None else min(num_patients, len(ds))
    baseline = None if split == "all" and baseline_data is None else \
        _mean_baseline(baseline_data or data_path, first["ct"].shape, required=baseline_data is not None)
    table = ds.header.labels
    per_patient: dict[str, dict] = {}
    cases: list[Case] = []  # the viewer's patients: those that get a figure
    device = getattr(predictor, "device", torch.device("cpu"))  # metrics where the model ran
    with atomic_dir(output_dir, recheck=claim) as tmp, ThreadPoolExecutor(1) as writer:
        bar = tqdm(total=n, desc=f"infer ({predictor.kind})", unit="pt", disable=not progress)
        pending = []
        for items in iter_items(ds, range(n), batch_size):
            xrays = torch.stack([it["xrays"] for it in items])
            step = reconstruct_batch(predictor, xrays, gate)
            gt = torch.stack([it["ct"] for it in items])
            found = _batch_figures(step.coarse, step.refined, step.ungated, gt, baseline, items, table, device)
            stds = step.std_hu or [None] * len(items)
            for it, c, r, m, rec, std in zip(items, step.coarse, step.refined, found, step.records, stds):
                m["gate"] = {**rec, "psnr_ungated": m.pop("psnr_ungated")}
                if std is not None:
                    m["uncertainty"] = patient_figures(std, model_to_hu(r[0].numpy()), model_to_hu(it["ct"][0].numpy()))
                    it = {**it, "std_hu": std}
                per_patient[it["name"]] = m
                # files off the critical path: the writer thread draws and compresses while the next batch runs
                png = figures is None or len(per_patient) <= figures
                if png and len(cases) < VIEWER_MAX:
                    cases.append(_viewer_case(it, c, r, m))
                if save_volumes or png:
                    pending.append(writer.submit(_write_patient, tmp / it["name"], it, c, r, m, save_volumes, png))
            bar.update(len(items))
        for f in pending:
            f.result()  # a failed write fails the command, before anything is renamed into place
        bar.close()
        summary = summarize(per_patient)
        summary.update(uncertainty_summary(per_patient))
        cal = getattr(predictor, "uncertainty", None)  # calibrated uncertainty, when the refiner carries it
        summary.update({"uncertainty": NO_UNCERTAINTY if cal is None else cal.describe(),
                        "split": split, "data_path": str(data_path), "predictor": predictor.kind, "gate": gate,
                        "source": predictor.source, "precision": predictor.precision, "compute": predictor.compute,
                        "device": str(getattr(predictor, "device", "cpu")),
                        "baseline_data": None if baseline is None else str(baseline_data or data_path)})
        write_json(tmp / "metrics.json", {"summary": summary, "patients": per_patient})
        (tmp / "metrics.txt").write_text(metrics_text(per_patient, summary))
        if cases:
            write_viewer(tmp / "viewer.html", cases, f"ctrefine: {data_path} ({split}), {predictor.source}")
        write_manifest(tmp, RESULT_KIND)
    return summary


def _batch_figures(coarse, refined, ungated, gt, baseline, items, table, device) -> list[dict]:
    """Per patient of a batch: the mean / coarse / refined metrics and the ungated refined PSNR, computed
    on ``device`` (label-free ones for the whole batch at once, label metrics per patient)."""
    vols = {"coarse": coarse, "refined": refined} if baseline is None else \
        {"mean": baseline, "coarse": coarse, "refined": refined}
    gt_d = gt.to(device)
    out = batch_metrics({k: v.to(device) for k, v in vols.items()}, gt_d,
                        [it.get("labels") for it in items] if table else None, table)
    for m, p in zip(out, psnr(ungated.to(device), gt_d).tolist()):
        m["psnr_ungated"] = p
    return out


def _write_patient(folder: Path, item: dict, coarse, refined, m: dict, save_volumes: bool, png: bool) -> None:
    """One patient's NIfTIs (HU, its own affine) and comparison PNG into ``folder``."""
    folder.mkdir()
    gt, name = item["ct"], item["name"]
    if save_volumes:
        aff = item["affine"].numpy()
        for fname, vol in (("coarse", coarse), ("refined", refined), ("ground_truth", gt)):
            save_nifti(folder / f"{fname}.nii.gz", model_to_hu(vol[0].numpy()), aff)
        if item.get("std_hu") is not None:
            save_nifti(folder / "uncertainty.nii.gz", item["std_hu"], aff)
    if not png:
        return
    title = "\n".join(f"{k:9s} coarse {m['coarse'][k]:7.3f}  refined {m['refined'][k]:7.3f}"
                      for k in ("psnr", "ssim", "hf_psnr", "band_high"))
    comparison_png(folder / f"{name}_comparison.png", coarse[0].numpy(), refined[0].numpy(), gt[0].numpy(),
                   item["xrays"][:, 0].numpy(), f"{name}\n{title}")


def _viewer_case(item: dict, coarse, refined, m: dict) -> Case:
    """One patient for the viewer: HU volumes, the radiographs as the model read them, headline metrics."""
    vols = {k: model_to_hu(v[0].numpy()) for k, v in (("coarse", coarse), ("refined", refined), ("truth", item["ct"]))}
    flat = {f"{k} {f}": m[k][f] for k in ("mean", "coarse", "refined") if k in m for f in ("psnr", "ssim", "hf_psnr")}
    flat["gate"] = "fell back to coarse" if m["gate"]["fell_back"] else "refined kept"
    if item.get("std_hu") is not None:
        vols["uncertainty"] = item["std_hu"]
        flat.update({f"uncertainty {k}": v for k, v in m["uncertainty"].items()})
    return Case(item["name"], vols, (item["xrays"][0, 0].numpy(), item["xrays"][1, 0].numpy()), flat)


def _mean_baseline(data_path, shape, required: bool) -> torch.Tensor | None:
    """The dataset's mean training volume in model space ``(1, D, H, W)``; None when the dataset has no train
    split to average (unless ``required``: a baseline dataset the user named must give one). A damaged
    cache, or a volume of another grid than the patients' ``shape``, is a one-line error naming the file."""
    root = Path(data_path)
    if required and not (root / "splits.json").is_file():
        raise DataError(f"--baseline-data {root}: not a ctrefine dataset (no splits.json)")
    if not (root / MEAN_VOLUME).exists() and not read_splits(root).get("train"):
        if required:
            raise DataError(f"--baseline-data {root}: has no train split to average")
        return None
    mean = hu_to_model(torch.from_numpy(mean_volume(root)))[None]
    if mean.shape != tuple(shape):
        raise DataError(f"{root / MEAN_VOLUME}: the mean training volume is {mean.shape[-1]}^3 but the patients "
                        f"are {shape[-1]}^3: a baseline must be on the same grid")
    return mean


# ------------------------------------------------------------------------------- user radiographs
FORMATS = ("nifti", "dicom", "both")
DICOM_KIND = "DICOM series"


def radiograph_outputs(out_path, with_std: bool) -> list[Path]:
    """The files a reconstruction from radiographs writes for ``out_path`` (a ``.nii`` / ``.nii.gz``): the refined
    volume there, ``*_coarse.nii.gz``, ``*_gate.json`` and ``*_viewer.html`` beside it (and ``*_std.nii.gz``)."""
    out = Path(out_path)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise DataError(f"{out}: output must be a .nii or .nii.gz file")
    stem = out.name[:-7] if out.name.endswith(".nii.gz") else out.name[:-4]
    names = ["_coarse.nii.gz", "_gate.json", "_viewer.html"] + (["_std.nii.gz"] if with_std else [])
    return [out] + [out.with_name(stem + n) for n in names]


def dicom_output(out_path) -> Path:
    """The folder ``--format dicom|both`` writes the refined volume into as a DICOM CT series: ``STEM_dicom/``."""
    out = radiograph_outputs(out_path, False)[0]
    return out.with_name(out.name[:-7 if out.name.endswith(".nii.gz") else -4] + "_dicom")


def claim_radiograph_outputs(out_path, with_std: bool, fmt: str, overwrite: bool) -> None:
    """Every output of :meth:`Reconstruction.save` may be written (an existing file only with ``overwrite``;
    an existing DICOM folder only when it holds an earlier ctrefine series, unedited, and ``overwrite``)."""
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    paths = radiograph_outputs(out_path, with_std)
    for p in paths[1:] if fmt == "dicom" else paths:
        claim_output_file(p, overwrite)
    if fmt != "nifti":
        claim_output_dir(dicom_output(out_path), DICOM_KIND, lambda f: is_own_result(f, DICOM_KIND), overwrite)


@dataclass
class Reconstruction:
    """One CT reconstructed from two radiographs: the volumes in HU on the canonical grid (D superior ->
    inferior, H anterior -> posterior, W right -> left), their affine, the per-voxel uncertainty (std, HU)
    where the refiner carries a head, and the safety gate's record (``refined_hu`` is what it let through)."""

    refined_hu: np.ndarray
    coarse_hu: np.ndarray
    affine: np.ndarray
    uncertainty_hu: np.ndarray | None
    gate: dict
    xrays: np.ndarray  # (2, S, S): the radiographs as the models read them (normalised), for the viewer
    title: str  # names the inputs and the models in the viewer page

    def save(self, out_path, overwrite: bool = False, fmt: str = "nifti") -> list[Path]:
        """Write what ``ctrefine infer --out`` writes (:func:`radiograph_outputs`; with ``fmt`` ``dicom`` the refined
        volume as a DICOM CT series in ``STEM_dicom/`` instead of the NIfTI, ``both``: both): all outputs or
        none, an existing one replaced only with ``overwrite``, nothing while another command writes them."""
        with_std = self.uncertainty_hu is not None
        paths = radiograph_outputs(out_path, with_std)
        with path_lock(paths[0], "output file"):
            claim_radiograph_outputs(out_path, with_std, fmt, overwrite)
            if fmt == "nifti":
                self._write(paths)
                return paths
            folder = dicom_output(out_path)
            with atomic_dir(folder) as tmp:  # renamed last: the files and the series appear together
                write_series(tmp, self.refined_hu, self.affine)
                write_manifest(tmp, DICOM_KIND)
                self._write(paths, nifti=fmt == "both")
            return ([] if fmt == "dicom" else paths[:1]) + [folder] + paths[1:]

    def _write(self, paths: list[Path], nifti: bool = True) -> None:
        vols = {"coarse": self.coarse_hu, "refined": self.refined_hu}
        if self.uncertainty_hu is not None:
            vols["uncertainty"] = self.uncertainty_hu
        g = self.gate
        with atomic_files(paths if nifti else paths[1:]) as tmps:  # all, or none
            t_out, (t_coarse, t_gate, t_view, *t_std) = (tmps[0], tmps[1:]) if nifti else (None, tmps)
            if t_out is not None:
                save_nifti(t_out, self.refined_hu, self.affine)
            save_nifti(t_coarse, self.coarse_hu, self.affine)
            if t_std:
                save_nifti(t_std[0], self.uncertainty_hu, self.affine)
            write_json(t_gate, g)
            metrics = {"X-ray consistency coarse": g["xray_consistency_coarse"],
                       "X-ray consistency refined": g["xray_consistency_refined"],
                       "gate": "fell back to coarse" if g["fell_back"] else "refined kept",
                       **{f"uncertainty {k}": v for k, v in g.get("uncertainty", {}).items() if v is not None}}
            stem = paths[1].name[:-len("_coarse.nii.gz")]
            write_viewer(t_view, [Case(stem, vols, (self.xrays[0], self.xrays[1]), metrics)], self.title)


def reconstruct(predictor, x: torch.Tensor, gate: bool = True, title: str = "radiographs") -> Reconstruction:
    """Both stages on one patient's prepared radiographs ``x`` ``(1, 2, 1, S, S)`` (:func:`ctrefine.data.radiograph.prepare_radiographs`),
    through the safety gate; the uncertainty placed among the validation patients' where there is a head."""
    step = reconstruct_batch(predictor, x, gate)
    (record,), v = step.records, step.refined.shape[-1]
    refined_hu, std = model_to_hu(step.refined[0, 0].numpy()), None
    if step.std_hu is not None:  # the trust signal without ground truth: this input's sigma among the validation patients'
        std = step.std_hu[0]
        mean_std = patient_figures(std, refined_hu, None)["mean_std_hu"]
        record["uncertainty"] = {"mean_std_hu": mean_std, "val_percentile": predictor.uncertainty.percentile(mean_std)}
    record = {**record, "gate": gate, "geometry": predictor.geometry, "models": predictor.source}
    return Reconstruction(refined_hu, model_to_hu(step.coarse[0, 0].numpy()), canonical_affine(v, FOV_MM / v), std, record,
                          x[0, :, 0].numpy(), f"ctrefine: {title}, {predictor.source}")


def gate_summary(record: dict) -> str:
    """What the safety gate saw and did for one patient, and (when measured) how uncertain the result is."""
    verdict = "fell back to the coarse volume" if record["fell_back"] else "kept the refined volume"
    text = (f"X-ray consistency coarse {record['xray_consistency_coarse']:.4f}, refined "
            f"{record['xray_consistency_refined']:.4f} (lower explains the radiographs better): the gate {verdict}")
    u = record.get("uncertainty")
    if u is None:
        return text + "\nuncertainty: none (the refiner carries no uncertainty head, or --no-uncertainty)"
    where = "" if u["val_percentile"] is None else \
        f", above {u['val_percentile']:.0f} % of the validation patients' (higher: trust this volume less)"
    return text + f"\nuncertainty: mean predicted std {u['mean_std_hu']:.0f} HU in the body{where}"
