"""The refine stage's validation, timed over three epochs: the shipped base and refiner on a dataset's
train split (a fixed set of patients to score), fp32. Runs against an older tree too (its stage API):

    PYTHONPATH=/path/to/old python bench/ab_val.py DATA
    PYTHONPATH=.            python bench/ab_val.py DATA
"""
import inspect
import sys
import time

import torch

from ctrefine.checkpoint import load_model_file
from ctrefine.config import load_config
from ctrefine.data.dataset import CTDataset
from ctrefine.training.stages import RefineStage

torch.set_num_threads(2)
data = sys.argv[1]
cfg = load_config("cpu-medium", [f"data.data_path={data}", "model.base_model_checkpoint=pretrained:phantom-64"])
dev = torch.device("cpu")
new = "policy" in inspect.signature(RefineStage.__init__).parameters
if new:
    from ctrefine.data.dataset import ResidentSplit
    from ctrefine.device import DevicePolicy

    stage = RefineStage(cfg, DevicePolicy(dev, torch.float32))
else:
    stage = RefineStage(cfg, dev, torch.float32)
val = CTDataset(data, "train")
stage.build([CTDataset(data, "val"), val])
model = load_model_file("pretrained:phantom-64-refiner", stage="refine").build().eval()
arg = ResidentSplit(val, dev, torch.float32) if new else val
for epoch in range(3):
    t = time.perf_counter()
    res = stage.evaluate(model, arg, 4)
    print(f"epoch {epoch}: {time.perf_counter() - t:.2f} s for {len(val)} patients", res, flush=True)
