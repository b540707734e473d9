"""One DeepSpeed driver for both stages: ``base`` (X-rays -> coarse CT) and ``refine`` (frozen base +
DetailRefinementNetwork).

Launch (ZeRO-2 + bf16 from ds_config.json; batch size and LR always come from the ctrefine config)::

    # one or more GPUs on this machine
    deepspeed --num_gpus 4 --module ctrefine.train base   --config full --deepspeed_config ds_config.json
    deepspeed --num_gpus 4 --module ctrefine.train refine --config full --deepspeed_config ds_config.json
    # several machines: a hostfile with lines "node1 slots=8"
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --module ctrefine.train refine --config full
    # CPU (gloo): --num_gpus sets the number of ranks; one thread per rank
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --module ctrefine.train base --config cpu-small
    # a plain single process (no launcher)
    python -m ctrefine.train base --config cpu-small

``--config`` takes a shipped preset name (cpu-small, cpu-medium, full) or a JSON file. Outputs under
``<checkpoint.dir>/<stage>/``: ``config.json`` (resolved), ``train_log.csv`` (per logged step),
``val_log.csv`` (per epoch), checkpoints and the best model file (:mod:`.checkpointing`). A rerun
resumes from ``latest.json`` (``--resume never`` refuses a directory that holds a run).
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ds_config_path, load_config, read_json_object
from ..device import DevicePolicy, rank_device
from ..data.augment import augment_radiographs
from ..data.dataset import CTDataset, ResidentSplit, read_splits
from ..data.io import read_json, write_json
from ..errors import OneLineParser, UserError
from ..models.layout import channels_last_layers, conv_widths
from .checkpointing import Checkpointer
from .logs import CSVLog, tensorboard_writer
from .stages import STAGES, Stage


# --------------------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = OneLineParser(prog="ctrefine train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=tuple(STAGES), help="base: train the reconstructor; refine: train the refiner on "
                                                         "the frozen base")
    p.add_argument("--config", required=True, help="preset name (cpu-small, cpu-medium, full) or a JSON file")
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (default: the shipped ds_config.json: ZeRO-2, bf16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.num_epochs=2 (VALUE is JSON)")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from latest.json when present (default); never: refuse to reuse a directory")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop this invocation after N epochs (the schedule still spans the stage's epochs); for "
                        "splitting a run across jobs")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto (default): ds_config's bf16 where the hardware has it (GPUs, CPUs with AMX / "
                        "AVX512-BF16), else fp32; bf16 / fp32 force one")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def validate(cfg: Config, stage: type[Stage], ds_config) -> dict:
    """Every check that can fail, before any file is written. Returns the DeepSpeed config dict."""
    data = Path(cfg.data.data_path)
    if not data.is_dir():
        raise UserError(f"data.data_path {str(data)!r} is not a directory (make one with `ctrefine make-data`)")
    if not (data / "splits.json").exists():
        raise UserError(f"data.data_path {str(data)!r} has no splits.json (not a ctrefine dataset)")
    splits = read_splits(data)
    for key in ("train_split", "val_split"):
        name = getattr(cfg.data, key)
        if not splits.get(name):
            raise UserError(f"dataset {str(data)!r} has no patients in split {name!r} (data.{key})")
    hdr = read_json(data / "dataset.json") if (data / "dataset.json").exists() else {}
    m = cfg.model
    if hdr and (hdr.get("size") != m.volume_size or hdr.get("xray_size") != m.xray_size):
        raise UserError(f"dataset {str(data)!r} is {hdr.get('size')}^3 / {hdr.get('xray_size')}^2 but the config expects "
                        f"{m.volume_size}^3 / {m.xray_size}^2")
    stage.check(cfg)
    ds_path = Path(ds_config) if ds_config else ds_config_path()
    ds = read_json_object(ds_path, UserError)
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise UserError(f"{ds_path}: remove {owned!r} -- the driver owns the optimizer and LR schedule (config.training)")
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


def lr_lambda(cfg: Config, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at the last step."""
    warm, floor = cfg.training.warmup_steps, cfg.training.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * prog))

    return f


def _resident_splits(policy: DevicePolicy, train_ds: CTDataset, val_ds: CTDataset, raw: bool):
    """The training split with its radiographs in the compute dtype (raw ones on the host for the
    augmentation when ``raw``) and the validation split in float32, each on the device if it fits."""
    def split(ds, dtype, raw=False):
        return ResidentSplit(ds, policy.device, dtype, raw=raw, resident=policy.keep_resident(ResidentSplit.nbytes(ds, dtype)))

    return split(train_ds, policy.input_dtype, raw), split(val_ds, torch.float32)


