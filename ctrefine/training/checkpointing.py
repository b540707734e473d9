"""Checkpoints of a training run: periodic DeepSpeed checkpoints, resume, rotation, the best model file.

Layout under ``<checkpoint.dir>/<stage>/``::

    ckpt/epoch_NNNN/      DeepSpeed checkpoint (model, optimizer, LR schedule) + client state (epoch,
                          step, best score, patience counter, every rank's RNG state, the config)
    latest.json           the newest *complete* checkpoint: written only after the rename below
    best_model.pt         plain fp32 model file (:mod:`ctrefine.checkpoint`) of the best epoch
    best.json             its epoch, step and validation metrics

A checkpoint is saved under a temporary tag and renamed when every rank has written its part, so an
interrupted save never becomes the one a resume reads.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import export_fp32, save_model_file
from ..config import Config, upgrade_stored
from ..data.io import read_json, write_json
from ..errors import UserError


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return keys


class Checkpointer:
    def __init__(self, out: Path, keep_last: int, rank: int, world: int):
        self.out, self.keep_last, self.rank, self.world = Path(out), keep_last, rank, world
        self.ckpt_dir = self.out / "ckpt"
        self.latest_path = self.out / "latest.json"

    def has_run(self) -> bool:
        return self.latest_path.exists()

    def check_compatible(self, cfg: Config) -> None:
        """Refuse to resume a run whose model was built from another ``model`` section (names the keys)."""
        if not self.has_run():
            return
        stored = self.out / "config.json"
        if not stored.exists():
            return
        old = upgrade_stored(read_json(stored)).get("model", {})
        diff = _diff_keys(old, cfg.to_dict()["model"], "model.")
        if diff:
            raise UserError(f"{self.out} holds a run with a different model ({', '.join(diff)}); "
                            f"use a new checkpoint.dir or the old model settings")

    def resume(self, engine) -> dict | None:
        """Load the newest complete checkpoint into ``engine``; its client state, or None for a fresh run."""
        if not self.has_run():
            return None
        tag = read_json(self.latest_path)["tag"]
        _, client = engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        client["tag"] = tag
        return client

    def save(self, engine, epoch: int, client: dict) -> str:
        """Save on every rank under a temporary tag, then (rank 0) rename, point latest.json, rotate."""
        tag = f"epoch_{epoch:04d}"
        tmp_tag = f".tmp_{tag}"
        engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
        self._barrier()
        if self.rank == 0:
            if (self.ckpt_dir / tag).exists():
                shutil.rmtree(self.ckpt_dir / tag)
            os.rename(self.ckpt_dir / tmp_tag, self.ckpt_dir / tag)
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
