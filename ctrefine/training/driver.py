"""One DeepSpeed driver for both stages: ``base`` (X-rays -> coarse CT) and ``refine`` (frozen base +
DetailRefinementNetwork), run by ``ctrefine train`` / ``deepspeed --module ctrefine.train`` (every launch
command is in :data:`ctrefine.cli.TRAIN_EPILOG`, which ``ctrefine train --help`` prints; the options are
parsed there, the one parser).

Outputs under ``<checkpoint.dir>/<stage>/``: ``config.json`` (resolved), ``train_log.csv`` (per logged step),
``val_log.csv`` (per epoch), checkpoints and the best model file (:mod:`.checkpointing`). A rerun
resumes from ``latest.json`` (``--resume never`` refuses a directory that holds a run).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_weights_into
from ..models import BUILDERS
from ..config import Config, ds_config_path, load_config, read_json_object
from ..device import DevicePolicy, env_int, free_port, has_cuda, kernel_mode, rank_device
from ..data.augment import augment_radiographs
from ..data.dataset import CTDataset, DatasetHeader, ResidentSplit, read_splits
from ..jsonio import write_json
from ..errors import UserError
from ..outputs import path_lock
from ..models.layout import channels_last_layers, conv_widths
from ..models.norm import use_fused_groupnorm
from .checkpointing import Checkpointer
from .ds_config import check_ds_config
from .engine import PlainEngine, checkpoint_engine, choose_engine
from .logs import CSVLog, tensorboard_writer
from .stages import STAGES, Stage


# --------------------------------------------------------------------------------------------- setup
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
    hdr = DatasetHeader.read(data)
    m = cfg.model
    if hdr.raw and (hdr.size != m.volume_size or hdr.xray_size != m.xray_size):
        raise UserError(f"dataset {str(data)!r} is {hdr.size}^3 / {hdr.xray_size}^2 but the config expects "
                        f"{m.volume_size}^3 / {m.xray_size}^2")
    stage.check(cfg)
    if cfg.training.init_checkpoint:  # tried now (on a throw-away model): a bad file fails before anything is written
        load_weights_into(BUILDERS[stage.name](cfg), cfg.training.init_checkpoint, stage.name)
    ds_path = Path(ds_config) if ds_config else ds_config_path()
    return check_ds_config(read_json_object(ds_path, UserError), ds_path)


def init_distributed():
    """Initialise torch.distributed through DeepSpeed; a bare `python -m` run becomes a 1-rank world."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # not started by a launcher: single process, no mpi4py needed
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if get_accelerator().device_name() == "cpu":
        _skip_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _skip_shared_memory_allreduce() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce (C++, ~50 s and a
    compiler on first use) that only its inference engine calls; training reduces through gloo, so it is
    not built."""
    import importlib

    # by module path: the package's attribute ``deepspeed.comm.torch`` is torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if has_cuda():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and has_cuda():
        torch.cuda.set_rng_state_all(st["cuda"])


class CosineSchedule:
    """LR factor at a step: linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at
    ``total_steps``. A callable object, not a closure, so LambdaLR's state_dict (inside every DeepSpeed
    checkpoint) carries ``total_steps``, which a time budget refits while the run goes."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float):
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        warm, floor = self.warmup_steps, self.min_lr_ratio
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + float(np.cos(np.pi * prog)))


def lr_lambda(cfg: Config, total_steps: int) -> CosineSchedule:
    return CosineSchedule(total_steps, cfg.training.warmup_steps, cfg.training.min_lr_ratio)


