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
    # |L(w^2)| = 2 in the interior; on the two W faces the one-sided stencil gives other values
    sq = (w**2)[None, None]
    lap = Fn.laplacian_l1_kernel(sq, zero).item()
    assert lap == pytest.approx(R.laplacian_l1(sq, zero).item(), rel=1e-6)


def test_dispatch(monkeypatch):
    p, t = inputs((1, 1, 5, 6, 7), torch.float32, seed=5)
    calls = []
    monkeypatch.setattr(Fn, "laplacian_l1_kernel", lambda a, b: calls.append("k") or R.laplacian_l1(a, b))
    monkeypatch.setenv("CTREFINE_KERNELS", "0")
    Fn.laplacian_l1(p, t)
    assert calls == []
    monkeypatch.setenv("CTREFINE_KERNELS", "1")
    Fn.laplacian_l1(p, t)
    assert calls == ["k"]
    monkeypatch.setenv("CTREFINE_KERNELS", "auto")
    calls.clear()
    Fn.laplacian_l1(p, t)
    assert calls == (["k"] if p.is_cuda else [])
    monkeypatch.setenv("CTREFINE_KERNELS", "maybe")
    with pytest.raises(ValueError, match="CTREFINE_KERNELS"):
        Fn.laplacian_l1(p, t)


def test_dispatch_per_family(monkeypatch):
    """auto follows the per-family measurement; a forced mode covers every family; a typo is an error."""
    from ctrefine.device import AUTO_ON_CUDA, use_kernels

    x = torch.zeros(1)
    monkeypatch.setenv("CTREFINE_KERNELS", "auto")
    assert set(AUTO_ON_CUDA) == {"loss", "groupnorm"} and AUTO_ON_CUDA["groupnorm"] is False
    assert not use_kernels(x, "groupnorm") and not use_kernels(x, "loss")  # CPU tensors: the references
    monkeypatch.setenv("CTREFINE_KERNELS", "1")
    assert use_kernels(x, "groupnorm") and use_kernels(x, "loss")
    with pytest.raises(ValueError, match="kernel family"):
        use_kernels(x, "norm")


def test_training_loss_same_numbers_both_paths(monkeypatch):
    from ctrefine.losses.loss import DetailRefinementLoss

    g = torch.Generator().manual_seed(6)
    p, t, c = (torch.rand(2, 1, 8, 8, 8, generator=g).to(DEVICE) for _ in range(3))
    xr = torch.rand(2, 2, 1, 8, 8, generator=g).to(DEVICE)
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("CTREFINE_KERNELS", mode)
        q = p.clone().requires_grad_()
        total, terms = DetailRefinementLoss()(q, t, c, xr)
        total.backward()
        out[mode] = (total.detach(), q.grad)
    torch.testing.assert_close(out["0"][0], out["1"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["0"][1], out["1"][1], atol=1e-7, rtol=1e-4)


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


def test_group_norm_silu_under_autocast_returns_what_the_reference_does(monkeypatch):
    """Under CUDA autocast GroupNorm runs in fp32 and returns fp32 (CPU autocast keeps bf16); the kernel
    path returns the same dtype and values."""
    from ctrefine.models.norm import GroupNormSiLU

    monkeypatch.setenv("CTREFINE_KERNELS", "1")
    m = GroupNormSiLU(2, 4).to(DEVICE)
    x = torch.randn(2, 4, 3, 4, 5, device=DEVICE).to(torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = m(x)
    monkeypatch.setenv("CTREFINE_KERNELS", "0")
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
