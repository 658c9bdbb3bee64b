#!/usr/bin/env bash
# The GPU check of BENCHMARKS.md, as one script that ends within BUDGET_S seconds.
#
#   OUT=/tmp/gpu bash experiments/gpu_check.sh
#
# 1. experiments.levers --check: fused and wavefront == scan on the GPU (1e-5 at
#    highest matmul precision), then the option variants of rnn_jax's step per shape
#    and cell. LEVERS lists the lever runs, ';'-separated, each
#    "configs|cells|layers|variants[|XLA_FLAGS]" (one process each; a fifth field
#    runs that process under those XLA flags).
# 2. experiments.benchmark --compare=flax,torch per case of BENCH (space-separated
#    "tag:config:cell:layers:bidirectional"), with the fastest float32 variant of
#    step 1 for that shape (unmeasured: auto, unroll 0 = the backend's defaults).
# Everything lands in $OUT (levers_N.json, bench.tar of the benchmark JSONs, log.txt).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT/bench"
rm -f "$OUT"/levers_*.json  # a reused $OUT must not feed old runs to best()
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-500}))
left() { echo $((DEADLINE - $(date +%s))); }
exec > >(tee -a "$OUT/log.txt") 2>&1

DEFAULT_LEVERS="long,large,medium,d2l|gru,lstm|1|scan:1,scan:8,fused:1,fused:8,fused:32"
DEFAULT_BENCH=""
for config in long large medium d2l; do
  for cell in lstm gru; do DEFAULT_BENCH+=" L1:$config:$cell:1:false"; done
done
for config in long medium d2l; do
  for cell in lstm gru; do DEFAULT_BENCH+=" L2:$config:$cell:2:false bi:$config:$cell:1:true"; done
done

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$PY -c "import jax, jaxlib, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), jax.devices())"

# 1. levers (each run cut off after LEVERS_S seconds; its JSON is written after every case)
n=0
IFS=';' read -ra RUNS <<< "${LEVERS:-$DEFAULT_LEVERS}"
for run in "${RUNS[@]}"; do
  IFS='|' read -r configs cells layers variants xla <<< "$run"
  configs=${configs// /}; cells=${cells// /}; layers=${layers// /}; variants=${variants// /}
  check=""; [ "$n" -eq 0 ] && [ "${CHECK:-1}" = 1 ] && check="--check"
  n=$((n + 1))
  limit=$(( ${LEVERS_S:-190} < $(left) ? ${LEVERS_S:-190} : $(left) ))
  if [ "$limit" -lt 20 ]; then echo "skip levers run $n (time)"; continue; fi
  echo "levers run $n: $configs | $cells | layers $layers | $variants | XLA_FLAGS=${xla:-}"
  XLA_FLAGS="${xla:-${XLA_FLAGS:-}}" timeout "$limit" $PY -m experiments.levers $check \
    --configs="$configs" --cells="$cells" --layers="$layers" --variants="$variants" \
    --iters=20 --max_time_s=1 --output="$OUT/levers_$n.json"
  echo "levers run $n exit $? at $(( $(date +%s) - START )) s"
done

best() {  # best <config> <cell> <layers> <bidirectional> -> "implementation unroll hoist"
  $PY - "$OUT" "${XLA_FLAGS:-}" "$@" <<'EOF'
import glob, json, sys
out, outer_flags, config, cell, layers, bi = sys.argv[1:]
fastest = {}  # variant -> ms, over every levers run under the benchmark's own XLA flags
for path in sorted(glob.glob(f"{out}/levers_*.json")):
    try:
        report = json.load(open(path))
    except Exception:
        continue
    if report.get("xla_flags", "") != outer_flags:
        continue
    for r in report["results"]:
        same = (r["config"], r["cell"], str(r["num_layers"]), str(r["bidirectional"]).lower())
        if same != (config, cell, layers, bi):
            continue
        for name, v in r["variants"].items():
            if v.get("ok") and v.get("step_s") and ":bf16" not in name:
                fastest[name] = min(v["step_s"], fastest.get(name, float("inf")))
if fastest:
    parts = min(fastest, key=fastest.get).split(":")
    hoist = {"hoist": "true", "nohoist": "false"}.get(parts[2] if len(parts) > 2 else "", "auto")
    print(parts[0], parts[1], hoist)
else:
    print("auto 0 auto")
EOF
}

# 2. the benchmark with the peers, case by case while time is left
for case in ${BENCH:-$DEFAULT_BENCH}; do
  IFS=':' read -r tag config cell layers bi <<< "$case"
  read -r impl unroll hoist < <(best "$config" "$cell" "$layers" "$bi")
  if [ "$(left)" -lt 25 ]; then echo "skip $tag $config $cell (time)"; continue; fi
  timeout "$(left)" $PY -m experiments.benchmark --configs="$config" --cells="$cell" \
    --layers="$layers" --bidirectional="$bi" --compare=flax,torch --rounds=1 --iters=20 \
    --max_time_s=2 --implementation="$impl" --unroll="$unroll" --hoist_input="$hoist" \
    --output="$OUT/bench/${tag}_${config}_${cell}.json" --markdown= 2>&1 | grep -v "^$" | grep -E "^\[|error|FAIL"
done
echo "all done at $(( $(date +%s) - START )) s"
tar -C "$OUT" -cf "$OUT/bench.tar" bench && rm -rf "$OUT/bench"
ls -la "$OUT"
