// The CPU operators' kernels driven without MXNet, through a C interface shaped like
// lamb_cuda.h's group, so the GPU tests can run the CPU's phase 1 and phase 2 on the same
// inputs as the CUDA kernels (native_build.compile_cpu_kernels builds it; the GPU machine has
// no MXNet). What it does per call is what lamb_op.cc's phase1_forward_typed and
// phase2_forward_typed do for a call without gradient statistics or device counts: the same
// lamb_math.h coefficients, lamb_phase1_cpu, step_size, lamb_phase2_cpu.
#include <cstdint>
#include <vector>

#include "lamb_cpu.h"
#include "lamb_cuda.h"

namespace {

using namespace mxlamb;

template <typename T>
void step(const MxlambCudaGroup& g, double* sumsq) {
  const int n = g.num_tensors;
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<Phase1Span<T>> first(n);
  std::vector<Phase2Span<T>> second(n);
  for (int t = 0; t < n; ++t) {
    coeffs[t] = tensor_coeffs<T>(g.params, g.step_counts[t], g.lrs[t], g.wds[t], g.rescale_grad,
                                 g.decays != nullptr ? g.decays[t] : 0.0);
    T* w = static_cast<T*>(g.weights[t]);
    T* m = static_cast<T*>(g.means[t]);
    T* v = static_cast<T*>(g.vars[t]);
    T* vmax = g.vmaxes != nullptr ? static_cast<T*>(g.vmaxes[t]) : nullptr;
    first[t] = Phase1Span<T>{w, g.grads[t], m, v, vmax, g.sizes[t],
                             static_cast<DType>(g.grad_dtypes[t])};
    second[t] = Phase2Span<T>{w, w,
                              g.weights_lowp != nullptr ? static_cast<half_t*>(g.weights_lowp[t])
                                                        : nullptr,
                              m, vmax != nullptr ? vmax : v,
                              g.averages != nullptr ? static_cast<T*>(g.averages[t]) : nullptr,
                              g.sizes[t]};
  }
  const StepCoeffs<T> s = step_coeffs<T>(g.params);
  lamb_phase1_cpu(first, s, coeffs, sumsq);
  std::vector<T> sizes(n);
  for (int t = 0; t < n; ++t) {
    const bool adapt = g.layer_adaptation == nullptr || g.layer_adaptation[t] != 0;
    sizes[t] = step_size(s, coeffs[t], sumsq[2 * t], sumsq[2 * t + 1], adapt);
  }
  lamb_phase2_cpu(second, s, coeffs, sizes);
}

}  // namespace

// Phase 1 and phase 2 of `group` (host pointers; float32 or float64 weights, float32/float16/
// float64 gradients, float16 model weights) on the CPU; sumsq as mxlamb_cuda_phase1's.
extern "C" __attribute__((visibility("default"))) int mxlamb_cpu_step(
    const MxlambCudaGroup* group, double* sumsq) {
  if (group->math_dtype == MXLAMB_FLOAT64) {
    step<double>(*group, sumsq);
  } else {
    step<float>(*group, sumsq);
  }
  return 0;
}
