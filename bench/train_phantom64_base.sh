#!/usr/bin/env bash
# Reproduces the shipped base pretrained:phantom-64 (its card: ctrefine/pretrained/phantom-64.md):
# 256 calibrated phantoms (version 3) of seed family 64 (disjoint from the demo's seed 0), the
# cpu-medium base at 64^3 from 128^2 through the deepspeed launcher (2 CPU ranks, one thread each),
# fine-tuned from the version-2 base (the file shipped as pretrained:phantom-64 at commit ddee144: 60
# epochs from scratch on the same seeds painted as version-2 phantoms, its card in that commit) for
# EPOCHS cosine epochs at LR, early stopping on val PSNR. Then:
#   python bench/ship_pretrained.py --name phantom-64 --model OUT/ship/base/best_model.pt --val-log OUT/ship/base/val_log.csv --data OUT/data --command ... --wall-time ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/p64v3}
BIN=${BIN:-.venv/bin}
EPOCHS=${EPOCHS:-20}
LR=${LR:-5e-4}
INIT=${INIT:-$OUT/init_base_v2.pt}
[ -f "$INIT" ] || { mkdir -p "$(dirname "$INIT")"; git show ddee144:ctrefine/pretrained/phantom-64.pt > "$INIT"; }
"$BIN/ctrefine" make-data --out "$OUT/data" --num-patients 256 --seed 64 --size 64 --xray-size 128 --phantom-version 3
OMP_NUM_THREADS=1 "$BIN/deepspeed" --num_gpus 2 --module ctrefine.train base --config cpu-medium \
    --set data.data_path="$OUT/data" --set checkpoint.dir="$OUT/ship" --set training.init_checkpoint="$INIT" \
    --set training.base_num_epochs="$EPOCHS" --set training.learning_rate="$LR" \
    --set training.early_stopping_patience=6 --no-progress
