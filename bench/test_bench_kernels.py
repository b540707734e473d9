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


# ------------------------------------------------------------------------------- GroupNorm + SiLU
# the `full` refiner's widest full-resolution norm (batch 8, 32 channels, 64^3, 8 groups), bf16 as DeepSpeed runs it
GN_SHAPE = (8, 32, 64, 64, 64) if CUDA else (2, 8, 32, 32, 32)
GN_DTYPE = torch.bfloat16 if CUDA else torch.float32
_gn_compiled = {}


def gn_fn(impl):
    from ctrefine.models.norm import group_norm_silu_reference

    if impl == "eager":
        return group_norm_silu_reference
    if impl == "compile":
        return _gn_compiled.setdefault("f", torch.compile(group_norm_silu_reference))
    from ctrefine.kernels.groupnorm_silu import GroupNormSiLUFunction

    return lambda x, g, w, b, eps: GroupNormSiLUFunction.apply(x, w, b, g, eps)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_silu(benchmark, impl):
    """Forward + backward; GB/s against the fused path's minimal traffic (forward: x twice + y;
    backward: x and dy twice + dx)."""
    if impl == "triton" and not CUDA:
        pytest.skip("Triton rows need CUDA (the CPU interpreter is not a kernel timing)")
    fn = gn_fn(impl)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    c = GN_SHAPE[1]
    x = torch.randn(GN_SHAPE, device=DEVICE, generator=g).to(GN_DTYPE).requires_grad_()
    w = torch.ones(c, device=DEVICE, dtype=GN_DTYPE, requires_grad=True)
    b = torch.zeros(c, device=DEVICE, dtype=GN_DTYPE, requires_grad=True)
    dy = torch.randn(GN_SHAPE, device=DEVICE, generator=g).to(GN_DTYPE)

    def run():
        fn(x, 8, w, b, 1e-5).backward(dy)
        sync()

    for _ in range(2):
        run()
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    n = x.numel() * x.element_size()
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if CUDA else "cpu",
                                 "gb_per_s": 8 * n / benchmark.stats.stats.mean / 1e9})
    assert benchmark.stats.stats.mean > 0
