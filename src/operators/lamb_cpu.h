// Multi-tensor LAMB on the CPU: phase 1 and phase 2 over a group of whole tensors.
#ifndef MXLAMB_LAMB_CPU_H_
#define MXLAMB_LAMB_CPU_H_

#include <vector>

#include "lamb_kernels.h"

namespace mxlamb {

// Phase 1 for every tensor of the group (spans cover whole tensors). Writes the tensors'
// sums of squares to sumsq: sumsq[2t] = sum(w_t^2), sumsq[2t + 1] = sum(u_t^2).
void lamb_phase1_cpu(const std::vector<Phase1Span>& tensors, const StepCoeffs& step,
                     const std::vector<TensorCoeffs>& coeffs, double* sumsq);

// Phase 2 for every tensor: w <- w - step_sizes[t] * u (step_size() of lamb_math.h), and the
// weight EMA where a span has one.
void lamb_phase2_cpu(const std::vector<Phase2Span>& tensors, const StepCoeffs& step,
                     const std::vector<TensorCoeffs>& coeffs,
                     const std::vector<float>& step_sizes, const EmaCoeffs& ema);

// sum(g^2) of every gradient, in double: out[t].
void grad_sumsq_cpu(const std::vector<GradSpan>& grads, double* out);

}  // namespace mxlamb

#endif  // MXLAMB_LAMB_CPU_H_
