"""Phantom generation + DRR rendering throughput (patients/s = 1 / mean time per patient)."""
import pytest
import torch

from ctrefine.data.phantoms import chest_phantom
from ctrefine.data.projector import Geometry, render_drrs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_phantom_128(benchmark):
    seeds = iter(range(10**6))
    vol = benchmark.pedantic(lambda: chest_phantom(next(seeds), 128), rounds=5, iterations=1)
    assert vol.shape == (128, 128, 128)
    benchmark.extra_info["patients_per_s"] = 1.0 / benchmark.stats.stats.mean


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_drr_pair_128(benchmark, device, kind):
    hu = torch.from_numpy(chest_phantom(0, 128))[None, None].to(device)

    def run():
        out = render_drrs(hu, 320.0, 128, Geometry(kind))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (1, 2, 1, 128, 128) and out.max() > 1.0
    benchmark.extra_info["patients_per_s"] = 1.0 / benchmark.stats.stats.mean
