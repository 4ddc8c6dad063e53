#!/usr/bin/env bash
# `make gpu-check OUT=dir`: the whole GPU check in one command, every step logged to its own file
# under dir. Steps: build _C in place, info, the GPU tests (pytest -m gpu), the rest of the suite,
# parity on every available backend and dtype, the full benchmark sweep. A failing step does not
# stop the others; the exit code is non-zero if any failed. Typically ~6-8 minutes; each step
# has its own time limit (override with the variables below).
#
#   usage: benchmarks/gpu_check.sh OUT_DIR [PYTHON]
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [PYTHON]}
PY=${2:-python3}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-150}
GPU_TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-150}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
PARITY_TIMEOUT=${PARITY_TIMEOUT:-120}
BENCH_SECONDS=${BENCH_SECONDS:-120}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
FAILED=0
echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$SUMMARY"
echo >>"$SUMMARY"
echo "| step | status | seconds | log |" >>"$SUMMARY"
echo "|---|---|---|---|" >>"$SUMMARY"

step() {  # step NAME TIMEOUT_S CMD... : run CMD with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*" >"$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${limit}s"
  elif [ $rc -eq 5 ] && [[ $name == tests-* ]]; then status="ok"; echo "(no tests collected)" >>"$OUT/$name.log"
  elif [ $rc -ne 0 ]; then status="FAILED (rc=$rc)"; fi
  [ "$status" = "ok" ] || FAILED=1
  echo "| $name | $status | $((SECONDS - t0)) | $name.log |" >>"$SUMMARY"
  echo "== $name: $status ($((SECONDS - t0)) s)"
  tail -n 3 "$OUT/$name.log"
}

# SKIP_BUILD=1: use the fusedformer already installed (to try the script itself)
[ "${SKIP_BUILD:-0}" = 1 ] || step build "$BUILD_TIMEOUT" bash -c "$PY -m pip install --no-build-isolation --no-deps -e . && $PY -c 'import fusedformer._C as c; print(\"_C:\", c.__file__)'"
step info 60 "$PY" -m fusedformer info
step tests-gpu "$GPU_TEST_TIMEOUT" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/tests-gpu.xml"
step tests-rest "$TEST_TIMEOUT" "$PY" -m pytest tests -m "not gpu" -q -p no:cacheprovider --junitxml="$OUT/tests-rest.xml"
step parity "$PARITY_TIMEOUT" "$PY" -m fusedformer parity --dtype float32 --dtype float16 --dtype bfloat16 --out "$OUT/parity.json"
step bench $((BENCH_SECONDS + 90)) "$PY" -m fusedformer bench --full --no-progress --max-seconds "$BENCH_SECONDS" --out "$OUT/bench"
if [ -f "$OUT/bench/bench.json" ]; then
  NAME=$("$PY" -c "import json, sys; from fusedformer.bench import results_name; print(results_name(json.load(open(sys.argv[1]))))" "$OUT/bench/bench.json")
  cp "$OUT/bench/bench.json" "$OUT/$NAME.json"
  cp "$OUT/bench/bench.md" "$OUT/$NAME.md"
  echo >>"$SUMMARY"
  echo "Results to commit: cp $OUT/$NAME.{json,md} benchmarks/results/" >>"$SUMMARY"
fi
echo >>"$SUMMARY"
echo "overall: $([ $FAILED -eq 0 ] && echo ok || echo FAILED)" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
