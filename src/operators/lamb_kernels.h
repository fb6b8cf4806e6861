// The per-span LAMB kernels and the table that selects an instruction-set level at run time.
//
// lamb_kernels.cc is compiled once per ISA level (baseline x86-64, AVX2, AVX-512) into the same
// library; isa_dispatch.cc picks the best level the running CPU supports (or the one named by
// MXLAMB_ISA). The build machine's CPU is never assumed.
#ifndef MXLAMB_LAMB_KERNELS_H_
#define MXLAMB_LAMB_KERNELS_H_

#include <cstdint>

#include "lamb_math.h"
#include "precision.h"

namespace mxlamb {

// Sums of squares are accumulated in double in kSumLanes independent lanes, element i going
// to lane i % kSumLanes, and the lanes are added in one fixed order. The same on every ISA
// level and for every thread count, so results are bit-identical everywhere.
constexpr int kSumLanes = 16;

// One contiguous span [0, n) of one tensor.
struct Phase1Span {
  const float* weight;  // fp32 weight, or the fp32 master copy under multi-precision
  const void* grad;     // grad_type elements
  float* mean;
  float* var;
  float* var_max;  // AMSGrad's running max of var (updated here), or nullptr
  int64_t n;
  DType grad_type;
};

struct Phase2Span {
  const float* weight;  // fp32 weight, or the fp32 master copy under multi-precision
  float* weight_out;    // where the updated fp32 weight goes (may be `weight` itself)
  void* weight_lowp;    // the fp16/bf16 model weight under multi-precision, else nullptr
  DType lowp_type;
  const float* mean;
  const float* var;     // the running max of var under AMSGrad
  float* average;       // the weight EMA to update after the step, or nullptr
  int64_t n;
};

// One span of one gradient, for the gradient statistics (sums of squares).
struct GradSpan {
  const void* grad;
  int64_t n;
  DType grad_type;
};

// Phase 1 on a span: updates mean and var, returns sum(w^2) and sum(u^2) of the span.
using Phase1Fn = void (*)(const Phase1Span& span, const StepCoeffs& step,
                          const TensorCoeffs& tensor, double* weight_sumsq,
                          double* update_sumsq);
// Phase 2 on a span: w <- w - step_size * u, u recomputed from mean and var.
// With span.average set, also avg <- mu avg + (1 - mu) w.
using Phase2Fn = void (*)(const Phase2Span& span, const StepCoeffs& step,
                          const TensorCoeffs& tensor, float step_size, const EmaCoeffs& ema);
// sum(grad^2) of a span, in double (same lanes and order as the phase-1 sums).
using GradSumsqFn = double (*)(const GradSpan& span);

struct KernelTable {
  const char* isa;
  Phase1Fn phase1;
  Phase2Fn phase2;
  GradSumsqFn grad_sumsq;
};

KernelTable kernels_baseline();
KernelTable kernels_avx2();
KernelTable kernels_avx512();

// The table in use (chosen once at load, changeable through mxlamb_set_isa for tests).
const KernelTable& active_kernels();

}  // namespace mxlamb

#endif  // MXLAMB_LAMB_KERNELS_H_
