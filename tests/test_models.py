from pathlib import Path

import pytest
import torch

from ctrefine.config import Config, ConfigError, load_config, resolve
from ctrefine.models import build_models, describe
from ctrefine.models.base import BaseReconstructor
from ctrefine.fourier import dft_matrices
from ctrefine.models.blocks import FrequencyAttention, apply_spectral_gain, lift_view, matmul_transforms
from ctrefine.models.refiner import DetailRefinementNetwork


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_default_parameter_counts():
    base, refiner = build_models(resolve())
    assert abs(n_params(base) - 16e6) <= 0.15 * 16e6
    assert abs(n_params(refiner) - 5e6) <= 0.15 * 5e6


@pytest.mark.parametrize("s,v", [(64, 32), (128, 32), (64, 64), (128, 64)])
def test_shapes(s, v):
    torch.manual_seed(0)
    base = BaseReconstructor(v, width=4)
    refiner = DetailRefinementNetwork(v, hidden_channels=8, guidance_channels=4, mid_blocks=1)
    x = torch.rand(2, 2, 1, s, s)
    with torch.no_grad():
        coarse = base(x)
        refined = refiner(coarse, x)
    assert coarse.shape == refined.shape == (2, 1, v, v, v)
    assert 0 <= coarse.min() and coarse.max() <= 1


