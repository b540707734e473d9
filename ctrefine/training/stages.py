"""What differs between the two training stages, behind one interface the driver calls.

* :class:`BaseStage` -- X-rays -> coarse CT; L1 loss; validated by PSNR / SSIM / HF-ratio.
* :class:`RefineStage` -- the frozen base (fp32, eval, no gradients, not seen by DeepSpeed) makes the
  coarse volumes once; the DetailRefinementNetwork learns the refinement with the registry's loss
  terms; validated by coarse vs refined metrics; at the end it proves the base never changed.

A stage owns its model set-up, loss, validation metrics, score key and log fields; the driver owns
the loop, distribution, RNG, logging and checkpoints. Adding a stage = one class + one entry in
:data:`STAGES`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_model_file, state_fingerprint
from ..config import Config
from ..device import DevicePolicy
from ..data.dataset import CTDataset, DatasetHeader, ResidentSplit, iter_batches
from ..jsonio import write_json
from ..errors import UserError
from ..losses.loss import DetailRefinementLoss, ReconstructionLoss
from .. import metrics, pretrained
from ..models import build_base, build_refiner
from ..models.norm import use_fused_groupnorm
from ..reprojection import SliceProjector, xray_consistency

# per-epoch validation: MAE adds nothing PSNR does not show; HF-PSNR says whether the detail is right
# (only these are computed every epoch: all_metrics would add the band FFTs nobody logs here)
VAL_METRICS = {"psnr": metrics.psnr, "ssim": metrics.ssim, "hf_ratio": metrics.hf_energy_ratio,
               "hf_psnr": metrics.hf_psnr}


def _pick(pred, ct, prefix: str = "") -> dict:
    return {prefix + k: fn(pred, ct) for k, fn in VAL_METRICS.items()}


def _accumulate(acc: dict[str, list], values: dict) -> None:
    for k, v in values.items():
        acc.setdefault(k, []).append(v)


def _mean(acc: dict[str, list]) -> dict[str, float]:
    """Means over every patient, brought to the host in one transfer."""
    keys = list(acc)
    means = torch.stack([torch.cat(acc[k]).double().mean() for k in keys]).cpu()
    return {k: float(v) for k, v in zip(keys, means)}


class Stage:
    """Interface of a training stage (see the module docstring)."""

    name: str
    score_key: str  # validation metric maximised: best model choice and early stopping
    val_fields: tuple[str, ...]

    def __init__(self, cfg: Config, policy: DevicePolicy):
        self.cfg, self.policy = cfg, policy
        self.device, self.dtype = policy.device, policy.dtype

    @staticmethod
    def check(cfg: Config) -> None:
        """Stage-specific checks before anything is written (raise :class:`UserError`)."""

    def num_epochs(self) -> int:
        return self.cfg.training.num_epochs

    def build(self, datasets: list[CTDataset]) -> torch.nn.Module:
        """The trainable model (and anything the stage needs before the first step); ``datasets`` is
        ``[train, val]``."""
        raise NotImplementedError

    @property
    def term_names(self) -> tuple[str, ...]:
        return self.criterion.term_names

    def loss(self, model, xrays, ct, names):
        """``(loss, {term: detached value})`` for one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, split: ResidentSplit, batch_size: int) -> dict[str, float]:
        """Validation metrics over ``split`` (float32 radiographs on the device), computed on the device."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Training state the stage owns outside the DeepSpeed engine (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on resume."""

    def finish(self, out: Path) -> None:
        """After the last epoch (rank 0)."""


class BaseStage(Stage):
    name = "base"
    score_key = "psnr"
    val_fields = tuple(VAL_METRICS)

    def num_epochs(self) -> int:
        t = self.cfg.training
        return t.base_num_epochs or t.num_epochs

    def build(self, datasets):
        self.criterion = ReconstructionLoss()
        return build_base(self.cfg)

    def loss(self, model, xrays, ct, names):
        return self.criterion(model(xrays.to(self.device, self.dtype)), ct.to(self.device))

    @torch.no_grad()
    def evaluate(self, model, split, batch_size):
        acc: dict[str, list] = {}
        for xr, ct, _ in split.batches(range(len(split)), batch_size):
            _accumulate(acc, _pick(model(xr.to(self.dtype)).float(), ct))
        return _mean(acc)


def base_checkpoint_path(cfg: Config) -> Path:
    """Where the refine stage reads its frozen base: the explicit path or shipped model
    (``pretrained:NAME``), else this run's base stage."""
    explicit = cfg.model.base_model_checkpoint
    return pretrained.resolve(explicit) if explicit else Path(cfg.checkpoint.dir) / "base" / "best_model.pt"


def _refine_val_fields() -> tuple[str, ...]:
    """The refine stage's val_log columns, from :data:`VAL_METRICS`: coarse and refined side by side,
    the gain after PSNR, the X-ray consistency last."""
    out = []
    for k in (*VAL_METRICS, "xray_consistency"):
        out += [f"coarse_{k}", f"refined_{k}"] + (["gain_db"] if k == "psnr" else [])
    return tuple(out)


