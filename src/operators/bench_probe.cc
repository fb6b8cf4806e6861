// Probes for the benchmarks, called through ctypes; no operator uses them.
//  - mxlamb_rmw_seconds: the memory-bandwidth probe of benchmarks/bench_step.py, which gives
//    the LAMB step's speed as a share of it;
//  - mxlamb_phase_arithmetic_seconds: what one phase kernel costs with its data in cache
//    (benchmarks/bench_state_bits_phases.py), the arithmetic without the memory.
#include <omp.h>

#include <cstdint>
#include <vector>

#include "lamb_kernels.h"
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

// One phase kernel of the active ISA level on one span of n float32 elements (n small enough
// for the span to stay in the core's cache), on the calling thread: the lowest of `repeats`
// calls, in seconds, after one warm-up call. kind: 0 phase 1 with float32 moments, 1 phase 1
// with 8-bit moments, 2 phase 2 with float32 moments, 3 phase 2 with 8-bit moments. The values
// are a fixed pattern (weights ~0.1, gradients ~0.01, lr 1e-3, wd 0.01, step 3); -1 for a bad
// kind or n. The moments change from call to call, as in training.
extern "C" __attribute__((visibility("default"))) double mxlamb_phase_arithmetic_seconds(
    int kind, int64_t n, int repeats) {
  using namespace mxlamb;
  if (kind < 0 || kind > 3 || n <= 0 || repeats <= 0) return -1.0;
  std::vector<float> w(n), g(n), m(n, 0.0f), v(n, 0.0f), out(n);
  std::vector<uint8_t> mc(n, 0), vc(n, 0);
  std::vector<float> ms((n + kStateBlock - 1) / kStateBlock, 0.0f), vs(ms.size(), 0.0f);
  uint32_t state = 12345u;
  auto uniform = [&state]() {  // in [-1, 1)
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) * 0x1p-23f - 1.0f;
  };
  for (int64_t i = 0; i < n; ++i) {
    w[i] = 0.1f * uniform();
    g[i] = 0.01f * uniform();
  }
  LambParams p;
  const StepCoeffs<float> step = step_coeffs<float>(p);
  const TensorCoeffs<float> tensor = tensor_coeffs<float>(p, 3.0, 1e-3, 0.01, 1.0);
  const PhaseKernels<float>& k = active_kernels().phases<float>();
  const bool quantized = kind == 1 || kind == 3;
  Phase1Span<float> p1{w.data(), g.data(), m.data(), v.data(), nullptr, n, DType::kFloat32,
                       {}, {}, {}};
  Phase2Span<float> p2{w.data(), out.data(), nullptr, m.data(), v.data(), nullptr, n, {}, {}};
  if (quantized) {
    p1.mean = p1.var = nullptr;
    p2.mean = p2.var = nullptr;
    p1.q_mean = p2.q_mean = QuantizedMoment{mc.data(), ms.data()};
    p1.q_var = p2.q_var = QuantizedMoment{vc.data(), vs.data()};
  }
  double weight_sumsq = 0.0, update_sumsq = 0.0;
  k.phase1(p1, step, tensor, &weight_sumsq, &update_sumsq);  // moments that are not all 0
  auto call = [&]() {
    if (kind < 2) {
      k.phase1(p1, step, tensor, &weight_sumsq, &update_sumsq);
    } else {
      k.phase2(p2, step, tensor, 1e-3f);
    }
  };
  call();
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const double start = omp_get_wtime();
    call();
    const double seconds = omp_get_wtime() - start;
    best = seconds < best ? seconds : best;
  }
  return best;
}
