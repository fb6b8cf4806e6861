// LAMB span kernels: load, call the lamb_math.h stage functions, store.
//
// This file is compiled once per ISA level with different -m flags and
// -DMXLAMB_ISA=<name> (see setup.py); each copy defines kernels_<name>(). The loops are written
// so that the compiler vectorises them: a body of blocks of kSumLanes elements whose lane l
// always feeds accumulator l, then a tail block padded with zeros. Both call the same element
// functions, so body and tail cannot disagree.
#include <cstdint>

#include "lamb_kernels.h"

#ifndef MXLAMB_ISA
#error "compile with -DMXLAMB_ISA=baseline|avx2|avx512"
#endif
#define MXLAMB_CAT_(a, b) a##b
#define MXLAMB_CAT(a, b) MXLAMB_CAT_(a, b)
#define MXLAMB_STR_(a) #a
#define MXLAMB_STR(a) MXLAMB_STR_(a)

namespace mxlamb {
namespace {

// The fixed-order sum of the accumulator lanes (a balanced tree).
inline double sum_lanes(const double* acc) {
  double level[kSumLanes];
  for (int l = 0; l < kSumLanes; ++l) level[l] = acc[l];
  for (int width = kSumLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) level[l] = level[l] + level[l + width];
  }
  return level[0];
}

// Phase 1 of one element: updates mean and var in place, returns u.
template <typename GradT>
MXLAMB_INLINE float phase1_element(float w, GradT grad, float* mean, float* var,
                                   const StepCoeffs& step, const TensorCoeffs& tensor) {
  float m = *mean, v = *var;
  update_moments(scaled_grad(to_float(grad), step), &m, &v, step);
  *mean = m;
  *var = v;
  return raw_update(w, m, v, step.epsilon, tensor);
}

// Adds the squares of one block of kSumLanes values to the lane accumulators.
MXLAMB_INLINE void accumulate_squares(const float* x, double* acc) {
  for (int lane = 0; lane < kSumLanes; ++lane) {
    const double d = static_cast<double>(x[lane]);
    acc[lane] += d * d;
  }
}

template <typename GradT>
void phase1_span(const Phase1Span& s, const StepCoeffs& step, const TensorCoeffs& tensor,
                 double* weight_sumsq, double* update_sumsq) {
  const float* __restrict__ w = s.weight;
  const GradT* __restrict__ g = static_cast<const GradT*>(s.grad);
  float* __restrict__ m = s.mean;
  float* __restrict__ v = s.var;
  double acc_w[kSumLanes] = {};
  double acc_u[kSumLanes] = {};
  float u[kSumLanes];

  const int64_t body = s.n - s.n % kSumLanes;
  for (int64_t i = 0; i < body; i += kSumLanes) {
    for (int lane = 0; lane < kSumLanes; ++lane) {
      u[lane] = phase1_element(w[i + lane], g[i + lane], &m[i + lane], &v[i + lane], step, tensor);
    }
    accumulate_squares(w + i, acc_w);
    accumulate_squares(u, acc_u);
  }
  // The tail continues the same lane pattern with zeros in the unused lanes (0^2 adds nothing).
  if (body < s.n) {
    float w_tail[kSumLanes] = {};
    float u_tail[kSumLanes] = {};
    for (int64_t i = body; i < s.n; ++i) {
      w_tail[i - body] = w[i];
      u_tail[i - body] = phase1_element(w[i], g[i], &m[i], &v[i], step, tensor);
    }
    accumulate_squares(w_tail, acc_w);
    accumulate_squares(u_tail, acc_u);
  }
  *weight_sumsq = sum_lanes(acc_w);
  *update_sumsq = sum_lanes(acc_u);
}

template <typename LowT>
void phase2_span(const Phase2Span& s, const StepCoeffs& step, const TensorCoeffs& tensor,
                 float step_size) {
  const float* w = s.weight;  // may alias w_out: no __restrict__
  float* w_out = s.weight_out;
  LowT* __restrict__ w_lowp = static_cast<LowT*>(s.weight_lowp);
  const float* __restrict__ m = s.mean;
  const float* __restrict__ v = s.var;
  for (int64_t i = 0; i < s.n; ++i) {
    const float updated =
        apply_update(w[i], raw_update(w[i], m[i], v[i], step.epsilon, tensor), step_size);
    w_out[i] = updated;
    if (w_lowp != nullptr) w_lowp[i] = from_float<LowT>(updated);
  }
}

void phase1(const Phase1Span& s, const StepCoeffs& step, const TensorCoeffs& tensor,
            double* weight_sumsq, double* update_sumsq) {
  switch (s.grad_type) {
    case DType::kFloat16:
      return phase1_span<half_t>(s, step, tensor, weight_sumsq, update_sumsq);
    case DType::kBfloat16:
      return phase1_span<bf16_t>(s, step, tensor, weight_sumsq, update_sumsq);
    default:
      return phase1_span<float>(s, step, tensor, weight_sumsq, update_sumsq);
  }
}

void phase2(const Phase2Span& s, const StepCoeffs& step, const TensorCoeffs& tensor,
            float step_size) {
  if (s.weight_lowp == nullptr) return phase2_span<float>(s, step, tensor, step_size);
  if (s.lowp_type == DType::kBfloat16) return phase2_span<bf16_t>(s, step, tensor, step_size);
  return phase2_span<half_t>(s, step, tensor, step_size);
}

}  // namespace

KernelTable MXLAMB_CAT(kernels_, MXLAMB_ISA)() {
  return KernelTable{MXLAMB_STR(MXLAMB_ISA), &phase1, &phase2};
}

}  // namespace mxlamb
