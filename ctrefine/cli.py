"""``ctrefine <command>``: argument parsing and delegation, nothing else.

Every command's work lives in the package (``data``, ``viz``, ``export``, ``infer``, ``launch``,
``training``); heavy modules are imported inside each command so ``ctrefine --help`` is instant.
A :class:`~ctrefine.errors.UserError` becomes one line on stderr (``ctrefine: error: ...``) and exit
status 2; Ctrl-C is one line and exit 130; anything else is a bug and keeps its traceback.

Flags use dashes (``--num-patients``); underscore spellings (``--base_checkpoint``,
``--data_path``, ``--output_dir``, ...) are accepted as aliases.
"""
from __future__ import annotations

import argparse
import sys

from .errors import OneLineParser, UserError, run_main
from .outputs import FIGURES


def _flag(parser, name: str, **kw):
    """Add ``--a-b`` with the alias ``--a_b`` (one style; the underscore spelling still works)."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    return parser.add_argument(*names, dest=kw.pop("dest", name.replace("-", "_")), **kw)


def _int_type(lo: int, multiple: int = 1, why: str = ""):
    """argparse type: an int >= ``lo`` (and a multiple of ``multiple``, for the reason ``why``), else a
    one-line usage error."""
    def parse(text: str) -> int:
        v = int(text)
        if multiple > 1 and (v < lo or v % multiple):
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}{why}, got {v}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


_positive, _xray_size = _int_type(1), _int_type(16)


def _figures(text: str) -> int | None:
    """argparse type of --figures: a count >= 0, or 'all' (None)."""
    if text.strip().lower() == "all":
        return None
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a count >= 0 or 'all', got {text!r}")
    return int(text)
_size = _int_type(16, 16, " (the base has five scales)")


# ------------------------------------------------------------------------------------------ commands
def _cmd_make_data(a) -> int:
    from .config import AugmentConfig
    from .data.dataset import make_dataset, summarize
    from .data.phantoms import Scan

    make_dataset(a.out, a.num_patients, seed=a.seed, size=a.size, xray_size=a.xray_size, geometry=a.geometry,
                 workers=a.workers, progress=not a.quiet, scan=Scan.parse(a.scan),
                 xray_realism=AugmentConfig().model_dump() if a.xray_realism else None,
                 phantom_version=a.phantom_version)
    print(summarize(a.out))
    return 0


def _cmd_view(a) -> int:
    from .outputs import claim_output_file
    from .viewer import cases_from_paths, write_viewer

    claim_output_file(a.out, a.overwrite)
    cases = cases_from_paths(a.paths)
    print(f"wrote {write_viewer(a.out, cases, a.title)} ({len(cases)} case(s); open it in any browser)")
    return 0


def _cmd_realism(a) -> int:
    from .data.realism import realism_report

    realism_report(a.data, a.out, a.max_patients, a.render, not a.quiet, a.overwrite)
    return 0


def _cmd_prepare(a) -> int:
    from .data.ingest import ingest_dataset

    def report(exc):
        print(f"ctrefine: error: {exc}", file=sys.stderr)

    done, failed = ingest_dataset(a.ct, a.out, size=a.size, xray_size=a.xray_size, geometry=a.geometry,
                                  series=a.series, progress=not a.quiet, on_error=report, labels=a.labels)
    print(f"ingested {len(done)} CT(s) into {a.out}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def _cmd_preview(a) -> int:
    from pathlib import Path

    from .outputs import claim_output_file
    from .viz import preview_png

    claim_output_file(a.out, a.overwrite)
    print(f"wrote {preview_png(Path(a.data) / a.patient, a.out, a.dpi)}")
    return 0


def _cmd_info(a) -> int:
    from .config import load_config, resolve
    from .models import describe

    print(describe(load_config(a.config) if a.config else resolve(), a.config or "defaults", a.verbose))
    return 0


def _cmd_export_onnx(a) -> int:
    from .export import export_and_verify
    from .outputs import claim_output_file
    from .pipeline import load_two_stage

    if not a.out.endswith(".onnx"):
        raise UserError(f"{a.out}: the output must be a .onnx file")
    claim_output_file(a.out, a.overwrite)
    model, cfg = load_two_stage(a.base_checkpoint, a.refinement_checkpoint)
    export_and_verify(model, cfg, a.out, precision=a.precision, data_path=a.data_path, split=a.split,
                      calibration_patients=a.calibration_patients)
    return 0


def _cmd_infer(a) -> int:
    from .api import Reconstructor
    from .infer import dicom_output, evaluate_dataset, gate_summary
    from .pipeline import make_predictor
    from .report import summary_table

    single = a.xray_pa or a.xray_lateral or a.out
    if single:
        if not (a.xray_pa and a.xray_lateral and a.out):
            raise UserError("radiograph mode needs --xray-pa, --xray-lateral and --out (both views are required)")
        if a.data_path:
            raise UserError("give either --data-path (evaluate a dataset) or radiograph files, not both")
    elif not (a.data_path and a.output_dir):
        raise UserError("dataset mode needs --data-path and --output-dir (or use --xray-pa/--xray-lateral/--out)")
    pred = make_predictor(a.base_checkpoint, a.refinement_checkpoint, a.onnx, a.engine, a.device, a.precision)
    if a.no_uncertainty:
        pred.drop_uncertainty()
    if not (a.onnx or a.base_checkpoint or a.refinement_checkpoint) and not a.quiet:
        print(f"models: {pred.source} (the best shipped pair; --base-checkpoint / --refinement-checkpoint pick others)")
    if single:
        r = Reconstructor(pred).reconstruct_to(a.xray_pa, a.xray_lateral, a.out, a.overwrite, a.xray_convention, not a.no_gate,
                                               lambda msg: print(f"ctrefine: warning: {msg}", file=sys.stderr), a.format)
        wrote = {"nifti": a.out, "dicom": dicom_output(a.out), "both": f"{a.out} and {dicom_output(a.out)}"}[a.format]
        print(f"wrote {wrote} and its _coarse beside it, HU, {pred.kind}; {gate_summary(r.gate)}")
        return 0
    s = evaluate_dataset(pred, a.data_path, a.output_dir, a.num_patients, a.split, not a.no_save_volumes,
                         progress=not a.quiet, overwrite=a.overwrite, baseline_data=a.baseline_data, gate=not a.no_gate,
                         figures=a.figures)
    print(f"{s['num_patients']} {a.split} patients -> {a.output_dir}/metrics.txt")
    print(summary_table(s))
    return 0


def _cmd_fit_uncertainty(a) -> int:
    from .outputs import claim_output_file
    from .training.uncertainty_fit import fit_uncertainty

    claim_output_file(a.out, a.overwrite)
    _, _, cal, val, minutes = fit_uncertainty(a.base_checkpoint, a.refinement_checkpoint, a.data_path, a.out,
                                              epochs=a.epochs, progress=not a.quiet)
    print(f"wrote {a.out}: the refiner with an uncertainty head ({cal.train_patients} training patients, {a.epochs} "
          f"epochs, {minutes:.1f} min); val split: 90 % interval coverage {val['coverage90']:.3f}, voxel rank "
          f"correlation {val['spearman_voxel']:.2f}")
    return 0


def _cmd_demo(a) -> int:
    from .launch import run_demo

    run_demo(a.out, a.preset, a.num_patients, a.seed, a.ranks, a.base_epochs, a.refine_epochs, a.set, a.quiet, a.train_base,
             a.device, a.precision, a.refiner_from_scratch)
    return 0


def _cmd_train(a) -> int:
    from .training.driver import run
    return run(a)


TRAIN_EPILOG = """\
Launch (ZeRO-2 + bf16 from the shipped ds_config.json; batch size and LR always come from the ctrefine config):

  # one or more GPUs on this machine
  deepspeed --num_gpus 4 --module ctrefine.train base   --config full
  deepspeed --num_gpus 4 --module ctrefine.train refine --config full
  # several machines: a hostfile with lines "node1 slots=8"
  deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --module ctrefine.train refine --config full
  # CPU (gloo): --num_gpus sets the number of ranks; one thread per rank
  OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --module ctrefine.train base --config cpu-small
  # a plain single process (no launcher)
  ctrefine train base --config cpu-small

