import math

import pytest
import torch

from ctrefine.losses import reference as R
from ctrefine.losses.loss import DEFAULT_WEIGHTS, DetailRefinementLoss
from ctrefine.stencil import laplacian3d


def grid(n=12):
    i = torch.arange(n, dtype=torch.float64)
    return torch.meshgrid(i, i, i, indexing="ij")


def _chest(n=32):
    """``(1, 1, n, n, n)`` model space, the same on every depth slab: a body of soft tissue (H / W index 4 to 27,
    its chest wall's shell 4 to 6) around lung from depth 3 inwards (index 6 to 25): the deep lung from index 7."""
    from ctrefine.conventions import hu_to_model

    truth = torch.zeros(1, 1, n, n, n)
    truth[..., 4:28, 4:28] = float(hu_to_model(40.0))
    truth[..., 6:26, 6:26] = float(hu_to_model(-850.0))
    return truth


def _costs(term, truth, where: dict, delta: float) -> dict:
    """``term(moved, truth)`` for each named ``(h, w)``: ``delta`` added there on every depth slab."""
    cost = {}
    for name, (h, w) in where.items():
        moved = truth.clone()
        moved[..., h, w] += delta
        cost[name] = term(moved, truth).item()
    return cost


def test_laplacian_hand_values():
    d, h, w = grid()
    ramp = (2 * d - 3 * h + 0.5 * w)[None, None]
    assert laplacian3d(ramp)[..., 1:-1, 1:-1, 1:-1].abs().max() < 1e-10
    sq = (w**2)[None, None]
    assert torch.allclose(laplacian3d(sq)[..., 1:-1, 1:-1, 1:-1], torch.full((1, 1, 10, 10, 10), 2.0, dtype=torch.float64))
    const = torch.full((1, 1, 6, 7, 8), 0.3, dtype=torch.float64)
    assert laplacian3d(const).abs().max() < 1e-12  # replicate padding: no border artefact (only rounding)


def test_laplacian_is_self_adjoint():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 1, 5, 6, 7, generator=g, dtype=torch.float64)
    assert torch.allclose((laplacian3d(x) * y).sum(), (x * laplacian3d(y)).sum())


def test_constant_pairs_give_zero():
    a = torch.full((2, 1, 8, 8, 8), 0.4)
    assert R.spectral_l1(a, a.clone()) == 0 and R.laplacian_l1(a, a.clone()) == 0
    b = torch.full((2, 1, 8, 8, 8), 0.7)  # different constants: Laplacian term 0 (no edges),
    assert R.laplacian_l1(a, b) < 1e-6  # |L(a - b)|: up to the six-neighbour sum's float32 rounding
    assert R.spectral_l1(a, b) > 0  # DC differs, weighted by w(0) ~ 0.27


def test_mse_weighs_large_errors_more_than_l1():
    truth = torch.zeros(1, 1, 4, 4, 4)
    one_big = truth.clone()
    one_big[..., 0, 0, 0] = 0.64  # one voxel off by 0.64 ...
    many_small = truth + 0.01  # ... or every voxel (64 of them) off by 0.01: the same L1
    assert R.l1(one_big, truth).item() == pytest.approx(R.l1(many_small, truth).item())
    assert R.mse(one_big, truth).item() == pytest.approx(0.64**2 / 64)
    assert R.mse(many_small, truth).item() == pytest.approx(1e-4)


def test_lung_mse_counts_only_lung_dense_voxels_inside_the_body():
    from ctrefine.conventions import hu_to_model

    truth = torch.zeros(1, 1, 8, 8, 8)  # air around the body (model 0 = -1000 HU)
    truth[..., 2:6, 2:6] = float(hu_to_model(40.0))  # a body of soft tissue ...
    truth[..., 3:5, 3:5] = float(hu_to_model(-850.0))  # ... with lung in it (4 x 2 x 2 = 16 voxels per depth slab)
    off = truth + 0.1  # every voxel off by 0.1
    assert R.lung_mse(off, truth).item() == pytest.approx(8 * 4 * 0.01 / 512)  # 8 slabs x 4 lung voxels
    outside = truth.clone()
    outside[..., 0, 0] += 0.5  # error in the air around the body or in soft tissue: not counted
    outside[..., 2, 2] += 0.5
    assert R.lung_mse(outside, truth).item() == 0.0
    assert R.mse(outside, truth).item() > 0


