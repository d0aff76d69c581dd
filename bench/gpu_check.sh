#!/usr/bin/env bash
# `make gpu-check`: validate and time kdfast's GPU kernels in one short run (< 8 minutes).
#  1. build kdfast._C in place for sm_90;
#  2. core GPU tests: every CUDA and Triton kernel against the float64 reference on real
#     shapes, fp32 / bf16 / fp16, forward and backward (plus gradcheck, opcheck, autocast);
#  3. the GPU benchmarks (results written case by case);
#  4. the rest of the tests marked `gpu` (layouts, odd shapes, reductions) in the time left.
# Logs and the JSON-lines results go to $OUT (default bench/results/); a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
stamp=$(date -u +%Y%m%d-%H%M%S)
start=$SECONDS
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONWARNINGS=ignore

echo "== build (sm_$TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
if ! "$PYTHON" setup.py build_ext --inplace > "$OUT/gpu-build_$stamp.log" 2>&1; then
  tail -40 "$OUT/gpu-build_$stamp.log"; echo "build failed"; exit 1
fi
echo "built in $((SECONDS - start)) s"
"$PYTHON" -m kdfast.cli info | tee "$OUT/gpu-info_$stamp.log"

CORE="gpu_kernel_paths or gpu_tiles or matches_reference or gradcheck or opcheck or autocast or low_precision"
echo "== core gpu tests"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -k "$CORE" tests > "$OUT/gpu-tests-core_$stamp.log" 2>&1
core_rc=$?
tail -15 "$OUT/gpu-tests-core_$stamp.log"

echo "== gpu benchmarks"
timeout 170 "$PYTHON" -m bench --out "$OUT/gpu-bench_$stamp.jsonl" > "$OUT/gpu-bench_$stamp.log" 2>&1
grep -v "^W" "$OUT/gpu-bench_$stamp.log" | tail -40

left=$((440 - (SECONDS - start)))
echo "== remaining gpu tests (${left} s left)"
rest_rc=0
if [ "$left" -gt 20 ]; then
  timeout "$left" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -k "not ($CORE)" tests \
    > "$OUT/gpu-tests-rest_$stamp.log" 2>&1
  rest_rc=$?
  tail -15 "$OUT/gpu-tests-rest_$stamp.log"
fi
echo "== done in $((SECONDS - start)) s: core tests rc=$core_rc, other tests rc=$rest_rc; results in $OUT"
[ "$core_rc" -eq 0 ] && [ "$rest_rc" -eq 0 ]
