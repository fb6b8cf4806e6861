/* Multi-tensor LAMB on CUDA: an extern "C" interface on raw device pointers and a stream.
 *
 * Usable without MXNet (the tests drive it through ctypes on CuPy/PyTorch arrays, mirroring
 * these structs) and by the operators' GPU forwards in lamb_op_gpu.cc (MXLAMB_WITH_CUDA), which
 * pass res.get_cuda_stream() and a workspace from res.alloc_gpu(). The library allocates
 * nothing: the tensor and chunk tables and the per-chunk partial sums live in the caller's
 * device workspace, sized by mxlamb_cuda_workspace_bytes. Nothing synchronises with the host.
 *
 * The group carries its coefficients ready made, by lamb_math.h's step_coeffs and
 * tensor_coeffs from the double hyper-parameters, exactly as the CPU operators make theirs:
 * the kernels round nothing themselves.
 */
#ifndef MXLAMB_LAMB_CUDA_H_
#define MXLAMB_LAMB_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#include "lamb_math.h"

extern "C" {

/* Storage types, numbered as MXNet's (mshadow's) dtype flags. */
enum MxlambDType : int { MXLAMB_FLOAT32 = 0, MXLAMB_FLOAT16 = 2, MXLAMB_BFLOAT16 = 12 };

/* One group of tensors. Pointer arrays are host arrays of device pointers. */
struct MxlambCudaGroup {
  int num_tensors;
  float* const* weights;      /* fp32 weight, or the fp32 master copy under multi-precision */
  const void* const* grads;   /* grad_dtype elements */
  float* const* means;
  float* const* vars;
  void* const* weights_lowp;  /* NULL, or the fp16/bf16 model weights (lowp_dtype) */
  const int64_t* sizes;
  MxlambDType grad_dtype;
  MxlambDType lowp_dtype;
  mxlamb::StepCoeffs<float> step;
  const mxlamb::TensorCoeffs<float>* coeffs; /* host array, one per tensor */
};

/* Device workspace bytes that phase 1 and phase 2 need for this group. */
size_t mxlamb_cuda_workspace_bytes(const MxlambCudaGroup* group);

/* Phase 1 and the per-tensor norms: m, v updated; sumsq (device, 2 doubles per tensor) gets
 * sum(w^2) and sum(u^2). Returns a cudaError_t value (0 = success). */
int mxlamb_cuda_phase1(const MxlambCudaGroup* group, double* sumsq, void* workspace,
                       size_t workspace_bytes, void* stream);

/* Phase 2: w <- w - lr * trust_ratio * u (u recomputed from m, v); low-precision weights get
 * the rounded result. `workspace` must be the one phase 1 used, or one written the same way. */
int mxlamb_cuda_phase2(const MxlambCudaGroup* group, const double* sumsq, void* workspace,
                       size_t workspace_bytes, void* stream);

}  /* extern "C" */

#endif /* MXLAMB_LAMB_CUDA_H_ */
