"""Fit an uncertainty head (:class:`ctrefine.models.uncertainty_head.UncertaintyHead`) to a frozen pipeline.

1. :func:`collect` -- run the pipeline (safety gate on) over a split: per patient the coarse volume, the
   answer the gate returned, the truth, its structure labels and the radiographs at the volume's size.
2. :func:`train_head` -- the head learns the 90th percentile of |answer - truth| on training patients with
   the pinball loss, from random crops (their voxel positions passed in, so a crop sees where it is).
   Every patient teaches twice: with the refined answer and with the coarse one (the gate may return
   either). ``class_power`` > 0 weights each structure class by ``frequency^-power`` so rare classes
   (airway, vessels, ribs) are not drowned by soft tissue.
3. :func:`fit_scale` -- the refiner fits its training patients better than new ones, so one factor, set
   on validation patients, makes the body's central 90 % interval hold 90 %.
4. :func:`measure` -- coverage overall and per class, rank correlations, reliability at other levels.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from ..conventions import HU_MAX, HU_MIN, hu_to_model
from ..data.dataset import CTDataset, iter_items
from ..metrics import psnr
from ..models.uncertainty_head import UncertaintyHead, voxel_coordinates
from ..pipeline import reconstruct_batch
from ..reprojection import pool_to
from ..uncertainty import BODY_HU, QUANTILE, coverage, spearman

BODY = float(hu_to_model(torch.tensor(BODY_HU)))  # the body threshold in model units
NOMINAL = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # reliability levels reported


def collect(predictor, data_path, split: str, batch_size: int = 4, progress: bool = False) -> list[dict]:
    """Per patient of ``split``: ``coarse``, ``answer`` (after the gate), ``truth`` as float16 ``(D, H, W)``
    model-space arrays, ``xrays`` float16 ``(2, 1, D, D)`` (area-averaged to the volume's side, as the head
    reads them), ``labels`` (uint8, or None), ``fell_back`` and the refined PSNR."""
    ds = CTDataset(data_path, split).nonempty()
    out = []
    for items in tqdm(list(iter_items(ds, range(len(ds)), batch_size)), desc=f"collect {split}", disable=not progress):
        x = torch.stack([it["xrays"] for it in items])
        step = reconstruct_batch(predictor, x, gate=True, uncertainty=False)  # the head is what is being fitted
        coarse, answer, recs = step.coarse, step.refined, step.records
        pooled = pool_to(x, coarse.shape[-1])
        for i, it in enumerate(items):
            lab = it.get("labels")
            out.append({"name": it["name"], "coarse": coarse[i, 0].numpy().astype(np.float16),
                        "answer": answer[i, 0].numpy().astype(np.float16),
                        "truth": it["ct"][0].numpy().astype(np.float16), "fell_back": bool(recs[i]["fell_back"]),
                        "xrays": pooled[i].numpy().astype(np.float16),
                        "labels": None if lab is None else np.asarray(lab).reshape(coarse.shape[-3:]).astype(np.uint8),
                        "psnr": float(psnr(answer[i:i + 1], it["ct"][None]).item())})
    return out


def class_weights(examples: list[dict], power: float, classes: int = 256) -> torch.Tensor:
    """Per label value: ``frequency^-power`` over the body voxels of ``examples``, normalised so the mean
    weight of a body voxel is 1 (all ones for ``power`` 0 or unlabelled data)."""
    counts = np.zeros(classes)
    for e in examples:
        if e["labels"] is not None:
            counts += np.bincount(e["labels"][_body(e["answer"], e["truth"])], minlength=classes)[:classes]
    if power == 0 or counts.sum() == 0:
        return torch.ones(classes)
    f = counts / counts.sum()
    w = np.where(counts > 0, np.maximum(f, 1e-6) ** -power, 0.0)
    return torch.tensor(w / (w * f).sum(), dtype=torch.float32)


def _body(answer, truth):
    return (answer > BODY) | (truth > BODY)


def pinball(log_q: torch.Tensor, err: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean pinball loss of the predicted :data:`QUANTILE` ``exp(log_q)`` of ``err``."""
    d = err - torch.exp(log_q)
    return (torch.maximum(QUANTILE * d, (QUANTILE - 1.0) * d) * weight).sum() / weight.sum().clamp_min(1e-6)


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


