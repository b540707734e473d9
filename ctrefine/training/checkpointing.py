"""Checkpoints of a training run: periodic DeepSpeed checkpoints, resume, rotation, the best model file.

Layout under ``<checkpoint.dir>/<stage>/``::

    ckpt/epoch_NNNN/      DeepSpeed checkpoint (model, optimizer, LR schedule) + client state (epoch,
                          step, best score, patience counter, every rank's RNG state, the config)
    ctrefine_run.json     the marker written first: this folder is a ctrefine run (anything else is never touched)
    latest.json           the newest *complete* checkpoint: written only after the rename below
    best_model.pt         plain fp32 model file (:mod:`ctrefine.checkpoint`) of the best epoch
    best.json             its epoch, step and validation metrics

A checkpoint is saved under a temporary tag and renamed when every rank has written its part, so an
interrupted save never becomes the one a resume reads.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import checkpoint_globals, export_fp32, save_model_file
from ..config import Config, upgrade_stored
from ..jsonio import read_json, write_json
from ..errors import UserError
from ..outputs import write_failure


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return keys


def verify_checkpoint(tag_dir: Path) -> None:
    """Every file of a checkpoint folder, at any depth, is a plain file (no link) that loads without running
    code; a folder or link inside it is refused too (one-line :class:`UserError`). DeepSpeed may read
    files below the tag folder (``zero/``, universal checkpoints): none is left unchecked."""
    allowed = checkpoint_globals()
    for f in sorted(Path(tag_dir).rglob("*")):
        if f.is_symlink() or not f.is_file():
            kind = "a symbolic link" if f.is_symlink() else "a folder"
            raise UserError(f"{f}: refusing to resume, {kind} inside a checkpoint: not a checkpoint as ctrefine "
                            f"writes them (resume only runs you made)")
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            bad = re.search(r"GLOBAL (\S+)", str(exc))
            why = f"it would call {bad.group(1)}" if bad else f"unreadable: {type(exc).__name__}"
            raise UserError(f"{f}: refusing to resume from it, {why}: not a checkpoint as ctrefine writes them "
                            f"(resume only runs you made)") from None


RUN_MARKER = "ctrefine_run.json"  # what makes a folder ctrefine's training run
RUN_KIND = "ctrefine training run"


class Checkpointer:
    def __init__(self, out: Path, keep_last: int, rank: int, world: int):
        self.out, self.keep_last, self.rank, self.world = Path(out), keep_last, rank, world
        self.ckpt_dir = self.out / "ckpt"
        self.latest_path = self.out / "latest.json"

    def has_run(self) -> bool:
        return self.latest_path.exists()

    def latest_tag(self) -> str | None:
        """The tag ``latest.json`` names, or None (checked when :meth:`resume` reads it)."""
        if not self.has_run():
            return None
        latest = read_json(self.latest_path)
        tag = latest.get("tag") if isinstance(latest, dict) else None
        return tag if isinstance(tag, str) and re.fullmatch(r"epoch_\d{4,}", tag) else None

    def check_owned(self) -> None:
        """The run folder is missing, empty, or ctrefine's own (its marker file says so): a folder holding
        anything else is refused before a file is written, so a user's config or CSV is never touched."""
        if not self.out.exists():
            return
        if not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is a file, not a training run folder")
        if not any(self.out.iterdir()):
            return
        marker = read_json(self.out / RUN_MARKER) if (self.out / RUN_MARKER).is_file() else {}
        if marker.get("kind") != RUN_KIND:
            raise UserError(f"{self.out}: holds files that are not a ctrefine training run (no {RUN_MARKER}); "
                            f"choose another checkpoint.dir (ctrefine never writes into it)")

    def mark(self, stage: str) -> None:
        """Create the run folder with its marker first (rank 0), before any other file; remove the partial
        checkpoints a killed earlier invocation may have left (``ckpt/.tmp_*``: never a resume point)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / RUN_MARKER).exists():
            write_json(self.out / RUN_MARKER, {"kind": RUN_KIND, "stage": stage})
        for stale in self.ckpt_dir.glob(".tmp_epoch_*") if self.ckpt_dir.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)

    def check_compatible(self, cfg: Config) -> None:
        """Refuse to resume a run whose model was built from another ``model`` section (names the keys)."""
        if not self.has_run():
            return
        stored = self.out / "config.json"
        if not stored.exists():
            return
        raw = read_json(stored)
        old = upgrade_stored(raw).get("model") if isinstance(raw, dict) else None
        if not isinstance(old, dict):
            raise UserError(f"{stored}: holds no \"model\" section as ctrefine writes it; use a new checkpoint.dir")
        diff = _diff_keys(old, cfg.to_dict()["model"], "model.")
        if diff:
            raise UserError(f"{self.out} holds a run with a different model ({', '.join(diff)}); "
                            f"use a new checkpoint.dir or the old model settings")

    def resume(self, engine) -> dict | None:
        """Load the newest complete checkpoint into ``engine``; its client state, or None for a fresh run.

        DeepSpeed's loader unpickles with ``weights_only=False``, which would run code planted in a
        checkpoint file; so every file of the checkpoint is first read with ``weights_only=True`` and
        only the globals a ctrefine checkpoint holds (:func:`~ctrefine.checkpoint.checkpoint_globals`) allowed. A file that
        needs anything else is refused before the engine sees it.
        """
        if not self.has_run():
            return None
        latest = read_json(self.latest_path)
        tag = latest.get("tag") if isinstance(latest, dict) else None
        if not isinstance(tag, str) or not re.fullmatch(r"epoch_\d{4,}", tag) or not (self.ckpt_dir / tag).is_dir():
            raise UserError(f"{self.latest_path}: names no checkpoint of this run ({tag!r}); use a new checkpoint.dir")
        for p in (self.ckpt_dir, self.ckpt_dir / tag):
            if p.is_symlink():
                raise UserError(f"{p}: is a symbolic link; a run resumes only from checkpoints inside its own folder")
        verify_checkpoint(self.ckpt_dir / tag)
        _, client = engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        client["tag"] = tag
        return client

    def save(self, engine, epoch: int, client: dict, publish=None) -> str:
        """Save on every rank under a temporary tag, then (rank 0) rename, ``publish(tag)`` (the best model
        file, when the epoch improved), and only then point latest.json at it: a run interrupted anywhere
        before that resumes from the previous checkpoint and redoes the epoch, so ``latest.json`` never
        names an epoch whose best model file is missing."""
        tag = f"epoch_{epoch:04d}"
        tmp_tag = f".tmp_{tag}"
        try:
            engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
        except (OSError, RuntimeError) as exc:  # a full disk: leave no half checkpoint; the last complete one stays
            why = write_failure(exc)
            if why is None:
                raise
            shutil.rmtree(self.ckpt_dir / tmp_tag, ignore_errors=True)
            raise UserError(f"{self.ckpt_dir / tmp_tag}: cannot save the checkpoint of epoch {epoch} "
                            f"({why}); the run resumes from {self.latest_path}") from None
        self._barrier()
        if self.rank == 0:
            if (self.ckpt_dir / tag).exists():
                shutil.rmtree(self.ckpt_dir / tag)
            os.rename(self.ckpt_dir / tmp_tag, self.ckpt_dir / tag)
            if publish is not None:
                publish(tag)
            write_json(self.latest_path, {"tag": tag, "epoch": epoch, "global_step": client["global_step"]})
        return tag

    def rotate(self) -> None:
        """Keep the newest ``keep_last`` periodic checkpoints (rank 0), then let every rank continue."""
        if self.rank == 0:
            keep = sorted(p.name for p in self.ckpt_dir.iterdir() if p.name.startswith("epoch_"))
            for old in keep[:-self.keep_last]:
                shutil.rmtree(self.ckpt_dir / old)
        self._barrier()

    def export_best(self, tag: str, stage: str, cfg: Config, metrics: dict, epoch: int, global_step: int) -> None:
        """``best_model.pt`` from checkpoint ``tag``'s fp32 master weights, and ``best.json`` (rank 0)."""
        save_model_file(self.out / "best_model.pt", stage, export_fp32(self.ckpt_dir, tag), cfg, metrics, epoch,
                        global_step)
        write_json(self.out / "best.json", {"epoch": epoch, "global_step": global_step, **metrics})

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