def test_untrained_refiner_is_identity():
    torch.manual_seed(0)
    refiner = DetailRefinementNetwork(32, hidden_channels=8, guidance_channels=4, mid_blocks=1)
    coarse = torch.rand(2, 1, 32, 32, 32)
    coarse[0, 0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # values at both clamp limits
    x = torch.rand(2, 2, 1, 64, 64)
    assert torch.equal(refiner.residual(coarse, x), torch.zeros_like(coarse))
    assert torch.equal(refiner(coarse, x), coarse)


def test_frequency_attention_preserves_phase():
    torch.manual_seed(0)
    fa = FrequencyAttention(3, (12, 10, 8), n_bins=6).double()
    with torch.no_grad():  # a non-trivial, content-dependent gain
        fa.base.normal_(0, 2)
        fa.cond[-1].weight.normal_(0, 0.5)
    x = torch.randn(2, 3, 12, 10, 8, dtype=torch.float64)
    gain = fa.gain(x)
    assert (gain >= 0).all() and gain.std() > 0.1
    y = apply_spectral_gain(x, gain.double())
    sx = torch.fft.rfftn(x, dim=(-3, -2, -1))
    sy = torch.fft.rfftn(y, dim=(-3, -2, -1))
    ok = (gain > 1e-3) & (sx.abs() > 1e-6)
    dphi = torch.angle(sy / sx)[ok]
    assert dphi.abs().max() < 1e-4
    assert torch.allclose(sy.abs()[ok], (sx.abs() * gain)[ok], rtol=1e-5)


@pytest.mark.parametrize("size", [(8, 8, 8), (12, 10, 8), (7, 9, 5)])
def test_matmul_transforms_equal_the_fft(size):
    """The export form of the spectral gain (real DFT matrices) gives torch's FFT answer, odd sizes too."""
    torch.manual_seed(0)
    fa = FrequencyAttention(3, size, n_bins=5)
    with torch.no_grad():
        fa.base.normal_(0, 2)
        fa.cond[-1].weight.normal_(0, 0.5)
    x = torch.randn(2, 3, *size)
    keys = set(fa.state_dict())
    with matmul_transforms(fa):
        assert fa.use_matmul
        y = fa(x)
    assert not fa.use_matmul and set(fa.state_dict()) == keys  # switched back; checkpoints unchanged
    assert (y - fa(x)).abs().max() < 1e-5 and (y - x).abs().max() > 0.1
    n = size[-1]
    m = dft_matrices(n, torch.float64)
    v = torch.randn(4, n, dtype=torch.float64)
    spec = torch.fft.rfft(v, norm="ortho")
    assert torch.allclose(v @ m["r2c"], torch.cat([spec.real, spec.imag], 1), atol=1e-12)
    assert torch.allclose(torch.cat([spec.real, spec.imag], 1) @ m["c2r"], v, atol=1e-12)
    assert torch.allclose(m["inv"] @ m["fwd"], torch.eye(2 * n, dtype=torch.float64), atol=1e-12)


def test_frequency_attention_starts_as_identity():
    fa = FrequencyAttention(4, (8, 8, 8))
    x = torch.randn(1, 4, 8, 8, 8)
    assert torch.allclose(fa(x), x, atol=1e-5)


def test_lifting_geometry():
    pa = torch.zeros(1, 1, 8, 8)  # (D, W)
    pa[0, 0, 2, 5] = 1.0
    v = lift_view(pa, "pa", 8)  # -> (D, H, W): line along H at (d=2, w=5)
    nz = v[0, 0].nonzero()
    assert len(nz) == 8 and (nz[:, 0] == 2).all() and (nz[:, 2] == 5).all() and sorted(nz[:, 1].tolist()) == list(range(8))
    lat = torch.zeros(1, 1, 8, 8)  # (D, H)
    lat[0, 0, 3, 6] = 1.0
    v = lift_view(lat, "lateral", 8)  # line along W at (d=3, h=6)
    nz = v[0, 0].nonzero()
    assert len(nz) == 8 and (nz[:, 0] == 3).all() and (nz[:, 1] == 6).all()


def test_config_validation(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"training": {"batchsize": 4}}')
    with pytest.raises(ConfigError, match="training.batchsize"):
        load_config(p)
    p.write_text('{"training": {"learning_rate": "fast"}}')
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(p)
    p.write_text('{"loss": {"l1": 2}}')
    assert load_config(p).loss.l1 == 2.0 and Config().loss.l1 == 1.0
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


# (base, refiner) parameters of each shipped preset, as docs/architecture.md states them: the mission's ~16M + ~5M
# at full size; a default that changed them would also make the shipped model files fail to load
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
_TEXT = DOC.read_text()
_TABLE = _TEXT[_TEXT.index("<!-- parameters"):_TEXT.index("<!-- end parameters")]
PRESET_PARAMETERS = {ln.split("|")[1].split("`")[1]: tuple(int(c.strip().replace(",", "")) for c in ln.split("|")[2:4])
                     for ln in _TABLE.splitlines() if ln.startswith("| `")}


@pytest.mark.parametrize("name", ["cpu-medium", "cpu-small", "full"])
def test_presets_build_the_models_they_promise(name):
    assert set(PRESET_PARAMETERS) == {"cpu-medium", "cpu-small", "full"}
    cfg = load_config(name)
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in build_models(cfg))
    assert counts == PRESET_PARAMETERS[name]
    assert f"{counts[0]:,d} parameters" in describe(cfg, name) and f"{counts[1]:,d} parameters" in describe(cfg, name)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_channels_last_layers_change_the_layout_not_the_result(which):
    """Same outputs and gradients (fp32, to rounding), same parameters and state-dict keys; undoable."""
    from ctrefine.models.layout import channels_last_layers

    torch.manual_seed(0)
    base, ref = build_models(load_config("cpu-small"))
    model = base if which == "base" else ref
    if which == "refiner":
        with torch.no_grad():
            model.head.weight.normal_(0, 0.05)  # a live head, so the whole network is on the gradient path
    x = torch.rand(2, 2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    coarse = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x) if which == "base" else model(coarse, x)
        (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    keys = list(model.state_dict())
    out0, grads0 = run()
    channels_last_layers(model)
    out1, grads1 = run()
    assert out1.is_contiguous()  # the model's output is NCDHW as before
    assert torch.allclose(out0, out1, atol=1e-5) and grads0.keys() == grads1.keys()
    for k in grads0:  # fp32 sums in another order: equal to ~1e-5 of the largest entry
        assert (grads0[k] - grads1[k]).abs().max() <= 1e-4 * grads0[k].abs().max() + 1e-7, k
    assert list(model.state_dict()) == keys
    channels_last_layers(model, enabled=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_channels_last_auto_follows_the_width():
    from ctrefine.device import channels_last
    from ctrefine.models.layout import conv_widths

    cpu = torch.device("cpu")
    narrow_base, narrow_ref = (conv_widths(m) for m in build_models(load_config("cpu-medium")))
    wide_base, wide_ref = (conv_widths(m) for m in build_models(load_config("full")))
    assert channels_last(narrow_base, cpu) and channels_last(narrow_ref, cpu)
    assert not channels_last(wide_base, cpu) and not channels_last(wide_ref, cpu)  # one 16-ch fusion layer aside
    assert channels_last(wide_ref, cpu, "on") and not channels_last(narrow_ref, cpu, "off")
    assert not channels_last(narrow_ref, torch.device("cuda", 0))  # not measured off the CPU: off


def test_gain_expansion_as_a_product_equals_the_gather():
    """The one-hot product (training) and the Gather (export) give the same gain bit for bit, the same
    gradient to float32 rounding, and the gain stays float32 under bf16 autocast."""
    torch.manual_seed(0)
    fa = FrequencyAttention(4, (10, 12, 8), n_bins=6)
    with torch.no_grad():
        fa.base.normal_(0, 2)
        fa.cond[-1].weight.normal_(0, 0.5)
    x = torch.randn(2, 4, 10, 12, 8)
    w = torch.randn(2, 4, 10, 12, 5)

    def run(export: bool):
        fa.zero_grad(set_to_none=True)
        fa.use_matmul = export
        g = fa.gain(x)
        (g * w).sum().backward()
        fa.use_matmul = False
        return g.detach(), fa.base.grad.clone()

    (g0, d0), (g1, d1) = run(True), run(False)
    assert torch.equal(g0, g1)
    assert torch.allclose(d0, d1, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fa.gain(x).dtype == torch.float32


@pytest.mark.parametrize("guidance, cues", [("image+laplacian", 2), ("image", 1), ("off", None)])
def test_xray_guidance_ablations_build_and_start_at_the_coarse_volume(guidance, cues):
    from ctrefine.config import load_config
    from ctrefine.models import build_refiner

    cfg = load_config("cpu-small", [f"model.xray_guidance={guidance}"])
    model = build_refiner(cfg).eval()
    if cues is None:
        assert model.guidance is None
    else:
        assert model.guidance.enc["pa"][0][0].in_channels == cues
    coarse = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = model(coarse, torch.rand(1, 2, 1, 64, 64))
    assert out.shape == coarse.shape  # zero-initialised head: the SIRT steps (step 0) and residual add nothing
    assert torch.equal(out, coarse)