def epochs_within(budget_s: float, elapsed_s: float, epoch_s: float, done: int, planned: int) -> int:
    """How many epochs an invocation with a wall budget ends after: those ``done`` plus as many more of
    ``epoch_s`` (the last epoch's wall, its checkpoint included) as fit in what is left; never more
    than ``planned``, never fewer than ``done``."""
    more = int(max(0.0, budget_s - elapsed_s) // max(epoch_s, 1e-6))
    return max(done, min(planned, done + more))


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
    """Fused kernels, channels-last convolutions and compilation, as the policy decides for this model."""
    use_fused_groupnorm(model, policy.kernels.groupnorm)
    if policy.use_channels_last(conv_widths(model), t.channels_last):
        channels_last_layers(model)
        if rank == 0:
            print(f"[{stage}] 3D convolutions in channels-last-3d (training.channels_last={t.channels_last})", flush=True)
    if policy.compile:
        model.compile()  # in place: parameter names and checkpoints unchanged


# --------------------------------------------------------------------------------------------- main
@dataclass
class Run:
    """What one invocation of the driver holds from set-up to the last epoch."""

    args: argparse.Namespace
    cfg: Config
    stage: Stage
    policy: DevicePolicy
    ckpt: Checkpointer
    engine: object
    sched: object
    train_split: ResidentSplit
    val_split: ResidentSplit
    rank: int
    world: int
    num_epochs: int  # the stage's, or fewer when training.time_budget_s refits the schedule
    steps_per_epoch: int
    started: float  # time.time() at the invocation's start: what a time budget counts from
    start_epoch: int = 0
    global_step: int = 0
    best: float = -float("inf")
    bad_epochs: int = 0
    logs: dict = field(default_factory=dict)  # rank 0: "train", "val" CSV logs and "tb" (or None)

    @property
    def out(self) -> Path:
        return self.ckpt.out


def _checked(args) -> tuple[Config, dict, Checkpointer]:
    """Every check before distributed start-up: config, dataset, DeepSpeed config, the run folder."""
    kernel_mode()  # a bad CTREFINE_KERNELS fails here, before the run folder is written
    env_int("LOCAL_RANK", 0)
    cfg = load_config(args.config, args.set)
    ds_cfg = validate(cfg, STAGES[args.stage], args.deepspeed_config)
    out = Path(cfg.checkpoint.dir) / args.stage
    ckpt = Checkpointer(out, cfg.checkpoint.keep_last, rank=0, world=1)
    if args.resume == "never" and ckpt.has_run():
        raise UserError(f"{out} already holds a run (latest.json); use --resume auto or a new checkpoint.dir")
    ckpt.check_owned()
    ckpt.check_compatible(cfg)
    return cfg, ds_cfg, ckpt


def _set_up(args, started: float, hold: contextlib.ExitStack) -> Run:
    """Distributed start-up, the device policy, the stage and its model, resident splits, the engine."""
    cfg, ds_cfg, ckpt = _checked(args)
    if env_int("RANK", 0) == 0:  # another `train` into this run folder is refused, not interleaved
        hold.enter_context(path_lock(ckpt.out, "training run"))
        ckpt.check_owned()  # again, under the lock
    rank, world = init_distributed()
    if args.local_rank is None:
        args.local_rank = env_int("LOCAL_RANK", 0)
    ckpt.rank, ckpt.world = rank, world
    t = cfg.training
    seed_everything(t.seed)
    policy = DevicePolicy.for_run(rank_device(args.local_rank, world), ds_cfg, args.precision, t.compile)
    if policy.note and rank == 0:
        print(f"[{args.stage}] {policy.note}", flush=True)
    train_ds = CTDataset(cfg.data.data_path, cfg.data.train_split)
    val_ds = CTDataset(cfg.data.data_path, cfg.data.val_split)
    stage = STAGES[args.stage](cfg, policy)
    model = stage.build([train_ds, val_ds])
    if t.init_checkpoint:
        sha = load_weights_into(model, t.init_checkpoint, stage.name)
        if rank == 0:
            print(f"[{args.stage}] initialised from {t.init_checkpoint} (weights sha256 {sha[:12]}, not the file's)",
                  flush=True)
    train_split, val_split = _resident_splits(policy, train_ds, val_ds, raw=cfg.augment.enabled)
    _apply_layout(model, policy, t, args.stage, rank)
    num_epochs = stage.num_epochs()
    steps_per_epoch = max(1, -(-len(train_ds) // (t.batch_size * world)))
    ds_cfg = dict(ds_cfg, bf16=dict(ds_cfg.get("bf16", {}), enabled=policy.dtype == torch.bfloat16),
                  train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=1,
                  train_batch_size=t.batch_size * world)
    engine, sched = _engine(cfg, ds_cfg, model, policy, world, steps_per_epoch * num_epochs)
    if rank == 0 and isinstance(engine, PlainEngine):
        print(f"[{args.stage}] one device: plain engine ({str(policy.dtype).replace('torch.', '')}, fused AdamW on fp32 "
              f"masters; training.engine={t.engine})", flush=True)
    return Run(args, cfg, stage, policy, ckpt, engine, sched, train_split, val_split, rank, world, num_epochs,
               steps_per_epoch, started)


def _engine(cfg: Config, ds_cfg: dict, model, policy: DevicePolicy, world: int, total_steps: int):
    """``(engine, LR scheduler)``: :class:`PlainEngine` on one device, DeepSpeed ZeRO on several
    (``training.engine``; :mod:`ctrefine.training.engine`)."""
    t = cfg.training
    schedule = lr_lambda(cfg, total_steps)
    if choose_engine(t.engine, world) == "plain":
        engine = PlainEngine(model, policy, t.learning_rate, t.weight_decay, schedule, ds_cfg.get("gradient_clipping", 0.0))
        return engine, engine.scheduler
    import deepspeed

    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg,
                                               lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
    return engine, sched


def _resume(r: Run) -> None:
    """Continue from the newest complete checkpoint, if any: counters, stage state, every RNG."""
    _check_resumable_engine(r)
    client = r.ckpt.resume(r.engine)
    if client is None:
        return
    r.start_epoch, r.global_step = client["epoch"] + 1, client["global_step"]
    r.best, r.bad_epochs = client["best"], client["bad_epochs"]
    r.num_epochs = client.get("num_epochs", r.num_epochs)  # as a time budget left it (the schedule: in the engine)
    r.stage.load_state_dict(client.get("stage", {}))
    set_rng_state(client["rng"][r.rank] if r.rank < len(client["rng"]) else client["rng"][0])
    if r.rank == 0:
        print(f"resumed {r.args.stage} from {r.ckpt.ckpt_dir / client['tag']} (epoch {r.start_epoch}, step "
              f"{r.global_step})", flush=True)


def _check_resumable_engine(r: Run) -> None:
    """A run resumes only with the engine that wrote its checkpoint (their layouts differ)."""
    tag = r.ckpt.latest_tag()
    if tag is None:
        return
    have, want = checkpoint_engine(r.ckpt.ckpt_dir / tag), "plain" if isinstance(r.engine, PlainEngine) else "deepspeed"
    if have != want:
        raise UserError(f"{r.ckpt.ckpt_dir / tag}: written by the {have} engine, this run uses the {want} engine; "
                        f"resume with --set training.engine={have} (and the same number of ranks)")


def _open_logs(r: Run) -> None:
    """Rank 0: the run folder's marker and resolved config, then the CSV logs (rows past a resumed step dropped)."""
    if r.rank != 0:
        return
    r.ckpt.mark(r.args.stage)
    write_json(r.out / "config.json", r.cfg.to_dict())
    keep = r.global_step if r.start_epoch else None
    r.logs = {"train": CSVLog(r.out / "train_log.csv", ["epoch", "step", "lr", "loss", *r.stage.term_names,
                                                         "volumes_per_s", "skipped_steps"], keep),
              "val": CSVLog(r.out / "val_log.csv", ["epoch", "step", *r.stage.val_fields, "train_s", "val_s"], keep),
              "tb": tensorboard_writer(r.cfg.logging.tensorboard, r.out / "tb")}


def _train_epoch(r: Run, epoch: int) -> tuple[float, float]:
    """One epoch of steps; returns (mean training loss, seconds). No host synchronisation per step: the
    loss is summed and its finiteness counted on the device, read at logged steps and the epoch's end."""
    from tqdm import tqdm

    t, device = r.cfg.training, r.policy.device
    r.engine.train()
    g = torch.Generator().manual_seed(t.seed * 1000 + epoch)  # same order on every rank, every rerun
    mine = torch.randperm(len(r.train_split), generator=g).tolist()[r.rank::r.world]
    bar = tqdm(total=len(mine), desc=f"{r.args.stage} epoch {epoch + 1}/{r.num_epochs}", unit="vol",
               disable=r.rank != 0 or r.args.no_progress, leave=False)
    tic, seen, n_b = time.time(), 0, 0
    ep_loss, bad = torch.zeros((), device=device), torch.zeros((), device=device)
    aug = torch.Generator().manual_seed(t.seed * 1000 + epoch + 7919 * (r.rank + 1))  # per epoch: exact resume
    for xr, ct, names in r.train_split.batches(mine, t.batch_size):
        if r.cfg.augment.enabled:
            xr = augment_radiographs(xr, r.cfg.augment, aug)
        loss, terms = r.stage.loss(r.engine, xr, ct, names)
        r.engine.backward(loss)
        r.engine.step()
        r.global_step += 1
        seen += len(names) * r.world
        ep_loss += loss.detach()
        bad = torch.where(torch.isfinite(loss.detach()), torch.zeros_like(bad), bad + 1)
        n_b += 1
        bar.update(len(names))
        if r.rank == 0 and (r.global_step % r.cfg.logging.log_every == 0 or n_b == 1):
            vps = seen / max(1e-9, time.time() - tic)  # the .item() below syncs, so this rate is honest
            loss_v = loss.item()
            bar.set_postfix(loss=f"{loss_v:.4f}", vol_s=f"{vps:.1f}")
            r.logs["train"].append({"epoch": epoch + 1, "step": r.global_step, "lr": r.sched.get_last_lr()[0],
                                    "loss": loss_v, "volumes_per_s": vps, **{k: v.item() for k, v in terms.items()},
                                    "skipped_steps": r.engine.skipped_steps})  # DeepSpeed's non-finite steps
            if r.logs["tb"]:
                r.logs["tb"].add_scalar(f"{r.args.stage}/train_loss", loss_v, r.global_step)
    bar.close()
    r.policy.synchronize()
    train_s = time.time() - tic
    _stop_if_not_finite(bad, n_b, epoch, r.global_step, r.world)
    return ep_loss.item() / max(1, n_b), train_s


def _validate(r: Run, epoch: int, train_loss: float, train_s: float) -> tuple[bool, dict]:
    """Rank 0 validates (ZeRO-2 keeps full parameters on every rank) and logs; every rank learns whether
    the score improved. Returns (improved, validation metrics -- empty on other ranks)."""
    improved, vm = False, {}
    if r.rank == 0:
        module = r.engine.module
        module.eval()
        tv = time.time()
        vm = r.stage.evaluate(module, r.val_split, r.cfg.training.batch_size)  # ends with one transfer: synced
        val_s = time.time() - tv
        module.train()
        improved = vm[r.stage.score_key] > r.best
        r.best, r.bad_epochs = (vm[r.stage.score_key], 0) if improved else (r.best, r.bad_epochs + 1)
        r.logs["val"].append({"epoch": epoch + 1, "step": r.global_step, **vm, "train_s": train_s, "val_s": val_s})
        if r.logs["tb"]:
            for k, v in vm.items():
                r.logs["tb"].add_scalar(f"{r.args.stage}/val_{k}", v, r.global_step)
        msg = ", ".join(f"{k} {v:.4f}" for k, v in vm.items())
        print(f"[{r.args.stage}] epoch {epoch + 1}/{r.num_epochs} train loss {train_loss:.4f} | "
              f"val {msg}{' (best)' if improved else ''}", flush=True)
    flags = [improved, r.best, r.bad_epochs]
    if r.world > 1:
        torch.distributed.broadcast_object_list(flags, src=0)
    improved, r.best, r.bad_epochs = flags
    return improved, vm


def _save(r: Run, epoch: int, improved: bool, vm: dict) -> None:
    """A checkpoint with every rank's RNG state; the best model file when the score improved."""
    rngs = [None] * r.world
    if r.world > 1:
        torch.distributed.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    client = {"epoch": epoch, "global_step": r.global_step, "best": r.best, "bad_epochs": r.bad_epochs,
              "num_epochs": r.num_epochs,
              "rng": rngs, "config": r.cfg.to_dict(), "stage": r.stage.state_dict()}
    def publish(tag):
        r.ckpt.export_best(tag, r.args.stage, r.cfg, vm, epoch + 1, r.global_step)

    r.ckpt.save(r.engine, epoch + 1, client, publish if improved else None)
    r.ckpt.rotate()


def _fit_to_budget(r: Run, epoch: int, epoch_s: float) -> None:
    """With training.time_budget_s: end after the epochs that fit, the cosine schedule refitted to them."""
    budget = r.cfg.training.time_budget_s
    if budget is None:
        return
    planned = r.stage.num_epochs()
    fit = [epochs_within(budget, time.time() - r.started, epoch_s, epoch + 1, planned)]
    if r.world > 1:  # rank 0's clock decides for every rank
        torch.distributed.broadcast_object_list(fit, src=0)
    fit = fit[0]
    if fit != r.num_epochs:
        r.num_epochs = fit
        r.sched.lr_lambdas[0].total_steps = fit * r.steps_per_epoch
        if r.rank == 0:
            print(f"[{r.args.stage}] time budget {budget:.0f} s: {fit} of {planned} epochs fit (an epoch takes "
                  f"{epoch_s:.1f} s); the schedule now ends there", flush=True)


def run(args) -> int:
    with contextlib.ExitStack() as hold:  # rank 0 holds the run folder's lock for the whole run
        return _run(args, hold)


def _run(args, hold: contextlib.ExitStack) -> int:
    r = _set_up(args, time.time(), hold)
    _resume(r)
    _open_logs(r)
    t = r.cfg.training
    save_s, epoch, epochs_run = 0.0, r.start_epoch, 0
    while epoch < r.num_epochs:  # a time budget may lower r.num_epochs as the run goes
        epochs_run += 1
        tic = time.time()
        improved, vm = _validate(r, epoch, *_train_epoch(r, epoch))
        _fit_to_budget(r, epoch, time.time() - tic + save_s)
        # checkpoint: periodic, on improvement, and at the end
        stop_early = t.early_stopping_patience > 0 and r.bad_epochs >= t.early_stopping_patience
        interrupted = args.stop_after_epochs is not None and epochs_run >= args.stop_after_epochs
        if improved or epoch + 1 == r.num_epochs or stop_early or interrupted or \
                (epoch + 1) % r.cfg.checkpoint.save_every == 0:
            tic = time.time()
            _save(r, epoch, improved, vm)
            save_s = max(save_s, time.time() - tic)
        if stop_early and r.rank == 0:
            print(f"[{args.stage}] early stop: no val improvement for {r.bad_epochs} epochs", flush=True)
        if stop_early or interrupted:
            break
        epoch += 1
    if r.rank == 0:
        r.stage.finish(r.out)
        if not (r.out / "best_model.pt").is_file():
            raise UserError(f"{r.out / 'best_model.pt'}: missing although the run's checkpoints are complete; "
                            f"train again into a new checkpoint.dir")
        print(f"[{args.stage}] done: best val {r.stage.score_key} {r.best:.3f} dB -> {r.out / 'best_model.pt'}",
              flush=True)
    return 0
