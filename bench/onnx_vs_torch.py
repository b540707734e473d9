"""Is the exported graph the fastest way to run the pair here? Seconds a volume of an ONNX file in its engine
against torch (bf16 autocast where the CPU has it natively, else fp32) on the same model files, in
interleaved rounds so that a drifting machine load hits both alike.

    python bench/onnx_vs_torch.py --onnx runs/demo/model.onnx --base pretrained:phantom-64 \\
        --refiner runs/demo/refine/best_model_uncertainty.pt --rounds 7

Batch 1, random radiographs of the model's size, each round one pass of each after a warm-up pass; prints
the median seconds a volume and the median of the per-round ratios (torch / ONNX: above 1, the graph is faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ctrefine.device import cpu_has_native_bf16
from ctrefine.pipeline import OnnxPredictor, TorchPredictor


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--refiner", required=True)
    p.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "openvino"))
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    arithmetic = "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"
    torch_pred = TorchPredictor(a.base, a.refiner, "cpu", arithmetic)
    onnx_pred = OnnxPredictor(a.onnx, a.engine)
    x = torch.rand(1, 2, 1, onnx_pred.xray_size, onnx_pred.xray_size, generator=torch.Generator().manual_seed(0))
    runs = {"torch": torch_pred.predict, "onnx": onnx_pred.predict}
    for run in runs.values():
        run(x)  # warm-up: first-call allocations, OpenVINO's compile
    times = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, run in runs.items():
            tic = time.perf_counter()
            run(x)
            times[k].append(time.perf_counter() - tic)
    ratio = statistics.median(t / o for t, o in zip(times["torch"], times["onnx"]))
    print(f"torch {arithmetic}: {statistics.median(times['torch']):.3f} s a volume; {onnx_pred.kind} "
          f"({onnx_pred.precision} file, computes {onnx_pred.compute}): {statistics.median(times['onnx']):.3f} s; "
          f"torch / ONNX per round, median of {a.rounds}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
