"""Carry a model file through a channel that takes only small files (the GPU machine returns files of at
most 16 MiB): store its weights in fp16 and cut it into parts, then join and check it on the other side.

    python bench/pack_model.py split runs/full/base/best_model.pt $OUT/base --max-mib 15
        -> $OUT/base.part0, base.part1, ... and $OUT/base.parts.json (sizes, sha256 of the whole)
    python bench/pack_model.py join received/base.parts.json runs/full_base_fp16.pt
        -> the fp16 model file, its sha256 checked and loaded as a ctrefine model file

A 15.2M-parameter `full` base is ~30 MB in fp16 (two parts), the 5.0M refiner ~10 MB (one part).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path


from ctrefine.checkpoint import load_model_file, save_model_file
from ctrefine.outputs import atomic_file


def split(model: Path, prefix: Path, max_mib: float) -> list[Path]:
    """Write ``prefix.partK`` files of at most ``max_mib`` MiB and ``prefix.parts.json``; returns the parts."""
    mf = load_model_file(model)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        half = Path(tmp) / "model.pt"
        save_model_file(half, mf.stage, mf.state_dict, mf.config, mf.metrics, mf.epoch, mf.global_step, weights="fp16")
        blob = half.read_bytes()
    size = max(1, int(max_mib * 2**20))
    parts = []
    for i in range(0, len(blob), size):
        p = prefix.with_name(f"{prefix.name}.part{i // size}")
        p.write_bytes(blob[i:i + size])
        parts.append(p)
    index = {"source": str(model), "stage": mf.stage, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
             "parts": [p.name for p in parts]}
    prefix.with_name(prefix.name + ".parts.json").write_text(json.dumps(index, indent=1))
    return parts


def join(index_path: Path, out: Path) -> Path:
    """Reassemble the parts named in ``index_path`` into ``out`` (sha256 checked, loaded as a model file)."""
    index = json.loads(index_path.read_text())
    blob = b"".join((index_path.parent / name).read_bytes() for name in index["parts"])
    if len(blob) != index["bytes"] or hashlib.sha256(blob).hexdigest() != index["sha256"]:
        raise SystemExit(f"{index_path}: the parts do not make the file it describes (missing or damaged part)")
    with atomic_file(out) as tmp:
        tmp.write_bytes(blob)
        load_model_file(tmp, stage=index["stage"])  # a ctrefine model file, safe to read, of the stage it says
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="model file -> fp16 parts")
    s.add_argument("model", type=Path)
    s.add_argument("prefix", type=Path, help="parts are PREFIX.partK, the index PREFIX.parts.json")
    s.add_argument("--max-mib", type=float, default=15.0)
    j = sub.add_parser("join", help="parts -> fp16 model file")
    j.add_argument("index", type=Path)
    j.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "split":
        parts = split(a.model, a.prefix, a.max_mib)
        print(f"{a.model} -> {len(parts)} part(s): {', '.join(str(x) for x in parts)}")
    else:
        print(f"{a.index} -> {join(a.index, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
