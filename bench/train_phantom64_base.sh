#!/usr/bin/env bash
# Reproduces the shipped base pretrained:phantom-64 (its card: ctrefine/pretrained/phantom-64.md):
# 256 phantoms of seed family 64 (disjoint from the demo's seed 0), the cpu-medium base at 64^3 from
# 128^2 through the deepspeed launcher (2 CPU ranks, one thread each), 60 cosine epochs, early stopping
# on val PSNR. About 2 min of data and 32 min of training on a 2-core AVX512-BF16 CPU. Then:
#   python bench/ship_pretrained.py --name phantom-64 --model OUT/ship/base/best_model.pt --val-log OUT/ship/base/val_log.csv --data OUT/data --command ... --wall-time ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/p64}
BIN=${BIN:-.venv/bin}
"$BIN/ctrefine" make-data --out "$OUT/data" --num-patients 256 --seed 64 --size 64 --xray-size 128
OMP_NUM_THREADS=1 "$BIN/deepspeed" --num_gpus 2 --module ctrefine.train base --config cpu-medium \
    --set data.data_path="$OUT/data" --set checkpoint.dir="$OUT/ship" \
    --set training.base_num_epochs=60 --set training.early_stopping_patience=8 --no-progress
