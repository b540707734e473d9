"""ctrefine.models.ray_placement: lifted radiograph features placed in depth from both views."""
import torch

from ctrefine.models.blocks import fuse_views
from ctrefine.models.ray_placement import GROUPS, RayPlacement

C, V = 8, 16


def _views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, C, V, V, generator=g), torch.randn(2, C, V, V, generator=g),
            torch.rand(2, 1, V, V, V, generator=g), torch.randn(2, 1, V, V, V, generator=g))


def test_an_untrained_placement_is_the_plain_lifting():
    pa, lat, coarse, hp = _views()
    with torch.no_grad():
        assert torch.equal(RayPlacement(C)(pa, lat, coarse, hp), fuse_views(pa, lat))


def test_weights_keep_each_feature_whole_along_its_ray():
    """Whatever the logits, a view's weights sum along its ray axis to the ray's length: features move in depth,
    they are neither made nor lost."""
    torch.manual_seed(0)
    place = RayPlacement(C)
    with torch.no_grad():
        place.logits.weight.normal_(0, 0.5)
        w_pa, w_lat = place.weights(torch.randn(2, 2 + 3 * C, V, V, V))
    assert w_pa.shape == w_lat.shape == (2, GROUPS, V, V, V)
    assert float(w_pa.std()) > 0.1  # far from even, so the sums below say something
    torch.testing.assert_close(w_pa.sum(dim=3), torch.full((2, GROUPS, V, V), float(V)))
    torch.testing.assert_close(w_lat.sum(dim=4), torch.full((2, GROUPS, V, V), float(V)))


def test_a_pa_feature_goes_to_the_depth_where_the_lateral_view_sees_it():
    """One vessel: on the PA image at (height d, width w), on the lateral at (height d, depth h). Logits that read the
    two views' product put the PA feature at depth h of its ray and nowhere else; the even lifting puts 1/V there."""
    d, w, h = 5, 11, 3
    pa, lat = torch.zeros(1, C, V, V), torch.zeros(1, C, V, V)
    pa[0, 0, d, w], lat[0, 0, d, h] = 1.0, 1.0
    coarse, hp = torch.zeros(1, 1, V, V, V), torch.zeros(1, 1, V, V, V)
    place = RayPlacement(C)
    with torch.no_grad():
        place.read[0].weight.zero_()
        place.read[0].weight[0, 2 + 2 * C] = 1.0  # hidden channel 0 reads the product of channel 0
        place.logits.weight[0, 0, 1, 1, 1] = 2.0  # PA group 0's logit: hidden channel 0 at the voxel itself
        out = place(pa, lat, coarse, hp)
    placed = out[0, 0, d, :, w]  # the PA feature along its ray
    assert int(placed.argmax()) == h
    assert float(placed[h]) > 0.99 * V and abs(float(placed.sum()) - V) < 1e-4
    even = fuse_views(pa, lat)[0, 0, d, :, w]
    assert float(even[h]) == 1.0  # the plain lifting: the same strength at every depth


def test_the_placement_exports_to_onnx_and_runs_there_as_in_torch(tmp_path):
    """Softmax along each ray and the grouped products: a graph ONNX Runtime reads, with torch's values."""
    import onnxruntime as ort

    from ctrefine.export import OPSET

    torch.manual_seed(1)
    place = RayPlacement(C).eval()
    with torch.no_grad():
        place.logits.weight.normal_(0, 0.5)
    args = _views(2)
    path = tmp_path / "place.onnx"
    torch.onnx.export(place, args, str(path), dynamo=True, opset_version=OPSET,
                      input_names=["pa", "lat", "coarse", "highpass"], output_names=["fused"])
    feeds = dict(zip(("pa", "lat", "coarse", "highpass"), (a.numpy() for a in args)))
    got = ort.InferenceSession(str(path)).run(None, feeds)[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), place(*args), rtol=1e-4, atol=1e-4)


def test_the_placement_loss_is_zero_where_the_missing_detail_is_and_positive_when_even():
    """placement_kl: 0 for weights proportional to the missing detail along each ray, > 0 for the even spread, and
    its gradient reaches the logits through the refiner's own weights."""
    from ctrefine.losses.loss import DetailRefinementLoss
    from ctrefine.losses.reference import placement_kl
    from ctrefine.losses.registry import TERMS
    from ctrefine.stencil import highpass

    g = torch.Generator().manual_seed(4)
    coarse = torch.rand(2, 1, V, V, V, generator=g)
    target = coarse.clone()
    target[:, :, 4:6, 9, 3:12] += 0.5  # a vessel the coarse volume lacks, at depth H = 9 of the PA rays
    e = highpass(target - coarse).square()[:, 0]
    exact = (V * e / (e.sum(2, keepdim=True) + 1e-20), V * e / (e.sum(3, keepdim=True) + 1e-20))
    exact = tuple(w.unsqueeze(1).expand(-1, GROUPS, -1, -1, -1) for w in exact)
    even = tuple(torch.ones(2, GROUPS, V, V, V) for _ in range(2))
    assert abs(float(placement_kl(exact, target, coarse))) < 1e-4
    assert float(placement_kl(even, target, coarse)) > 1.0
    place = RayPlacement(C).train()
    pa, lat, _, hp = _views(5)
    place(pa, lat, coarse, hp)
    only = {**{k: 0.0 for k in TERMS}, "placement": 1.0}
    crit = DetailRefinementLoss(only)
    total, terms = crit(target, target, coarse, None, place.last_weights)
    total.backward()
    assert float(terms["placement"]) > 1.0 and float(place.logits.weight.grad.abs().max()) > 0
    assert float(DetailRefinementLoss(only)(target, target, coarse)[1]["placement"]) == 0.0


def test_a_refiner_that_places_its_residual_hands_those_weights_to_the_placement_loss():
    """model.residual_weighting="learned": the back-projected residuals go through a one-group placement; in training
    mode its weights join the guidance placement's (one more group per view) for the ``placement`` term, whose
    gradient reaches the residual placement's logits; in eval mode nothing is kept."""
    from ctrefine.config import load_config
    from ctrefine.losses.reference import placement_kl
    from ctrefine.models import build_refiner

    cfg = load_config("cpu-small", ["model.hidden_channels=8", "model.guidance_channels=4", "model.mid_blocks=1",
                                    'model.guidance_depth="cross-view"', 'model.residual_weighting="learned"'])
    torch.manual_seed(0)
    net = build_refiner(cfg).train()
    g = torch.Generator().manual_seed(6)
    coarse, xrays = torch.rand(1, 1, 32, 32, 32, generator=g), torch.rand(1, 2, 1, 64, 64, generator=g)
    net(coarse, xrays)
    w_pa, w_lat = net.placement_weights()
    assert w_pa.shape == w_lat.shape == (1, GROUPS + 1, 32, 32, 32)  # the guidance's groups, then the residual's
    target = coarse.clone()
    target[:, :, 10:12, 7, 5:20] += 0.5
    placement_kl((w_pa, w_lat), target, coarse).backward()
    assert float(net.residual_place.logits.weight.grad.abs().max()) > 0
    net.eval()
    with torch.no_grad():
        net(coarse, xrays)
    assert net.placement_weights() is None
