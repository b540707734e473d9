#!/usr/bin/env bash
# Reproduces the shipped refiner pretrained:phantom-64-refiner (card: ctrefine/pretrained/phantom-64-refiner.md):
# the cpu-medium refiner (hidden 16; default loss terms, re-projection guidance, 2 data-consistency
# steps) on the frozen base of bench/train_phantom64_base.sh (OUT/ship/base/best_model.pt, shipped as
# pretrained:phantom-64), trained on the same 204 training phantoms (version 3, seed family 64),
# fine-tuned from the version-2 refiner (shipped at commit ddee144: 12 epochs from scratch on the
# version-2 pair) for EPOCHS cosine epochs through the deepspeed launcher (2 CPU ranks); BUDGET=SECONDS
# fits the schedule into a wall-clock budget (training.time_budget_s).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/p64v3}
BIN=${BIN:-.venv/bin}
EPOCHS=${EPOCHS:-8}
LR=${LR:-5e-4}
INIT=${INIT:-$OUT/init_refiner_v2.pt}
[ -f "$INIT" ] || { mkdir -p "$(dirname "$INIT")"; git show ddee144:ctrefine/pretrained/phantom-64-refiner.pt > "$INIT"; }
OMP_NUM_THREADS=1 "$BIN/deepspeed" --num_gpus 2 --module ctrefine.train refine --config cpu-medium \
    --set data.data_path="$OUT/data" --set checkpoint.dir="$OUT/ship" --set training.init_checkpoint="$INIT" \
    --set model.base_model_checkpoint="$OUT/ship/base/best_model.pt" \
    --set training.num_epochs="$EPOCHS" --set training.learning_rate="$LR" ${BUDGET:+--set training.time_budget_s=$BUDGET} \
    --no-progress
