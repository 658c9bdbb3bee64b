#!/usr/bin/env bash
# The GPU check of BENCHMARKS.md, as one script that ends within BUDGET_S seconds.
#
#   OUT=/tmp/gpu bash experiments/gpu_check.sh
#
# 0. TESTS_S > 0: the numerics tests (TESTS, pytest with TEST_JOBS workers, matmuls at
#    "highest" precision) and, beside them, the default training run
#    (`python -m experiments.train`, the README's main job), both cut off after
#    TESTS_S seconds -> tests.txt, train.txt.
# P. PROBE=1: experiments.pallas_probe: `check` once per exchange of the Pallas kernels
#    (EXCHANGES, each in its own process, cut off after PROBE_CHECK_S seconds: a
#    broken exchange could spin forever), then `time` over those that passed (cut off
#    after PROBE_TIME_S); the faster one is exported to the benchmark ->
#    pallas_probe.jsonl, exchange.env.
# S. STACK=1: experiments.pallas_probe stack (deep networks: all layers in one kernel
#    per pass vs one kernel per layer; checked first), cut off after STACK_S -> stack.txt.
# 1. LEVERS (optional, ';'-separated runs, each "configs|cells|layers|variants[|XLA_FLAGS]"):
#    experiments.levers, one process per run (--check on the first) -> levers_N.json.
# 2. experiments.benchmark --compare=$COMPARE (default flax,torch) over CASES in that order (each
#    "config:cell:layers:bidirectional"), with the shipped defaults, every JAX step
#    compiled first PREWARM at a time into a compilation cache (--prewarm) -> bench.json,
#    rewritten after every case, so a run cut off by the budget keeps what it finished.
# Everything lands in $OUT: log.txt, tests.txt, train.txt, bench.json, pallas_probe.jsonl,
# exchange.env, stack.txt, levers_N.json (the device tool brings back at most 8 files).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
rm -f "$OUT"/levers_*.json "$OUT"/bench.json "$OUT"/tests.txt "$OUT"/train.txt "$OUT"/log.txt \
  "$OUT"/pallas_probe.jsonl "$OUT"/exchange.env
TESTS_S=${TESTS_S:-90}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-540}))
left() { echo $((DEADLINE - $(date +%s))); }
exec > >(tee -a "$OUT/log.txt") 2>&1

DEFAULT_CASES=""
for config in long large medium d2l; do
  for layers_bi in 1:false 2:false 1:true; do
    [ "$config" = large ] && [ "$layers_bi" != 1:false ] && continue  # large's deep ones last
    for cell in lstm gru; do DEFAULT_CASES+="${DEFAULT_CASES:+,}$config:$cell:$layers_bi"; done
  done
done
DEFAULT_CASES+=",large:lstm:2:false,large:gru:2:false,large:lstm:1:true,large:gru:1:true"
DEFAULT_TESTS="tests/test_persistent.py tests/test_persistent_stack.py tests/test_fused.py tests/test_wavefront.py tests/test_networks.py tests/test_cells.py tests/test_linen.py"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$PY -c "import jax, jaxlib, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), jax.devices())"

# 0. tests and the main job, side by side (several processes share the GPU: no
#    preallocation), and the Pallas probe's checks (P) beside them
probe_checks() {
  for exchange in ${EXCHANGES:-flag counter}; do
    EXCHANGES=$exchange OUT=$OUT XLA_PYTHON_CLIENT_PREALLOCATE=false \
      timeout "${PROBE_CHECK_S:-90}" $PY -m experiments.pallas_probe check
    code=$?
    echo "probe check $exchange exit $code at $(( $(date +%s) - START )) s"
    [ "$code" -eq 0 ] && echo "passed $exchange" >> "$OUT/probe_checks.txt"
  done
}
rm -f "$OUT/probe_checks.txt"
probe_pid=""
if [ "${PROBE:-0}" = 1 ]; then probe_checks & probe_pid=$!; fi
if [ "$TESTS_S" -gt 0 ]; then
  echo "tests: ${TESTS:-$DEFAULT_TESTS} (cut off after $TESTS_S s) and experiments.train"
  (XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout "$TESTS_S" $PY -m pytest -v -p no:cacheprovider -n "${TEST_JOBS:-12}" \
    ${TESTS:-$DEFAULT_TESTS} > "$OUT/tests.txt" 2>&1; echo "pytest exit $?" >> "$OUT/tests.txt") &
  tests_pid=$!
  (t0=$(date +%s) && cd "$(mktemp -d)" && XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout "$TESTS_S" $PY -m experiments.train > "$OUT/train.txt" 2>&1;
    echo "train exit $? after $(( $(date +%s) - t0 )) s" >> "$OUT/train.txt") &
  wait "$tests_pid" $!  # (a bare wait would also wait for the log's tee)
  grep -E "passed|failed|error|exit" "$OUT/tests.txt" | tail -5
  grep -E "FAILED|ERROR" "$OUT/tests.txt" | head -20
  tail -4 "$OUT/train.txt"
  echo "tests and train done at $(( $(date +%s) - START )) s"
