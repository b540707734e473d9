#!/usr/bin/env bash
# Reproduces the shipped refiner pretrained:phantom-64-refiner (card: ctrefine/pretrained/phantom-64-refiner.md):
# the cpu-medium refiner (hidden 16; re-projection guidance with the two views' residual product, 2
# density-weighted data-consistency steps) on the frozen base pretrained:phantom-64, trained on its 204 training
# phantoms (version 3, `ctrefine make-data --out OUT/data --num-patients 256 --seed 64 --size 64 --xray-size
# 128`) through the deepspeed launcher (2 CPU ranks), EPOCHS cosine epochs a leg. With no INIT the first leg
# starts from the refiner shipped at commit ca5d210 (per-view residuals, uniform SIRT steps), widened by
# bench/widen_refiner.py (the product channel enters with zero weights). INIT=FILE starts from another model
# file, SHIP=DIR trains into another checkpoint.dir, BUDGET=SECONDS fits the schedule into a wall-clock budget
# (training.time_budget_s). BAND=W / STREAK=W / MATCH=W / MSE=W / LUNG=W / RIM=W / DETAIL=W / SOFT=W / LSTREAK=W set
# the band-energy, streak, streak_match, mse, lung_mse, lung_rim_mse, lung_detail_mse, soft_l1 and lung_streak_match
# terms, 0 unless set: the first two legs ran with them off, the third with the defaults of its day (before the lung
# terms), the fourth with those of session 19, the fifth with those of session 21, the sixth (the card's command)
# with today's. WIDTH=N trains a refiner of model.hidden_channels N (the INIT file must have it:
# bench/widen_refiner.py --double-width); DEPTH=cross-view one whose lifted radiograph features are placed in depth
# (model.guidance_depth; the INIT file must have it: bench/widen_refiner.py --ray-placement), PLACE=W the
# placement term's weight (loss.placement, its default unless set), RESIDUAL=density a refiner that spreads its
# re-projection residual along the rays by the coarse volume's attenuation (model.residual_weighting), RESIDUAL=learned
# one that places it by learned weights (the INIT file must have them: bench/widen_refiner.py --residual-placement).
# LUNGL1=W the lung_l1 term's weight, GHOST=W the ghost_mse term's (each its default unless set). CROSSING=mlp a
# refiner that reads both views' neighbourhoods together at each voxel (model.guidance_crossing; the INIT file must
# have it: bench/widen_refiner.py --crossing-reader), CROSSBCE=W the crossing_bce term's weight (its default unless
# set). INIT=null trains the refiner from zero.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/p64v3}
BIN=${BIN:-.venv/bin}
EPOCHS=${EPOCHS:-8}
LR=${LR:-5e-4}
BAND=${BAND:-0.0}
STREAK=${STREAK:-0.0}
MSE=${MSE:-0.0}
LUNG=${LUNG:-0.0}
RIM=${RIM:-0.0}
MATCH=${MATCH:-0.0}
DETAIL=${DETAIL:-0.0}
SOFT=${SOFT:-0.0}
LSTREAK=${LSTREAK:-0.0}
SHIP=${SHIP:-$OUT/ship}
# the first leg's start, made once; a given INIT (a file or pretrained:NAME) is used as it is
if [ -z "${INIT:-}" ]; then
  INIT=$OUT/init_refiner_product.pt
  if [ ! -f "$INIT" ]; then
    mkdir -p "$(dirname "$INIT")"
    git show ca5d210:ctrefine/pretrained/phantom-64-refiner.pt > "$OUT/refiner_ca5d210.pt"
    "$BIN/python" bench/widen_refiner.py "$OUT/refiner_ca5d210.pt" "$INIT" --dc-weighting density
  fi
fi
OMP_NUM_THREADS=1 "$BIN/deepspeed" --num_gpus 2 --module ctrefine.train refine --config cpu-medium \
    --set data.data_path="$OUT/data" --set checkpoint.dir="$SHIP" --set training.init_checkpoint="$INIT" \
    --set model.base_model_checkpoint=pretrained:phantom-64 \
    --set loss.band_energy="$BAND" --set loss.streak="$STREAK" --set loss.mse="$MSE" --set loss.lung_mse="$LUNG" \
    --set loss.lung_rim_mse="$RIM" --set loss.streak_match="$MATCH" --set loss.lung_detail_mse="$DETAIL" \
    --set loss.soft_l1="$SOFT" --set loss.lung_streak_match="$LSTREAK" ${PLACE:+--set loss.placement=$PLACE} \
    ${LUNGL1:+--set loss.lung_l1=$LUNGL1} ${GHOST:+--set loss.ghost_mse=$GHOST} \
    ${CROSSBCE:+--set loss.crossing_bce=$CROSSBCE} \
    --set training.num_epochs="$EPOCHS" --set training.learning_rate="$LR" ${BUDGET:+--set training.time_budget_s=$BUDGET} \
    ${WIDTH:+--set model.hidden_channels=$WIDTH} ${DEPTH:+--set model.guidance_depth=$DEPTH} \
    ${RESIDUAL:+--set model.residual_weighting=$RESIDUAL} ${CROSSING:+--set model.guidance_crossing=$CROSSING} \
    --no-progress
