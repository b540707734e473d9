# Shared by bench/gpu_check.sh and bench/train_full.sh (sourced, not run): the results folder, the
# timeline, packing, installing the wheels a GPU machine without network lacks, the launcher, and
# sampling the GPU's busy fraction.
# Expects: OUT (what comes back), W (scratch), PY (python), ARCHIVE (name of the .tgz in OUT), DRY (1 on a CPU).
R=$W/res; rm -rf "$W"; mkdir -p "$R" "$OUT"
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$R/timeline.txt"; }
rc() { echo "$1 rc=$2 at $(( $(date +%s) - T0 ))s" >> "$R/timeline.txt"; }
pack() { (cd "$W" && tar czf "$OUT/$ARCHIVE" res) 2>/dev/null; }
want() { case " $PHASES " in *" $1 "*) return 0 ;; esac; return 1; }
CTR="$PY -m ctrefine.cli"

if [ "${DRY:-0}" = 1 ]; then
  cap() { echo 600; }  # a CPU is slower than the caps are sized for
else
  cap() { echo "$1"; }
  # the checkout and the wheels (deepspeed, nibabel, pydicom, pydantic, pydantic-core, annotated-types,
  # typing-inspection, hjson) into /tmp/site: the machine has torch, triton and onnx, and no network
  WHEELS=${WHEELS:-.whl}
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site \
    . "$WHEELS"/*.whl > "$R/pip.log" 2>&1 || say "pip install failed (see pip.log)"
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
  cd "$W"  # from here on the ctrefine installed in /tmp/site, the one the wheels were built against
fi

write_env() {
  { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, triton, deepspeed, ctrefine, sys; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'ctrefine', ctrefine.__version__, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    git -C "$ROOT" rev-parse --short HEAD 2>/dev/null; date -u +%Y-%m-%d; } > "$R/env.txt" 2>&1
  cat "$R/env.txt"
}

busy_start() { command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 > "$R/busy_$1.csv" &
  SAMPLER=$!; }
busy_stop() { [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null; SAMPLER=""; }

# launch STAGE CAP RUN_DIR PRESET DATA [--set ...]: one stage through the deepspeed launcher on one device,
# the GPU sampled meanwhile; its logs copied into the results as STAGE_{train,val}_log.csv
launch() {
  local stage=$1 c=$2 run=$3 preset=$4 data=$5; shift 5
  local ds; ds=$("$PY" -c "from ctrefine.config import ds_config_path; print(ds_config_path())")
  busy_start "$stage"
  timeout "$(cap "$c")" deepspeed --num_gpus 1 --master_port $((29500 + RANDOM % 1000)) --module ctrefine.train "$stage" \
    --config "$preset" --deepspeed_config "$ds" --no-progress --set data.data_path="$data" \
    --set checkpoint.dir="$run" "$@" > "$R/train_$stage.log" 2>&1
  rc "train_$stage" $?
  busy_stop
  for f in train_log val_log; do cp "$run/$stage/$f.csv" "$R/${stage}_$f.csv" 2>/dev/null; done
  cp "$run/$stage/config.json" "$R/${stage}_config.json" 2>/dev/null
  pack
}
