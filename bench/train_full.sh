#!/usr/bin/env bash
# One GPU window of the relay that trains the mission's models (`make gpu-window`; bench/relay.py says how
# the relay works), planned against a deadline (default 540 s, inside the device's 10-minute command; no
# network). The window continues the relay: the `full` base and refiner start from the model files in
# relay/ (fp16 parts; a warm restart) when there are any, and train on new phantoms of the relay's seed
# family (window k: bench/relay.py seeds). Training starts on the first small dataset (the base's, A) while
# the refiner's (B) and the fixed held-out set are made in the background; the base (15.2M) trains on A,
# the refiner (5.0M) on B with that base frozen; both are evaluated on the held-out set beside the mean
# training volume and the shipped narrow pair; the model files come back in fp16 parts of at most 15 MiB
# with the relay log (this window appended) in $OUT/relay/ -- commit them as relay/.
# Each stage gets a share of the time left as its `training.time_budget_s`, so its cosine schedule is
# refitted to the epochs that fit and the run ends annealed rather than cut off.
#
#   bash bench/train_full.sh                     # on the GPU machine, from the project's root
#   DRY=1 bash bench/train_full.sh               # anywhere: tiny sizes on the CPU (tests/test_train_full.py)
#
# Environment as bench/gpu_check.sh (OUT, default /tmp/train_full; W; PY; WHEELS), and RELAY (the relay
# folder, default relay/), NPAT_A / NPAT_B (the base's and the refiner's new patients, defaults 192 / 512;
# each split 80/10/10), NEVAL (held-out patients, default 96), DEADLINE (seconds from the start, default
# 540), BASE_SHARE (the base's share of the training time, default 0.6), BASE_EPOCHS / REFINE_EPOCHS (most
# epochs, defaults 60 / 40), PATIENCE (early stopping, default 6), BASE_LR / REFINE_LR (AdamW peaks,
# defaults 5e-4 / 3e-4: a short window favours a higher peak than the preset's 2e-4).
# $OUT gets: train_full.tgz (logs, metrics of every evaluation, summary.md; packed after every phase),
# relay/{base,refine}.part* + *.parts.json + relay_log.json, summary.md.
set -u
OUT=${OUT:-/tmp/train_full}; W=${W:-/tmp/tfw}; PY=${PY:-python3}; ARCHIVE=train_full.tgz
PHASES=${PHASES:-data base refine eval pack}  # add "checks" for the kernel tests and the isolated step first
. "$(dirname "$0")/gpu_lib.sh"
if [ "${DRY:-0}" = 1 ]; then
  PRESET=cpu-small; NPAT_A=${NPAT_A:-8}; NPAT_B=${NPAT_B:-8}; NEVAL=${NEVAL:-4}; SIZE=32; XS=64; BASE_EPOCHS=1
  REFINE_EPOCHS=1; PATIENCE=0; WORKERS=2; BG_WORKERS=1; DEADLINE=${DEADLINE:-3600}
  STEP_ARGS="--smoke --variants kernels"; KT_ARGS="-k test_dispatch"
else
  PRESET=full; NPAT_A=${NPAT_A:-192}; NPAT_B=${NPAT_B:-512}; NEVAL=${NEVAL:-96}; SIZE=64; XS=128
  BASE_EPOCHS=${BASE_EPOCHS:-60}; REFINE_EPOCHS=${REFINE_EPOCHS:-40}; PATIENCE=${PATIENCE:-6}
  WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 )); BG_WORKERS=$(( $(nproc) > 6 ? $(nproc) - 4 : 1 ))  # cores for the driver
  DEADLINE=${DEADLINE:-540}; STEP_ARGS="--variants reference kernels all-kernels"; KT_ARGS=""
fi
BASE_SHARE=${BASE_SHARE:-0.6}; BASE_LR=${BASE_LR:-5e-4}; REFINE_LR=${REFINE_LR:-3e-4}
RELAY=${RELAY:-$ROOT/relay}; RELAY_PY="$PY $ROOT/bench/relay.py"
RUN=$W/run; DATA_A=$W/data_a; DATA_B=$W/data_b; HELDOUT=$W/heldout
RESERVE=45  # the evaluations and the packing, after the refiner
left() { echo $(( T0 + DEADLINE - $(date +%s) )); }

say "env"
write_env
read -r SEED_A SEED_B < <($RELAY_PY seeds "$RELAY")
HELDOUT_SEED=$("$PY" -c "import sys; sys.path.insert(0, '$ROOT/bench'); import relay; print(relay.HELDOUT_SEED)")
say "relay window $($RELAY_PY window "$RELAY"): base patients seed $SEED_A, refiner patients seed $SEED_B, held out $HELDOUT_SEED"
INIT_BASE=(); INIT_REFINE=()
for stage in base refine; do  # a warm restart from the relay's model files, when there are any
  if [ -f "$RELAY/$stage.parts.json" ]; then
    "$PY" "$ROOT/bench/pack_model.py" join "$RELAY/$stage.parts.json" "$W/relay_$stage.pt" >> "$R/pack.log" 2>&1
    rc "join_$stage" $?
    if [ -f "$W/relay_$stage.pt" ] && [ $stage = base ]; then INIT_BASE=(--set training.init_checkpoint="$W/relay_base.pt"); fi
    if [ -f "$W/relay_$stage.pt" ] && [ $stage = refine ]; then INIT_REFINE=(--set training.init_checkpoint="$W/relay_refine.pt"); fi
  fi