def test_soft_l1_counts_flat_fat_and_muscle_not_their_borders_lung_bone_or_air():
    from ctrefine.conventions import hu_to_model

    n = 16
    truth = torch.zeros(1, 1, n, n, n)  # air around the body
    truth[..., 2:14, 2:14] = float(hu_to_model(40.0))  # muscle ...
    truth[..., 2:5, 2:14] = float(hu_to_model(-100.0))  # ... under a layer of fat ...
    truth[..., 8:11, 8:11] = float(hu_to_model(-850.0))  # ... with lung in it ...
    truth[..., 5, 12] = float(hu_to_model(700.0))  # ... and a bone
    where = {"muscle": (6, 4), "fat": (3, 6), "muscle beside the lung": (7, 9), "muscle beside the bone": (5, 11),
             "muscle at the skin": (13, 6), "lung": (9, 9), "bone": (5, 12), "air": (0, 0)}
    cost = _costs(R.soft_l1, truth, where, 0.1)
    flat = pytest.approx(n * 0.1 / n**3)
    assert cost == {"muscle": flat, "fat": flat, **{k: 0.0 for k in list(where)[2:]}}


def test_lung_rim_mse_counts_the_lung_in_the_chest_wall_not_the_deep_lung():
    from ctrefine.anatomy import shell_voxels

    n = 32
    assert shell_voxels(n) == 4  # the chest wall: the body's outer 3 voxels
    truth = _chest(n)  # the body: depth 1 at index 4, 3 at index 6; lung from depth 3 inwards
    rim, deep = truth.clone(), truth.clone()
    rim[..., 6, 16] += 0.1  # lung at depth 3: in the wall
    deep[..., 16, 16] += 0.1  # lung 12 voxels deep
    assert R.lung_rim_mse(rim, truth).item() == pytest.approx(n * 0.01 / n**3)
    assert R.lung_rim_mse(deep, truth).item() == 0.0
    assert R.lung_mse(deep, truth).item() == pytest.approx(n * 0.01 / n**3)  # the whole-lung term counts both


def test_lung_detail_mse_counts_the_vessels_inside_the_deep_lung_not_the_heart_or_the_wall():
    from ctrefine.conventions import hu_to_model

    n, soft = 32, float(hu_to_model(40.0))
    truth = _chest(n)
    truth[..., 16, 12] = soft  # a vessel through the deep lung, one voxel thick (n voxels)
    truth[..., 6, 16] = soft  # a vessel on the lung's rim, in the chest wall: lung_rim_mse's region
    truth[..., 14:22, 18:24] = soft  # a heart deep in the lung: its border voxels are half lung
    errors = {"vessel": (16, 12), "rim vessel": (6, 16), "heart border": (14, 20), "lung": (10, 10)}
    cost = _costs(R.lung_detail_mse, truth, errors, -0.1)
    assert cost == {"vessel": pytest.approx(n * 0.01 / n**3), "rim vessel": 0.0, "heart border": 0.0, "lung": 0.0}


def test_ghost_mse_counts_where_the_two_views_shadows_cross_but_no_vessel_is():
    """Two vessels through the deep lung at (h, w) = (10, 10) and (20, 20): their PA and lateral shadows also cross at
    (10, 20) and (20, 10). An error there counts; on a vessel, beside one, or where only one view's shadow falls, not."""
    from ctrefine.conventions import hu_to_model

    n, soft = 32, float(hu_to_model(40.0))
    truth = _chest(n)
    truth[..., 10, 10] = truth[..., 20, 20] = soft  # two vessels, one voxel thick, through every depth slab
    errors = {"ghost": (10, 20), "other ghost": (20, 10), "vessel": (10, 10), "beside a vessel": (11, 10),
              "one shadow": (10, 15), "no shadow": (15, 15)}
    cost = _costs(R.ghost_mse, truth, errors, 0.1)
    one_line = pytest.approx(n * 0.01 / n**3)
    assert cost == {"ghost": one_line, "other ghost": one_line, "vessel": 0.0, "beside a vessel": 0.0,
                    "one shadow": 0.0, "no shadow": 0.0}