NONFINITE_STEPS = 10  # consecutive steps with a NaN / Inf loss that end a run (DeepSpeed skips each such step)


def _stop_if_not_finite(bad: torch.Tensor, steps: int, epoch: int, global_step: int, world: int) -> None:
    """End the run, on every rank and before anything is validated or saved, when the loss has not been
    finite for the last :data:`NONFINITE_STEPS` steps (or for every step of a shorter epoch)."""
    worst = bad.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    n = int(worst.item())
    if n >= min(NONFINITE_STEPS, max(1, steps)):
        raise UserError(f"the training loss was NaN or Inf for the last {n} steps (epoch {epoch + 1}, step "
                        f"{global_step}): every such step was skipped, so nothing is learned; check the data and "
                        f"training.learning_rate (the last good checkpoint is kept)")


def _apply_layout(model, policy: DevicePolicy, t, stage: str, rank: int) -> None:
    """Channels-last convolutions and compilation, as the policy decides for this model."""
    if policy.use_channels_last(conv_widths(model), t.channels_last):
        channels_last_layers(model)
        if rank == 0:
            print(f"[{stage}] 3D convolutions in channels-last-3d (training.channels_last={t.channels_last})", flush=True)
    if policy.compile:
        model.compile()  # in place: parameter names and checkpoints unchanged


