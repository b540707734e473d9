"""Jobs that run other parts as processes: a training stage through the ``deepspeed`` launcher, and
the main job (``ctrefine demo``): data -> base -> refiner -> ONNX -> ONNX inference (OpenVINO on CPU, ONNX Runtime on CUDA) -> table.

Where a shipped base fits the preset (:data:`SHIPPED_BASE`), the demo is the two-stage workflow: that
base, frozen, and only the refiner trained here (``train_base=True`` trains the base as well). Where a
shipped refiner was trained on that base (:data:`SHIPPED_REFINER`), the demo fine-tunes it on its own
patients (:data:`FINE_TUNE`) rather than starting from a random init (``refiner_from_scratch=True``).

The demo reuses finished work on a rerun: the dataset (resumable generation), each training stage
(its driver resumes and stops at once when done) and an ONNX file newer than both model files.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


from . import pretrained
from .config import ds_config_path, load_config, preset_path
from .device import free_port, gpu_count, has_cuda, inference_device, kernel_mode, usable_cores
from .errors import UserError
from .jsonio import read_json, write_json
from .outputs import check_writable, sha256_file


# preset -> the shipped base trained for its geometry (ctrefine/pretrained/NAME.md says how)
SHIPPED_BASE = {"cpu-medium": "phantom-64"}
# preset -> the shipped refiner trained on that base's coarse volumes (its card says how)
SHIPPED_REFINER = {"cpu-medium": "phantom-64-refiner"}
# the demo's fine-tuning of a shipped refiner: a lower peak rate than a random init's, 6 epochs (bench/RESULTS.md,
# "Detail in place": +1.33 dB on unseen patients against +0.49 from a random init in as many epochs, same loss;
# 12 epochs gained about 0.03 dB more for about 4 more minutes)
FINE_TUNE = ("training.learning_rate=3e-4", "training.num_epochs=6")


def shipped_base(preset: str) -> str | None:
    """The name of the shipped base installed for ``preset``'s geometry, or None."""
    name = SHIPPED_BASE.get(preset)
    return name if name in pretrained.SHIPPED else None


def shipped_refiner(preset: str) -> str | None:
    """The name of the shipped refiner installed for ``preset``'s shipped base, or None."""
    name = SHIPPED_REFINER.get(preset)
    return name if name in pretrained.SHIPPED and shipped_base(preset) else None


def refine_sets(preset: str, shipped_base_used: bool, from_scratch: bool, epochs: int | None) -> tuple[list, str]:
    """The demo's overrides for its refine stage, and how it starts (for the progress line): the shipped
    refiner fine-tuned (:data:`FINE_TUNE`) where it was trained on the base the demo uses, else a random init.
    ``epochs`` (``--refine-epochs``) wins over both."""
    start, sets = "from a random init", []
    name = shipped_refiner(preset) if shipped_base_used and not from_scratch else None
    if name:
        start = f"fine-tuned from {pretrained.PREFIX}{name} (--refiner-from-scratch starts from zero)"
        sets = [f"training.init_checkpoint={pretrained.PREFIX}{name}", *FINE_TUNE]
    return sets + ([f"training.num_epochs={epochs}"] if epochs else []), start


def demo_preset(preset: str, gpus: bool | None = None) -> str:
    """``auto``: ``full`` on CUDA (``gpus``: whether the run uses them; default: when there are any); on CPU
    ``cpu-medium`` (64^3) when its shipped base is installed, else ``cpu-small`` (32^3, both stages trained here)."""
    if preset != "auto":
        return preset
    if has_cuda() if gpus is None else gpus:
        return "full"
    return "cpu-medium" if shipped_base("cpu-medium") else "cpu-small"


def default_ranks(gpus: bool | None = None) -> int:
    """One rank per GPU; on CPU two gloo ranks (one thread each) use this machine's two cores best."""
    gpus = has_cuda() if gpus is None else gpus
    return gpu_count() if gpus else min(2, usable_cores())


