#!/usr/bin/env bash
# The accelerator comparison in one call within a 10-minute device budget: environment facts, then
# benchmarks.members (En5ResNet20 on 32x32x3: vmap vs grouped members, float32 vs bfloat16, batch 128 vs
# 512; an attack step and a training step), then the paper throughput suite if time is left. Every row
# lands in $OUT as it is measured.
#
#   BUDGET=570 bash benchmarks/gpu_session.sh           # on the GPU machine
#   bash benchmarks/gpu_session.sh --smoke              # any machine: tiny sizes, checks the script
#
# Optional, prepared on the workstation (git-ignored, carried to the machine): .whl/*.whl (wheels the
# image lacks, installed with --no-index) and .whl/pinned/*.whl (fallback flax/optax/chex/orbax).
set -u
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
T0=$(date +%s)
BUDGET=${BUDGET:-570}
[ "$SMOKE" = 1 ] && BUDGET=${SMOKE_BUDGET:-300}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, jax.devices())" || {
  if ls .whl/pinned/*.whl >/dev/null 2>&1; then
    echo "== imports failed: installing the pinned flax/optax/chex/orbax wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pinned \
      .whl/pinned/*.whl && export PYTHONPATH="/tmp/pinned:${PYTHONPATH:-}"
  fi
}

if [ "$SMOKE" = 1 ]; then
  timeout $(( $(left) - 5 )) $PY -m benchmarks.members --smoke --budget_s=$(( $(left) - 60 )) \
    --out="$OUT/members_smoke.json"
  echo "== smoke exit $?; $(left) s left"
  exit 0
fi

# The comparison first (what the device time is for): about 16 cases; each compiles once (~10-30 s on a
# GPU) and is timed for 5 x 5 calls. Stops starting new cases 60 s before the budget's end.
timeout $(( $(left) - 20 )) $PY -m benchmarks.members --budget_s=$(( $(left) - 80 )) \
  --out="$OUT/members_en5resnet20.json"
echo "== members exit $?; $(left) s left"

if [ "$(left)" -gt 150 ]; then
  timeout $(( $(left) - 10 )) $PY -m benchmarks.throughput --suite=paper --out="$OUT/suite_paper_f32.json"
  echo "== suite exit $?; $(left) s left"
fi
echo "== done, $(left) s left"
