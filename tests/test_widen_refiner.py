"""bench/widen_refiner.py: a trained refiner made larger (more inputs, twice the channels) computes the same volume."""
import sys
from pathlib import Path

import pytest
import torch

from ctrefine.checkpoint import load_model_file, save_model_file
from ctrefine.config import load_config
from ctrefine.models import build_refiner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import widen_refiner  # noqa: E402

ROUNDING = 5e-6  # the widened refiner computes the same volume up to this (float32 rounding)
SMALL = ["model.hidden_channels=8", "model.guidance_channels=4", "model.mid_blocks=1"]


def test_widened_refiner_computes_the_same_volume(tmp_path):
    """bench/widen_refiner.py: a trained refiner gains the residual product and the cue, output unchanged."""
    cfg = load_config("cpu-small", ['model.residual_fusion="views"', "model.hidden_channels=8",
                                    "model.guidance_channels=4", "model.mid_blocks=1"])
    torch.manual_seed(0)
    refiner = build_refiner(cfg)
    with torch.no_grad():
        refiner.head.weight.normal_(0, 0.02)
    save_model_file(tmp_path / "src.pt", "refine", refiner.state_dict(), cfg, {}, epoch=1)
    assert widen_refiner.main([str(tmp_path / "src.pt"), str(tmp_path / "wide.pt"), "--product", "--wall-cue"]) == 0
    wide = load_model_file(tmp_path / "wide.pt", stage="refine")
    assert (wide.config.model.residual_fusion, wide.config.model.wall_cue) == ("views+product", "depth+detail")
    c, x = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 2, 1, 64, 64)
    with torch.no_grad():
        before, after = refiner.eval()(c, x), wide.build().eval()(c, x)
    assert not torch.equal(before, c)  # a refiner that does something, so the identity is not trivial
    # float32 rounding of sums over twice the channels, in another order: up to ~1.1e-6 on AVX-512 EPYC (the volume is
    # in [0, 1]); a wrong split of a weight moves voxels by orders of magnitude more
    torch.testing.assert_close(after, before, rtol=0, atol=ROUNDING)
    # a file that has the cue but not the product: the product's channel goes before the cue's
    cfg_cue = load_config("cpu-small", ['model.residual_fusion="views"', 'model.wall_cue="depth+detail"',
                                        "model.hidden_channels=8", "model.guidance_channels=4", "model.mid_blocks=1"])
    cued = build_refiner(cfg_cue)
    with torch.no_grad():
        cued.head.weight.normal_(0, 0.02)
        cued.stem[0].weight[:, -4:].normal_(0, 0.1)  # the cue read with weights of its own
    save_model_file(tmp_path / "cued.pt", "refine", cued.state_dict(), cfg_cue, {}, epoch=1)
    assert widen_refiner.main([str(tmp_path / "cued.pt"), str(tmp_path / "cued_wide.pt"), "--product"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model_file(tmp_path / "cued_wide.pt", stage="refine").build().eval()(c, x),
                                   cued.eval()(c, x), rtol=0, atol=ROUNDING)
    with pytest.raises(SystemExit, match="already reads the chest-wall cue"):
        widen_refiner.main([str(tmp_path / "wide.pt"), str(tmp_path / "again.pt"), "--wall-cue"])
    assert not (tmp_path / "again.pt").exists()


def _trained_like(cfg) -> torch.nn.Module:
    """A refiner with every parameter random (zero-initialised heads included), so an identity is not trivial; the
    head small enough that the correction is O(0.1), as a trained one's (float32 rounding scales with it)."""
    torch.manual_seed(0)
    refiner = build_refiner(cfg)
    with torch.no_grad():
        for name, p in refiner.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if name.startswith("dc_step") else 0.001 if name.startswith("head") else 0.1))
    return refiner.eval()


def _same_volume(refiner: torch.nn.Module, widened: torch.nn.Module, atol: float):
    """``(coarse, xrays, refiner's volume)`` on random inputs the refiner corrects by more than 0.01 (so the
    identity is not trivial), after checking that ``widened`` computes the same volume to ``atol``."""
    c, x = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 2, 1, 64, 64)
    with torch.no_grad():
        before = refiner(c, x)
        assert float((before - c).abs().max()) > 1e-2
        torch.testing.assert_close(widened(c, x), before, rtol=0, atol=atol)
    return c, x, before


