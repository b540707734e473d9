"""The optional adversarial term: a small 3D patch critic trained alongside the refiner.

Every other term compares the refined volume with the truth voxel by voxel (or band by band), so
detail whose exact position the refiner is unsure of is still averaged towards a blur. A critic asks a
different question -- *does this correction look like a true one?* -- and rewards plausible detail
without demanding its exact phase. It is a knob between fidelity and sharpness:
``loss.adversarial`` (0 = off, the default; the 64^3 ablation in bench/RESULTS-history.md section 10 measures
it at two weights).

The critic is conditional on the coarse volume: it sees ``(volume, volume - coarse)``, i.e. the
correction as well as the result, on overlapping patches (receptive field ~38 voxels, an 8^3 grid of
logits at 64^3). Spectral normalisation keeps it 1-Lipschitz so it cannot overpower the refiner's
other terms early (no warm-up schedule needed). Non-saturating logistic losses on both sides.

Training: once per refiner step, before the refiner's loss, :meth:`AdversarialCritic.step` takes one
Adam step of the critic on (truth, detached refined); its gradients are averaged over the ranks
(the refiner's engine does not own the critic). Its state travels in the training checkpoint so a
resumed run is exact; it is never part of a model file: inference does not need it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

WIDTH = 16  # first-layer channels; 3 stride-2 layers: 16 -> 32 -> 64; 168k parameters
LR = 2e-4  # the usual GAN critic step (Adam, beta1 = 0.5): fast enough to track a slowly changing refiner
BETAS = (0.5, 0.999)
INIT_SEED = 20261130  # the critic's own init seed: building it must not shift the refiner's initialisation


class PatchCritic(nn.Module):
    """``(volume, coarse) (B, 1, D, H, W) each -> patch logits (B, 1, D/8, H/8, W/8)``."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        chans = (2, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [spectral_norm(nn.Conv3d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv3d(chans[-1], 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, volume: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        v, c = volume.float(), coarse.float()  # fp32: tiny network, and the logits' scale matters
        return self.net(torch.cat([v, v - c], dim=1))


class AdversarialCritic:
    """The critic, its optimizer, and the two losses (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu", width: int = WIDTH):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            self.net = PatchCritic(width).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=LR, betas=BETAS)

    def generator_loss(self, refined: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """``mean softplus(-D(refined))``: low when the critic takes the refined volume for a true one.
        Gradients reach ``refined`` only (the critic is trained in :meth:`step`, not by this loss)."""
        self.net.requires_grad_(False)
        try:
            return F.softplus(-self.net(refined, coarse)).mean()
        finally:
            self.net.requires_grad_(True)

    def step(self, target: torch.Tensor, refined: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """One critic update on truths vs (detached) refined volumes; returns its loss (detached)."""
        real = self.net(target, coarse)
        fake = self.net(refined.detach(), coarse)
        loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_over_ranks(self.net)
        self.opt.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


def _average_over_ranks(net: nn.Module) -> None:
    """Data-parallel critic: every rank ends the step with the same gradients (so the same weights)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))
