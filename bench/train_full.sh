#!/usr/bin/env bash
# The mission's models in one GPU call (phase caps sized for about 9 minutes on one H200, not yet run on one; no network): phantoms of a seed family
# no shipped model has seen -> the `full` base (15.2M) with early stopping on validation PSNR -> the `full`
# refiner (5.0M) on it, frozen -> both evaluated on the held-out test split beside the mean baseline and
# the shipped narrow pair -> the two model files in fp16, cut into parts that fit the way back (each
# <= 15 MiB; join them with `python bench/pack_model.py join OUT/base.parts.json base_fp16.pt`).
#
#   bash bench/train_full.sh                     # on the GPU machine, from the project's root
#   DRY=1 bash bench/train_full.sh               # anywhere: tiny sizes on the CPU (tests/test_train_full.py)
#
# Environment as bench/gpu_check.sh (OUT, default /tmp/train_full; W; PY; WHEELS), and NPAT (patients,
# default 1000: 800 train / 100 val / 100 test), SEED (dataset seed, default 2027: not the demo's 0 nor the
# shipped base's family 64), BASE_EPOCHS (default 40), REFINE_EPOCHS (default 25), PATIENCE (default 4).
# $OUT gets: train_full.tgz (logs, metrics of every evaluation, summary.md; packed after every phase),
# base.part*, refine.part*, their *.parts.json indexes, summary.md.
set -u
OUT=${OUT:-/tmp/train_full}; W=${W:-/tmp/tfw}; PY=${PY:-python3}; ARCHIVE=train_full.tgz
PHASES=${PHASES:-data base refine eval pack}
. "$(dirname "$0")/gpu_lib.sh"
if [ "${DRY:-0}" = 1 ]; then
  PRESET=cpu-small; NPAT=${NPAT:-8}; SIZE=32; XS=64; BASE_EPOCHS=1; REFINE_EPOCHS=1; PATIENCE=0; WORKERS=2
else
  PRESET=full; NPAT=${NPAT:-1000}; SIZE=64; XS=128; BASE_EPOCHS=${BASE_EPOCHS:-40}; REFINE_EPOCHS=${REFINE_EPOCHS:-25}
  PATIENCE=${PATIENCE:-4}; WORKERS=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
fi
SEED=${SEED:-2027}
RUN=$W/run; DATA=$W/data

say "env"
write_env

if want data; then
  say "data: $NPAT phantoms ${SIZE}^3 from ${XS}^2, seed $SEED, $WORKERS workers"
  timeout "$(cap 260)" $CTR make-data --out "$DATA" --num-patients "$NPAT" --seed "$SEED" --size $SIZE --xray-size $XS \
    --workers "$WORKERS" > "$R/data.log" 2>&1
  rc data $?; cp "$DATA/splits.json" "$R/splits.json" 2>/dev/null; pack
fi
if want base; then
  say "base ($PRESET), up to $BASE_EPOCHS epochs, early stop after $PATIENCE without improvement"
  launch base 170 "$RUN" $PRESET "$DATA" --set training.base_num_epochs="$BASE_EPOCHS" \
    --set training.early_stopping_patience="$PATIENCE"
fi
if want refine; then
  say "refiner ($PRESET) on that base, frozen, up to $REFINE_EPOCHS epochs"
  launch refine 150 "$RUN" $PRESET "$DATA" --set training.num_epochs="$REFINE_EPOCHS" \
    --set training.early_stopping_patience="$PATIENCE" --set model.base_model_checkpoint="$RUN/base/best_model.pt"
fi

evaluate() {  # NAME BASE REFINER: the test split, mean baseline beside, metrics into the results
  timeout "$(cap 60)" $CTR infer --base-checkpoint "$2" --refinement-checkpoint "$3" --data-path "$DATA" \
    --output-dir "$W/eval_$1" --no-save-volumes --quiet > "$R/eval_$1.log" 2>&1
  rc "eval_$1" $?
  for f in metrics.json metrics.txt; do cp "$W/eval_$1/$f" "$R/eval_${1}_$f" 2>/dev/null; done
}
if want eval; then
  say "evaluation on the test split: the full pair, and the shipped narrow pair on the same patients"
  evaluate full "$RUN/base/best_model.pt" "$RUN/refine/best_model.pt"
  if [ "$SIZE" = 64 ]; then evaluate narrow pretrained:phantom-64 pretrained:phantom-64-refiner; fi
  pack
fi
if want pack; then
  say "model files in fp16, in parts of at most 15 MiB"
  for stage in base refine; do
    "$PY" "$ROOT/bench/pack_model.py" split "$RUN/$stage/best_model.pt" "$OUT/$stage" --max-mib 15 >> "$R/pack.log" 2>&1
    rc "pack_$stage" $?
    cp "$RUN/$stage/best.json" "$R/${stage}_best.json" 2>/dev/null
  done
fi
"$PY" "$ROOT/bench/gpu_summary.py" "$R" "ctrefine full-size training" > "$R/summary.log" 2>&1; cp "$R/summary.md" "$OUT/summary.md" 2>/dev/null
say "done"; pack
ls -la "$OUT"
