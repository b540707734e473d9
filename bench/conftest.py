"""Benchmarks: run with ``make bench`` (``pytest bench``). Figures go to bench/RESULTS.md by hand,
with device, date and command, from the JSON that pytest-benchmark writes."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
