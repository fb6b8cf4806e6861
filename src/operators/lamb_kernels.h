// The per-span LAMB kernels and the table that selects an instruction-set level at run time.
//
// lamb_kernels.cc is compiled once per ISA level (baseline x86-64, AVX2, AVX-512) into the same
// library; runtime.cc picks the best level the running CPU supports (or the one named by
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

// A moment stored in 8 bits (state_bits=8, lamb_math.h): one code per element and one scale
// per block of kStateBlock elements. Spans of such moments begin at a block's first element.
struct QuantizedMoment {
  uint8_t* codes = nullptr;
  float* scales = nullptr;
};

// One contiguous span [0, n) of one tensor, in math type T (float: float32 weights or the
// float32 master copy of float16 ones; double: float64 weights).
template <typename T>
struct Phase1Span {
  const T* weight;  // the weight, or the fp32 master copy under multi-precision
  const void* grad;  // grad_type elements: float32 or float16 for float, float64 for double
  T* mean;
  T* var;
  T* var_max;  // AMSGrad's running max of var (updated here), or nullptr
  int64_t n;
  DType grad_type;
  // state_bits=8 (float only): the moments as codes and scales; mean, var and var_max above
  // are then nullptr.
  QuantizedMoment q_mean, q_var, q_var_max;
};

template <typename T>
struct Phase2Span {
  const T* weight;   // the weight, or the fp32 master copy under multi-precision
  T* weight_out;     // where the updated weight goes (may be `weight` itself)
  half_t* model_weight;  // the float16 model weight beside a float32 master copy, or nullptr
  const T* mean;
  const T* var;      // the running max of var under AMSGrad
  T* average;        // the weight EMA to update after the step, or nullptr
  int64_t n;
  // state_bits=8 (float only): mean and var (the running max under AMSGrad) as codes and
  // scales; mean and var above are then nullptr.
  QuantizedMoment q_mean, q_var;
};

// One span of one gradient, for the gradient statistics (sums of squares).
struct GradSpan {
  const void* grad;
  int64_t n;
  DType grad_type;
};

// Phase 1 on a span: updates mean and var, returns sum(w^2) and sum(u^2) of the span.
template <typename T>
using Phase1Fn = void (*)(const Phase1Span<T>& span, const StepCoeffs<T>& step,
                          const TensorCoeffs<T>& tensor, double* weight_sumsq,
                          double* update_sumsq);
// Phase 2 on a span: w <- w - step_size * u, u recomputed from mean and var.
// With span.average set, also avg <- mu avg + (1 - mu) w (the tensor's EMA coefficients).
template <typename T>
using Phase2Fn = void (*)(const Phase2Span<T>& span, const StepCoeffs<T>& step,
                          const TensorCoeffs<T>& tensor, T step_size);
// sum(grad^2) of a span, in double (same lanes and order as the phase-1 sums).
using GradSumsqFn = double (*)(const GradSpan& span);

// The phase kernels of one math type.
template <typename T>
struct PhaseKernels {
  Phase1Fn<T> phase1;
  Phase2Fn<T> phase2;
};

struct KernelTable {
  const char* isa;
  PhaseKernels<float> f32;
  PhaseKernels<double> f64;
  GradSumsqFn grad_sumsq;

  template <typename T>
  const PhaseKernels<T>& phases() const;
};

template <>
inline const PhaseKernels<float>& KernelTable::phases<float>() const { return f32; }
template <>
inline const PhaseKernels<double>& KernelTable::phases<double>() const { return f64; }

KernelTable kernels_baseline();
KernelTable kernels_avx2();
KernelTable kernels_avx512();

// The table in use (chosen once at load, changeable through mxlamb_set_isa for tests).
const KernelTable& active_kernels();

}  // namespace mxlamb

#endif  // MXLAMB_LAMB_KERNELS_H_