def test_doubled_width_computes_the_same_volume_and_its_copies_can_part(tmp_path):
    cfg = load_config("cpu-small", ['model.residual_fusion="views+product"', *SMALL])
    refiner = _trained_like(cfg)
    save_model_file(tmp_path / "src.pt", "refine", refiner.state_dict(), cfg, {}, epoch=1)
    assert widen_refiner.main([str(tmp_path / "src.pt"), str(tmp_path / "wide.pt"), "--double-width"]) == 0
    wide = load_model_file(tmp_path / "wide.pt", stage="refine")
    assert wide.config.model.hidden_channels == 16
    wide_net = wide.build().eval()
    assert sum(p.numel() for p in wide_net.parameters()) > 3 * sum(p.numel() for p in refiner.parameters())
    c, x, before = _same_volume(refiner, wide_net, atol=1e-5)
    # the two copies of a channel get different gradients (an equal split would keep them equal forever)
    wide_net(c, x).square().mean().backward()
    g = wide_net.stem[0].weight.grad
    assert not torch.allclose(g[0::2], g[1::2], rtol=1e-3, atol=0)
    # each FrequencyAttention's band logits are rows of one channel: doubled as blocks, or the output changes
    state, shapes = refiner.state_dict(), {k: v.shape for k, v in wide_net.state_dict().items()}
    wrong = build_refiner(wide.config).eval()
    wrong.load_state_dict(widen_refiner.double_channels(state, shapes, block={}))
    with torch.no_grad():
        assert float((wrong(c, x) - before).abs().max()) > 1e-4


def test_a_width_that_cannot_double_is_refused():
    with pytest.raises(SystemExit, match="does not double"):
        widen_refiner.double_channels({"w": torch.zeros(3, 4)}, {"w": (5, 4)}, {})


@pytest.mark.parametrize("flag, setting, module, refusal", [
    ("--ray-placement", ("guidance_depth", "cross-view"), "guidance.place", "places them already"),
    ("--residual-placement", ("residual_weighting", "learned"), "residual_place", "nothing to place")])
def test_a_placement_joins_a_trained_refiner_without_changing_its_volume_and_then_learns(tmp_path, flag, setting,
                                                                                       module, refusal):
    """--ray-placement / --residual-placement: the same volume at first (even weights along every ray), a gradient
    that reaches the placement's logits, so fine-tuning can move features in depth, and a refusal to add it twice."""
    cfg = load_config("cpu-small", SMALL)
    refiner = _trained_like(cfg)
    save_model_file(tmp_path / "src.pt", "refine", refiner.state_dict(), cfg, {}, epoch=1)
    assert widen_refiner.main([str(tmp_path / "src.pt"), str(tmp_path / "placed.pt"), flag]) == 0
    placed = load_model_file(tmp_path / "placed.pt", stage="refine")
    assert getattr(placed.config.model, setting[0]) == setting[1]
    net = placed.build().eval()
    c, x, _ = _same_volume(refiner, net, atol=1e-6)
    net(c, x).square().mean().backward()
    assert float(net.get_submodule(module).logits.weight.grad.abs().max()) > 0
    with pytest.raises(SystemExit, match=refusal):
        widen_refiner.main([str(tmp_path / "placed.pt"), str(tmp_path / "again.pt"), flag])
    assert not (tmp_path / "again.pt").exists()


def test_a_crossing_reader_joins_a_trained_refiner_without_changing_its_volume_and_then_learns(tmp_path):
    """--crossing-reader: the same volume at first (its last layer zero), a gradient that reaches that layer, and a
    refusal to add it twice."""
    cfg = load_config("cpu-small", SMALL)
    refiner = _trained_like(cfg)
    save_model_file(tmp_path / "src.pt", "refine", refiner.state_dict(), cfg, {}, epoch=1)
    assert widen_refiner.main([str(tmp_path / "src.pt"), str(tmp_path / "read.pt"), "--crossing-reader"]) == 0
    read = load_model_file(tmp_path / "read.pt", stage="refine")
    assert read.config.model.guidance_crossing == "mlp"
    net = read.build().eval()
    c, x, _ = _same_volume(refiner, net, atol=1e-6)
    net(c, x).square().mean().backward()
    assert float(net.guidance.crossing.read[-1].weight.grad.abs().max()) > 0
    with pytest.raises(SystemExit, match="reads the crossings already"):
        widen_refiner.main([str(tmp_path / "read.pt"), str(tmp_path / "again.pt"), "--crossing-reader"])
    assert not (tmp_path / "again.pt").exists()
