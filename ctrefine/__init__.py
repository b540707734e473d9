"""ctrefine: CT from two radiographs (PA + lateral) in two stages -- a frozen base reconstructor, then a
detail refinement network -- with Triton loss kernels, DeepSpeed training and ONNX Runtime inference.

Reading order: ``conventions`` -> ``data`` -> ``models`` -> ``losses`` (reference, then kernels) ->
``training`` (stages, driver) -> ``pipeline`` -> ``export`` / ``infer``; ``cli`` only parses.

The Python API (:mod:`ctrefine.api`)::

    import ctrefine
    result = ctrefine.Reconstructor.load().reconstruct("pa.png", "lateral.png")
    result.refined_hu, result.affine, result.uncertainty_hu, result.gate
    result.save("ct.nii.gz")

``import ctrefine`` stays light: the API (and torch) load on first use of ``ctrefine.Reconstructor``.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ctrefine")
except PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+source"


def __getattr__(name):
    if name in ("Reconstructor", "Reconstruction"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ctrefine' has no attribute {name!r}")
