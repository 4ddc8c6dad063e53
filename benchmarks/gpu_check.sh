#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py, which documents it): `benchmarks/gpu_check.sh OUT_DIR [ARGS...]`,
# with PYTHON (default python3) running it.
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [gpu_check.py arguments...]}
shift
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" --out "$OUT" "$@"