fi
if [ -n "$probe_pid" ]; then wait "$probe_pid"; fi

# P. the Pallas probe (its checks ran beside the tests)
if [ "${PROBE:-0}" = 1 ]; then
  passed=$(grep -h "^passed " "$OUT/probe_checks.txt" 2>/dev/null | cut -d' ' -f2 | paste -sd, -)
  echo "probe checks passed: ${passed:-none}"
  if [ -n "$passed" ]; then
    EXCHANGES=$passed OUT=$OUT timeout "${PROBE_TIME_S:-150}" $PY -m experiments.pallas_probe time
    echo "probe time exit $? at $(( $(date +%s) - START )) s"
  fi
  if [ -f "$OUT/exchange.env" ]; then
    export "$(cat "$OUT/exchange.env")"
    echo "benchmark with $(cat "$OUT/exchange.env")"
  elif [ -n "$passed" ]; then
    export RNN_JAX_PALLAS_EXCHANGE=${passed%%,*}
  fi
fi

# S. the stacked kernels (opt-in: RNN_JAX_PALLAS_STACK=1)
if [ "${STACK:-0}" = 1 ]; then
  timeout "${STACK_S:-150}" $PY -m experiments.pallas_probe stack 2>&1 | grep -v -i warn \
    | tee "$OUT/stack.txt"
  echo "stack probe done at $(( $(date +%s) - START )) s"
fi

# 1. levers (each run cut off after LEVERS_S seconds; its JSON is written after every case)
n=0
RUNS=()
[ -n "${LEVERS:-}" ] && IFS=';' read -ra RUNS <<< "$LEVERS"
for run in ${RUNS[@]+"${RUNS[@]}"}; do
  IFS='|' read -r configs cells layers variants xla <<< "$run"
  configs=${configs// /}; cells=${cells// /}; layers=${layers// /}; variants=${variants// /}
  check=""; [ "$n" -eq 0 ] && [ "${CHECK:-1}" = 1 ] && check="--check"
  n=$((n + 1))
  limit=$(( ${LEVERS_S:-190} < $(left) ? ${LEVERS_S:-190} : $(left) ))
  if [ "$limit" -lt 20 ]; then echo "skip levers run $n (time)"; continue; fi
  echo "levers run $n: $configs | $cells | layers $layers | $variants | XLA_FLAGS=${xla:-}"
  XLA_FLAGS="${xla:-${XLA_FLAGS:-}}" timeout "$limit" $PY -m experiments.levers $check \
    --configs="$configs" --cells="$cells" --layers="$layers" --variants="$variants" \
    --iters=20 --max_time_s=1 --cpu_devices=1 --output="$OUT/levers_$n.json"
  echo "levers run $n exit $? at $(( $(date +%s) - START )) s"
done

# 2. the benchmark with the peers, every case of CASES while time is left
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" $PY -m experiments.benchmark --cases="${CASES:-$DEFAULT_CASES}" \
    --compare="${COMPARE:-flax,torch}" --rounds="${ROUNDS:-1}" --iters=20 --max_time_s=1 \
    --prewarm="${PREWARM:-16}" --output="$OUT/bench.json" --markdown= 2>&1 \
    | grep --line-buffered -E "^\[|^prewarm|error|FAIL|worker processes" \
    | while IFS= read -r line; do printf '%4d s  %s\n' $(( $(date +%s) - START )) "$line"; done
  echo "benchmark exit ${PIPESTATUS[0]}"
fi
echo "all done at $(( $(date +%s) - START )) s"
ls -la "$OUT"
