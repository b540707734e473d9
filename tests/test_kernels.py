"""Triton kernels vs the pure-torch reference: forward and gradients, fp32 and bf16.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py), on small shapes; the larger
odd shapes run only on CUDA.
"""
import pytest
import torch

from ctrefine.losses import functional as Fn
from ctrefine.losses import reference as R

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_SHAPES = [(1, 1, 13, 17, 19), (2, 1, 6, 7, 8), (1, 2, 5, 4, 6)]
GPU_SHAPES = [(2, 1, 37, 53, 61), (4, 1, 64, 64, 64), (2, 1, 128, 128, 128)]
SHAPES = CPU_SHAPES + ([pytest.param(s, marks=pytest.mark.gpu) for s in GPU_SHAPES] if CUDA else [])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}
PAIRS = [("laplacian", Fn.laplacian_l1_kernel, R.laplacian_l1), ("spectral", Fn.spectral_l1_kernel, R.spectral_l1)]


def inputs(shape, dtype, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # a strided view: W stored with stride 2
        p = torch.rand(*shape[:-1], shape[-1] * 2, generator=g)[..., ::2]
        t = torch.rand(*shape[:-1], shape[-1] * 2, generator=g)[..., ::2]
        assert not p.is_contiguous()
    else:
        p, t = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    p = p.to(DEVICE, dtype).requires_grad_()
    t = t.to(DEVICE, dtype).requires_grad_()
    return p, t


def run(fn, p, t):
    loss = fn(p, t) * 2.0  # grad_output != 1 exercises the backward's scaling
    gp, gt = torch.autograd.grad(loss, (p, t))
    return loss.detach(), gp, gt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,kernel,ref", PAIRS, ids=[p[0] for p in PAIRS])
def test_matches_reference(name, kernel, ref, shape, dtype):
    p, t = inputs(shape, dtype)
    lk, gpk, gtk = run(kernel, p, t)
    lr, gpr, gtr = run(ref, p, t)
    assert lk.dtype == torch.float32
    torch.testing.assert_close(lk, lr, atol=1e-6, rtol=1e-5)  # the loss itself is fp32 in both paths
    scale = gpr.float().abs().max()
    torch.testing.assert_close(gpk.float() / scale, gpr.float() / scale, **TOL[dtype])
    torch.testing.assert_close(gtk.float() / scale, gtr.float() / scale, **TOL[dtype])
    assert gpk.dtype == dtype and gpk.shape == shape


@pytest.mark.parametrize("name,kernel,ref", PAIRS, ids=[p[0] for p in PAIRS])
def test_non_contiguous(name, kernel, ref):
    p, t = inputs((2, 1, 6, 5, 7), torch.float32, seed=3, noncontig=True)
    lk, gpk, gtk = run(kernel, p, t)
    lr, gpr, gtr = run(ref, p, t)
    torch.testing.assert_close(lk, lr, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gpk, gpr, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("name,kernel,ref", PAIRS, ids=[p[0] for p in PAIRS])
def test_only_pred_requires_grad(name, kernel, ref):
    p, t = inputs((1, 1, 5, 6, 7), torch.float32, seed=4)
    t = t.detach()
    (gk,) = torch.autograd.grad(kernel(p, t), (p,))
    (gr,) = torch.autograd.grad(ref(p, t), (p,))
    torch.testing.assert_close(gk, gr, atol=1e-7, rtol=1e-4)


def test_hand_values_through_kernels():
    n = 9
    i = torch.arange(n, dtype=torch.float32, device=DEVICE)
    d, h, w = torch.meshgrid(i, i, i, indexing="ij")
    zero = torch.zeros(1, 1, n, n, n, device=DEVICE)
    const = torch.full_like(zero, 0.5)
    assert Fn.laplacian_l1_kernel(const, zero).item() == 0.0
    assert Fn.spectral_l1_kernel(const, const.clone()).item() == 0.0
    # L(w^2) with the 7-point stencil and replicate padding: 2 inside; at w = 0, 0 + 1 - 0 = 1; at w = n - 1,
    # (n-2)^2 + (n-1)^2 - 2 (n-1)^2 = -(2n - 3) = -15. Mean |L| over the W axis: (2 (n - 2) + 1 + 15) / n
    sq = (w**2)[None, None]
    hand = (2 * (n - 2) + 1 + (2 * n - 3)) / n
    assert Fn.laplacian_l1_kernel(sq, zero).item() == pytest.approx(hand, rel=1e-6)
    assert R.laplacian_l1(sq, zero).item() == pytest.approx(hand, rel=1e-6)


def test_dispatch(monkeypatch):
    """The loss functions run the kernel exactly when they are told to: nothing is read per call."""
    p, t = inputs((1, 1, 5, 6, 7), torch.float32, seed=5)
    calls = []
    monkeypatch.setattr(Fn, "laplacian_l1_kernel", lambda a, b: calls.append("k") or R.laplacian_l1(a, b))
    monkeypatch.setenv("CTREFINE_KERNELS", "1")  # the environment is not consulted here
    Fn.laplacian_l1(p, t)
    assert calls == []
    Fn.laplacian_l1(p, t, kernels=True)
    assert calls == ["k"]


def test_kernel_choice(monkeypatch):
    """Made once per run from CTREFINE_KERNELS and the device: forced modes cover every family, auto picks
    the CUDA table on CUDA only, a kernel module that does not import on CUDA is an error naming the fix."""
    from ctrefine import device as dev
    from ctrefine.errors import ConfigError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("CTREFINE_KERNELS", "0")
    assert dev.kernel_choice(cpu) == dev.kernel_choice(cuda) == dev.Kernels(False, False)
    monkeypatch.setenv("CTREFINE_KERNELS", "1")  # TRITON_INTERPRET=1 (conftest): the kernels run on the CPU
    assert dev.kernel_choice(cpu) == dev.Kernels(True, True)
    monkeypatch.setenv("CTREFINE_KERNELS", "auto")
    assert dev.kernel_choice(cpu) == dev.Kernels(False, False)
    monkeypatch.setattr(dev, "kernels_import_error", lambda: None)
    assert dev.kernel_choice(cuda) == dev.Kernels(**dev.AUTO_ON_CUDA)
    monkeypatch.setattr(dev, "kernels_import_error", lambda: "ImportError: no module named triton")
    with pytest.raises(ConfigError, match="no module named triton.*CTREFINE_KERNELS=0"):
        dev.kernel_choice(cuda)
    assert dev.kernel_choice(cpu) == dev.Kernels(False, False)  # a CPU never needed them
    monkeypatch.setenv("CTREFINE_KERNELS", "maybe")
    with pytest.raises(ConfigError, match="CTREFINE_KERNELS"):
        dev.kernel_choice(cpu)


def test_training_loss_same_numbers_both_paths():
    from ctrefine.losses.loss import DetailRefinementLoss

    g = torch.Generator().manual_seed(6)
    p, t, c = (torch.rand(2, 1, 8, 8, 8, generator=g).to(DEVICE) for _ in range(3))
    xr = torch.rand(2, 2, 1, 8, 8, generator=g).to(DEVICE)
    out = {}
    for kernels in (False, True):
        q = p.clone().requires_grad_()
        total, terms = DetailRefinementLoss(kernels=kernels)(q, t, c, xr)
        total.backward()
        out[kernels] = (total.detach(), q.grad)
    torch.testing.assert_close(out[False][0], out[True][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[False][1], out[True][1], atol=1e-7, rtol=1e-4)


# ------------------------------------------------------------------------------- GroupNorm + SiLU
# (B, C, D, H, W, groups): a group of 1 channel, odd sizes, several chunks per group (45 x 48 > BLOCK)
GN_CPU = [(2, 4, 3, 5, 7, 2), (1, 8, 4, 4, 4, 8), (2, 6, 5, 9, 11, 3)]
GN_GPU = [(8, 32, 64, 64, 64, 8), (2, 64, 37, 53, 61, 8)]
GN_SHAPES = GN_CPU + ([pytest.param(s, marks=pytest.mark.gpu) for s in GN_GPU] if CUDA else [])
GN_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _gn_inputs(shape, dtype, seed=0):
    b, c, d, h, w, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = (3.0 + 2.0 * torch.randn(b, c, d, h, w, generator=g)).to(DEVICE, dtype).requires_grad_()  # mean >> 0
    wt = (1 + 0.3 * torch.randn(c, generator=g)).to(DEVICE, dtype).requires_grad_()
    bias = (0.2 * torch.randn(c, generator=g)).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(b, c, d, h, w, generator=g).to(DEVICE, dtype)
    return x, wt, bias, dy


def _gn_run(fn, x, wt, bias, dy, groups):
    y = fn(x, groups, wt, bias, 1e-5)
    return (y.detach(), *torch.autograd.grad(y, (x, wt, bias), 2.0 * dy))  # grad_output != 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=str)
def test_group_norm_silu_matches_reference(shape, dtype):
    from ctrefine.kernels.groupnorm_silu import GroupNormSiLUFunction
    from ctrefine.models.norm import group_norm_silu_reference

    x, wt, bias, dy = _gn_inputs(shape, dtype)
    groups = shape[-1]
    kern = _gn_run(lambda x_, g_, w_, b_, e_: GroupNormSiLUFunction.apply(x_, w_, b_, g_, e_), x, wt, bias, dy, groups)
    ref = _gn_run(lambda *a: group_norm_silu_reference(*(t.float() if torch.is_tensor(t) else t for t in a)),
                  x, wt, bias, dy, groups)  # the truth in fp32
    for k, r, name in zip(kern, ref, ("y", "dx", "dweight", "dbias")):
        assert k.dtype == dtype, name
        scale = r.float().abs().max()
        torch.testing.assert_close(k.float() / scale, r.float() / scale, **GN_TOL[dtype], msg=name)


def test_group_norm_silu_under_autocast_returns_what_the_reference_does():
    """Under CUDA autocast GroupNorm runs in fp32 and returns fp32 (CPU autocast keeps bf16); the kernel
    path returns the same dtype and values."""
    from ctrefine.models.norm import GroupNormSiLU, use_fused_groupnorm

    m = GroupNormSiLU(2, 4).to(DEVICE)
    x = torch.randn(2, 4, 3, 4, 5, device=DEVICE).to(torch.bfloat16)
    assert use_fused_groupnorm(m, True) == 1
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = m(x)
    use_fused_groupnorm(m, False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        r = m(x)
    assert y.dtype == r.dtype == (torch.float32 if CUDA else torch.bfloat16)
    torch.testing.assert_close(y.float(), r.float(), atol=1e-2 if r.dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_group_norm_silu_module_keeps_the_state_dict_names():
    """The fused module is a GroupNorm: model files saved with GroupNorm + SiLU load into it."""
    from ctrefine.models.blocks import ResBlock, conv_norm_act

    assert set(conv_norm_act(4, 8, 3).state_dict()) == {"0.weight", "1.weight", "1.bias"}
    assert set(ResBlock(8).state_dict()) == {"body.0.weight", "body.1.weight", "body.1.bias", "body.3.weight",
                                              "body.4.weight", "body.4.bias"}
