"""Training-time radiograph realism (domain randomisation): each effect does what it says, off = identity,
deterministic per generator, used by training only."""
import ast
from pathlib import Path

import pytest
import torch

from ctrefine.config import AugmentConfig, ConfigError, resolve
from ctrefine.conventions import normalize_xray
from ctrefine.data.augment import augment_radiographs, gaussian_blur, imaging_chain
from ctrefine.data.dataset import CTDataset, iter_batches

PKG = Path(__file__).resolve().parents[1] / "ctrefine"
NONE = dict(beam_hardening=0.0, scatter_fraction=0.0, blur_px=0.0, photons_min=1e14, photons_max=1e14,
            gamma_jitter=0.0)


@pytest.fixture(scope="module")
def raw(tiny_dataset):
    xr, _, _ = next(iter_batches(CTDataset(tiny_dataset, "train"), [0, 1], 2, raw=True))
    return xr  # (2, 2, 1, 64, 64) line integrals as stored


def _hf(x):
    """Energy of the 2D Laplacian: how much pixel-scale detail (or noise) an image holds."""
    lap = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return float((lap ** 2).mean())


def test_off_by_default_and_ranges_checked():
    assert resolve().augment.enabled is False
    with pytest.raises(ConfigError, match="photons_min"):
        resolve({"augment": {"photons_min": 1e6, "photons_max": 1e4}})
    with pytest.raises(ConfigError, match="augment.scatter_fraction"):
        resolve({"augment": {"scatter_fraction": 1.5}})


def test_a_null_chain_is_the_plain_normalisation(raw):
    out = augment_radiographs(raw, AugmentConfig(**NONE), torch.Generator().manual_seed(0))
    assert out.shape == raw.shape
    assert (out - normalize_xray(raw)).abs().max() < 2e-3


def test_deterministic_per_generator_and_in_range(raw):
    cfg = AugmentConfig()
    a = augment_radiographs(raw, cfg, torch.Generator().manual_seed(1))
    b = augment_radiographs(raw, cfg, torch.Generator().manual_seed(1))
    c = augment_radiographs(raw, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert (a - normalize_xray(raw)).abs().mean() > 0.005  # it changes the images


def test_each_effect_moves_the_image_the_right_way(raw):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    clean = normalize_xray(raw)
    noisy = augment_radiographs(raw, AugmentConfig(**{**NONE, "photons_min": 3e2, "photons_max": 3e2}), g())
    blurred = augment_radiographs(raw, AugmentConfig(**{**NONE, "blur_px": 2.0}), g())
    assert _hf(noisy) > 1.5 * _hf(clean) and _hf(blurred) < 0.8 * _hf(clean)
    # scatter (a glow added to the detected intensity) and beam hardening (sublinear attenuation) both
    # pull the dense end of the line integrals down, and leave the unattenuated air near 0
    dense = lambda p: torch.quantile(p.reshape(-1, p.shape[-1] * p.shape[-2]).double(), 0.995, dim=1)  # noqa: E731
    for key in ("scatter_fraction", "beam_hardening"):
        soft = imaging_chain(raw, AugmentConfig(**{**NONE, key: 0.6}), g())
        ratio = dense(soft) / dense(raw)
        assert (ratio <= 1.0 + 1e-6).all() and ratio.mean() < 0.95, (key, ratio)
    img = torch.zeros(1, 33, 33, dtype=torch.float64)
    img[0, 16, 16] = 1.0
    out = gaussian_blur(img, torch.tensor([2.0], dtype=torch.float64))
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)  # blur keeps energy
    var = float((out[0].sum(1) * (torch.arange(33) - 16.0) ** 2).sum())
    assert var == pytest.approx(4.0, rel=0.02)  # sigma 2 px -> variance 4 px^2


def test_only_training_augments():
    """The training driver augments; dataset generation may apply a fixed chain (--xray-realism);
    validation, export and inference never touch it."""
    users = {}
    for f in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("augment"):
                users.setdefault(f.relative_to(PKG).as_posix(), set()).update(a.name for a in n.names)
    assert users == {"training/driver.py": {"augment_radiographs"}, "data/dataset.py": {"imaging_chain"}}


def test_refine_stage_recomputes_the_coarse_volume_from_augmented_radiographs(tiny_dataset, tmp_path):
    from ctrefine.checkpoint import save_model_file
    from ctrefine.models import build_models
    from ctrefine.device import DevicePolicy
    from ctrefine.training.stages import RefineStage

    cfg = resolve({"model": {"volume_size": 32, "xray_size": 64, "base_width": 4, "hidden_channels": 8,
                             "guidance_channels": 4, "mid_blocks": 1},
                   "augment": {"enabled": True}, "checkpoint": {"dir": str(tmp_path)}})
    base, _ = build_models(cfg)
    save_model_file(tmp_path / "base" / "best_model.pt", "base", base.state_dict(), cfg, {}, epoch=1)
    stage = RefineStage(cfg, DevicePolicy(torch.device("cpu"), torch.float32))
    ds = CTDataset(tiny_dataset, "train")
    model = stage.build([ds])
    assert stage.recompute_coarse
    xr, ct, names = next(iter_batches(ds, [0, 1], 2, raw=True))
    aug = augment_radiographs(xr, cfg.augment, torch.Generator().manual_seed(0))
    loss, terms = stage.loss(model, aug, ct, names)
    # the identity-initialised refiner returns the coarse volume, and here that is the base's answer to
    # the *augmented* radiographs, not the cached one
    with torch.no_grad():
        coarse_aug, coarse_clean = stage.frozen(aug), stage.frozen(normalize_xray(xr))
    refined = model(coarse_aug, aug)
    assert torch.allclose(refined, coarse_aug) and not torch.allclose(coarse_aug, coarse_clean)
    assert stage.coarse.numel() == 0 and not stage.coarse_row  # nor is a clean coarse volume of the training set computed that nothing reads
    assert torch.isfinite(loss)
