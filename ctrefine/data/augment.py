"""Radiograph realism as training-time augmentation (domain randomisation).

The projector (:mod:`ctrefine.data.projector`) renders ideal radiographs: exact line integrals of a
monochromatic beam, no scatter, no noise, a perfect detector. A real radiograph differs in each of
these, and a network trained only on the ideal ones learns the projector's exact output rather than
the anatomy. So every training radiograph is re-rendered, on the fly, through an imaging chain whose
parameters are drawn per image (:class:`ctrefine.config.AugmentConfig` holds the ranges):

1. **beam hardening** -- a polychromatic beam hardens with depth, so the measured log-attenuation
   grows less than linearly with path length: ``p -> p / (1 + b p)``, ``b`` chosen so the densest
   ray (the image's 99.5th percentile) loses up to ``beam_hardening`` of its value;
2. to detector intensity ``I = exp(-p)``;
3. **scatter** -- a smooth, broad glow added to the primary: ``I -> (1 - f) I + f G_wide * I``, scatter
   fraction ``f`` (a chest radiograph with an anti-scatter grid keeps roughly a fifth to a third of
   its signal as scatter; without one more than half);
4. **detector blur** -- Gaussian point-spread function, ``sigma`` up to ``blur_px`` pixels;
5. **quantum noise** -- Poisson counts with ``N0`` photons per unattenuated pixel, drawn
   log-uniformly in ``[photons_min, photons_max]`` (Gaussian approximation, variance ``I / N0``);
6. back to log-attenuation ``-log I`` and the usual per-image normalisation
   (:func:`ctrefine.conventions.normalize_xray`);
7. **display / calibration jitter** -- ``x -> x ** gamma`` with ``log gamma`` uniform in
   ``+-log(1 + gamma_jitter)``.

Only the training driver calls :func:`augment_radiographs`; validation, export and inference inputs
are never augmented. Deterministic in the generator it is given (the driver seeds one per epoch and
rank, so a resumed run draws the same chains).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..conventions import XRAY_NORM_PERCENTILES, normalize_xray

SCATTER_SIGMA = 0.12  # width of the scatter kernel as a fraction of the image side: scatter is a low-frequency glow


def _uniform(gen, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur ``(N, S, S)`` images, each with its own ``sigma`` (pixels, ``(N,)``), reflect-padded."""
    n, s, _ = img.shape
    pad = min(s - 1, int(math.ceil(3 * float(sigma.max()))) + 1)
    x = F.pad(img[:, None], (pad, pad, pad, pad), mode="reflect")[:, 0]
    m = x.shape[-1]
    f = torch.fft.fftfreq(m)
    f2 = f[:, None] ** 2 + torch.fft.rfftfreq(m)[None, :] ** 2
    gain = torch.exp(-2 * math.pi ** 2 * sigma.view(-1, 1, 1) ** 2 * f2)
    out = torch.fft.irfft2(torch.fft.rfft2(x) * gain, s=(m, m))
    return out[:, pad:pad + s, pad:pad + s]


def augment_radiographs(raw: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """``(B, 2, 1, S, S)`` line-integral radiographs -> augmented, *normalised* network inputs (same shape).

    ``cfg`` is an :class:`ctrefine.config.AugmentConfig`; each of the ``2B`` images gets its own chain.
    """
    x = normalize_xray(imaging_chain(raw, cfg, gen))
    jit = math.log1p(cfg.gamma_jitter)
    gamma = torch.exp(_uniform(gen, x.shape[:-2], -jit, jit))[..., None, None]  # one per image
    return x.clamp_min(0.0).pow(gamma)


def imaging_chain(raw: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """Steps 1-6 of the module docstring on ``(..., S, S)`` line integrals; returns line integrals, float32.

    Also what ``make-data --xray-realism`` applies once, at generation, to make a test set whose
    radiographs are not the projector's ideal ones.
    """
    shape = raw.shape
    p = raw.reshape(-1, shape[-2], shape[-1]).double().clamp_min(0.0)
    n, s = p.shape[0], p.shape[-1]
    # 1. beam hardening, relative to the image's own dense end (what the normalisation maps to 1)
    hi = torch.quantile(p.reshape(n, -1), XRAY_NORM_PERCENTILES[1] / 100.0, dim=1).clamp_min(1e-6)
    loss = _uniform(gen, (n,), 0.0, cfg.beam_hardening).double()  # fraction lost at p = hi
    b = loss / (1.0 - loss) / hi
    p = p / (1.0 + b.view(-1, 1, 1) * p)
    # 2-3. intensity, scatter
    intensity = torch.exp(-p)
    f = _uniform(gen, (n,), 0.0, cfg.scatter_fraction).double().view(-1, 1, 1)
    glow = gaussian_blur(intensity, torch.full((n,), SCATTER_SIGMA * s, dtype=torch.float64))
    intensity = (1.0 - f) * intensity + f * glow
    # 4. detector blur
    intensity = gaussian_blur(intensity, _uniform(gen, (n,), 0.0, cfg.blur_px).double())
    # 5. quantum noise: N0 photons in an unattenuated pixel
    log_n0 = _uniform(gen, (n,), math.log(cfg.photons_min), math.log(cfg.photons_max)).double().view(-1, 1, 1)
    n0 = torch.exp(log_n0)
    noise = torch.randn(intensity.shape, generator=gen, dtype=torch.float64)
    intensity = (intensity + noise * torch.sqrt(intensity.clamp_min(0.0) / n0)).clamp_min(0.5 / n0)
    # 6. back to log-attenuation
    return (-torch.log(intensity)).float().reshape(shape)