def train_stage(stage: str, preset, sets: list[str], ranks: int, log_path, progress: bool = True,
                gpus: bool | None = None, precision: str = "auto") -> None:
    """Run one training stage through the deepspeed launcher (``ranks`` processes); output to ``log_path``.
    ``gpus`` False trains on CPU ranks even where GPUs exist; ``precision`` is the driver's ``--precision``.

    Lines the driver prints for the user (``[stage] ...`` and errors) are echoed; everything goes to the log.
    """
    cmd = ["--module", "ctrefine.train", stage, "--config", str(preset), "--deepspeed_config", str(ds_config_path()),
           "--precision", precision]
    for item in sets:
        cmd += ["--set", item]
    if not progress:
        cmd.append("--no-progress")
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        raise UserError(f"the deepspeed launcher is not installed next to {sys.executable}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not (has_cuda() if gpus is None else gpus):
        env["OMP_NUM_THREADS"] = "1"  # one thread per CPU rank, else ranks oversubscribe the cores
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks asked for: the launcher and the driver see no GPU
    full = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), *cmd]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(full) + "\n")
        log.flush()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(f"[{stage}]") or "error" in line.lower() and "ctrefine" in line:
                print("   " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise UserError(f"{stage} training failed (exit {proc.returncode}); see {log_path}")


DEMO_RECORD = "ctrefine_demo.json"  # written first into a demo folder; later, what the demo wrote into it
DEMO_KIND = "ctrefine demo run"


def _record(folder: Path) -> dict:
    path = folder / DEMO_RECORD
    rec = read_json(path) if path.is_file() else {}
    return rec if rec.get("kind") == DEMO_KIND else {}


def is_demo_run(folder: Path) -> bool:
    """``folder`` was made by :func:`run_demo`: its own record says so (nothing is guessed from other files)."""
    return bool(_record(Path(folder)))


def _onnx_is_ours(out: Path, onnx_path: Path) -> bool:
    """The ONNX file in a demo folder is the one the demo exported (its sha256 is in the record)."""
    return _record(out).get("model.onnx") == sha256_file(onnx_path)


UNCERTAINTY_FILE = "best_model_uncertainty.pt"  # the demo's refiner with its uncertainty head, beside best_model.pt


def _uncertainty_head(out: Path, base_ckpt: Path, ref_ckpt: Path, quiet: bool) -> Path:
    """The demo's refiner with an uncertainty head fitted on the pair's own errors (train split; scaled on val),
    made once per trained refiner; returns that model file."""
    from .training.uncertainty_fit import fit_uncertainty

    path = ref_ckpt.with_name(UNCERTAINTY_FILE)
    if path.exists() and path.stat().st_mtime > ref_ckpt.stat().st_mtime:
        print(f"   {path} is newer than the refiner: reused")
        return path
    tic = time.time()
    _, _, cal, val, _ = fit_uncertainty(base_ckpt, ref_ckpt, out / "data", path, progress=not quiet)
    print(f"   uncertainty head fitted on {cal.train_patients} training patients' errors in {time.time() - tic:.0f} s: "
          f"90 % interval coverage {val['coverage90']:.3f} on the val split -> {path}", flush=True)
    return path


def _export(out: Path, onnx_path: Path, base_ckpt: Path, ref_ckpt: Path, precision: str = "auto") -> None:
    """The demo's ONNX graph: reused while newer than both model files, else exported (bf16 where this CPU has
    it natively, judged on the test split) and recorded by checksum."""
    from .export import export_and_verify
    from .pipeline import load_two_stage

    if onnx_path.exists() and not _onnx_is_ours(out, onnx_path):
        raise UserError(f"{onnx_path} is not the file this demo exported (its record has another checksum): "
                        f"move it away or use a new --out; the demo never replaces a file it did not write")
    if onnx_path.exists() and onnx_path.stat().st_mtime > max(base_ckpt.stat().st_mtime, ref_ckpt.stat().st_mtime):
        print(f"   {onnx_path} is newer than both checkpoints: reused")
        return
    model, mcfg = load_two_stage(base_ckpt, ref_ckpt)
    export_and_verify(model, mcfg, onnx_path, log=lambda s: print("   " + s.strip(), flush=True),
                      precision=precision, data_path=out / "data")
    write_json(out / DEMO_RECORD, {**_record(out), "model.onnx": sha256_file(onnx_path)})


def run_demo(out, preset: str = "auto", num_patients: int | None = None, seed: int = 0, ranks: int | None = None,
             base_epochs: int | None = None, refine_epochs: int | None = None, sets: list[str] = (),
             quiet: bool = False, train_base: bool = False, device: str = "auto", precision: str = "auto",
             refiner_from_scratch: bool = False) -> dict:
    """The main job; prints its progress and the results table, returns the test-split summary. ``device``
    (auto, cpu, cuda) and ``precision`` (auto, bf16, fp32) are decided by :mod:`ctrefine.device` for the
    training ranks, the exported graph's precision and the inference."""
    from .data.dataset import make_dataset, summarize
    from .infer import evaluate_dataset
    from .pipeline import OnnxPredictor
    from .report import summary_table

    kernel_mode()  # a bad CTREFINE_KERNELS fails before the demo folder is made
    t0 = time.time()
    cuda = inference_device(device).type == "cuda"  # a one-line error for cuda without a GPU, before any work
    preset_name = demo_preset(preset, cuda)
    shipped = None if train_base else shipped_base(preset_name)
    preset_file = preset_path(preset_name)
    cfg = load_config(preset_file, list(sets))  # validate the overrides before any work
    out = Path(out)
    check_writable(out, "demo folder")
    if out.is_dir() and any(out.iterdir()) and not is_demo_run(out):
        raise UserError(f"{out} is not empty and is not an earlier demo run: choose a new --out (the demo never "
                        f"writes into other folders)")
    onnx_path = out / "model.onnx"
    if onnx_path.exists() and not _onnx_is_ours(out, onnx_path):  # before any work, not after training
        raise UserError(f"{onnx_path} is not the file this demo exported (its record has another checksum): "
                        f"move it away or use a new --out; the demo never replaces a file it did not write")
    out.mkdir(parents=True, exist_ok=True)
    if not is_demo_run(out):
        write_json(out / DEMO_RECORD, {"kind": DEMO_KIND})
    log = out / "demo.log"
    ranks = ranks or default_ranks(cuda)
    m = cfg.model
    n = num_patients or (1000 if preset_name == "full" else 128)  # CPU presets: a few minutes of training
    print(f"ctrefine demo: preset {preset_name}, {n} patients, {ranks} {'GPU' if cuda else 'CPU'} rank(s), output {out}")

    def step(title):
        print(f"[{time.time() - t0:6.0f}s] {title}", flush=True)

    step("1/5 synthetic dataset")
    make_dataset(out / "data", n, seed=seed, size=m.volume_size, xray_size=m.xray_size, progress=not quiet)
    print("   " + summarize(out / "data").replace("\n", "\n   "))
    run_sets = [f"data.data_path={out / 'data'}", f"checkpoint.dir={out}"]
    frozen = []  # the base the refiner is trained on: the demo's choice, after the user's --set entries
    if shipped:
        base_ckpt = pretrained.resolve(pretrained.PREFIX + shipped)
        step(f"2/5 base reconstructor: shipped {pretrained.PREFIX}{shipped}, frozen (--train-base trains one here)")
        frozen = [f"model.base_model_checkpoint={pretrained.PREFIX}{shipped}"]
    else:
        base_ckpt = out / "base" / "best_model.pt"
        step("2/5 base reconstructor (deepspeed launcher)")
        epochs = [f"training.base_num_epochs={base_epochs}"] if base_epochs else []
        train_stage("base", preset_file, run_sets + list(sets) + epochs, ranks, log, False, cuda, precision)
    refine_run, start = refine_sets(preset_name, bool(shipped), refiner_from_scratch, refine_epochs)
    step(f"3/5 detail refinement network on the frozen base, {start}")
    train_stage("refine", preset_file, run_sets + refine_run + list(sets) + frozen, ranks, log, False, cuda, precision)
    ref_ckpt = _uncertainty_head(out, base_ckpt, out / "refine" / "best_model.pt", quiet)
    step("4/5 ONNX export + verification")
    _export(out, onnx_path, base_ckpt, ref_ckpt, precision)
    predictor = OnnxPredictor(onnx_path)
    step(f"5/5 ONNX inference on the test split ({predictor.engine})")
    res = out / "inference_results"
    summary = evaluate_dataset(predictor, out / "data", res, progress=not quiet, overwrite=True)
    print()
    print(summary_table(summary))
    if "uncertainty_coverage90" in summary:
        print(f"uncertainty: the 90 % interval holds {summary['uncertainty_coverage90']:.1%} of the body's voxels; "
              f"voxel rank correlation of sigma with |error| {summary.get('uncertainty_spearman_voxel', float('nan')):.2f}")
    print(f"\nresults: {res}/metrics.txt, per-patient NIfTI + comparison PNGs; log {log}; "
          f"total {time.time() - t0:.0f} s")
    return summary
