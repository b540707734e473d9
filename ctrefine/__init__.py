"""ctrefine: CT from two radiographs (PA + lateral) in two stages -- a frozen base reconstructor, then a
detail refinement network -- with Triton loss kernels, DeepSpeed training and ONNX Runtime inference.

Reading order: ``conventions`` -> ``data`` -> ``models`` -> ``losses`` (reference, then kernels) ->
``training`` (stages, driver) -> ``pipeline`` -> ``export`` / ``infer``; ``cli`` only parses.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ctrefine")
except PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+source"
