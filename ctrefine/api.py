"""The Python API: a CT from two radiographs in three lines, the same code path as ``ctrefine infer --out``.

    import ctrefine

    rec = ctrefine.Reconstructor.load()                        # the best shipped pair (or base=, refiner=, onnx=)
    result = rec.reconstruct("pa.png", "lateral.png")          # files, or 2D numpy arrays as displayed
    result.refined_hu, result.affine, result.uncertainty_hu    # numpy (D, H, W) in HU, 4x4 RAS mm, std or None
    result.gate                                                # the safety gate's record: did it fall back?
    result.save("ct.nii.gz")                                   # what `infer --out ct.nii.gz` writes

``Reconstructor.load`` takes model files or shipped names (``pretrained:NAME``) for ``base`` and ``refiner``,
or an exported ``onnx`` file (run in ONNX Runtime or OpenVINO, ``engine``); ``device`` picks where torch runs
(``cpu``, ``cuda``, ``auto``). ``reconstruct`` reads each radiograph as ``infer`` does (``convention``:
``attenuation``, bone bright; or ``intensity``, raw detector data) and passes the refined volume through the
safety gate (``gate=False`` keeps the refiner's answer whatever it explains). Bad input is a
:class:`ctrefine.errors.UserError` (a ``ValueError`` too) with one line naming what is wrong.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .data.radiograph import prepare_radiographs
from .infer import Reconstruction, claim_radiograph_outputs, reconstruct
from .pipeline import make_predictor

__all__ = ["Reconstructor", "Reconstruction"]


def _name(x, view: str) -> str:
    return Path(x).name if isinstance(x, (str, Path)) else f"{view} array"


class Reconstructor:
    """Base + refiner ready to reconstruct (:meth:`load`); :meth:`reconstruct` one patient at a time."""

    def __init__(self, predictor):
        self.predictor = predictor

    @classmethod
    def load(cls, base=None, refiner=None, onnx=None, engine: str = "auto", device: str = "auto",
             precision: str = "auto", uncertainty: bool = True) -> "Reconstructor":
        """The pair from two model files / shipped names, an ONNX file, or (nothing given) the best shipped pair;
        torch on ``device`` in ``precision`` as :mod:`ctrefine.device` decides them. ``uncertainty=False`` skips
        the refiner's uncertainty head."""
        predictor = make_predictor(base, refiner, onnx, engine, device, precision)
        if not uncertainty:
            predictor.drop_uncertainty()
        return cls(predictor)

    @property
    def source(self) -> str:
        """Which models answer (files, shipped names or the ONNX file)."""
        return self.predictor.source

    def reconstruct(self, pa, lateral, convention: str = "attenuation", gate: bool = True,
                    warn=None) -> Reconstruction:
        """One CT from a PA and a lateral radiograph (paths, or 2D numpy arrays of pixel values as displayed).
        ``warn(message)`` hears about images that look like raw intensity in attenuation mode."""
        for view, img in (("pa", pa), ("lateral", lateral)):
            if not isinstance(img, (str, Path, np.ndarray)):
                raise UserError(f"the {view} radiograph must be a file path or a 2D numpy array, got {type(img).__name__}")
        if convention not in ("attenuation", "intensity"):
            raise UserError(f"convention must be 'attenuation' or 'intensity', got {convention!r}")
        x = prepare_radiographs(pa, lateral, self.predictor.xray_size, convention, warn)
        return reconstruct(self.predictor, x, gate, f"{_name(pa, 'PA')} + {_name(lateral, 'lateral')}")

    def reconstruct_to(self, pa, lateral, out, overwrite: bool = False, convention: str = "attenuation",
                       gate: bool = True, warn=None, fmt: str = "nifti") -> Reconstruction:
        """:meth:`reconstruct` and :meth:`Reconstruction.save` to ``out`` (``fmt``: nifti, dicom or both), with
        every output checked before the work starts (``ctrefine infer --out``)."""
        claim_radiograph_outputs(out, getattr(self.predictor, "uncertainty", None) is not None, fmt, overwrite)
        result = self.reconstruct(pa, lateral, convention, gate, warn)
        result.save(out, overwrite, fmt)
        return result
