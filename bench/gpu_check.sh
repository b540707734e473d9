#!/usr/bin/env bash
# One command for a CUDA machine with torch + triton and no network (phase caps sized for about 8 minutes on one H200; not yet run on one):
#   kernel tests -> kernel benchmark -> the isolated training step (variants side by side, profile,
#   the project's kernels' share) and inference throughput at batch 1/8/32 -> both stages through the
#   deepspeed launcher for a fixed number of epochs, the GPU's busy fraction sampled all the while ->
#   a `full`-preset demo on a small dataset -> summary.md.
# The dataset is generated in the background (CPU cores) while the first phases run.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the project's root
#   DRY=1 bash bench/gpu_check.sh           # anywhere: the same phases at tiny sizes on the CPU (~5 min here)
#   DRY=1 PHASES="step summary" bash bench/gpu_check.sh    # some phases only (what tests/test_gpu_check.py runs)
#
# Phases: kernels (tests + benchmark), step, launcher (base + refine), demo, summary; PHASES (default all)
# picks some; the data generation runs when launcher or demo is picked.
# Environment: OUT (results folder, default /tmp/gpu_check; $OUT/gpu_check.tgz is packed after every
# phase, so a run killed at its limit still returns what it finished), W (scratch, default /tmp/gcw),
# PY (python), NPAT (patients, default 400), WHEELS (folder of wheels the machine lacks, default .whl:
# deepspeed, nibabel, pydicom, pydantic, pydantic-core, annotated-types, typing-inspection, hjson;
# made on a networked machine with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux2014_x86_64 -d .whl NAME==VERSION` and, for deepspeed,
# `pip wheel --no-deps -w .whl deepspeed==0.19.8`; ctrefine itself is installed from the checkout).
# Each phase has its own time cap; a phase that fails is recorded in timeline.txt and the next runs.
set -u
OUT=${OUT:-/tmp/gpu_check}; W=${W:-/tmp/gcw}; PY=${PY:-python3}; ARCHIVE=gpu_check.tgz
PHASES=${PHASES:-kernels step launcher demo summary}
. "$(dirname "$0")/gpu_lib.sh"
if [ "${DRY:-0}" = 1 ]; then  # the script itself, checked on a CPU
  PRESET=cpu-small; NPAT=8; SIZE=32; XS=64; EPOCHS=1; DEMO_N=8; WORKERS=2; STEP_ARGS="--smoke"
else
  PRESET=full; NPAT=${NPAT:-400}; SIZE=64; XS=128; EPOCHS=2; DEMO_N=160; WORKERS=12; STEP_ARGS=""
fi

say "env"
write_env

DATA=""
if want launcher; then
  say "data: $NPAT patients ${SIZE}^3 from ${XS}^2, in the background"
  ( timeout "$(cap 240)" $CTR make-data --out "$W/data" --num-patients "$NPAT" --seed 0 --size $SIZE --xray-size $XS \
      --workers $WORKERS > "$R/data.log" 2>&1; rc data $? ) &
  DATA=$!
fi

# tests and benchmarks run from a copy, so they import the ctrefine installed in /tmp/site and not the checkout
mkdir -p "$W/t" && cp -r "$ROOT/tests" "$ROOT/bench" "$ROOT/pytest.ini" "$W/t/"
if want kernels; then
say "kernel tests"
(cd "$W/t" && timeout "$(cap 90)" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py > "$R/kernel_tests.log" 2>&1)
rc kernel_tests $?; tail -1 "$R/kernel_tests.log"; pack

if [ "${DRY:-0}" != 1 ]; then
  say "kernel benchmark"
  (cd "$W/t" && timeout 45 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_kernels.py \
     --benchmark-json="$R/bench_kernels.json" --benchmark-columns=mean,min,max > "$R/kernel_bench.log" 2>&1)
  rc kernel_bench $?; pack
fi
fi

if want step; then
  say "isolated step: variants, profile, inference throughput"
  (cd "$W/t" && timeout "$(cap 110)" "$PY" bench/gpu_step.py --out "$R/step" $STEP_ARGS > "$R/step.log" 2>&1)
  rc step $?; pack
fi

[ -n "$DATA" ] && wait $DATA && say "data done"
if want launcher; then
  say "base through the launcher, $EPOCHS epochs"
  launch base 75 "$W/run" $PRESET "$W/data" --set training.base_num_epochs=$EPOCHS
  say "refiner through the launcher on that base, $EPOCHS epochs"
  launch refine 75 "$W/run" $PRESET "$W/data" --set training.num_epochs=$EPOCHS
fi

if want demo; then
say "demo, $PRESET preset, $DEMO_N patients (base and refiner $EPOCHS epochs each)"
busy_start demo
TD=$(date +%s)
timeout "$(cap 100)" $CTR demo --out "$W/demo" --preset $PRESET --num-patients "$DEMO_N" --train-base \
  --base-epochs $EPOCHS --refine-epochs $EPOCHS --quiet > "$R/demo.log" 2>&1
rc demo $?
echo "demo wall_s $(( $(date +%s) - TD ))" >> "$R/timeline.txt"
busy_stop
cp "$W/demo/inference_results/metrics.txt" "$R/demo_metrics.txt" 2>/dev/null
pack
fi

if want summary; then
  say "summary"
  "$PY" "$ROOT/bench/gpu_summary.py" "$R" > "$R/summary.log" 2>&1; rc summary $?
  cp "$R/summary.md" "$OUT/summary.md" 2>/dev/null
fi
say "done"; pack
ls -la "$OUT"