done

make_data() {  # NAME OUT N SEED WORKERS
  timeout "$(cap 300)" $CTR make-data --out "$2" --num-patients "$3" --seed "$4" --size $SIZE --xray-size $XS \
    --workers "$5" --quiet > "$R/data_$1.log" 2>&1
  rc "data_$1" $?
}
if want data; then  # the base's patients first (training waits for them only), the rest while it trains
  say "data: $NPAT_A phantoms ${SIZE}^3 from ${XS}^2 for the base, $WORKERS workers"
  make_data a "$DATA_A" "$NPAT_A" "$SEED_A" "$WORKERS"
  say "data a done; the refiner's $NPAT_B and the $NEVAL held-out patients in the background ($BG_WORKERS workers)"
  ( make_data b "$DATA_B" "$NPAT_B" "$SEED_B" "$BG_WORKERS"; make_data heldout "$HELDOUT" "$NEVAL" "$HELDOUT_SEED" "$BG_WORKERS" ) &
  GEN=$!
  cp "$DATA_A/splits.json" "$R/splits_a.json" 2>/dev/null; pack
fi
# the kernels and the isolated step (only when asked: make gpu-check measures them; a window trains), from a
# copy of the tests (./ctrefine would shadow the install)
if want checks; then
  mkdir -p "$W/t" && cp -r "$ROOT/tests" "$ROOT/bench" "$ROOT/pytest.ini" "$W/t/"
  say "kernel tests"
  (cd "$W/t" && timeout "$(cap 100)" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py $KT_ARGS > "$R/kernel_tests.log" 2>&1)
  KT=$?; rc kernel_tests $KT; tail -1 "$R/kernel_tests.log"
  if [ $KT != 0 ]; then export CTREFINE_KERNELS=0; say "kernel tests failed: training on the references"; fi
  (cd "$W/t" && timeout "$(cap 110)" "$PY" bench/gpu_step.py --out "$R/step" $STEP_ARGS > "$R/step.log" 2>&1)
  rc step $?; pack
fi

TRAIN_S=$(( $(left) - RESERVE ))
if want base; then
  B=$(awk -v t="$TRAIN_S" -v f="$BASE_SHARE" 'BEGIN { printf "%d", t * f }')
  say "base ($PRESET): ${B} s, at most $BASE_EPOCHS epochs, early stop after $PATIENCE without improvement"
  launch base $(( B + 25 )) "$RUN" $PRESET "$DATA_A" --set training.base_num_epochs="$BASE_EPOCHS" \
    --set training.learning_rate="$BASE_LR" "${INIT_BASE[@]}" \
    --set training.early_stopping_patience="$PATIENCE" --set training.time_budget_s=$(( B > 40 ? B - 15 : 25 ))
fi
[ -n "${GEN:-}" ] && { wait "$GEN"; say "data b and held-out set done"; }
if want refine; then
  F=$(( $(left) - RESERVE ))
  say "refiner ($PRESET) on that base, frozen: ${F} s, at most $REFINE_EPOCHS epochs"
  launch refine $(( F + 15 )) "$RUN" $PRESET "$DATA_B" --set training.num_epochs="$REFINE_EPOCHS" \
    --set training.learning_rate="$REFINE_LR" "${INIT_REFINE[@]}" \
    --set training.early_stopping_patience="$PATIENCE" --set model.base_model_checkpoint="$RUN/base/best_model.pt" \
    --set training.time_budget_s=$(( F > 40 ? F - 15 : 25 ))
fi

evaluate() {  # NAME BASE REFINER: the held-out set, the base's mean training volume beside, metrics into the results
  timeout "$(cap 40)" $CTR infer --base-checkpoint "$2" --refinement-checkpoint "$3" --data-path "$HELDOUT" \
    --split all --baseline-data "$DATA_A" --output-dir "$W/eval_$1" --no-save-volumes --figures 4 --quiet \
    > "$R/eval_$1.log" 2>&1
  rc "eval_$1" $?
  for f in metrics.json metrics.txt; do cp "$W/eval_$1/$f" "$R/eval_${1}_$f" 2>/dev/null; done
}
if want eval; then
  say "evaluation on the held-out set: the relay pair, and the shipped narrow pair on the same patients"
  evaluate full "$RUN/base/best_model.pt" "$RUN/refine/best_model.pt" &
  if [ "$SIZE" = 64 ]; then evaluate narrow pretrained:phantom-64 pretrained:phantom-64-refiner; fi
  wait; pack
fi
if want pack; then
  say "relay: model files in fp16, in parts of at most 15 MiB, and the log with this window"
  mkdir -p "$OUT/relay"
  for stage in base refine; do
    "$PY" "$ROOT/bench/pack_model.py" split "$RUN/$stage/best_model.pt" "$OUT/relay/$stage" --max-mib 15 >> "$R/pack.log" 2>&1
    rc "pack_$stage" $?
    cp "$RUN/$stage/best.json" "$R/${stage}_best.json" 2>/dev/null
  done
  $RELAY_PY record "$R" "$RELAY" "$OUT/relay" >> "$R/pack.log" 2>&1; rc relay_log $?
fi
"$PY" "$ROOT/bench/gpu_summary.py" "$R" "ctrefine relay window" > "$R/summary.log" 2>&1; cp "$R/summary.md" "$OUT/summary.md" 2>/dev/null
say "done"; pack
ls -la "$OUT"
