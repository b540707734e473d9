"""``ctrefine <command>``: the only module that knows every stage. Heavy imports happen lazily inside
each command so ``ctrefine --help`` is instant.

Every command turns a bad input into one line on stderr (``ctrefine: error: ...``) and a non-zero exit.
"""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """An error for the user: printed as one line, exit status 2."""


def _cmd_make_data(a) -> int:
    from .data.dataset import make_dataset, summarize

    if a.num_patients < 1:
        raise CLIError("--num-patients must be >= 1")
    if a.xray_size < 8 or a.size < 8:
        raise CLIError("--size and --xray-size must be >= 8")
    make_dataset(a.out, a.num_patients, seed=a.seed, size=a.size, xray_size=a.xray_size, geometry=a.geometry,
                 workers=a.workers, progress=not a.quiet)
    print(summarize(a.out))
    return 0


def _cmd_prepare(a) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from .data.dataset import make_splits
    from .data.io import DataError, read_json, write_json
    from .data.ingest import ingest_ct

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done, failed = [], 0
    existing = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / "meta.json").exists())
    start = len(existing)
    for i, path in enumerate(tqdm(a.ct, desc="ingest", unit="ct", disable=a.quiet)):
        name = f"patient_{start + i:04d}"
        try:
            ingest_ct(path, out, name, size=a.size, xray_size=a.xray_size, geometry=a.geometry)
            done.append(name)
        except DataError as exc:
            print(f"ctrefine: error: {exc}", file=sys.stderr)
            failed += 1
    header = out / "dataset.json"
    if done and not header.exists():
        write_json(header, {"version": 1, "source": "ingested", "size": a.size, "xray_size": a.xray_size,
                            "fov_mm": 320.0, "geometry": {"kind": a.geometry}})
    split_path = out / "splits.json"
    if done:
        if split_path.exists():  # never re-split: new patients are held out as test data
            splits = read_json(split_path)
            splits["test"] = sorted(set(splits["test"]) | set(done))
        else:
            splits = make_splits(existing + done, seed=0)
        write_json(split_path, splits)
    print(f"ingested {len(done)} CT(s) into {out}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def _cmd_preview(a) -> int:
    """Axial / coronal / sagittal slices of a patient's CT and both radiographs, as one PNG."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.io import atomic_file, load_nifti

    folder = Path(a.data) / a.patient
    ct, aff = load_nifti(folder / "ct.nii.gz")
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
    out = Path(a.out)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=a.dpi)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


def _cmd_info(a) -> int:
    from .config import build_models, load_config, resolve

    cfg = load_config(a.config) if a.config else resolve()
    base, refiner = build_models(cfg)
    m = cfg["model"]
    print(f"config: {a.config or 'defaults'} -- volume {m['volume_size']}^3, radiographs {m['xray_size']}^2")
    for name, model in (("base (BaseReconstructor)", base), ("refiner (DetailRefinementNetwork)", refiner)):
        n = sum(p.numel() for p in model.parameters())
        print(f"  {name:36s} {n:>12,d} parameters ({n / 1e6:.2f}M)")
        if a.verbose:
            for child_name, child in model.named_children():
                k = sum(p.numel() for p in child.parameters())
                if k:
                    print(f"      {child_name:32s} {k:>12,d}")
    return 0


def _cmd_export_onnx(a) -> int:
    import torch

    from .data.dataset import CTDataset
    from .export import PARITY_TOL, export_onnx, load_two_stage, verify

    model, cfg = load_two_stage(a.base_checkpoint, a.refinement_checkpoint)
    s = cfg["model"]["xray_size"]
    batches = {"random batch 1": torch.rand(1, 2, 1, s, s), "random batch 3": torch.rand(3, 2, 1, s, s)}
    if a.data_path:
        ds = CTDataset(a.data_path, a.split)
        batches[f"{a.split} patients"] = torch.stack([ds[i]["xrays"] for i in range(min(4, len(ds)))])
    out = export_onnx(model, cfg, a.out)
    print(f"exported {out} ({out.stat().st_size / 2**20:.1f} MiB, opset 18, onnx.checker passed)")
    worst = 0.0
    for name, x in batches.items():
        err = verify(model, out, [x])
        worst = max(worst, err)
        print(f"  ONNX Runtime vs torch, {name}: max |error| = {err:.2e}")
    if worst > PARITY_TOL:
        print(f"ctrefine: error: parity {worst:.2e} exceeds {PARITY_TOL:.0e}", file=sys.stderr)
        return 1
    return 0


def _cmd_infer(a) -> int:
    from .infer import evaluate_dataset, infer_radiographs, make_predictor

    single = a.xray_pa or a.xray_lateral or a.out
    if single:
        if not (a.xray_pa and a.xray_lateral and a.out):
            raise CLIError("radiograph mode needs --xray_pa, --xray_lateral and --out (both views are required)")
        if a.data_path:
            raise CLIError("give either --data_path (evaluate a dataset) or radiograph files, not both")
    elif not (a.data_path and a.output_dir):
        raise CLIError("dataset mode needs --data_path and --output_dir (or use --xray_pa/--xray_lateral/--out)")
    pred = make_predictor(a.base_checkpoint, a.refinement_checkpoint, a.onnx)
    if single:
        refined, coarse = infer_radiographs(pred, a.xray_pa, a.xray_lateral, a.out, a.xray_convention)
        print(f"wrote {refined} (refined) and {coarse} (coarse), HU, {pred.kind}")
        return 0
    s = evaluate_dataset(pred, a.data_path, a.output_dir, a.num_patients, a.split, not a.no_save_volumes,
                         progress=not a.quiet)
    print(f"{s['num_patients']} {a.split} patients -> {a.output_dir}/metrics.txt")
    print(f"  coarse  PSNR {s['coarse_psnr_mean']:.2f} +- {s['coarse_psnr_std']:.2f} dB  SSIM {s['coarse_ssim_mean']:.4f}  "
          f"HF-ratio {s['coarse_hf_ratio_mean']:.3f}")
    print(f"  refined PSNR {s['refined_psnr_mean']:.2f} +- {s['refined_psnr_std']:.2f} dB  SSIM {s['refined_ssim_mean']:.4f}  "
          f"HF-ratio {s['refined_hf_ratio_mean']:.3f}")
    print(f"  gain {s['gain_db_mean']:+.2f} dB, refined wins {s['refined_wins']}/{s['num_patients']}")
    return 0


def train_stage(stage: str, preset: str, sets: list[str], ranks: int, log_path, progress: bool = True) -> None:
    """Run one training stage through the deepspeed launcher (``ranks`` processes); output to ``log_path``."""
    import os
    import subprocess
    from pathlib import Path

    import torch

    cmd = ["--module", "ctrefine.train", stage, "--config", preset, "--deepspeed_config", str(_repo_file("ds_config.json"))]
    for item in sets:
        cmd += ["--set", item]
    if not progress:
        cmd.append("--no-progress")
    launcher = Path(sys.executable).with_name("deepspeed")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = "1"  # one thread per CPU rank, else ranks oversubscribe the cores
    full = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(_free_port()), *cmd]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(full) + "\n")
        log.flush()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(f"[{stage}]") or "error" in line.lower() and "ctrefine" in line:
                print("   " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise CLIError(f"{stage} training failed (exit {proc.returncode}); see {log_path}")


def _free_port() -> int:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _repo_file(name: str):
    """A file shipped beside the package (ds_config.json, configs/)."""
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    if not (here / name).exists():
        raise CLIError(f"{name} not found next to the package ({here}); run from a source checkout")
    return here / name


def _cmd_demo(a) -> int:
    import os
    import time
    from pathlib import Path

    import torch

    from .config import load_config
    from .data.dataset import make_dataset, summarize
    from .export import PARITY_TOL, export_onnx, load_two_stage, verify
    from .infer import OnnxPredictor, evaluate_dataset

    t0 = time.time()
    cuda = torch.cuda.is_available()
    preset_name = a.preset if a.preset != "auto" else ("full" if cuda else "cpu-small")
    preset = _repo_file(f"configs/{preset_name}.json")
    cfg = load_config(preset)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    ranks = a.ranks or (torch.cuda.device_count() if cuda else min(2, os.cpu_count() or 1))
    m = cfg["model"]
    n = a.num_patients or (1000 if preset_name == "full" else 128)
    print(f"ctrefine demo: preset {preset_name}, {n} patients, {ranks} {'GPU' if cuda else 'CPU'} rank(s), output {out}")

    def step(title):
        print(f"[{time.time() - t0:6.0f}s] {title}", flush=True)

    step("1/5 synthetic dataset")
    make_dataset(out / "data", n, seed=a.seed, size=m["volume_size"], xray_size=m["xray_size"], progress=not a.quiet)
    print("   " + summarize(out / "data").replace("\n", "\n   "))
    sets = [f"data.data_path={out / 'data'}", f"checkpoint.dir={out}"] + list(a.set)
    step("2/5 base reconstructor (deepspeed launcher)")
    train_stage("base", str(preset), sets + (["training.base_num_epochs=%d" % a.base_epochs] if a.base_epochs else []),
                ranks, log, progress=False)
    step("3/5 detail refinement network on the frozen base")
    train_stage("refine", str(preset), sets + (["training.num_epochs=%d" % a.refine_epochs] if a.refine_epochs else []),
                ranks, log, progress=False)
    base_ckpt, ref_ckpt = out / "base" / "best_model.pt", out / "refine" / "best_model.pt"
    onnx_path = out / "model.onnx"
    step("4/5 ONNX export + verification")
    if onnx_path.exists() and onnx_path.stat().st_mtime > max(base_ckpt.stat().st_mtime, ref_ckpt.stat().st_mtime):
        print(f"   {onnx_path} is newer than both checkpoints: reused")
    else:
        model, mcfg = load_two_stage(base_ckpt, ref_ckpt)
        export_onnx(model, mcfg, onnx_path)
        s = m["xray_size"]
        err = verify(model, onnx_path, [torch.rand(1, 2, 1, s, s), torch.rand(3, 2, 1, s, s)])
        print(f"   {onnx_path}: ORT vs torch max |error| {err:.2e}")
        if err > PARITY_TOL:
            raise CLIError(f"ONNX parity {err:.2e} exceeds {PARITY_TOL:.0e}")
    step("5/5 ONNX Runtime inference on the test split")
    res = out / "inference_results"
    sm = evaluate_dataset(OnnxPredictor(onnx_path), out / "data", res, progress=not a.quiet)
    print()
    print(f"{'test split (' + str(sm['num_patients']) + ' patients)':<28s}{'coarse':>18s}{'refined':>18s}")
    for k, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("mae", "MAE"), ("hf_ratio", "HF-energy ratio")):
        print(f"{label:<28s}{sm[f'coarse_{k}_mean']:>10.4f} +- {sm[f'coarse_{k}_std']:<6.4f}"
              f"{sm[f'refined_{k}_mean']:>10.4f} +- {sm[f'refined_{k}_std']:<6.4f}")
    print(f"{'gain (refined - coarse)':<28s}{sm['gain_db_mean']:>+10.3f} dB +- {sm['gain_db_std']:.3f}")
    print(f"{'refined wins':<28s}{sm['refined_wins']:>10d} / {sm['num_patients']}")
    print(f"\nresults: {res}/metrics.txt, per-patient NIfTI + comparison PNGs; log {log}; "
          f"total {time.time() - t0:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctrefine", description="Dual-view X-ray -> CT reconstruction with detail refinement.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("make-data", help="generate synthetic chest phantoms and their dual-view DRRs",
                       description="Generate procedural chest CT phantoms (HU, 2x the target resolution), render PA and "
                                   "lateral DRRs from them, and write one folder per patient plus a fixed split file. "
                                   "Resumable: finished patients are skipped.")
    m.add_argument("--out", required=True, help="dataset directory to create or resume")
    m.add_argument("--num-patients", type=int, required=True, help="number of patients")
    m.add_argument("--seed", type=int, default=0, help="dataset seed (patient i's phantom depends only on seed and i)")
    m.add_argument("--size", type=int, default=64, help="target volume side in voxels (default 64)")
    m.add_argument("--xray-size", type=int, default=128, help="radiograph side in pixels (default 128)")
    m.add_argument("--geometry", choices=("cone", "parallel"), default="cone", help="beam geometry (default cone)")
    m.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_make_data)

    r = sub.add_parser("prepare", help="ingest real CTs (NIfTI files or DICOM folders) into a dataset",
                       description="Reorient each CT to the canonical orientation, resample to isotropic voxels over the "
                                   "field of view centred on the body, render DRRs, and write the dataset layout. A bad "
                                   "file is reported on one line and skipped; the exit status is 1 if any failed.")
    r.add_argument("--ct", nargs="+", required=True, help="NIfTI files and/or DICOM series folders")
    r.add_argument("--out", required=True, help="dataset directory")
    r.add_argument("--size", type=int, default=64, help="target volume side in voxels (default 64)")
    r.add_argument("--xray-size", type=int, default=128, help="radiograph side in pixels (default 128)")
    r.add_argument("--geometry", choices=("cone", "parallel"), default="cone")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_cmd_prepare)

    v = sub.add_parser("preview", help="PNG of one patient: CT slices and both radiographs",
                       description="Axial, coronal and sagittal mid-slices of a patient's ct.nii.gz next to its PA and "
                                   "lateral radiographs, to check anatomy and orientation at a glance.")
    v.add_argument("--data", required=True, help="dataset directory")
    v.add_argument("--patient", default="patient_0000", help="patient folder name (default patient_0000)")
    v.add_argument("--out", required=True, help="output .png")
    v.add_argument("--dpi", type=int, default=80)
    v.set_defaults(func=_cmd_preview)

    i = sub.add_parser("info", help="print the parameter counts of the models of a config",
                       description="Build the base and refiner described by a config preset and print their sizes.")
    i.add_argument("--config", default=None, help="JSON preset (default: built-in defaults = configs/full.json sizes)")
    i.add_argument("--verbose", "-v", action="store_true", help="also list each sub-module")
    i.set_defaults(func=_cmd_info)

    e = sub.add_parser("export-onnx", help="export base + refiner as one ONNX graph and verify it in ONNX Runtime",
                       description="One graph: inputs xray_pa, xray_lateral (batch, 1, S, S); outputs coarse, refined. "
                                   "Dynamo exporter, opset 18, onnx.checker, then ORT-vs-torch parity on random inputs "
                                   "(batch 1 and 3) and, with --data_path, on real dataset inputs; exit 1 if > 1e-4.")
    e.add_argument("--base_checkpoint", required=True, help="best_model.pt of the base stage")
    e.add_argument("--refinement_checkpoint", required=True, help="best_model.pt of the refine stage")
    e.add_argument("--out", required=True, help="output .onnx file")
    e.add_argument("--data_path", default=None, help="dataset whose radiographs are used for the parity check too")
    e.add_argument("--split", default="test", help="split used with --data_path (default test)")
    e.set_defaults(func=_cmd_export_onnx)

    f = sub.add_parser("infer", help="reconstruct CTs: evaluate a dataset split, or your own two radiographs",
                       description="Dataset mode (--data_path, --output_dir): metrics.txt, NIfTI volumes and comparison "
                                   "PNGs per patient of the test split. Radiograph mode (--xray_pa, --xray_lateral, "
                                   "--out): PNG/TIFF/NIfTI/DICOM radiographs -> refined CT NIfTI. Uses torch checkpoints "
                                   "or, with --onnx, ONNX Runtime.")
    f.add_argument("--base_checkpoint", help="best_model.pt of the base stage (torch path)")
    f.add_argument("--refinement_checkpoint", help="best_model.pt of the refine stage (torch path)")
    f.add_argument("--onnx", help="model.onnx from export-onnx (ONNX Runtime path)")
    f.add_argument("--data_path", help="dataset directory (dataset mode)")
    f.add_argument("--split", default="test", help="split to evaluate (default test: never training patients)")
    f.add_argument("--num_patients", type=int, default=None, help="evaluate at most this many patients")
    f.add_argument("--output_dir", help="where metrics.txt and patient_XXXX/ go (replaced atomically)")
    f.add_argument("--save_volumes", action="store_true", default=True, help="write NIfTI volumes (default)")
    f.add_argument("--no_save_volumes", action="store_true", help="skip the NIfTI volumes")
    f.add_argument("--xray_pa", help="PA radiograph file (radiograph mode)")
    f.add_argument("--xray_lateral", help="lateral radiograph file (radiograph mode)")
    f.add_argument("--out", help="output CT .nii.gz (radiograph mode)")
    f.add_argument("--xray-convention", dest="xray_convention", choices=("attenuation", "intensity"),
                   default="attenuation", help="attenuation: bone bright (default); intensity: raw detector, bone dark")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_cmd_infer)

    d = sub.add_parser("demo", help="the main job: data -> base -> refiner -> ONNX -> inference, with a summary table",
                       description="Generate a synthetic dataset, train the base then the refiner through the deepspeed "
                                   "launcher, export ONNX, run ONNX Runtime on the test split and print coarse vs refined "
                                   "metrics. Preset cpu-small on CPU, full on CUDA. Re-running reuses finished work "
                                   "(dataset, trained stages, an up-to-date ONNX file).")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--preset", choices=("auto", "cpu-small", "cpu-medium", "full"), default="auto")
    d.add_argument("--num-patients", type=int, default=None, help="default 128 (cpu-small) / 1000 (full)")
    d.add_argument("--seed", type=int, default=0, help="dataset seed")
    d.add_argument("--ranks", type=int, default=None, help="deepspeed ranks (default: GPUs, or 2 CPU ranks)")
    d.add_argument("--base-epochs", type=int, default=None, help="override the preset's training.base_num_epochs")
    d.add_argument("--refine-epochs", type=int, default=None, help="override the preset's training.num_epochs (refiner)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train a stage in one process (multi-GPU: use the deepspeed launcher)",
                       description="Single-process shortcut for `python -m ctrefine.train STAGE ...`; every argument is "
                                   "passed through (see `python -m ctrefine.train --help`). For several GPUs or machines: "
                                   "deepspeed --num_gpus N --module ctrefine.train STAGE --config ...",
                       add_help=False)
    t.add_argument("train_args", nargs=argparse.REMAINDER, help="base|refine --config FILE [...]")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # pass everything through, --help included
        from . import train

        return train.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"ctrefine: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"ctrefine: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
