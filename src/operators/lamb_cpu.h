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

// Phase 2 for every tensor: w <- w - lr * trust_ratio * u, the ratio from phase 1's sums.
void lamb_phase2_cpu(const std::vector<Phase2Span>& tensors, const StepCoeffs& step,
                     const std::vector<TensorCoeffs>& coeffs, const double* sumsq,
                     double lower_bound, double upper_bound);

}  // namespace mxlamb

#endif  // MXLAMB_LAMB_CPU_H_
