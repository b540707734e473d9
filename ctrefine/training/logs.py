"""Training logs: append-only CSVs that survive resume, and optional TensorBoard events."""
from __future__ import annotations

import csv
from pathlib import Path


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


def tensorboard_writer(enabled: bool, folder: Path, log=print):
    """A SummaryWriter, or None -- with a one-line notice when it was asked for but cannot be made."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(folder))
    except Exception as exc:  # tensorboard not installed (it is optional): CSV logs only
        log(f"note: logging.tensorboard is on but TensorBoard is unavailable ({type(exc).__name__}); "
            f"writing CSV logs only (pip install tensorboard, or set logging.tensorboard=false)")
        return None
