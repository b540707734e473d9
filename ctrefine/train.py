"""One DeepSpeed driver for both stages: ``base`` (X-rays -> coarse CT) and ``refine`` (frozen base +
DetailRefinementNetwork).

Launch (ZeRO-2 + bf16 from ds_config.json; batch size and LR always come from the ctrefine config)::

    # one or more GPUs on this machine
    deepspeed --num_gpus 4 --module ctrefine.train base   --config configs/full.json --deepspeed_config ds_config.json
    deepspeed --num_gpus 4 --module ctrefine.train refine --config configs/full.json --deepspeed_config ds_config.json
    # several machines: a hostfile with lines "node1 slots=8"
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --module ctrefine.train refine --config configs/full.json
    # CPU (gloo): --num_gpus sets the number of ranks; one thread per rank
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --module ctrefine.train base --config configs/cpu-small.json
    # a plain single process (no launcher)
    python -m ctrefine.train base --config configs/cpu-small.json

Outputs under ``<checkpoint.dir>/<stage>/``: ``config.json`` (resolved), ``train_log.csv`` (per logged
step), ``val_log.csv`` (per epoch), ``ckpt/epoch_NNNN/`` DeepSpeed checkpoints (model, optimizer, LR
schedule, RNG states) with ``latest.json`` pointing at the newest complete one, ``best_model.pt`` (a
plain fp32 state dict + config + metrics: inference never needs DeepSpeed) and ``best.json``.
A rerun resumes from ``latest.json`` (``--resume never`` starts over in a fresh directory only).
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, build_models, load_config, read_json_object
from .data.dataset import CTDataset
from .data.io import DataError, atomic_file, read_json, write_json
from .losses.loss import DetailRefinementLoss
from .metrics import all_metrics

STAGES = ("base", "refine")


class TrainError(Exception):
    """A one-line, user-facing error raised before anything is written."""


# --------------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ctrefine.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES, help="base: train the reconstructor; refine: train the refiner on the frozen base")
    p.add_argument("--config", required=True, help="JSON preset (configs/cpu-small.json, configs/full.json)")
    p.add_argument("--deepspeed_config", default="ds_config.json", help="DeepSpeed JSON (default ./ds_config.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.num_epochs=2 (VALUE is JSON)")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from latest.json when present (default); never: refuse to reuse a directory")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop this invocation after N epochs (the schedule still spans training.num_epochs); for "
                        "splitting a run across jobs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def base_checkpoint_path(cfg: dict) -> Path:
    explicit = cfg["model"]["base_model_checkpoint"]
    return Path(explicit) if explicit else Path(cfg["checkpoint"]["dir"]) / "base" / "best_model.pt"


def validate(cfg: dict, stage: str, ds_config_path: str) -> dict:
    """Every check that can fail, before any file is written. Returns the DeepSpeed config dict."""
    data = Path(cfg["data"]["data_path"])
    if not data.is_dir():
        raise TrainError(f"data.data_path {str(data)!r} is not a directory (make one with `ctrefine make-data`)")
    if not (data / "splits.json").exists():
        raise TrainError(f"data.data_path {str(data)!r} has no splits.json (not a ctrefine dataset)")
    splits = read_json(data / "splits.json")
    for key in ("train_split", "val_split"):
        name = cfg["data"][key]
        if not splits.get(name):
            raise TrainError(f"dataset {str(data)!r} has no patients in split {name!r} (data.{key})")
    hdr = read_json(data / "dataset.json") if (data / "dataset.json").exists() else {}
    m = cfg["model"]
    if hdr and (hdr.get("size") != m["volume_size"] or hdr.get("xray_size") != m["xray_size"]):
        raise TrainError(f"dataset {str(data)!r} is {hdr.get('size')}^3 / {hdr.get('xray_size')}^2 but the config expects "
                         f"{m['volume_size']}^3 / {m['xray_size']}^2")
    if stage == "refine" and not base_checkpoint_path(cfg).exists():
        raise TrainError(f"refine stage needs a trained base: {str(base_checkpoint_path(cfg))!r} not found "
                         f"(set model.base_model_checkpoint or run the base stage first)")
    ds_path = Path(ds_config_path)
    ds = read_json_object(ds_path, TrainError)
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise TrainError(f"{ds_path}: remove {owned!r} -- the driver owns the optimizer and LR schedule (config.training)")
    return ds


def init_distributed():
    """Initialise torch.distributed through DeepSpeed; a bare `python -m` run becomes a 1-rank world."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # not started by a launcher: single process, no mpi4py needed
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def lr_lambda(cfg: dict, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at the last step."""
    t = cfg["training"]
    warm, floor = t["warmup_steps"], t["min_lr_ratio"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * prog))

    return f


# ------------------------------------------------------------------------------------------ data
def batches(ds: CTDataset, indices: list[int], batch_size: int):
    for i in range(0, len(indices), batch_size):
        items = [ds[j] for j in indices[i:i + batch_size]]
        yield (torch.stack([it["xrays"] for it in items]), torch.stack([it["ct"] for it in items]),
               [it["name"] for it in items])


@torch.no_grad()
def coarse_cache(base, datasets, device, dtype, batch_size: int) -> dict[str, torch.Tensor]:
    """The frozen base's prediction for every patient (the base never changes, so compute once).

    The base keeps its fp32 weights (bit-identical to the file); bf16 runs use autocast instead of casting it.
    """
    cache = {}
    for ds in datasets:
        for xr, _, names in batches(ds, list(range(len(ds))), batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = base(xr.to(device)).float().cpu()
            cache.update(zip(names, out))
    return cache


def state_fingerprint(state_dict: dict) -> str:
    """sha256 over the names, dtypes and bytes of every tensor (order-independent)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------- checkpoints
def atomic_torch_save(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def export_fp32(ckpt_dir: Path, tag: str) -> dict:
    """The fp32 master weights of a saved ZeRO checkpoint as a plain state dict."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress output
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float().clone() for k, v in sd.items()}


def load_model_file(path) -> dict:
    """Read a ``best_model.pt`` written by this driver (one-line error if it is not one)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "config" not in obj:
        raise DataError(f"{path}: not a ctrefine model file (expected state_dict + config)")
    return obj


class CSVLog:
    """Append-only CSV that survives resume: rows past the resumed step are dropped first."""

    def __init__(self, path: Path, fields: list[str], keep_until_step: int | None):
        self.path, self.fields = path, fields
        if path.exists() and keep_until_step is not None:
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
            self._write(rows, "w")
        elif not path.exists():
            self._write([], "w")

    def _write(self, rows, mode):
        with self.path.open(mode, newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if mode == "w":
                w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        self._write([{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}], "a")


# --------------------------------------------------------------------------------------------- main
def run(args) -> int:
    cfg = load_config(args.config, args.set)
    ds_cfg = validate(cfg, args.stage, args.deepspeed_config)
    out = Path(cfg["checkpoint"]["dir"]) / args.stage
    ckpt_dir = out / "ckpt"
    latest_path = out / "latest.json"
    if args.resume == "never" and latest_path.exists():
        raise TrainError(f"{out} already holds a run (latest.json); use --resume auto or a new checkpoint.dir")

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    rank, world = init_distributed()
    acc = get_accelerator()
    device = torch.device(acc.device_name(), args.local_rank) if acc.device_name() == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    t = cfg["training"]
    num_epochs = t["base_num_epochs"] if args.stage == "base" and t["base_num_epochs"] else t["num_epochs"]
    seed_everything(t["seed"])

    train_ds = CTDataset(cfg["data"]["data_path"], cfg["data"]["train_split"])
    val_ds = CTDataset(cfg["data"]["data_path"], cfg["data"]["val_split"])
    base, refiner = build_models(cfg)
    bf16 = bool(ds_cfg.get("bf16", {}).get("enabled", False))
    dtype = torch.bfloat16 if bf16 else torch.float32

    frozen = None
    if args.stage == "refine":
        blob = load_model_file(base_checkpoint_path(cfg))
        if blob.get("stage") != "base":
            raise TrainError(f"{base_checkpoint_path(cfg)} is a {blob.get('stage')!r} model, not a base")
        base.load_state_dict(blob["state_dict"])
        frozen = base.to(device).eval()  # not wrapped by DeepSpeed, no optimizer state, fp32 weights
        frozen.requires_grad_(False)
        base_sha = state_fingerprint(blob["state_dict"])
        model = refiner
    else:
        model = base

    steps_per_epoch = max(1, -(-len(train_ds) // (t["batch_size"] * world)))
    total_steps = steps_per_epoch * num_epochs
    ds_cfg = dict(ds_cfg)
    ds_cfg["train_micro_batch_size_per_gpu"] = t["batch_size"]
    ds_cfg["gradient_accumulation_steps"] = 1
    ds_cfg["train_batch_size"] = t["batch_size"] * world
    opt = torch.optim.AdamW(model.parameters(), lr=t["learning_rate"], weight_decay=t["weight_decay"])
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg, total_steps)))

    start_epoch, global_step, best, bad_epochs = 0, 0, -float("inf"), 0
    if latest_path.exists():
        tag = read_json(latest_path)["tag"]
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        start_epoch, global_step = client["epoch"] + 1, client["global_step"]
        best, bad_epochs = client["best"], client["bad_epochs"]
        set_rng_state(client["rng"][rank] if rank < len(client["rng"]) else client["rng"][0])
        if rank == 0:
            print(f"resumed {args.stage} from {ckpt_dir / tag} (epoch {start_epoch}, step {global_step})", flush=True)

    coarse = None
    if frozen is not None:
        coarse = coarse_cache(frozen, [train_ds, val_ds], device, dtype, t["batch_size"])

    crit = DetailRefinementLoss(cfg["loss"]) if args.stage == "refine" else None
    term_names = list(crit.weights) if crit else ["l1"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg)
        train_log = CSVLog(out / "train_log.csv", ["epoch", "step", "lr", "loss", *term_names, "volumes_per_s"],
                           global_step if start_epoch else None)
        val_fields = (["epoch", "step", "psnr", "ssim", "hf_ratio"] if args.stage == "base" else
                      ["epoch", "step", "coarse_psnr", "refined_psnr", "gain_db", "coarse_ssim", "refined_ssim",
                       "coarse_hf_ratio", "refined_hf_ratio"])
        val_log = CSVLog(out / "val_log.csv", val_fields, global_step if start_epoch else None)
        tb = None
        if cfg["logging"]["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard not installed: CSV only
                tb = None

    def forward(xr, ct, names):
        """(loss, {term: detached value}) for one batch."""
        xr = xr.to(device, dtype)
        if args.stage == "base":
            loss = (engine(xr).float() - ct.to(device)).abs().mean()
            return loss, {"l1": loss.detach()}
        c = torch.stack([coarse[n] for n in names]).to(device, dtype)
        return crit(engine(c, xr), ct.to(device), c)

    epochs_run = 0
    from tqdm import tqdm

    for epoch in range(start_epoch, num_epochs):
        engine.train()
        g = torch.Generator().manual_seed(t["seed"] * 1000 + epoch)  # same order on every rank, every rerun
        order = torch.randperm(len(train_ds), generator=g).tolist()
        mine = order[rank::world]
        bar = tqdm(total=len(mine), desc=f"{args.stage} epoch {epoch + 1}/{num_epochs}", unit="vol",
                   disable=rank != 0 or args.no_progress, leave=False)
        tic, seen, n_b = time.time(), 0, 0
        ep_loss = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for xr, ct, names in batches(train_ds, mine, t["batch_size"]):
            loss, terms = forward(xr, ct, names)
            engine.backward(loss)
            engine.step()
            global_step += 1
            seen += len(names) * world
            ep_loss += loss.detach()
            n_b += 1
            bar.update(len(names))
            if rank == 0 and (global_step % cfg["logging"]["log_every"] == 0 or n_b == 1):
                vps = seen / max(1e-9, time.time() - tic)  # the .item() below syncs, so this rate is honest
                loss_v = loss.item()
                bar.set_postfix(loss=f"{loss_v:.4f}", vol_s=f"{vps:.1f}")
                row = {"epoch": epoch + 1, "step": global_step, "lr": sched.get_last_lr()[0], "loss": loss_v,
                       "volumes_per_s": vps}
                row.update({k: v.item() for k, v in terms.items()})
                train_log.append(row)
                if tb:
                    tb.add_scalar(f"{args.stage}/train_loss", loss_v, global_step)
        bar.close()

        # ---- validation (rank 0; ZeRO-2 keeps full parameters on every rank) -------------------------
        improved = False
        if rank == 0:
            vm = evaluate(engine.module, val_ds, args.stage, coarse, device, dtype, t["batch_size"])
            score = vm["psnr"] if args.stage == "base" else vm["refined_psnr"]
            improved = score > best
            if improved:
                best, bad_epochs = score, 0
            else:
                bad_epochs += 1
            val_log.append({"epoch": epoch + 1, "step": global_step, **vm})
            if tb:
                for k, v in vm.items():
                    tb.add_scalar(f"{args.stage}/val_{k}", v, global_step)
            msg = ", ".join(f"{k} {v:.4f}" for k, v in vm.items())
            print(f"[{args.stage}] epoch {epoch + 1}/{num_epochs} train loss {ep_loss.item() / max(1, n_b):.4f} | "
                  f"val {msg}{' (best)' if improved else ''}", flush=True)
        flags = [improved, best, bad_epochs]
        if world > 1:
            torch.distributed.broadcast_object_list(flags, src=0)
        improved, best, bad_epochs = flags

        # ---- checkpoint: periodic, on improvement, and at the end -------------------------------------
        epochs_run += 1
        last = epoch + 1 == num_epochs
        stop_early = t["early_stopping_patience"] > 0 and bad_epochs >= t["early_stopping_patience"]
        interrupted = args.stop_after_epochs is not None and epochs_run >= args.stop_after_epochs
        if improved or last or stop_early or interrupted or (epoch + 1) % cfg["checkpoint"]["save_every"] == 0:
            tag = f"epoch_{epoch + 1:04d}"
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            client = {"epoch": epoch, "global_step": global_step, "best": best, "bad_epochs": bad_epochs, "rng": rngs,
                      "config": cfg}
            tmp_tag = f".tmp_{tag}"
            engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
            if world > 1:
                torch.distributed.barrier()
            if rank == 0:
                if (ckpt_dir / tag).exists():
                    shutil.rmtree(ckpt_dir / tag)
                os.rename(ckpt_dir / tmp_tag, ckpt_dir / tag)
                write_json(latest_path, {"tag": tag, "epoch": epoch + 1, "global_step": global_step})
                if improved:
                    atomic_torch_save({"stage": args.stage, "state_dict": export_fp32(ckpt_dir, tag), "config": cfg,
                                       "metrics": vm, "epoch": epoch + 1, "global_step": global_step},
                                      out / "best_model.pt")
                    write_json(out / "best.json", {"epoch": epoch + 1, "global_step": global_step, **vm})
                keep = sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("epoch_"))
                for old in keep[:-cfg["checkpoint"]["keep_last"]]:
                    shutil.rmtree(ckpt_dir / old)
            if world > 1:
                torch.distributed.barrier()
        if stop_early:
            if rank == 0:
                print(f"[{args.stage}] early stop: no val improvement for {bad_epochs} epochs", flush=True)
            break
        if interrupted:
            break
    if frozen is not None and rank == 0:  # prove the frozen base never changed
        after = state_fingerprint(frozen.state_dict())
        write_json(out / "frozen_base_check.json", {"file": str(base_checkpoint_path(cfg)), "file_sha256": base_sha,
                                                    "after_training_sha256": after, "identical": after == base_sha})
        if after != base_sha:
            raise TrainError("the frozen base's weights changed during refine training")
    if rank == 0:
        print(f"[{args.stage}] done: best val {'PSNR' if args.stage == 'base' else 'refined PSNR'} {best:.3f} dB -> "
              f"{out / 'best_model.pt'}", flush=True)
    return 0


@torch.no_grad()
def evaluate(model, ds, stage, coarse, device, dtype, batch_size) -> dict:
    """Mean val metrics: base -> psnr/ssim/hf_ratio; refine -> coarse vs refined and the gain."""
    keys = ("psnr", "ssim", "hf_ratio")

    def pick(pred, ct, prefix=""):
        m = all_metrics(pred, ct)
        return {prefix + k: m[k] for k in keys}

    model.eval()
    acc: dict[str, list] = {}
    for xr, ct, names in batches(ds, list(range(len(ds))), batch_size):
        xr = xr.to(device, dtype)
        if stage == "base":
            vals = pick(model(xr).float().cpu(), ct)
        else:
            c = torch.stack([coarse[n] for n in names]).to(device, dtype)
            ref = model(c, xr).float().cpu()
            vals = {**pick(c.float().cpu(), ct, "coarse_"), **pick(ref, ct, "refined_")}
        for k, v in vals.items():
            acc.setdefault(k, []).append(v)
    model.train()
    res = {k: float(torch.cat(v).mean()) for k, v in acc.items()}
    if stage == "refine":
        res["gain_db"] = res["refined_psnr"] - res["coarse_psnr"]
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, TrainError, DataError) as exc:
        print(f"ctrefine.train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
