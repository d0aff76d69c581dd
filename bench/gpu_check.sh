#!/usr/bin/env bash
# `make gpu-check`: validate and time kdfast's GPU kernels in one short run.
# 1. build kdfast._C in place for sm_90; 2. run the tests marked `gpu` (every CUDA and
# Triton kernel against the reference); 3. run the GPU benchmarks; results (JSON lines),
# the build and test logs go to $OUT (default bench/results/). A short table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%d-%H%M%S)
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

echo "== build (sm_$TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
if ! "$PYTHON" setup.py build_ext --inplace > "$OUT/gpu-build_$stamp.log" 2>&1; then
  tail -40 "$OUT/gpu-build_$stamp.log"; echo "build failed"; exit 1
fi
"$PYTHON" -m kdfast.cli info | tee "$OUT/gpu-info_$stamp.log"

echo "== gpu tests"
timeout 240 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gpu-tests_$stamp.log" 2>&1
tests_rc=$?
tail -25 "$OUT/gpu-tests_$stamp.log"

echo "== gpu benchmarks"
timeout 240 "$PYTHON" -m bench --out "$OUT/gpu-bench_$stamp.jsonl" 2>&1 | tee "$OUT/gpu-bench_$stamp.log" | grep -v "^W"
echo "== done: tests rc=$tests_rc; results in $OUT"
exit $tests_rc