class RefineStage(Stage):
    name = "refine"
    score_key = "refined_psnr"
    val_fields = _refine_val_fields()

    @staticmethod
    def check(cfg):
        geo, want = DatasetHeader.read(cfg.data.data_path).geometry, cfg.model.reprojection
        if want != "off" and want != geo:
            raise UserError(f"model.reprojection={want!r} but {cfg.data.data_path} was rendered with {geo!r} "
                            f"geometry; set model.reprojection={geo!r}")
        path = base_checkpoint_path(cfg)
        if not path.exists():
            raise UserError(f"refine stage needs a trained base: {str(path)!r} not found "
                            f"(set model.base_model_checkpoint or run the base stage first)")

    def build(self, datasets):
        path = base_checkpoint_path(self.cfg)
        mf = load_model_file(path, stage="base")
        if mf.config.model.volume_size != self.cfg.model.volume_size:
            raise UserError(f"{path}: base makes {mf.config.model.volume_size}^3 volumes, this config "
                            f"{self.cfg.model.volume_size}^3")
        self.base_path, self.base_sha = path, state_fingerprint(mf.state_dict)
        # fp32 weights, bit-identical to the file; bf16 runs use autocast instead of casting it
        self.frozen = mf.build().to(self.device)
        self.frozen.requires_grad_(False)
        use_fused_groupnorm(self.frozen, self.policy.kernels.groupnorm)
        # Augmented radiographs change from step to step, and the coarse volume the refiner corrects must
        # come from the same radiographs it reads (as at inference): recompute it then for the training
        # set (datasets[0]), cache it otherwise; validation inputs are never augmented, so always cached.
        self.recompute_coarse = self.cfg.augment.enabled
        self._cache_coarse(datasets[1:] if self.recompute_coarse else datasets, self.cfg.training.batch_size)
        self._coarse_val: tuple[tuple[str, ...], dict] | None = None  # the val split's coarse metrics, once a run
        # one re-projector for the run: the loss's X-ray consistency term and validation's figures
        self.projector = SliceProjector(self.cfg.model.volume_size, geometry=datasets[0].header.geometry).to(self.device)
        self.criterion = DetailRefinementLoss(self.cfg.loss_weights(), datasets[0].header.geometry, self.device,
                                              projector=self.projector, kernels=self.policy.kernels.loss)
        return build_refiner(self.cfg)

    @torch.no_grad()
    def _cache_coarse(self, datasets, batch_size) -> None:
        """The frozen base's prediction for every patient, once (the base never changes), kept in the
        compute dtype where the policy keeps the data (on the device when it fits)."""
        outs, self.coarse_row = [], {}
        for ds in datasets:
            for xr, _, names in iter_batches(ds, list(range(len(ds))), batch_size):
                with self.policy.autocast():
                    outs.append(self.frozen(xr.to(self.device)).float().to(self.dtype))
                self.coarse_row.update((n, len(self.coarse_row)) for n in names)
        v = self.cfg.model.volume_size
        coarse = torch.cat(outs) if outs else torch.empty(0, 1, v, v, v, device=self.device, dtype=self.dtype)
        self.coarse = coarse if self.policy.keep_resident(coarse.nbytes) else coarse.cpu()

    def _coarse(self, names):
        rows = torch.tensor([self.coarse_row[n] for n in names]).to(self.coarse.device, non_blocking=True)
        return self.coarse.index_select(0, rows).to(self.device, non_blocking=True)

    def loss(self, model, xrays, ct, names):
        if self.recompute_coarse:
            with torch.no_grad(), self.policy.autocast():
                c = self.frozen(xrays.to(self.device)).float().to(self.dtype)
        else:
            c = self._coarse(names)
        x, target = xrays.to(self.device, self.dtype), ct.to(self.device)
        refined = model(c, x)
        critic_loss = self.criterion.train_critic(refined, target, c)  # None unless loss.adversarial > 0
        net = getattr(model, "module", model)  # the engine wraps the refiner
        total, terms = self.criterion(refined, target, c, x, net.placement_weights(), net.crossing_logits())
        if critic_loss is not None:
            terms["critic"] = critic_loss
        return total, terms

    @torch.no_grad()
    def evaluate(self, model, split, batch_size):
        """Refined metrics every call; the coarse volume's only on the first call for a split (the frozen
        base and the split never change within a run)."""
        acc: dict[str, list] = {}
        known = self._coarse_val is not None and self._coarse_val[0] == tuple(split.names)
        for xr, ct, names in split.batches(range(len(split)), batch_size):
            c = self._coarse(names)
            ref = model(c, xr.to(self.dtype)).float()
            proj = self.projector  # needs no truth: how well each volume explains the radiographs
            _accumulate(acc, {**_pick(ref, ct, "refined_"), "refined_xray_consistency": xray_consistency(proj, ref, xr)})
            if not known:
                cf = c.float()
                _accumulate(acc, {**_pick(cf, ct, "coarse_"), "coarse_xray_consistency": xray_consistency(proj, cf, xr)})
        res = _mean(acc)
        if known:
            res.update(self._coarse_val[1])
        else:
            self._coarse_val = (tuple(split.names), {k: v for k, v in res.items() if k.startswith("coarse_")})
        res["gain_db"] = res["refined_psnr"] - res["coarse_psnr"]
        return {k: res[k] for k in self.val_fields}

    def state_dict(self):
        return {"critic": self.criterion.critic.state_dict()} if self.criterion.critic else {}

    def load_state_dict(self, state):
        if self.criterion.critic and "critic" in state:
            self.criterion.critic.load_state_dict(state["critic"])

    def finish(self, out):
        """Prove the frozen base never changed: its fingerprint before and after, in a file."""
        after = state_fingerprint(self.frozen.state_dict())
        write_json(out / "frozen_base_check.json", {"file": str(self.base_path), "file_sha256": self.base_sha,
                                                    "after_training_sha256": after, "identical": after == self.base_sha})
        if after != self.base_sha:
            raise RuntimeError("the frozen base's weights changed during refine training")


STAGES: dict[str, type[Stage]] = {s.name: s for s in (BaseStage, RefineStage)}
