"""Static int8 quantisation of the exported graph, calibrated on training patients, judged in dB.

An int8 file is the fp32 graph of :mod:`ctrefine.export` with QuantizeLinear/DequantizeLinear pairs
(QDQ) around the refiner's convolutions (:data:`INT8_MODULES`): int8 weights per output channel,
uint8 activations whose ranges are read off real training radiographs (min/max over the calibration
patients). Both ONNX Runtime and OpenVINO read QDQ and run those convolutions in int8. Only ``Conv``
is quantised because it is 80 % of the time (ORT op profile, bench/RESULTS-history.md section 4); quantising
Add/Concat/Mul/Resize as well was measured *slower* in OpenVINO (3.03 s vs 2.24 s a volume: the
extra requantisations cost more than they save), and the DFT products stay fp32 to keep the
spectrum exact.

A quantised model is not bit-compatible with torch, so its parity is the change in PSNR against the
ground truth on held-out patients (:func:`ctrefine.report.split_psnr`, judged in :mod:`ctrefine.export`),
not a max |error|.
"""
from __future__ import annotations

import tempfile
from pathlib import Path


from .data.dataset import CTDataset
from .outputs import atomic_file
from .engines import onnx_feed, set_onnx_metadata

QUANT_OPS = ("Conv",)
# Which convolutions run in int8, by the module owning the weight. Measured on the converged cpu-small
# models, 13 test patients, ONNX Runtime (bench/RESULTS-history.md section 4): every Conv in int8 -5.95 dB;
# the base's finest-scale decoder alone (base.up.0 + base.merge.0, 4 convs) -1.14 dB whatever the
# calibration (min/max, entropy, 99.999th percentile -0.79); the refiner's convolutions -0.037 dB,
# -0.030 dB with its stem and head kept fp32. The base writes the coarse volume directly, the refiner
# only a residual on top of it, so the refiner tolerates int8 and the base does not.
INT8_MODULES = ("refiner.",)
FP32_MODULES = ("refiner.stem.", "refiner.head.")


def calibration_batches(data_path, n: int, split: str = "train") -> list[dict]:
    """The first ``n`` patients of ``split`` as ONNX feeds (batch 1): the inputs the model will really see."""
    ds = CTDataset(data_path, split, cache=False).nonempty("int8 calibration needs training patients")
    return [onnx_feed(ds[i]["xrays"][None]) for i in range(min(n, len(ds)))]


def quantize_int8(fp32_path, out, feeds: list[dict], metadata: dict[str, str]) -> Path:
    """Write the QDQ int8 version of ``fp32_path`` to ``out`` (atomically), with ``metadata`` added."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".ctrefine-int8-", dir=out.parent) as work, atomic_file(out) as tmp:
        pre = Path(work) / "pre.onnx"
        # Shape inference + graph clean-up first, as ORT's quantiser recommends (symbolic shapes are not
        # needed: every shape but the batch is static).
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        keep = [n.name for n in onnx.load(str(pre), load_external_data=False).graph.node
                if n.op_type in QUANT_OPS and not _runs_int8(n.input[1])]
        quantize_static(str(pre), str(tmp), _Feeds(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANT_OPS), nodes_to_exclude=keep, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        set_onnx_metadata(proto, metadata)
        onnx.save(proto, str(tmp))
    return out


def _runs_int8(weight_name: str) -> bool:
    """Whether the convolution with this weight (named by its torch module path) is quantised."""
    return weight_name.startswith(INT8_MODULES) and not weight_name.startswith(FP32_MODULES)


