#!/usr/bin/env bash
# Everything that needs the GPU, in one call (about 5 minutes, at most 9): run from the repository
# root on the GPU machine (Python 3.12, PyTorch, CuPy, nvcc; no MXNet, no network):
#
#     OUT=/tmp/out bash benchmarks/gpu_session.sh
#
# 1. builds the CUDA kernels (native_build.py: nvcc, sm_90 + PTX) into build/gpu/;
# 2. runs tests/test_cuda.py on that build (the GPU tests against the float64 reference, the
#    CUDA-graph replay, bit-identical runs);
# 3. runs benchmarks/bench_gpu.py (BERT-base and BERT-large, fp32 and fp16, against PyTorch);
# 4. with the time left, compute-sanitizer memcheck and racecheck over a few GPU tests.
# Writes to $OUT (at most 8 files): summary.txt, env.txt, build.log, test_cuda.log,
# bench_gpu.log, bench_gpu.json, sanitizer.log. Each step runs even when an earlier one fails,
# if it can; summary.txt lists each step's exit status.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" build/gpu
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LIB=$PWD/build/gpu/libmxlamb_cuda.so
BUDGET=540  # seconds for the whole script, inside the device tool's 600 per command
summary() { echo "$1: exit $2 after ${SECONDS}s" | tee -a "$OUT/summary.txt"; }
left() { echo $(( BUDGET - SECONDS > 10 ? BUDGET - SECONDS : 10 )); }

{
  date -u
  nvidia-smi
  nvcc --version
  python3 -c "import sys, numpy, torch; print(sys.version); print('numpy', numpy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
  python3 -c "import cupy; print('cupy', cupy.__version__)"
  python3 -c "import pytest; print('pytest', pytest.__version__)"
  git log --oneline -1 2>/dev/null
} > "$OUT/env.txt" 2>&1

timeout 120 python3 -c "import sys; sys.path.insert(0, '.'); import native_build; native_build.compile_cuda_library('$LIB', extra_flags=['-Xptxas', '-v'])" > "$OUT/build.log" 2>&1
summary build $?

MXLAMB_CUDA_LIB=$LIB timeout 300 python3 -m pytest -q -p no:cacheprovider -rs --durations=10 tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1
summary tests $?

timeout "$(left)" python3 benchmarks/bench_gpu.py --lib "$LIB" --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
summary benchmark $?

: > "$OUT/sanitizer.log"
for tool in memcheck racecheck; do
  [ "$(left)" -gt 40 ] || { echo "$tool: no time left" >> "$OUT/sanitizer.log"; continue; }
  MXLAMB_CUDA_LIB=$LIB timeout "$(( $(left) / 2 ))" compute-sanitizer --tool "$tool" --error-exitcode 99 \
    python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda.py \
    -k "trust_ratio or (plain and float32) or (everything and float16)" >> "$OUT/sanitizer.log" 2>&1
  summary "compute-sanitizer $tool" $?
done