@torch.no_grad()
def _xray_features(head: UncertaintyHead, examples: list[dict]) -> list[torch.Tensor]:
    """The head's radiograph features of every example's refined answer, then of its coarse one (float16)."""
    out = []
    for key in ("answer", "coarse"):
        for e in examples:
            f = head.xray_features(_tensor(e[key])[None, None], _tensor(e["xrays"])[None])
            out.append(f[0].half())
    return out


def _crop_batch(examples, xfeats, picks, corner, crop, weights):
    """Coarse, answer (the refined one for the first copy of a patient, the coarse for the second), its
    radiograph features, |error| and loss weight, ``(B, C, c, c, c)`` each, for the crop at ``corner``."""
    n = len(examples)
    sl = tuple(slice(o, o + crop) for o in corner)
    t = lambda a: _tensor(a[sl])[None]
    coarse = torch.stack([t(examples[i % n]["coarse"]) for i in picks])
    answer = torch.stack([t(examples[i % n]["answer" if i < n else "coarse"]) for i in picks])
    truth = torch.stack([t(examples[i % n]["truth"]) for i in picks])
    xf = torch.stack([xfeats[i][(slice(None),) + sl].float() for i in picks])
    w = _body(answer, truth).float()
    if any(examples[i % n]["labels"] is not None for i in picks):
        lab = torch.stack([torch.from_numpy(examples[i % n]["labels"][sl].astype(np.int64))[None]
                           if examples[i % n]["labels"] is not None else torch.zeros((1,) + (crop,) * 3, dtype=torch.long)
                           for i in picks])
        w = w * weights[lab]
    return coarse, answer, xf, (answer - truth).abs(), w


