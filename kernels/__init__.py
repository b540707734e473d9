"""Triton kernels of ctrefine, installed as ``ctrefine.kernels`` (see setup.py for why not ``kernels``).

Each module holds its ``@triton.jit`` kernels, a plain launcher and the ``torch.autograd.Function``;
nothing else. Which path runs (kernel or pure-torch reference) is decided in one place:
:func:`ctrefine.device.use_kernels`.
"""
