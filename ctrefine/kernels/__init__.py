"""Triton kernels of ctrefine (``ctrefine.kernels``: a top-level ``kernels`` would collide with a PyPI package).

Each module holds its ``@triton.jit`` kernels, a plain launcher and the ``torch.autograd.Function``;
nothing else. Which path runs (kernel or pure-torch reference) is decided in one place:
:func:`ctrefine.device.kernel_choice`, once per run.
"""
