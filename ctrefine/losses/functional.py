"""The ONE dispatch point between the Triton kernels (``ctrefine.kernels``) and the reference.

``laplacian_l1`` and ``spectral_l1`` here are what the training loss calls. :func:`use_kernels`
decides per call:

* ``CTREFINE_KERNELS=0`` -> always the reference (for comparisons and debugging);
* ``CTREFINE_KERNELS=1`` -> always the kernels (errors if Triton cannot run them; on CPU this works
  only under ``TRITON_INTERPRET=1``, which is how the tests exercise this path);
* unset / ``auto`` -> kernels for CUDA tensors when Triton imports, else the reference.

Both paths give the same numbers (tests/test_kernels.py holds them to per-dtype tolerances).
"""
from __future__ import annotations

import functools
import os

import torch

from . import reference


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from .. import kernels  # noqa: F401
    except Exception:
        return False
    return True


def use_kernels(x: torch.Tensor) -> bool:
    mode = os.environ.get("CTREFINE_KERNELS", "auto").strip().lower()
    if mode in ("0", "off", "false", "ref", "reference"):
        return False
    if mode in ("1", "on", "true", "force"):
        if not triton_available():
            raise RuntimeError("CTREFINE_KERNELS=1 but Triton kernels cannot be imported")
        return True
    if mode not in ("auto", ""):
        raise ValueError(f"CTREFINE_KERNELS must be 0, 1 or auto, got {mode!r}")
    return x.is_cuda and triton_available()


def laplacian_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean |L(pred) - L(target)|``: fused Triton kernel or the reference."""
    if use_kernels(pred):
        from ..kernels.laplacian_l1 import laplacian_l1 as kernel

        return kernel(pred, target)
    return reference.laplacian_l1(pred, target)


def spectral_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """High-pass weighted spectral L1: one-FFT Triton path or the reference."""
    if use_kernels(pred):
        from ..kernels.spectral_l1 import spectral_l1 as kernel

        return kernel(pred, target)
    return reference.spectral_l1(pred, target)
