#!/usr/bin/env bash
# The GPU check of BENCHMARKS.md, as one script that ends within ~9 minutes.
#
#   OUT=/tmp/gpu bash experiments/gpu_check.sh
#
# 1. experiments.levers --check: fused == scan on the GPU (1e-5 at highest matmul
#    precision), then every option variant of rnn_jax's step per shape and cell.
# 2. experiments.benchmark --compare=flax,torch per (shape, cell), 1 layer, with the
#    fastest variant of step 1 as --implementation/--unroll.
# 3. The same for 2 layers and a bidirectional layer, while time is left.
# Everything lands in $OUT (levers.json, bench.tar of the benchmark JSONs, log.txt).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT/bench"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-500}))
left() { echo $((DEADLINE - $(date +%s))); }
exec > >(tee -a "$OUT/log.txt") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$PY -c "import jax, jaxlib, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), jax.devices())"

# 1. levers (cut off after LEVERS_S seconds; levers.json is written after every case)
timeout "${LEVERS_S:-190}" $PY -m experiments.levers --check \
  --configs="${CONFIGS:-long,large,medium,d2l}" --cells=gru,lstm \
  --variants="${VARIANTS:-scan:1,scan:8,fused:1,fused:8,fused:32}" \
  --iters=20 --max_time_s=1 --output="$OUT/levers.json"
echo "levers exit $? at $(( $(date +%s) - START )) s"

best() {  # best <config> <cell> -> "implementation unroll" (fused 1 when unmeasured)
  $PY - "$OUT/levers.json" "$1" "$2" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["results"]
except Exception:
    rows = []
for r in rows:
    if r["config"] == sys.argv[2] and r["cell"] == sys.argv[3] and r.get("fastest"):
        impl, unroll = r["fastest"].split(":")[:2]
        print(impl, unroll)
        break
else:
    print("fused 1")
EOF
}

bench() {  # bench <tag> <config> <cell> <layers> <bidirectional>
  read -r impl unroll < <(best "$2" "$3")
  if [ "$(left)" -lt 25 ]; then echo "skip $1 $2 $3 (time)"; return; fi
  timeout "$(left)" $PY -m experiments.benchmark --configs="$2" --cells="$3" \
    --layers="$4" --bidirectional="$5" --compare=flax,torch --rounds=1 --iters=20 \
    --max_time_s=2 --implementation="$impl" --unroll="$unroll" \
    --output="$OUT/bench/$1_$2_$3.json" --markdown= 2>&1 | grep -v "^$" | grep -E "^\[|error|FAIL"
}

# 2. one layer, every shape and cell
for config in long large medium d2l; do
  for cell in lstm gru; do bench L1 "$config" "$cell" 1 false; done
done
echo "benchmark 1 layer done at $(( $(date +%s) - START )) s"
# 3. deeper and bidirectional, while time is left
for config in long medium d2l; do
  for cell in lstm gru; do bench L2 "$config" "$cell" 2 false; bench bi "$config" "$cell" 1 true; done
done
echo "all done at $(( $(date +%s) - START )) s"
tar -C "$OUT" -cf "$OUT/bench.tar" bench && rm -rf "$OUT/bench"
ls -la "$OUT"
