"""Test session setup.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
``@triton.jit`` decorator executes, i.e. before ctrefine.kernels is first imported -- hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Six 32^3 phantom patients with 64^2 radiographs (cone beam), generated once per session."""
    from ctrefine.data.dataset import make_dataset

    root = tmp_path_factory.mktemp("tiny_ds")
    make_dataset(root, 6, seed=7, size=32, xray_size=64, workers=1, progress=False)
    return root
