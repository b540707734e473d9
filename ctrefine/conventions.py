"""The fixed conventions every stage of ctrefine agrees on.

Nothing else in the package hard-codes the HU window, the X-ray physics constants, the
acquisition geometry defaults or the radiograph normalisation: import them from here.

Axes
    Volumes are ``(B, 1, D, H, W)``: D superior->inferior, H anterior->posterior,
    W patient right->left. In nibabel's axis-code terms the array orientation is ``('I','P','L')``.
    The PA radiograph integrates along H and is an image ``(D, W)``; the lateral radiograph
    integrates along W and is an image ``(D, H)``. Dual-view input is ``(B, 2, 1, S, S)``,
    view 0 = PA, view 1 = lateral.
"""
from __future__ import annotations

import numpy as np
import torch

# Intensity window of X2CT-GAN: model space 0 <-> -1000 HU (air), 1 <-> +1500 HU (dense bone).
HU_MIN = -1000.0
HU_MAX = 1500.0

# Linear attenuation of water at a typical effective diagnostic energy (~70 keV), mm^-1.
MU_WATER = 0.02

# Array orientation as nibabel axis codes (direction in which each index increases).
CANONICAL_AXCODES = ("I", "P", "L")

# Cone-beam geometry of X2CT-GAN (mm).
SOURCE_ISOCENTER_MM = 541.0
SOURCE_DETECTOR_MM = 949.0

# Default field of view of the cubic volume (mm): covers an adult chest (~300 mm wide) with margin.
FOV_MM = 320.0

# Percentiles used for per-image radiograph normalisation (robust against a few hot pixels / markers).
XRAY_NORM_PERCENTILES = (0.5, 99.5)

VIEW_NAMES = ("pa", "lateral")


def hu_to_model(hu):
    """HU -> model space ``clip((HU + 1000) / 2500, 0, 1)``; works on numpy arrays and tensors."""
    scaled = (hu - HU_MIN) / (HU_MAX - HU_MIN)
    if isinstance(scaled, torch.Tensor):
        return scaled.clamp(0.0, 1.0)
    return np.clip(scaled, 0.0, 1.0)


def model_to_hu(x):
    """Model space -> HU (the inverse of :func:`hu_to_model` inside the window)."""
    return x * (HU_MAX - HU_MIN) + HU_MIN


def hu_to_mu(hu):
    """HU -> linear attenuation (mm^-1): ``mu_water * (1 + HU/1000)``, clipped at 0 (air)."""
    mu = MU_WATER * (1.0 + hu / 1000.0)
    if isinstance(mu, torch.Tensor):
        return mu.clamp_min(0.0)
    return np.maximum(mu, 0.0)


def normalize_xray(img: torch.Tensor) -> torch.Tensor:
    """Per-image normalisation of attenuation radiographs for network input -- the ONE place it is defined.

    ``img`` is ``(..., S, S)`` holding line integrals of mu (bone bright, air ~0) or any image that is
    monotonic in them (a real radiograph converted with ``-log(I/I0)``, see ``ctrefine.data.io``).
    Each image is mapped linearly so its 0.5th percentile goes to 0 and its 99.5th to 1, then clipped
    to [0, 1]. Percentiles rather than min/max make the mapping robust to collimator edges, markers and
    hot pixels, and the per-image scale removes the unknown exposure/calibration of real radiographs.
    """
    flat = img.reshape(*img.shape[:-2], -1).float()
    lo = torch.quantile(flat, XRAY_NORM_PERCENTILES[0] / 100.0, dim=-1, keepdim=True)
    hi = torch.quantile(flat, XRAY_NORM_PERCENTILES[1] / 100.0, dim=-1, keepdim=True)
    out = (flat - lo) / (hi - lo).clamp_min(1e-6)
    return out.clamp(0.0, 1.0).reshape(img.shape)


def canonical_affine(size: int, spacing_mm: float, center_ras=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 voxel->RAS affine for a cubic volume in the canonical ('I','P','L') array orientation.

    Index 0 increases towards inferior (-z), index 1 towards posterior (-y), index 2 towards the
    patient's left (-x, since RAS +x is the patient's right). The volume centre sits at ``center_ras``.
    """
    a = np.zeros((4, 4))
    a[0, 2] = -spacing_mm  # array axis 2 (W, right->left) -> RAS x decreases
    a[1, 1] = -spacing_mm  # array axis 1 (H, ant->post) -> RAS y decreases
    a[2, 0] = -spacing_mm  # array axis 0 (D, sup->inf) -> RAS z decreases
    a[3, 3] = 1.0
    mid = (size - 1) / 2.0
    a[:3, 3] = np.asarray(center_ras, float) - a[:3, :3] @ np.array([mid, mid, mid])
    return a
