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


class _ChestScene:
    """A 32^3 model-space chest for the lung streak measures: ``tissue`` is a soft-tissue body (40 HU) with a lung
    (-850 HU) inside; ``detail(g, vessels, branches)`` a correction of short vessels in the lung (along D, with a
    branch along H when ``branches``) and rib arcs across the front and back walls, along the lateral rays."""

    n = 32

    @property
    def tissue(self) -> torch.Tensor:
        from ctrefine.conventions import hu_to_model

        t = torch.zeros(1, 1, self.n, self.n, self.n)
        t[..., 2:30, 2:30] = float(hu_to_model(40.0))
        t[..., 6:26, 6:26] = float(hu_to_model(-850.0))
        return t

    def detail(self, g: torch.Generator, vessels: int, branches: bool) -> torch.Tensor:
        d = torch.zeros(1, 1, self.n, self.n, self.n)
        for z, h, w in torch.randint(8, 24, (vessels, 3), generator=g).tolist():
            d[0, 0, z - 1:z + 2, h, w] += 0.15
            if branches:
                d[0, 0, z, h - 1:h + 2, w] += 0.1
        for z in range(4, 28, 4):
            d[0, 0, z, (3, 28), 3:29] += 0.3
        return d


@pytest.fixture
def chest_scene():
    """:class:`_ChestScene`: the chest both lung streak tests (the metric and the loss term) are read on."""
    return _ChestScene()
