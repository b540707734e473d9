"""Memory layout on CPU: channels-last-3d inside each 3D convolution and up-sampling, NCDHW around them.

Why: on CPU, oneDNN's 3D convolutions are 1.5-3.5x faster (forward + backward, bf16 and fp32) with
channels-last-3d (NDHWC) activations than with NCDHW -- most for the narrow full-resolution layers
(8 -> 8 channels at 64^3, batch 2, bf16: 68.6 -> 19.8 ms; 32 -> 32: 229 -> 150 ms; measured here, see
bench/RESULTS-history.md section 3). But switching the *whole* model to channels-last made a training step
slower (0.79x at 64^3), because GroupNorm's channels-last backward is a slow path (15 -> 861 ms a
step) and SiLU's backward slows too. So only the layers that gain see channels-last: the
convolutions and the trilinear up-sampling (forward + backward 104 -> 19 ms a step at 64^3). A
pre-hook hands each such layer a channels-last copy of its input, a post-hook returns its output in
NCDHW for the norm and activation that follow, and each gradient goes back in the layout its tensor
had. The arithmetic is the same (only the layout differs); parameters, state dict keys and
checkpoints are unchanged, and :func:`channels_last_layers` can be undone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_HANDLES = "_ctrefine_layout_hooks"


class _Layout(torch.autograd.Function):
    """Identity that changes the memory layout, and gives the gradient back in the layout it came in.

    ``Tensor.contiguous(memory_format=...)`` alone passes the gradient through in the *new* layout, so
    the op before it (SiLU, GroupNorm) would get a channels-last gradient with a channels-first input:
    a mixed-layout slow path (SiLU backward 20 -> 117 ms a step at 64^3).
    """

    @staticmethod
    def forward(ctx, x, channels_last: bool):
        ctx.back = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) and \
            not x.is_contiguous() else torch.contiguous_format
        return x.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.back), None


def _to_channels_last(module, args):
    return (_Layout.apply(args[0], True), *args[1:])


def _to_channels_first(module, args, out):
    return _Layout.apply(out, False)


def channels_last_layers(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every 3D convolution and up-sampling of ``model`` in channels-last-3d (``enabled=False``
    removes the hooks). Returns ``model``."""
    from .blocks import Upsample2x

    for m in model.modules():
        if isinstance(m, (nn.Conv3d, Upsample2x)):
            for h in getattr(m, _HANDLES, ()):
                h.remove()
            hooks = ()
            if enabled:
                hooks = (m.register_forward_pre_hook(_to_channels_last), m.register_forward_hook(_to_channels_first))
            setattr(m, _HANDLES, hooks)
    return model


def conv_widths(model: nn.Module) -> list[int]:
    """Output channels of every 3D convolution of ``model``: what :func:`ctrefine.device.channels_last`
    decides the layout from."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv3d)]