Outputs under <checkpoint.dir>/<stage>/: config.json (resolved), train_log.csv, val_log.csv, checkpoints and
best_model.pt. A rerun resumes from latest.json (--resume never refuses a folder that holds a run)."""


def _add_train(p) -> None:
    p.add_argument("stage", choices=("base", "refine"), help="base: train the reconstructor; refine: train the "
                                                              "refiner on the frozen base")
    p.add_argument("--config", required=True, help="preset name (cpu-small, cpu-medium, full) or a JSON file")
    _flag(p, "deepspeed-config", default=None, help="DeepSpeed JSON (default: the shipped ds_config.json: ZeRO-2, bf16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.num_epochs=2 (VALUE is JSON)")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from latest.json when present (default); never: refuse to reuse a directory")
    p.add_argument("--stop-after-epochs", type=_positive, default=None,
                   help="stop this invocation after N epochs (the schedule still spans the stage's epochs); for "
                        "splitting a run across jobs")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto (default): ds_config's bf16 where the hardware has it (GPUs, CPUs with AMX / "
                        "AVX512-BF16), else fp32; bf16 / fp32 force one")
    _flag(p, "no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's


# ------------------------------------------------------------------------------------------- parser
def _add_make_data(m) -> None:
    m.add_argument("--out", required=True, help="dataset directory to create or resume")
    _flag(m, "num-patients", type=_positive, required=True, help="number of patients")
    m.add_argument("--seed", type=int, default=0, help="dataset seed (patient i's phantom depends only on seed and i)")
    m.add_argument("--size", type=_size, default=64, help="target volume side in voxels, a multiple of 16 (default 64)")
    _flag(m, "xray-size", type=_xray_size, default=128, help="radiograph side in pixels (default 128)")
    m.add_argument("--geometry", choices=("cone", "parallel"), default="cone", help="beam geometry (default cone)")
    m.add_argument("--workers", type=_positive, default=None, help="parallel processes (default: all cores)")
    m.add_argument("--scan", action="append", default=[], metavar="KEY=VALUE", help="fix a scan setting for every patient "
                   "(default: drawn): contrast=BOOL, coverage_mm=MM, table=flat|curved|none, metal=BOOL, arms=raised|down")
    _flag(m, "xray-realism", action="store_true", help="render the radiographs through a random non-ideal imaging "
          "chain (scatter, blur, noise, beam hardening), e.g. for a shifted test set")
    _flag(m, "phantom-version", type=int, choices=(2, 3), default=None, help="3: bone, fat, lung and contrast "
          "calibrated to real chest CTs; 2: the phantoms of datasets made before (default: an existing dataset's "
          "own, else 3)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_view(v) -> None:
    v.add_argument("paths", nargs="+", help="an infer result folder (or one of its patient folders), or NIfTI volumes")
    v.add_argument("--out", required=True, help="the .html page to write")
    v.add_argument("--title", default="ctrefine viewer", help="page title")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _add_realism(r) -> None:
    r.add_argument("data", nargs="+", help="dataset directories with label maps (make-data, or prepare --labels)")
    r.add_argument("--out", default=None, help="also write the report to OUT.md and its figures to OUT.json")
    _flag(r, "max-patients", type=_positive, default=None, help="measure only the first N patients of each dataset")
    r.add_argument("--render", action="store_true", help="phantoms: also measure each label on the 2x render grid "
                   "(regenerated from the patient's seed; ~1 s a patient)")
    r.add_argument("--overwrite", action="store_true", help="replace existing OUT.md / OUT.json")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_prepare(r) -> None:
    r.add_argument("--ct", nargs="+", required=True, help="NIfTI files and/or DICOM series folders")
    r.add_argument("--out", required=True, help="dataset directory")
    r.add_argument("--size", type=_size, default=64, help="target volume side in voxels, a multiple of 16 (default 64)")
    _flag(r, "xray-size", type=_xray_size, default=128, help="radiograph side in pixels (default 128)")
    r.add_argument("--geometry", choices=("cone", "parallel"), default="cone")
    r.add_argument("--series", default=None, help="for DICOM folders with several series: UID or index to ingest")
    r.add_argument("--labels", nargs="+", default=None, help="optional segmentations (NIfTI on each CT's grid, "
                                                             "ctrefine's label numbering), one per --ct in order")
    r.add_argument("--quiet", action="store_true")


def _add_preview(v) -> None:
    v.add_argument("--data", required=True, help="dataset directory")
    v.add_argument("--patient", default="patient_0000", help="patient folder name (default patient_0000)")
    v.add_argument("--out", required=True, help="output .png")
    v.add_argument("--dpi", type=_positive, default=80)
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _add_info(i) -> None:
    i.add_argument("--config", default=None, help="preset name (cpu-small, cpu-medium, full) or JSON file (default: full)")
    i.add_argument("--verbose", "-v", action="store_true", help="also list each sub-module")


def _add_export_onnx(e) -> None:
    _flag(e, "base-checkpoint", required=True, help="best_model.pt of the base stage, or a shipped one (pretrained:NAME)")
    _flag(e, "refinement-checkpoint", required=True, help="best_model.pt of the refine stage, or pretrained:NAME")
    e.add_argument("--out", required=True, help="output .onnx file (an existing one only with --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _flag(e, "data-path", default=None, help="dataset for the parity check (bf16, int8: required; int8: train calibrates)")
    e.add_argument("--split", default="test", help="split used with --data-path (default test)")
    e.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="fp32",
                   help="fp32 (default, exact); bf16 (fastest where bf16 is native: OpenVINO 3.1x torch fp32); int8 "
                        "(fastest on AVX2-only CPUs) -- bench/RESULTS-history.md section 4; auto: bf16 where native, else fp32")
    _flag(e, "calibration-patients", type=_positive, default=16,
          help="training patients whose radiographs set the int8 activation ranges (default 16)")


def _add_infer(f) -> None:
    _flag(f, "base-checkpoint", help="best_model.pt of the base stage, or pretrained:NAME (torch path; default, "
                                     "with no --refinement-checkpoint and no --onnx: the best shipped pair)")
    _flag(f, "refinement-checkpoint", help="best_model.pt of the refine stage, or pretrained:NAME (torch path)")
    f.add_argument("--onnx", help="model.onnx from export-onnx (ONNX path)")
    f.add_argument("--engine", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="runtime for --onnx; auto: ONNX Runtime with CUDA, else OpenVINO (faster on CPU) if installed")
    f.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where torch runs (auto: CUDA if any)")
    f.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="torch arithmetic; auto: "
                   "bf16 on CUDA, fp32 on a CPU (ctrefine.device.inference_dtype); --onnx: the file's own")
    _flag(f, "data-path", help="dataset directory (dataset mode)")
    f.add_argument("--split", default="test", help="split to evaluate (default test: never training patients; "
                                                   "'all' for a set no model was trained on)")
    _flag(f, "num-patients", type=_positive, default=None, help="evaluate at most this many patients")
    _flag(f, "baseline-data", default=None, help="dataset whose mean training volume is the baseline (default: "
                                                 "--data-path; give the training set when evaluating another)")
    _flag(f, "output-dir", help="where metrics.txt and patient_XXXX/ go (new, empty, or an earlier result)")
    f.add_argument("--overwrite", action="store_true", help="replace an earlier inference result / existing --out")
    _flag(f, "no-save-volumes", action="store_true", help="skip the NIfTI volumes")
    f.add_argument("--figures", type=_figures, default=FIGURES, metavar="N|all",
                   help=f"comparison PNGs for the first N patients (default {FIGURES}; 0: none; all: every patient)")
    _flag(f, "xray-pa", help="PA radiograph file (radiograph mode)")
    _flag(f, "xray-lateral", help="lateral radiograph file (radiograph mode)")
    f.add_argument("--out", help="output CT .nii.gz (radiograph mode)")
    f.add_argument("--format", choices=("nifti", "dicom", "both"), default="nifti", help="radiograph mode: the refined "
                   "CT as NIfTI (--out), a DICOM CT series (STEM_dicom/ beside it: one file per slice), or both")
    _flag(f, "xray-convention", choices=("attenuation", "intensity"), default="attenuation",
          help="attenuation: bone bright (default); intensity: raw detector, bone dark")
    _flag(f, "no-uncertainty", action="store_true", help="skip the per-voxel uncertainty of a refiner that "
          "carries an uncertainty head (a small network's one extra pass)")
    _flag(f, "no-gate", action="store_true", help="keep the refined volume even where it explains the radiographs worse "
          "than the coarse one (default: fall back to coarse there, and say so)")
    f.add_argument("--quiet", action="store_true")


def _add_fit_uncertainty(u) -> None:
    _flag(u, "base-checkpoint", required=True, help="the frozen base (a model file or pretrained:NAME)")
    _flag(u, "refinement-checkpoint", required=True, help="the refiner to give an uncertainty head")
    _flag(u, "data-path", required=True, help="a dataset: its train split teaches the head, its val split scales it")
    u.add_argument("--out", required=True, help="the refiner's model file with the head (a new file)")
    u.add_argument("--epochs", type=_positive, default=12, help="training epochs of the head (default 12)")
    u.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    u.add_argument("--quiet", action="store_true")


def _add_demo(d) -> None:
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--preset", choices=("auto", "cpu-small", "cpu-medium", "full"), default="auto")
    _flag(d, "num-patients", type=_positive, default=None, help="default 128 (CPU presets) / 1000 (full)")
    _flag(d, "train-base", action="store_true", help="train the base here even where a shipped one fits the preset "
          "(the refiner then starts from a random init)")
    _flag(d, "refiner-from-scratch", action="store_true", help="train the refiner from a random init; by default, "
          "where a shipped refiner was trained on the shipped base (cpu-medium), the demo fine-tunes it on its patients")
    d.add_argument("--seed", type=int, default=0, help="dataset seed")
    d.add_argument("--ranks", type=_positive, default=None, help="deepspeed ranks (default: GPUs, or 2 CPU ranks)")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="train on GPUs (cuda) or CPU ranks "
                   "(cpu); auto: GPUs when there are any")
    d.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="training arithmetic and the "
                   "exported graph's; auto: bf16 where the hardware has it natively (ctrefine.device)")
    _flag(d, "base-epochs", type=_positive, default=None, help="override the preset's training.base_num_epochs")
    _flag(d, "refine-epochs", type=_positive, default=None, help="refiner epochs (default: the preset's training.num_epochs, or 6 when "
          "fine-tuning the shipped refiner)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    d.add_argument("--quiet", action="store_true")


def _commands() -> dict:
    """Every subcommand: the function adding its arguments, the one running it, its help and description."""
    return {
        "make-data": (_add_make_data, _cmd_make_data, dict(
            help="generate synthetic chest phantoms and their dual-view DRRs",
            description="Generate procedural chest CT phantoms (HU, 2x the target resolution), render PA and "
                        "lateral DRRs from them, and write one folder per patient plus a fixed split file. "
                        "Resumable: finished patients are skipped; an existing dataset made with other "
                        "parameters is refused.")),
        "prepare": (_add_prepare, _cmd_prepare, dict(
            help="ingest real CTs (NIfTI files or DICOM folders) into a dataset",
            description="Reorient each CT to the canonical orientation, resample to isotropic voxels over the "
                        "field of view centred on the body, render DRRs, and write the dataset layout. A bad "
                        "file is reported on one line and skipped; the exit status is 1 if any failed. An "
                        "existing dataset of another grid is refused; new patients join its test split.")),
        "view": (_add_view, _cmd_view, dict(
            help="one self-contained HTML page to look at volumes: three planes, windows, layers",
            description="Write a single HTML file (no network access, no external scripts) with the volumes inside "
                        "(8 bits over -1000..1500 HU, gzip): axial / coronal / sagittal planes with sliders and a "
                        "shared crosshair, lung / soft-tissue / bone windows or a free width and level, and for an "
                        "infer result the layers coarse / refined / truth / |error| with each patient's metrics. "
                        "NIfTI volumes are turned to ctrefine's orientation by axis flips only (never resampled).")),
        "realism": (_add_realism, _cmd_realism, dict(
            help="how realistic a dataset's CTs are: label HU, bone/lung/fat shares, rib and vertebra sizes",
            description="Measure each dataset (phantoms, or real CTs prepared with --labels) the same way and "
                        "print one table, datasets side by side, with published reference ranges and their "
                        "sources (ctrefine.data.realism.REFERENCES); a figure inside its range is marked with a "
                        "check, outside with a cross. Reads only the datasets; writes only --out.")),
        "preview": (_add_preview, _cmd_preview, dict(
            help="PNG of one patient: axial, coronal, sagittal CT slices and both radiographs")),
        "info": (_add_info, _cmd_info, dict(
            help="print the parameter counts of the models of a config")),
        "export-onnx": (_add_export_onnx, _cmd_export_onnx, dict(
            help="export base + refiner as one ONNX graph (fp32, bf16 or int8) and verify it",
            description="One graph: inputs xray_pa, xray_lateral (batch, 1, S, S); outputs coarse, refined; "
                        "dynamo exporter, opset 18, FFTs as plain MatMul so ONNX Runtime and OpenVINO both "
                        "read it. fp32: parity with torch in each installed engine on random inputs (batch 1 "
                        "and 3) and, with --data-path, real ones; exit 2 if max |error| > 1e-4. bf16: the same "
                        "graph, computed in bf16 by OpenVINO on CPUs with native bf16. int8: the refiner's Conv "
                        "quantised (QDQ), calibrated on --data-path's training patients. bf16, int8: exit 2 if "
                        "the mean PSNR on --split moves by more than 0.05 dB from torch fp32.")),
        "infer": (_add_infer, _cmd_infer, dict(
            help="reconstruct CTs: evaluate a dataset split, or your own two radiographs",
            description="Dataset mode (--data-path, --output-dir): metrics.txt, NIfTI volumes and comparison "
                        "PNGs per patient of the test split. Radiograph mode (--xray-pa, --xray-lateral, "
                        "--out): PNG/TIFF/NIfTI/DICOM radiographs -> refined CT NIfTI. Uses torch checkpoints "
                        "or, with --onnx, ONNX Runtime / OpenVINO. Radiographs are read as displayed: head up; PA with "
                        "the patient's right on the image left; lateral with the patient's front on the image "
                        "left. A 2D NIfTI is oriented by its affine. Outputs: --output-dir must be new, empty "
                        "or an earlier inference result (replaced only with --overwrite), never the dataset "
                        "or inside it; an existing --out file is replaced only with --overwrite.")),
        "fit-uncertainty": (_add_fit_uncertainty, _cmd_fit_uncertainty, dict(
            help="give a trained refiner a calibrated uncertainty head (per-voxel std) from the pair's own errors",
            description="Run the frozen pair over the dataset's train split and teach a small head the size of its "
                        "errors (90th percentile, pinball loss), scale it on the val split so the body's 90 % "
                        "interval holds 90 %, and write the refiner's model file with the head: infer then writes "
                        "uncertainty.nii.gz / *_std.nii.gz, the viewer shows the layer, export-onnx adds its outputs. "
                        "The demo runs it after training its refiner.")),
        "train": (_add_train, _cmd_train, dict(
            help="train a stage (base or refine): one process here, several through the deepspeed launcher",
            description="Train one stage with DeepSpeed (ZeRO + bf16) or, on one device, the plain engine; "
                        "resumes where the last complete checkpoint left off.",
            epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)),
        "demo": (_add_demo, _cmd_demo, dict(
            help="the main job: data -> base -> refiner -> ONNX -> inference, with a summary table",
            description="Generate a synthetic dataset, take the shipped frozen base (or train one), train the "
                        "refiner through the deepspeed launcher (on cpu-medium: the shipped refiner fine-tuned on "
                        "the new patients), export ONNX, run it on the test split, print the table. Preset auto: "
                        "full on CUDA; on CPU cpu-medium (64^3, shipped base pretrained:phantom-64). Re-running "
                        "reuses finished work (dataset, stages, an up-to-date ONNX file).")),
    }


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = OneLineParser(prog="ctrefine", description="Dual-view X-ray -> CT reconstruction with detail refinement.")
    p.add_argument("--version", action="version", version=f"ctrefine {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, command, about) in _commands().items():
        parser = sub.add_parser(name, **about)
        add_arguments(parser)
        parser.set_defaults(func=command)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    kept = ("the last complete checkpoint (latest.json) is where a rerun resumes" if argv[:1] == ["train"] else
            "outputs are written atomically: nothing half-written was left")

    def work() -> int:
        args = build_parser().parse_args(argv)
        return args.func(args)

    return run_main("ctrefine", work, kept)


if __name__ == "__main__":
    sys.exit(main())
