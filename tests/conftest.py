"""Test session setup.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
``@triton.jit`` decorator executes, i.e. before ctrefine.kernels is first imported -- hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``make test`` runs two workers), each worker and every process it starts keeps to
    one core of its own: torch's thread pools never oversubscribe the machine (two processes with two
    spinning OpenMP threads each on two cores run several times slower), and the code under test sizes
    its threads and ranks from the affinity it sees (``ctrefine.device.usable_cores``)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_share_the_cores_between_workers()
from ctrefine.device import usable_cores  # noqa: E402

torch.set_num_threads(min(2, usable_cores()))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Six 32^3 phantom patients with 64^2 radiographs (cone beam), generated once per session."""
    from ctrefine.data.dataset import make_dataset

    root = tmp_path_factory.mktemp("tiny_ds")
    make_dataset(root, 6, seed=7, size=32, xray_size=64, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def random_pair(tmp_path_factory):
    """``(base.pt, refine.pt)``: model files of the ``cpu-small`` models at their seeded random init."""
    from ctrefine.checkpoint import save_model_file
    from ctrefine.config import load_config
    from ctrefine.models import build_models

    root = tmp_path_factory.mktemp("random_pair")
    cfg = load_config("cpu-small")
    torch.manual_seed(0)
    for stage, model in zip(("base", "refine"), build_models(cfg)):
        save_model_file(root / f"{stage}.pt", stage, model.state_dict(), cfg)
    return root / "base.pt", root / "refine.pt"
