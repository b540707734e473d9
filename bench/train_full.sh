#!/usr/bin/env bash
# The mission's models in one GPU call, planned against a deadline (default 560 s, inside the device's
# 10-minute command; no network): phantoms of a seed family no shipped model has seen, generated on the
# machine's cores while the GPU checks the project's kernels and times the isolated step -> the `full`
# base (15.2M) -> the `full` refiner (5.0M) on it, frozen -> both evaluated on the held-out test split
# beside the mean baseline and the shipped narrow pair -> the two model files in fp16, cut into parts that
# fit the way back (each <= 15 MiB; `python bench/pack_model.py join OUT/base.parts.json base_fp16.pt`).
# Each stage gets a share of the time left as its `training.time_budget_s`, so its cosine schedule is
# refitted to the epochs that fit and the run ends annealed rather than cut off.
#
#   bash bench/train_full.sh                     # on the GPU machine, from the project's root
#   DRY=1 bash bench/train_full.sh               # anywhere: tiny sizes on the CPU (tests/test_train_full.py)
#
# Environment as bench/gpu_check.sh (OUT, default /tmp/train_full; W; PY; WHEELS), and NPAT (patients,
# default 1000: 800 train / 100 val / 100 test), SEED (dataset seed, default 2027: not the demo's 0 nor the
# shipped base's family 64), DEADLINE (seconds from the start, default 560), BASE_SHARE (the base's share
# of the training time, default 0.6), BASE_EPOCHS / REFINE_EPOCHS (most epochs, defaults 60 / 40),
# PATIENCE (early stopping, default 6), BASE_LR / REFINE_LR (AdamW peaks, defaults 5e-4 / 3e-4: a short
# window favours a higher peak than the preset's 2e-4; the narrow CPU models were trained at 1e-3).
# $OUT gets: train_full.tgz (logs, metrics of every evaluation, summary.md; packed after every phase),
# base.part*, refine.part*, their *.parts.json indexes, summary.md.
set -u
OUT=${OUT:-/tmp/train_full}; W=${W:-/tmp/tfw}; PY=${PY:-python3}; ARCHIVE=train_full.tgz
PHASES=${PHASES:-data checks base refine eval pack}
[ "${DRY:-0}" = 1 ] && PHASES=${PHASES/checks /}  # the checks' step smoke runs in tests/test_gpu_check.py
. "$(dirname "$0")/gpu_lib.sh"
if [ "${DRY:-0}" = 1 ]; then
  PRESET=cpu-small; NPAT=${NPAT:-8}; SIZE=32; XS=64; BASE_EPOCHS=1; REFINE_EPOCHS=1; PATIENCE=0; WORKERS=2
  DEADLINE=${DEADLINE:-3600}; STEP_ARGS="--smoke --variants kernels"; KT_ARGS="-k test_dispatch"
else
  PRESET=full; NPAT=${NPAT:-1000}; SIZE=64; XS=128; BASE_EPOCHS=${BASE_EPOCHS:-60}; REFINE_EPOCHS=${REFINE_EPOCHS:-40}
  PATIENCE=${PATIENCE:-6}; WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 )); DEADLINE=${DEADLINE:-560}
  STEP_ARGS="--variants reference kernels all-kernels"; KT_ARGS=""
fi
SEED=${SEED:-2027}; BASE_SHARE=${BASE_SHARE:-0.6}; BASE_LR=${BASE_LR:-5e-4}; REFINE_LR=${REFINE_LR:-3e-4}
RUN=$W/run; DATA=$W/data
RESERVE=45  # the evaluations and the packing, after the refiner
left() { echo $(( T0 + DEADLINE - $(date +%s) )); }

say "env"
write_env

GEN=""
if want data; then
  say "data: $NPAT phantoms ${SIZE}^3 from ${XS}^2, seed $SEED, $WORKERS workers (the GPU checks meanwhile)"
  ( timeout "$(cap 300)" $CTR make-data --out "$DATA" --num-patients "$NPAT" --seed "$SEED" --size $SIZE --xray-size $XS \
      --workers "$WORKERS" > "$R/data.log" 2>&1; rc data $? ) &
  GEN=$!
fi
# while the phantoms are made: the kernels on this GPU (the training falls back to the references if they
# fail here), then the isolated step; both from a copy of the tests (./ctrefine would shadow the install)
mkdir -p "$W/t" && cp -r "$ROOT/tests" "$ROOT/bench" "$ROOT/pytest.ini" "$W/t/"
if want checks; then
  say "kernel tests"
  (cd "$W/t" && timeout "$(cap 100)" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py $KT_ARGS > "$R/kernel_tests.log" 2>&1)
  KT=$?; rc kernel_tests $KT; tail -1 "$R/kernel_tests.log"
  if [ $KT != 0 ]; then export CTREFINE_KERNELS=0; say "kernel tests failed: training on the references"; fi
  say "isolated step (while the data is made: CPU shared)"
  (cd "$W/t" && timeout "$(cap 110)" "$PY" bench/gpu_step.py --out "$R/step" $STEP_ARGS > "$R/step.log" 2>&1)
  rc step $?; pack
fi
[ -n "$GEN" ] && wait $GEN && say "data done"
cp "$DATA/splits.json" "$R/splits.json" 2>/dev/null; pack

TRAIN_S=$(( $(left) - RESERVE ))
if want base; then
  B=$(awk -v t="$TRAIN_S" -v f="$BASE_SHARE" 'BEGIN { printf "%d", t * f }')
  say "base ($PRESET): ${B} s, at most $BASE_EPOCHS epochs, early stop after $PATIENCE without improvement"
  launch base $(( B + 25 )) "$RUN" $PRESET "$DATA" --set training.base_num_epochs="$BASE_EPOCHS" \
    --set training.learning_rate="$BASE_LR" \
    --set training.early_stopping_patience="$PATIENCE" --set training.time_budget_s=$(( B > 40 ? B - 15 : 25 ))
fi
if want refine; then
  F=$(( $(left) - RESERVE ))
  say "refiner ($PRESET) on that base, frozen: ${F} s, at most $REFINE_EPOCHS epochs"
  launch refine $(( F + 15 )) "$RUN" $PRESET "$DATA" --set training.num_epochs="$REFINE_EPOCHS" \
    --set training.learning_rate="$REFINE_LR" \
    --set training.early_stopping_patience="$PATIENCE" --set model.base_model_checkpoint="$RUN/base/best_model.pt" \
    --set training.time_budget_s=$(( F > 40 ? F - 15 : 25 ))
fi

evaluate() {  # NAME BASE REFINER: the test split, mean baseline beside, metrics into the results
  timeout "$(cap 40)" $CTR infer --base-checkpoint "$2" --refinement-checkpoint "$3" --data-path "$DATA" \
    --output-dir "$W/eval_$1" --no-save-volumes --figures 4 --quiet > "$R/eval_$1.log" 2>&1
  rc "eval_$1" $?
  for f in metrics.json metrics.txt; do cp "$W/eval_$1/$f" "$R/eval_${1}_$f" 2>/dev/null; done
}
if want eval; then
  say "evaluation on the test split: the full pair, and the shipped narrow pair on the same patients"
  evaluate full "$RUN/base/best_model.pt" "$RUN/refine/best_model.pt" &
  if [ "$SIZE" = 64 ]; then evaluate narrow pretrained:phantom-64 pretrained:phantom-64-refiner; fi
  wait; pack
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
