#!/usr/bin/env bash
# Everything that needs the GPU, in one call of at most 7 minutes (the device tool's machine start
# comes on top): run from the repository root on the GPU machine (Python 3.12, PyTorch, CuPy,
# JAX/optax, timm, nvcc; no MXNet, no network):
#
#     OUT=/tmp/out bash benchmarks/gpu_session.sh [steps...]
#
# steps (default: all, in this order):
#   build      the CUDA kernels (native_build.py: nvcc, sm_90 + PTX) into build/gpu/;
#   tune       the kernels built with each chunk size of CHUNKS (log2 elements; the source's
#              default is one of them) and timed on BERT-base and BERT-large fp32 (mxlamb only,
#              bench_gpu.py); the fastest BERT-base one-call step's build is the one the later
#              steps test and time (tune.json, summary.txt say which);
#   tests      tests/test_cuda.py on that build (the float64 reference, the CPU kernels,
#              CUDA-graph replay, awkward sizes, bit-identical runs, the grid);
#   memcheck   compute-sanitizer memcheck over the GPU tests that reach tails, empty tensors and
#              the misaligned scalar path, with PyTorch's caching allocator off (its blocks are
#              larger than the tensors, so an overrun would land in memory it owns);
#   bench      benchmarks/bench_gpu.py (BERT-base and BERT-large, fp32 and fp16 master, against
#              torch _foreach, timm, optax and fused AdamW, with the copy bandwidth);
#   racecheck  compute-sanitizer racecheck over two small GPU tests, with the time left.
# A rerun after a fix names the steps it needs: `bash benchmarks/gpu_session.sh build tests`.
# Writes to $OUT (at most 10 files): summary.txt, env.txt, build.log, tune.log, tune.json,
# test_cuda.log, bench_gpu.log, bench_gpu.json, sanitizer.log. Each step runs even when an earlier one fails,
# if it can; summary.txt lists each step's exit status and the seconds it ended at.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" build/gpu
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LIB=$PWD/build/gpu/libmxlamb_cuda.so
BUDGET=${GPU_SESSION_BUDGET:-420}  # seconds for the whole script
STEPS=${*:-build tune tests memcheck bench racecheck}
CHUNKS=${CHUNKS:-12 13 14}
summary() { echo "$1: exit $2 at ${SECONDS}s" | tee -a "$OUT/summary.txt"; }
left() { echo $(( BUDGET - SECONDS > 10 ? BUDGET - SECONDS : 10 )); }
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }  # min(seconds, time left)
wants() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
PYTEST=(python3 -m pytest -q -p no:cacheprovider)
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 4) || XDIST=()
# The GPU tests (not the no-GPU checks CI runs, nor the CPU kernels' own reference tests).
GPU_TESTS="test_cuda_ and not numpy_model and not compile and not refuses"

{
  date -u
  # The library links the CUDA 13 runtime: the driver must say "CUDA Version: 13.x" or newer,
  # else every call returns cudaErrorInsufficientDriver while PyTorch still works.
  nvidia-smi
  nvcc --version
  python3 -c "import sys, numpy, torch; print(sys.version); print('numpy', numpy.__version__, 'torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "import cupy; print('cupy', cupy.__version__)"
  python3 -c "import timm; print('timm', timm.__version__)"
  python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__)"
  python3 -c "import pytest; print('pytest', pytest.__version__)"
  git log --oneline -1 2>/dev/null
} > "$OUT/env.txt" 2>&1

if wants build; then
  timeout "$(cap 90)" python3 -c "import sys; sys.path.insert(0, '.'); import native_build; native_build.compile_cuda_library('$LIB', extra_flags=['-Xptxas', '-v'])" > "$OUT/build.log" 2>&1
  summary build $?
fi

if wants tune; then
  for chunk in $CHUNKS; do
    timeout "$(cap 90)" python3 -c "import sys; sys.path.insert(0, '.'); import native_build; native_build.compile_cuda_library('build/gpu/chunk$chunk/libmxlamb_cuda.so', extra_flags=['-DMXLAMB_CUDA_CHUNK_LOG2=$chunk'])" > "build/gpu/chunk$chunk.log" 2>&1 &
  done
  wait
  for chunk in $CHUNKS; do
    cat "build/gpu/chunk$chunk.log" >> "$OUT/tune.log"
    timeout "$(cap 60)" python3 benchmarks/bench_gpu.py --lib "build/gpu/chunk$chunk/libmxlamb_cuda.so" \
      --peers "" --precisions fp32 --steps 30 --json "build/gpu/chunk$chunk.json" >> "$OUT/tune.log" 2>&1
    echo "chunk 2^$chunk: exit $?" >> "$OUT/tune.log"
  done
  CHOSEN=$(python3 - "$CHUNKS" "$OUT/tune.json" <<'PY'
import json, sys
chunks, out = sys.argv[1].split(), sys.argv[2]
table = {}
for chunk in chunks:
    try:
        rows = json.load(open("build/gpu/chunk%s.json" % chunk))["results"]
    except (OSError, ValueError, KeyError):
        continue
    table[chunk] = {"%s %s" % (r["model"], r["case"]): r.get("seconds") for r in rows}
key = "bert-base mxlamb step (one call)"
timed = [c for c in table if table[c].get(key)]
best = min(timed, key=lambda c: table[c][key]) if timed else ""
json.dump({"seconds": table, "chosen": best}, open(out, "w"), indent=1)
print(best)
PY
)
  if [ -n "$CHOSEN" ]; then LIB=$PWD/build/gpu/chunk$CHOSEN/libmxlamb_cuda.so; fi
  echo "tune: chunk 2^${CHOSEN:-none} chosen at ${SECONDS}s (later steps use $LIB)" | tee -a "$OUT/summary.txt"
fi

if wants tests; then
  MXLAMB_CUDA_LIB=$LIB timeout "$(cap 150)" "${PYTEST[@]}" "${XDIST[@]}" -rs --durations=15 \
    tests/test_cuda.py -k "not numpy_model" > "$OUT/test_cuda.log" 2>&1
  summary tests $?
fi

: >> "$OUT/sanitizer.log"
if wants memcheck; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 MXLAMB_CUDA_LIB=$LIB timeout "$(cap 80)" \
    compute-sanitizer --tool memcheck --error-exitcode 99 "${PYTEST[@]}" tests/test_cuda.py \
    -k "($GPU_TESTS) and (awkward or bit_identical or 8_bit or (matches_the_reference and plain))" \
    >> "$OUT/sanitizer.log" 2>&1
  summary "compute-sanitizer memcheck" $?
fi

if wants bench; then
  timeout "$(cap 200)" python3 benchmarks/bench_gpu.py --lib "$LIB" --steps 20 \
    --optax-timeout 45 --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
  summary benchmark $?
fi

if wants racecheck; then
  if [ "$(left)" -gt 30 ]; then
    MXLAMB_CUDA_LIB=$LIB timeout "$(left)" compute-sanitizer --tool racecheck --error-exitcode 99 \
      "${PYTEST[@]}" tests/test_cuda.py \
      -k "($GPU_TESTS) and matches_the_reference and float32 and (plain or everything)" \
      >> "$OUT/sanitizer.log" 2>&1
    summary "compute-sanitizer racecheck" $?
  else
    echo "racecheck: no time left" | tee -a "$OUT/summary.txt"
  fi
fi
