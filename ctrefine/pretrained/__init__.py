"""Model files shipped inside the package, named ``pretrained:NAME`` wherever a checkpoint path is taken.

Each entry is a ``best_model.pt`` (fp32 state dict + the resolved config it was trained with, as
:mod:`ctrefine.checkpoint` writes it) with its sha256 and a model card (``NAME.md`` beside it: data,
seed, command, epochs, wall time, metrics). :func:`resolve` turns ``pretrained:NAME`` into the file's
path after checking its digest, so a damaged or replaced file is a one-line error, never a silent
swap. Any other string is returned unchanged (a path).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..outputs import sha256_file

PREFIX = "pretrained:"
ROOT = Path(__file__).parent  # the shipped files are package data beside this module

# name -> (file inside this package, sha256 of the file). Add an entry with its model card.
SHIPPED: dict[str, tuple[str, str]] = {
    # 64^3 from 128^2, cpu-medium base (0.96M), calibrated (version-3) phantoms of seed family 64; card: phantom-64.md
    "phantom-64": ("phantom-64.pt", "0a132eec4630a18162e82876be26c4a5d2ed63cac6bac547835b7741da8d01c9"),
    # its refiner (hidden 16, 0.2M, re-projection guidance + 2 DC steps, an uncertainty head), same data:
    # +1.24 dB, 26/26 on its test split; card: phantom-64-refiner.md
    "phantom-64-refiner": ("phantom-64-refiner.pt", "c9d2a68fd0ac8e93c578ee38c4d935d80a51a60819f30c75488e8f6adbd644dd"),
}


# Shipped (base, refiner) pairs, best first by their test-split PSNR on held-out phantoms (the model
# cards hold the figures): what `infer` uses when it is given no model.
PAIRS: tuple[tuple[str, str], ...] = (
    ("phantom-64", "phantom-64-refiner"),
)


def default_pair() -> tuple[str, str]:
    """``(pretrained:BASE, pretrained:REFINER)``: the best shipped pair (:data:`PAIRS`)."""
    base, refiner = PAIRS[0]
    return PREFIX + base, PREFIX + refiner


def resolve(spec) -> Path:
    """``pretrained:NAME`` -> the shipped file (digest checked); anything else -> ``Path(spec)``."""
    text = str(spec)
    if not text.startswith(PREFIX):
        return Path(spec)
    name = text[len(PREFIX):]
    if name not in SHIPPED:
        known = ", ".join(PREFIX + n for n in sorted(SHIPPED)) or "none in this version"
        raise DataError(f"{text}: no such shipped model (shipped: {known})")
    filename, digest = SHIPPED[name]
    path = ROOT / filename
    if not path.is_file():
        raise DataError(f"{text}: the shipped file {filename} is missing from this installation")
    if sha256(path) != digest:
        raise DataError(f"{text}: {path} does not match its recorded sha256 (damaged or replaced)")
    return path


def sha256(path) -> str:
    """The SHA-256 a shipped file is checked against (:func:`ctrefine.outputs.sha256_file`)."""
    return sha256_file(path)
