#!/usr/bin/env bash
# One lent-GPU session in a single call (the device time is minutes): environment facts, the paper
# throughput suite, then Table VIII's first row (MNIST En2ResNet20 BR binary, loss (6)) at gpu<E> scale with E
# chosen from the measured speed to fit the time left, then bf16 if time remains. Everything lands in $OUT.
#
#   BUDGET=570 bash benchmarks/gpu_session.sh      # needs .devdata/mnist (IDX files) and .whl/*.whl
#
# Prepared on the workstation (both folders git-ignored via .git/info/exclude, carried to the machine):
#   mkdir -p .devdata && cp -r ../shared/data/mnist .devdata/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl tensorboardX==2.6.4
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl/pinned \
#     flax==0.12.8 optax==0.2.8 chex==0.1.92 orbax-checkpoint==0.12.8     # fallback if the image's fail
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-570}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
PY=python3

$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, chex, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'chex', chex.__version__, 'orbax', o.__version__, jax.devices())"

smoke() { timeout 90 $PY -m benchmarks.throughput --models=1 --depth=8 --cases=natural,at2 --steps=1 \
  --rounds=1; }
if ! smoke; then
  echo "== smoke failed: retrying without the XLA:CPU flag"
  export ENQUANT_XLA_CPU_FLAGS=0
  if ! smoke; then
    echo "== smoke failed: retrying with the pinned flax/optax/chex/orbax wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pinned \
      .whl/pinned/*.whl && export PYTHONPATH=/tmp/pinned:/tmp/site
    smoke || { echo "== smoke failed three times: stopping"; exit 1; }
  fi
fi
echo "== $(left) s left after the smoke test"

timeout $(( $(left) < 205 ? $(left) - 5 : 200 )) $PY -m benchmarks.throughput --suite=paper --out="$OUT/suite_paper_f32.json"
echo "== $(left) s left after the suite"

if [ "$(left)" -lt 150 ]; then echo "== no time left for a Table VIII row"; exit 0; fi
# Epochs that fit: the MNIST (28x28x1) trade-off PGD-10 step costs about (26/23) x (784/1024) of the CIFAR
# PGD-10 AT step measured above; evaluation is ~171 gradient evaluations per test image (A1, A2, A3, A2-EOT5).
E=$($PY - "$OUT/suite_paper_f32.json" "$(left)" <<'EOF'
import json, sys
try:
  rows = json.load(open(sys.argv[1]))
except (OSError, ValueError):
  rows = []
ips = next((r["images_per_second"] for r in rows if r["model"] == "En2ResNet20" and r["case"] == "at10"), 800.)
ips_mnist = ips * 23 / 26 * 1024 / 784
epoch, evaluation, overhead = 60000 / ips_mnist, 10000 * 171 * 2 / 23 / ips, 100
print(max(1, min(15, int((int(sys.argv[2]) - 40 - overhead - evaluation) / epoch))))
EOF
)
echo "== Table VIII MNIST BR row at gpu$E scale"
timeout $(( $(left) - 25 )) $PY -m experiments.paper --table=VIII --scale="gpu$E" --max_runs=1 \
  --runs_root=/tmp/runs --results_root=/tmp/res --data_dir=.devdata --noprogress
echo "== exit $?; $(left) s left"
tar czf "$OUT/table_viii_gpu.tgz" --exclude=checkpoints -C /tmp runs res 2>/dev/null

if [ "$(left)" -gt 100 ]; then
  timeout $(( $(left) - 10 )) $PY -m benchmarks.throughput --models=5 --shape=32,32,3 --cases=at10 \
    --compute_dtype=bfloat16 --out="$OUT/suite_en5_bf16.json"
fi
echo "== done, $(left) s left"
