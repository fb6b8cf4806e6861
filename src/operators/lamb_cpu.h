// Multi-tensor LAMB on the CPU: phase 1 and phase 2 over a group of whole tensors, in math
// type T (float, or double for float64 weights; see lamb_kernels.h).
#ifndef MXLAMB_LAMB_CPU_H_
#define MXLAMB_LAMB_CPU_H_

#include <vector>

#include "lamb_kernels.h"

namespace mxlamb {

// Phase 1 for every tensor of the group (spans cover whole tensors). Writes the tensors'
// sums of squares to sumsq: sumsq[2t] = sum(w_t^2), sumsq[2t + 1] = sum(u_t^2).
template <typename T>
void lamb_phase1_cpu(const std::vector<Phase1Span<T>>& tensors, const StepCoeffs<T>& step,
                     const std::vector<TensorCoeffs<T>>& coeffs, double* sumsq);

// Phase 2 for every tensor: w <- w - step_sizes[t] * u (step_size() of lamb_math.h), and the
// weight EMA where a span has one (each tensor's EMA coefficients).
template <typename T>
void lamb_phase2_cpu(const std::vector<Phase2Span<T>>& tensors, const StepCoeffs<T>& step,
                     const std::vector<TensorCoeffs<T>>& coeffs, const std::vector<T>& step_sizes);

// Phase 1 then phase 2, back to back per batch of consecutive tensors small enough for the
// batch's arrays to stay in the last-level cache between the two passes (a larger tensor is a
// batch of its own), so phase 2 reads w, m and v from cache rather than memory. step_size_of(t,
// sum(w_t^2), sum(u_t^2)) gives tensor t's step size once its phase 1 is done. Bit-identical to
// lamb_phase1_cpu then lamb_phase2_cpu over the whole group.
template <typename T, typename StepSizeFn>
void lamb_step_cpu(const std::vector<Phase1Span<T>>& phase1,
                   const std::vector<Phase2Span<T>>& phase2, const StepCoeffs<T>& step,
                   const std::vector<TensorCoeffs<T>>& coeffs, StepSizeFn&& step_size_of,
                   double* sumsq);

// sum(g^2) of every gradient, in double: out[t].
void grad_sumsq_cpu(const std::vector<GradSpan>& grads, double* out);

// Elements per back-to-back batch: w, g, m, v of 2^20 fp32 elements are 16 MiB, which a
// server CPU's last-level cache of 32 MiB or more keeps between the two passes. The size is
// fixed, not read from the CPU: with a smaller cache only the reuse is lost, never correctness.
constexpr int64_t kBackToBackElements = int64_t{1} << 20;

template <typename T, typename StepSizeFn>
void lamb_step_cpu(const std::vector<Phase1Span<T>>& phase1,
                   const std::vector<Phase2Span<T>>& phase2, const StepCoeffs<T>& step,
                   const std::vector<TensorCoeffs<T>>& coeffs, StepSizeFn&& step_size_of,
                   double* sumsq) {
  const size_t n = phase1.size();
  size_t first = 0;
  while (first < n) {
    size_t last = first + 1;
    int64_t elements = phase1[first].n;
    while (last < n && elements + phase1[last].n <= kBackToBackElements) {
      elements += phase1[last].n;
      ++last;
    }
    const std::vector<Phase1Span<T>> p1(phase1.begin() + first, phase1.begin() + last);
    const std::vector<Phase2Span<T>> p2(phase2.begin() + first, phase2.begin() + last);
    const std::vector<TensorCoeffs<T>> c(coeffs.begin() + first, coeffs.begin() + last);
    lamb_phase1_cpu(p1, step, c, sumsq + 2 * first);
    std::vector<T> step_sizes(last - first);
    for (size_t t = first; t < last; ++t) {
      step_sizes[t - first] = step_size_of(static_cast<int>(t), sumsq[2 * t], sumsq[2 * t + 1]);
    }
    lamb_phase2_cpu(p2, step, c, step_sizes);
    first = last;
  }
}

}  // namespace mxlamb

#endif  // MXLAMB_LAMB_CPU_H_