# --------------------------------------------------------------------------------------------- main
def run(args) -> int:
    cfg = load_config(args.config, args.set)
    stage_cls = STAGES[args.stage]
    ds_cfg = validate(cfg, stage_cls, args.deepspeed_config)
    out = Path(cfg.checkpoint.dir) / args.stage
    ckpt = Checkpointer(out, cfg.checkpoint.keep_last, rank=0, world=1)
    if args.resume == "never" and ckpt.has_run():
        raise UserError(f"{out} already holds a run (latest.json); use --resume auto or a new checkpoint.dir")
    ckpt.check_owned()
    ckpt.check_compatible(cfg)

    import deepspeed

    rank, world = init_distributed()
    ckpt.rank, ckpt.world = rank, world
    device = rank_device(args.local_rank, world)
    t = cfg.training
    seed_everything(t.seed)
    policy = DevicePolicy.for_run(device, ds_cfg, args.precision, t.compile)
    ds_cfg = dict(ds_cfg, bf16=dict(ds_cfg.get("bf16", {}), enabled=policy.dtype == torch.bfloat16))
    if policy.note and rank == 0:
        print(f"[{args.stage}] {policy.note}", flush=True)

    train_ds = CTDataset(cfg.data.data_path, cfg.data.train_split)
    val_ds = CTDataset(cfg.data.data_path, cfg.data.val_split)
    stage = stage_cls(cfg, policy)
    model = stage.build([train_ds, val_ds])
    train_split, val_split = _resident_splits(policy, train_ds, val_ds, raw=cfg.augment.enabled)
    _apply_layout(model, policy, t, args.stage, rank)
    num_epochs = stage.num_epochs()

    steps_per_epoch = max(1, -(-len(train_ds) // (t.batch_size * world)))
    total_steps = steps_per_epoch * num_epochs
    ds_cfg = dict(ds_cfg, train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=1,
                  train_batch_size=t.batch_size * world)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg, total_steps)))

    start_epoch, global_step, best, bad_epochs = 0, 0, -float("inf"), 0
    client = ckpt.resume(engine)
    if client is not None:
        start_epoch, global_step = client["epoch"] + 1, client["global_step"]
        best, bad_epochs = client["best"], client["bad_epochs"]
        stage.load_state_dict(client.get("stage", {}))
        set_rng_state(client["rng"][rank] if rank < len(client["rng"]) else client["rng"][0])
        if rank == 0:
            print(f"resumed {args.stage} from {ckpt.ckpt_dir / client['tag']} (epoch {start_epoch}, step {global_step})",
                  flush=True)

    tb = None
    if rank == 0:
        ckpt.mark(args.stage)
        write_json(out / "config.json", cfg.to_dict())
        keep = global_step if start_epoch else None
        train_log = CSVLog(out / "train_log.csv", ["epoch", "step", "lr", "loss", *stage.term_names, "volumes_per_s",
                                                   "skipped_steps"], keep)
        val_log = CSVLog(out / "val_log.csv", ["epoch", "step", *stage.val_fields, "train_s", "val_s"], keep)
        tb = tensorboard_writer(cfg.logging.tensorboard, out / "tb")

    from tqdm import tqdm

    epochs_run = 0
    for epoch in range(start_epoch, num_epochs):
        engine.train()
        g = torch.Generator().manual_seed(t.seed * 1000 + epoch)  # same order on every rank, every rerun
        mine = torch.randperm(len(train_ds), generator=g).tolist()[rank::world]
        bar = tqdm(total=len(mine), desc=f"{args.stage} epoch {epoch + 1}/{num_epochs}", unit="vol",
                   disable=rank != 0 or args.no_progress, leave=False)
        tic, seen, n_b = time.time(), 0, 0
        ep_loss = torch.zeros((), device=device)  # summed on the device: no host sync per step
        bad = torch.zeros((), device=device)  # consecutive steps with a non-finite loss, counted on the device
        aug = torch.Generator().manual_seed(t.seed * 1000 + epoch + 7919 * (rank + 1))  # per epoch: exact resume
        for xr, ct, names in train_split.batches(mine, t.batch_size):
            if cfg.augment.enabled:
                xr = augment_radiographs(xr, cfg.augment, aug)
            loss, terms = stage.loss(engine, xr, ct, names)
            engine.backward(loss)
            engine.step()
            global_step += 1
            seen += len(names) * world
            ep_loss += loss.detach()
            bad = torch.where(torch.isfinite(loss.detach()), torch.zeros_like(bad), bad + 1)
            n_b += 1
            bar.update(len(names))
            if rank == 0 and (global_step % cfg.logging.log_every == 0 or n_b == 1):
                vps = seen / max(1e-9, time.time() - tic)  # the .item() below syncs, so this rate is honest
                loss_v = loss.item()
                bar.set_postfix(loss=f"{loss_v:.4f}", vol_s=f"{vps:.1f}")
                train_log.append({"epoch": epoch + 1, "step": global_step, "lr": sched.get_last_lr()[0], "loss": loss_v,
                                  "volumes_per_s": vps, **{k: v.item() for k, v in terms.items()},
                                  "skipped_steps": engine.skipped_steps})  # DeepSpeed's count of non-finite steps
                if tb:
                    tb.add_scalar(f"{args.stage}/train_loss", loss_v, global_step)
        bar.close()
        policy.synchronize()
        train_s = time.time() - tic
        _stop_if_not_finite(bad, n_b, epoch, global_step, world)

        # ---- validation (rank 0; ZeRO-2 keeps full parameters on every rank) -------------------------
        improved, vm = False, {}
        if rank == 0:
            engine.module.eval()
            tv = time.time()
            vm = stage.evaluate(engine.module, val_split, t.batch_size)  # ends with one transfer: synchronised
            val_s = time.time() - tv
            engine.module.train()
            improved = vm[stage.score_key] > best
            best, bad_epochs = (vm[stage.score_key], 0) if improved else (best, bad_epochs + 1)
            val_log.append({"epoch": epoch + 1, "step": global_step, **vm, "train_s": train_s, "val_s": val_s})
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
        stop_early = t.early_stopping_patience > 0 and bad_epochs >= t.early_stopping_patience
        interrupted = args.stop_after_epochs is not None and epochs_run >= args.stop_after_epochs
        if improved or last or stop_early or interrupted or (epoch + 1) % cfg.checkpoint.save_every == 0:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            client = {"epoch": epoch, "global_step": global_step, "best": best, "bad_epochs": bad_epochs,
                      "rng": rngs, "config": cfg.to_dict(), "stage": stage.state_dict()}
            tag = ckpt.save(engine, epoch + 1, client)
            if improved and rank == 0:
                ckpt.export_best(tag, args.stage, cfg, vm, epoch + 1, global_step)
            ckpt.rotate()
        if stop_early and rank == 0:
            print(f"[{args.stage}] early stop: no val improvement for {bad_epochs} epochs", flush=True)
        if stop_early or interrupted:
            break
    if rank == 0:
        stage.finish(out)
        print(f"[{args.stage}] done: best val {stage.score_key} {best:.3f} dB -> {out / 'best_model.pt'}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"ctrefine.train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctrefine.train: interrupted; the last complete checkpoint (latest.json) is where a rerun resumes",
              file=sys.stderr)
        return 130
