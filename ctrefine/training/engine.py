"""The training engine of one run: DeepSpeed ZeRO across several ranks, a plain loop on one device.

On one device ZeRO partitions nothing, yet its engine still flattens gradients, checks bf16 overflow
and clips through its own buffers on every step (a third of the `full` refiner's step on an H200,
``bench/RESULTS-history.md`` §12). :class:`PlainEngine` is what a single device needs and nothing more: the
module in the device policy's compute dtype (as DeepSpeed's bf16 mode runs it), fused AdamW
(:mod:`ctrefine.training.optim`) on fp32 master weights, gradient clipping without a host sync, the LR
schedule, and checkpoints in one file per tag that resume exactly. It answers the calls the driver makes of a
DeepSpeed engine (``module``, ``train``, ``__call__``, ``backward``, ``step``, ``skipped_steps``,
``save_checkpoint``, ``load_checkpoint``), so the loop does not know which one it drives.

Which engine a run uses (``training.engine``): ``auto`` -- plain on a one-rank world, DeepSpeed on
several; ``deepspeed`` forces ZeRO even on one rank; ``plain`` refuses several ranks. A run resumes
only with the engine that wrote its checkpoints (the checkpoint layouts differ; the file names tell).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import PLAIN_FILE, checkpoint_globals
from ..errors import UserError
from .optim import make_optimizer

def choose_engine(setting: str, world: int) -> str:
    """``plain`` or ``deepspeed`` for a run of ``world`` ranks (``training.engine``)."""
    if setting == "plain" and world > 1:
        raise UserError(f"training.engine=plain runs on one device; this run has {world} ranks (use auto or deepspeed)")
    if setting == "auto":
        return "plain" if world == 1 else "deepspeed"
    return setting


def checkpoint_engine(tag_dir: Path) -> str:
    """Which engine wrote the checkpoint in ``tag_dir``."""
    return "plain" if (Path(tag_dir) / PLAIN_FILE).is_file() else "deepspeed"


class PlainEngine:
    """One device, no ZeRO: see the module docstring.

    In bf16 the module computes in bf16 (as DeepSpeed's bf16 mode runs it) and AdamW updates fp32 master
    copies of its parameters: a step copies the bf16 gradients into the masters' fp32 gradient buffers, clips
    them, runs one fused AdamW kernel and copies the masters back -- each of the three a single batched
    (``_foreach``) operator, whatever the number of parameter tensors. In fp32 the parameters are their own
    masters. Checkpoints hold the fp32 masters, so a resumed run continues exactly.
    """

    def __init__(self, model: torch.nn.Module, policy, lr: float, weight_decay: float, schedule,
                 gradient_clipping: float):
        self.policy, self.clip = policy, float(gradient_clipping)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        # the masters start from the weights as given (fp32, not rounded by the cast below)
        masters = [p.detach().to(policy.device, torch.float32).clone() for p in model.parameters() if p.requires_grad]
        self.module = model.to(policy.device, policy.dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if policy.dtype == torch.float32:
            self.masters = self.params
        else:
            self.masters = [m.requires_grad_(True) for m in masters]
            for m in self.masters:
                m.grad = torch.zeros_like(m)  # persistent: each step's gradients are copied into them
        self.optimizer = make_optimizer(self.masters, policy.device, lr, weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.skipped_steps = 0  # bf16 has fp32's range: no loss scaling, no overflow to skip

    def train(self) -> None:
        self.module.train()

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """Gradients into the masters, clip (the total norm stays on the device: no sync), AdamW, masters
        back into the module, clear the gradients, advance the LR."""
        if self.masters is not self.params:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            torch._foreach_copy_([m.grad for m in self.masters], grads)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.clip, foreach=True)
        self.optimizer.step()
        if self.masters is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
            for p in self.params:
                p.grad = None
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict:
        """The module's state with the fp32 masters in place of its (bf16) parameters."""
        sd = self.module.state_dict()
        sd.update((n, m.detach()) for n, m in zip(self.names, self.masters))
        return sd

    def save_checkpoint(self, folder, tag: str, client_state: dict, save_latest: bool = False) -> None:
        """``folder/tag/plain_states.pt``: fp32 weights, optimizer moments, LR schedule and the driver's state."""
        out = Path(folder) / tag
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "client": client_state}, out / PLAIN_FILE)

    def load_checkpoint(self, folder, tag: str):
        """Restore a :meth:`save_checkpoint`; returns ``(path, client_state)`` as DeepSpeed's loader does. The
        caller has verified the file (:func:`~ctrefine.training.checkpointing.verify_checkpoint`)."""
        path = Path(folder) / tag / PLAIN_FILE
        with torch.serialization.safe_globals(checkpoint_globals()):
            blob = torch.load(path, map_location=self.policy.device, weights_only=True)
        self.module.load_state_dict(blob["module"])  # cast to the module's dtype
        with torch.no_grad():
            for n, m in zip(self.names, self.masters):
                m.copy_(blob["module"][n])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        return str(path), blob["client"]
