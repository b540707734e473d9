"""JSON files: the one reader and the one writer of every record ctrefine keeps (datasets' headers and
splits, runs' configs and logs, checkpoints' pointers, inference manifests and metrics).

Standard library only, beside :mod:`ctrefine.outputs` (whose atomic writer it uses): every floor that keeps a
record may import it without reaching into :mod:`ctrefine.data`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError
from .outputs import atomic_file


def write_json(path, obj) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, error=DataError) -> dict:
    """A JSON object from ``path``; an empty, damaged or non-object file is a one-line ``error`` (the one
    JSON reader: datasets, runs, records, and the config files through :func:`ctrefine.config.read_json_object`)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}; an empty or damaged file?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw
