// The memory-bandwidth probe of benchmarks/bench_step.py, which gives the LAMB step's speed as a
// share of it. Called through ctypes; no operator uses it.
#include <omp.h>

#include <cstdint>

#include "multi_tensor.h"

// A STREAM-like read-modify-write: a[i] = a[i] + s * b[i] over n floats (12 bytes per element),
// with the same chunks and threads as the LAMB kernels (multi_tensor.h). Returns seconds.
extern "C" __attribute__((visibility("default"))) double mxlamb_rmw_seconds(float* a,
                                                                            const float* b,
                                                                            int64_t n, float s) {
  const mxlamb::ChunkPlan plan({n});
  const double start = omp_get_wtime();
  mxlamb::for_each_chunk(plan, [&](int64_t, const mxlamb::Chunk& c) {
    float* __restrict__ x = a + c.begin;
    const float* __restrict__ y = b + c.begin;
    for (int64_t i = 0; i < c.end - c.begin; ++i) x[i] = x[i] + s * y[i];
  });
  return omp_get_wtime() - start;
}