def test_crossing_bce_teaches_which_crossings_hold_a_vessel():
    """The same two vessels: their crossings are the vessels (label 1) and the two ghosts (label 0). Logits that say so
    cost less than their reverse; a logit anywhere else (beside a vessel, under one shadow) costs nothing; each class
    weighs half, however few its voxels."""
    from ctrefine.conventions import hu_to_model

    n, soft = 32, float(hu_to_model(40.0))
    truth = _chest(n)
    truth[..., 10, 10] = truth[..., 20, 20] = soft
    vessel, ghost = torch.zeros_like(truth, dtype=torch.bool), torch.zeros_like(truth, dtype=torch.bool)
    vessel[..., 10, 10] = vessel[..., 20, 20] = True
    ghost[..., 10, 20] = ghost[..., 20, 10] = True
    right = torch.where(vessel, 5.0, torch.where(ghost, -5.0, 0.0))
    assert R.crossing_bce(right, truth).item() < 0.01 < R.crossing_bce(-right, truth).item()
    elsewhere = right.clone()
    elsewhere[..., 11, 10] = elsewhere[..., 10, 15] = elsewhere[..., 15, 15] = 50.0
    assert R.crossing_bce(elsewhere, truth).item() == pytest.approx(R.crossing_bce(right, truth).item())
    half = torch.where(ghost, -5.0, 0.0)  # the vessels left at logit 0: half of the loss is ln 2
    assert R.crossing_bce(half, truth).item() == pytest.approx(math.log(2) / 2, rel=1e-2)


def test_lung_l1_leaves_out_a_vessel_unsure_of_its_place_where_the_squared_error_draws_it_faintly():
    """One vessel deep in the lung, at one of five places along a row. The squared error prefers the mean of the five
    guesses (a fifth of the vessel at each) to leaving it out; lung_l1 prefers leaving it out (the median), counts
    the vessel's own voxels, and not the soft tissue around the lung."""
    from ctrefine.conventions import hu_to_model

    n, soft = 32, float(hu_to_model(40.0))
    truth = _chest(n)
    lung = truth.clone()
    truth[..., 16, 12] = soft  # the vessel, one voxel thick through every depth slab
    places = (8, 10, 12, 14, 16)
    hedge = lung.clone()
    for w in places:
        hedge[..., 16, w] += (soft - float(lung[0, 0, 0, 16, 12])) / len(places)
    assert R.mse(hedge, truth).item() < R.mse(lung, truth).item()
    assert R.lung_l1(lung, truth).item() < R.lung_l1(hedge, truth).item()
    assert R.lung_l1(lung, truth).item() > 0 and R.lung_l1(truth, truth).item() == 0.0
    wall = truth.clone()
    wall[..., 4, 10] += 0.3  # soft tissue of the chest wall: not the lung's
    assert R.lung_l1(wall, truth).item() == 0.0


def test_spectral_weight_values():
    w = R.spectral_weight((8, 8, 8))
    assert w[0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())
    assert w.max() > 0.99
    half = R.spectral_weight((8, 8, 8), onesided=True)
    assert torch.allclose(half, w[..., :5])


def test_terms_have_finite_gradients():
    torch.manual_seed(0)
    t = torch.rand(2, 1, 16, 16, 16)
    c = torch.rand(2, 1, 16, 16, 16)
    p = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    for fn in (R.laplacian_l1, R.spectral_l1, R.local_stats_loss):
        p.grad = None
        fn(p, t).backward()
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    p.grad = None
    R.consistency_l1(p, c).backward()
    assert torch.isfinite(p.grad).all()
    flat = torch.full((1, 1, 8, 8, 8), 0.5, requires_grad=True)  # sqrt(var) at var=0 stays finite
    R.local_stats_loss(flat, flat.detach()).backward()
    assert torch.isfinite(flat.grad).all()


