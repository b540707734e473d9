#!/usr/bin/env bash
# Reproduces the shipped refiner pretrained:phantom-64-refiner (card: ctrefine/pretrained/phantom-64-refiner.md):
# the cpu-medium refiner (hidden 16; default loss terms, re-projection guidance, 2 data-consistency steps) on the frozen shipped base pretrained:phantom-64, trained on the same
# 204 training phantoms of seed family 64 (bench/train_phantom64_base.sh makes them), 12 cosine epochs
# through the deepspeed launcher (2 CPU ranks). The same run as `bench/quality.py`'s row `no_phase_free`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/p64}
BIN=${BIN:-.venv/bin}
OMP_NUM_THREADS=1 "$BIN/deepspeed" --num_gpus 2 --module ctrefine.train refine --config cpu-medium \
    --set data.data_path="$OUT/data" --set checkpoint.dir="$OUT/ship" \
    --set model.base_model_checkpoint=pretrained:phantom-64 --no-progress
