"""Loss kernels vs the eager reference vs torch.compile of the reference.

Rows: loss (laplacian | spectral) x impl (eager | compile | triton) x pass (fwd | bwd | full) x shape.
Each row records mean time, GB/s of the kernel path's minimal traffic (see the kernels' docstrings)
and, on CUDA, peak memory above the inputs. Triton rows need CUDA: under TRITON_INTERPRET on a CPU
they would time the interpreter (500-9000x slower), which says nothing about the kernel.

Run: ``make bench`` or ``pytest bench/test_bench_kernels.py --benchmark-json=bench/kernels.json``.
"""
import pytest
import torch

from ctrefine.losses import functional as Fn
from ctrefine.losses import reference as R

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(4, 1, 64, 64, 64), (2, 1, 128, 128, 128)]
IMPLS = ["eager", "compile", "triton"]
_compiled = {}


def impl_fn(loss, impl):
    ref = {"laplacian": R.laplacian_l1, "spectral": R.spectral_l1}[loss]
    if impl == "eager":
        return ref
    if impl == "compile":
        if loss not in _compiled:
            _compiled[loss] = torch.compile(ref)
        return _compiled[loss]
    return {"laplacian": Fn.laplacian_l1_kernel, "spectral": Fn.spectral_l1_kernel}[loss]


def traffic_bytes(loss, shape, mode, elt=4):
    """Minimal HBM traffic of the fused path (the yardstick for GB/s)."""
    n = 1
    for s in shape:
        n *= s
    if loss == "laplacian":
        fwd, bwd = 2 * n * elt, 4 * n * elt  # read p,t | read p,t, write grad_p, grad_t
    else:
        half = n // shape[-1] * (shape[-1] // 2 + 1) * 8  # complex64 half spectrum
        fwd = 2 * n * elt + n * elt + half * 2  # read p,t, write diff; FFT out + kernel read
        bwd = half * 2 + half * 2 + 2 * n * elt  # kernel read/write, irfft out, grad_p, grad_t
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["laplacian", "spectral"])
def test_loss_kernel(benchmark, loss, impl, mode, shape):
    if impl == "triton" and not CUDA:
        pytest.skip("Triton rows need CUDA (the CPU interpreter is not a kernel timing)")
    fn = impl_fn(loss, impl)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    p = torch.rand(shape, device=DEVICE, generator=g, requires_grad=True)
    t = torch.rand(shape, device=DEVICE, generator=g, requires_grad=True)
    for _ in range(2):  # warm-up: compile / autotune / allocator
        fn(p, t).backward()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()

    if mode == "fwd":
        def run():
            with torch.no_grad():
                out = fn(p, t)
            sync()
            return out
    elif mode == "bwd":
        def setup():
            return (fn(p, t),), {}

        def run(loss_val):
            loss_val.backward()
            sync()
    else:
        def run():
            fn(p, t).backward()
            sync()

    if mode == "bwd":
        benchmark.pedantic(run, setup=setup, rounds=20, iterations=1)
    else:
        benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if CUDA else "cpu",
                                 "gb_per_s": traffic_bytes(loss, shape, mode) / mean / 1e9})
    if CUDA:
        benchmark.extra_info["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    assert mean > 0