def test_loss_applies_config_weights():
    torch.manual_seed(0)
    t, c, p = torch.rand(3, 1, 1, 16, 16, 16)
    weights = {"l1": 2.0, "frequency": 0.0, "gradient": 1.5, "texture": 0.25, "consistency": 3.0, "xray_consistency": 0.0}
    total, terms = DetailRefinementLoss(weights)(p, t, c)
    assert "frequency" not in terms
    w = {**DEFAULT_WEIGHTS, **weights}
    assert torch.allclose(total, sum(w[k] * v for k, v in terms.items()))
    assert torch.allclose(terms["gradient"], R.laplacian_l1(p, t))
    xr = torch.rand(1, 2, 1, 32, 32)
    total_d, terms_d = DetailRefinementLoss()(p, t, c, xr)
    assert set(terms_d) == {k for k, w in DEFAULT_WEIGHTS.items() if w > 0}
    with pytest.raises(ValueError, match="needs the batch's radiographs"):
        DetailRefinementLoss({"xray_consistency": 1.0})(p, t, c)
    with pytest.raises(ValueError, match="unknown loss term"):
        DetailRefinementLoss({"ssim": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        DetailRefinementLoss({"l1": -1.0})


def _blob_volume(shift=0, n=24):
    """Sharp-edged random blocks: detail at every scale, shifted (circularly) by ``shift`` voxels."""
    g = torch.Generator().manual_seed(3)
    v = torch.zeros(1, 1, n, n, n)
    for _ in range(12):
        a = torch.randint(0, n - 6, (3,), generator=g)
        s = torch.randint(2, 6, (3,), generator=g)
        v[..., a[0]:a[0] + s[0], a[1]:a[1] + s[1], a[2]:a[2] + s[2]] += torch.rand(1, generator=g).item()
    return torch.roll(v, shifts=(shift, shift, shift), dims=(-3, -2, -1))


def test_phase_free_terms_reward_detail_not_its_position():
    """Misplaced detail costs the pointwise terms a lot and these nothing; lost detail (a blur) costs them."""
    from ctrefine.metrics import highpass

    t = _blob_volume()
    moved = _blob_volume(shift=3)  # the same detail, elsewhere (the case a pointwise loss averages away)
    blurred = (t.double() - highpass(t.double(), 1.5)).float()
    for fn in (R.band_energy_l1, R.gradient_distribution_l1):
        assert fn(t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)
        assert fn(moved, t).item() < 0.1 * fn(blurred, t).item()  # not 0: the roll moves edges across the border
    assert R.l1(moved, t) > R.l1(blurred, t)  # pointwise: the blur looks better than the right detail misplaced
    p = blurred.clone().requires_grad_(True)
    (R.band_energy_l1(p, t) + R.gradient_distribution_l1(p, t)).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def _blob_scene(seed: int, n: int = 24):
    """A random coarse volume (0-0.1) and 30 dense 3^3 blobs of the truth's correction; the generator goes on."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, n, n, n, generator=g) * 0.1
    blobs = torch.zeros(1, 1, n, n, n)
    for d, h, w in torch.randint(2, n - 2, (30, 3), generator=g).tolist():
        blobs[0, 0, d - 1:d + 2, h - 1:h + 2, w - 1:w + 2] += 0.3
    return g, coarse, blobs


def test_streak_term_charges_only_detail_smeared_along_the_rays():
    """A correction placed in depth (the truth's blobs, at any strength) costs nothing; the same blobs' PA
    projection copied along the PA rays -- the radiograph's pattern lifted through the body: the truth's ray
    means without its depth structure -- costs, more the more of it there is, with a gradient that lowers it."""
    _, coarse, blobs = _blob_scene(1)
    truth = coarse + blobs
    smeared = coarse + blobs.mean(dim=3, keepdim=True).expand_as(blobs)  # same PA projection, no depth
    assert R.streak_excess(truth, truth, coarse).item() == pytest.approx(0.0, abs=1e-6)
    assert R.streak_excess(coarse + 0.5 * blobs, truth, coarse).item() == pytest.approx(0.0, abs=1e-5)
    partly = R.streak_excess(0.5 * (truth + smeared), truth, coarse).item()
    p = smeared.clone().requires_grad_(True)
    cost = R.streak_excess(p, truth, coarse)
    assert cost.item() > 1.0 and 0 < partly < cost.item()  # the PA share: ~1 smeared against the truth's ~0.1
    cost.backward()
    assert R.streak_excess((p - 0.1 * p.grad / p.grad.abs().max()).detach(), truth, coarse) < cost


def test_streak_match_charges_too_little_ray_constant_detail_as_well_as_too_much():
    """The two-sided term: zero at the truth's correction; a correction with none of the truth's ray-constant
    part (the same detail with each ray's mean taken out) costs, and so does a smeared one; each with a
    gradient that lowers it. The one-sided term lets the first pass free."""
    g, coarse, blobs = _blob_scene(2)
    n = coarse.shape[-1]
    band = torch.linspace(0, 1, n).sin()[None, None, :, None, None].expand_as(blobs) * 0.2  # constant along H and W
    truth = coarse + blobs + band * torch.rand(1, 1, n, 1, n, generator=g)  # part of it constant along the PA rays
    flat = truth - (truth - coarse).mean(dim=3, keepdim=True) - (truth - coarse).mean(dim=4, keepdim=True)
    smeared = coarse + (truth - coarse).mean(dim=3, keepdim=True).expand_as(blobs)
    assert R.streak_mismatch(truth, truth, coarse).item() == pytest.approx(0.0, abs=1e-6)
    assert R.streak_excess(flat, truth, coarse).item() == pytest.approx(0.0, abs=1e-6)  # under the truth: free
    for wrong in (flat, smeared):
        p = wrong.clone().requires_grad_(True)
        cost = R.streak_mismatch(p, truth, coarse)
        assert cost.item() > 0.5
        cost.backward()
        assert R.streak_mismatch((p - 0.01 * p.grad / p.grad.abs().max()).detach(), truth, coarse) < cost


def test_lung_streak_match_sees_a_streak_across_the_lung_that_the_whole_rays_dilute(chest_scene):
    """Inside a chest whose truth correction has ribs in the wall (long along the lateral rays) and short vessels in
    the lung, a 13-voxel streak across the lung along the lateral rays costs the lung term ten times what it costs the
    whole-ray streak_match (the ribs dominate whole rays); the same streak in the wall costs the lung term next to nothing;
    its gradient lowers it."""
    g = torch.Generator().manual_seed(3)
    tissue = chest_scene.tissue
    coarse = tissue + torch.rand(tissue.shape, generator=g) * 0.01
    truth = coarse + chest_scene.detail(g, vessels=40, branches=True)
    lung_streak, wall_streak = torch.zeros_like(coarse), torch.zeros_like(coarse)
    lung_streak[0, 0, 16, 12, 8:21] = 0.15
    wall_streak[0, 0, 18, 4, 8:21] = 0.15
    assert R.lung_streak_mismatch(truth, truth, coarse).item() == pytest.approx(0.0, abs=1e-6)
    assert R.lung_streak_mismatch(truth + wall_streak, truth, coarse).item() < 1e-3  # its high-pass halo only
    p = (truth + lung_streak).requires_grad_(True)
    cost = R.lung_streak_mismatch(p, truth, coarse)
    assert cost.item() > 0.1 and cost.item() > 5 * R.streak_mismatch(p, truth, coarse).item()
    cost.backward()
    assert R.lung_streak_mismatch((p - 0.01 * p.grad / p.grad.abs().max()).detach(), truth, coarse) < cost


def test_adversarial_critic_tells_truth_from_blur_and_trains_only_itself():
    """The optional critic learns to separate sharp truths from blurred refinements; its verdict's gradient
    reaches the refined volume only; it is built only when its weight is > 0 and never shifts the global RNG."""
    from ctrefine.losses.adversarial import AdversarialCritic
    from ctrefine.metrics import highpass

    t = torch.cat([_blob_volume(shift=s, n=32) for s in (0, 5)])
    blurred = (t.double() - highpass(t.double(), 1.5)).float()
    coarse = (t.double() - highpass(t.double(), 3.0)).float()
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    critic = AdversarialCritic()
    assert torch.equal(torch.rand(3), before)  # its own init seed: the refiner's initialisation is unchanged
    first = critic.step(t, blurred, coarse).item()
    for _ in range(60):
        last = critic.step(t, blurred, coarse).item()
    assert first == pytest.approx(2 * 0.6931, abs=0.05) and last < 0.7 * first
    with torch.no_grad():
        assert critic.net(t, coarse).mean() > critic.net(blurred, coarse).mean()
    grads = [q.grad.clone() for q in critic.net.parameters()]  # left by the last critic step
    p = blurred.clone().requires_grad_(True)
    critic.generator_loss(p, coarse).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(torch.equal(g, q.grad) for g, q in zip(grads, critic.net.parameters()))  # the verdict trains no critic
    assert all(q.requires_grad for q in critic.net.parameters())  # trainable again after the verdict
    clone = AdversarialCritic()
    clone.load_state_dict(critic.state_dict())
    with torch.no_grad():
        critic.net.eval(), clone.net.eval()
        assert torch.equal(critic.net(t, coarse), clone.net(t, coarse))

    assert DetailRefinementLoss().critic is None and "critic" not in DetailRefinementLoss().term_names
    loss = DetailRefinementLoss({"adversarial": 0.1, "xray_consistency": 0.0})
    assert loss.critic is not None and loss.term_names[-1] == "critic"
    total, terms = loss(blurred, t, coarse)
    assert "adversarial" in terms and torch.isfinite(total)
    with pytest.raises(ValueError, match="needs a critic"):
        from ctrefine.losses.registry import TERMS, TermContext
        TERMS["adversarial"].fn(blurred, t, coarse, TermContext())


def test_every_ablation_row_writes_out_every_term():
    """bench/quality.py's rows name every loss term's weight, so a row means the same run whatever the
    registry's defaults become (a term added later is off in the old rows, not silently on)."""
    import sys
    from pathlib import Path

    from ctrefine.losses.registry import DEFAULT_WEIGHTS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import quality

    assert {k: sorted(set(DEFAULT_WEIGHTS) - set(r["weights"])) for k, r in quality.ROWS.items()
            if set(r["weights"]) != set(DEFAULT_WEIGHTS)} == {}
