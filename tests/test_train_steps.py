"""Both models learn on a tiny phantom batch on CPU (a smoke test of models + loss + backward)."""
import torch
import torch.nn.functional as F

from ctrefine.data.dataset import CTDataset
from ctrefine.losses.loss import DetailRefinementLoss
from ctrefine.models.base import BaseReconstructor
from ctrefine.models.refiner import DetailRefinementNetwork


def batch(root):
    ds = CTDataset(root, "train")
    items = [ds[i] for i in range(min(2, len(ds)))]
    return torch.stack([it["xrays"] for it in items]), torch.stack([it["ct"] for it in items])


def test_base_loss_drops(tiny_dataset):
    torch.manual_seed(0)
    x, ct = batch(tiny_dataset)
    model = BaseReconstructor(32, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.l1_loss(model(x), ct)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_refiner_loss_drops(tiny_dataset):
    torch.manual_seed(0)
    x, ct = batch(tiny_dataset)
    coarse = F.avg_pool3d(ct, 3, stride=1, padding=1, count_include_pad=False)  # a blurred "base" output
    model = DetailRefinementNetwork(32, hidden_channels=8, guidance_channels=4, mid_blocks=1)
    crit = DetailRefinementLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = crit(model(coarse, x), ct, coarse, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