def train_head(examples: list[dict], geometry: str = "cone", channels: int = 16, dilations=(1, 2, 4),
               epochs: int = 8, crop: int = 32, batch_size: int = 4, lr: float = 3e-3, class_power: float = 0.0,
               seed: int = 0, progress: bool = False, log=print) -> UncertaintyHead:
    """A head trained with the pinball loss on random ``crop``-voxel cubes of ``examples`` (:func:`collect`),
    AdamW with a one-cycle schedule; deterministic in ``seed``. ``geometry``: the refiner's ray geometry."""
    torch.manual_seed(seed)
    size = examples[0]["truth"].shape[-1]
    crop = min(crop, size)
    head = UncertaintyHead(size, geometry, channels, tuple(dilations))
    xfeats = _xray_features(head, examples)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = max(1, (2 * len(examples)) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch)
    rng, weights = np.random.default_rng(seed), class_weights(examples, class_power)
    coords = voxel_coordinates(torch.zeros(1, 1, size, size, size))
    for ep in range(epochs):
        order, total = rng.permutation(2 * len(examples)), 0.0
        for b in tqdm(range(per_epoch), desc=f"head epoch {ep + 1}/{epochs}", disable=not progress, leave=False):
            picks = order[(b * batch_size) % len(order):][:batch_size]
            corner = tuple(int(v) for v in rng.integers(0, size - crop + 1, 3))
            coarse, answer, xf, err, w = _crop_batch(examples, xfeats, picks, corner, crop, weights)
            c = coords[(slice(None), slice(None)) + tuple(slice(o, o + crop) for o in corner)].expand(len(picks), -1, -1, -1, -1)
            loss = pinball(head.log_quantile(coarse, answer, xf, c), err, w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log(f"uncertainty head epoch {ep + 1}/{epochs}: pinball loss {total / per_epoch:.5f}")
    return head.eval()


@torch.no_grad()
def predict_std_hu(head: UncertaintyHead, examples: list[dict]) -> list[np.ndarray]:
    """The head's sigma (HU, with its current scale) for each example's answer."""
    out = []
    for e in examples:
        c, a = (_tensor(e[k])[None, None] for k in ("coarse", "answer"))
        out.append(head(c, a, _tensor(e["xrays"])[None])[0, 0].numpy() * (HU_MAX - HU_MIN))
    return out


def _pooled(stds, examples):
    """Body voxels of all examples: |error| (HU), sigma (HU), labels (or None)."""
    err, std, lab = [], [], []
    for s, e in zip(stds, examples):
        a, t = e["answer"].astype(np.float32), e["truth"].astype(np.float32)
        m = _body(a, t)
        err.append(np.abs(a - t)[m] * (HU_MAX - HU_MIN))
        std.append(s[m])
        lab.append(None if e["labels"] is None else e["labels"][m])
    return np.concatenate(err), np.concatenate(std), None if any(v is None for v in lab) else np.concatenate(lab)


def fit_scale(head: UncertaintyHead, examples: list[dict], target: float = 0.9) -> float:
    """Set the head's scale so that ``target`` of the body voxels of ``examples`` lie inside the central
    interval (bisection on the pooled voxels); returns it."""
    head.scale.fill_(1.0)
    err, std, _ = _pooled(predict_std_hu(head, examples), examples)
    lo, hi = 1e-3, 1e3
    for _ in range(60):  # coverage grows with the factor
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if coverage(err, mid * std) < target else (lo, mid)
    head.scale.fill_(hi)
    return float(head.scale)


def measure(stds: list[np.ndarray], examples: list[dict], label_names: dict | None = None) -> dict:
    """Coverage of the 90 % interval (overall; per structure class with >= 1,000 voxels), the voxel rank
    correlation of sigma with |error| (fixed 200,000-voxel subsample), reliability at :data:`NOMINAL`,
    and per patient the mean sigma and PSNR."""
    from scipy.stats import norm

    err, std, lab = _pooled(stds, examples)
    pick = np.random.default_rng(0).permutation(err.size)[:200_000]
    out = {"patients": len(examples), "coverage90": coverage(err, std), "spearman_voxel": spearman(std[pick], err[pick]),
           "reliability": {str(q): coverage(err, std, float(norm.ppf(0.5 + q / 2))) for q in NOMINAL},
           "mean_std": [float(s[_body(e["answer"], e["truth"])].mean()) for s, e in zip(stds, examples)],
           "psnr": [e["psnr"] for e in examples]}
    if lab is not None:
        names = label_names or {}
        out["by_class"] = {names.get(int(k), str(int(k))): coverage(err[lab == k], std[lab == k])
                           for k in np.unique(lab) if (lab == k).sum() >= 1000}
    return out


def fit_uncertainty(base, refiner, data_path, out, channels: int = 16, epochs: int = 12, class_power: float = 0.25,
                    max_train: int | None = None, progress: bool = True):
    """Give a refiner an uncertainty head: the frozen pair runs over ``data_path``'s train split (its errors
    teach the head) and val split (the one scale factor); the refiner's model file with the head is written
    to ``out``. Returns ``(predictor without the head, head, Calibration, val figures, training minutes)``."""
    from ..checkpoint import load_model_file, save_model_file
    from ..data.phantoms import LABELS
    from ..models.uncertainty_head import DILATIONS
    from ..pipeline import TorchPredictor
    from ..uncertainty import Calibration, head_entry

    pred = TorchPredictor(base, refiner, arithmetic="fp32")  # on the device the policy picks; exact arithmetic
    pred.drop_uncertainty()  # the head is trained anew on what the pair itself gets wrong
    train = collect(pred, data_path, "train", progress=progress)[:max_train]
    val = collect(pred, data_path, "val", progress=progress)
    t0 = time.perf_counter()
    head = train_head(train, pred.geometry, channels, epochs=epochs, class_power=class_power, progress=progress,
                      log=print if progress else (lambda _: None))
    minutes = (time.perf_counter() - t0) / 60
    scale = fit_scale(head, val)
    figures = measure(predict_std_hu(head, val), val, LABELS)
    cal = Calibration(train[0]["truth"].shape[-1], pred.geometry, channels, DILATIONS, scale,
                      tuple(figures["mean_std"]), class_power, len(train), epochs)
    mf = load_model_file(refiner, stage="refine")
    save_model_file(out, "refine", mf.state_dict, mf.config, mf.metrics, mf.epoch, mf.global_step,
                    uncertainty=head_entry(head, cal))
    return pred, head, cal, figures, minutes
