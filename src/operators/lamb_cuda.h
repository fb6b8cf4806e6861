/* Multi-tensor LAMB on CUDA: an extern "C" interface on raw device pointers and a stream.
 *
 * Usable without MXNet (the tests and the benchmark drive it through ctypes on CuPy/PyTorch
 * arrays, mirroring these structs) and by the operators' GPU forwards in lamb_op_gpu.cc
 * (MXLAMB_WITH_CUDA), which pass res.get_cuda_stream() and a workspace from res.alloc_gpu().
 *
 * A call enqueues kernels on `stream` and returns: the library allocates nothing (its tables
 * and partial sums live in the caller's device workspace, sized by the *_workspace_bytes
 * functions), copies nothing from the host (the tables travel as kernel arguments) and never
 * waits for the device, so a whole step can be captured in a CUDA graph.
 *
 * Every option of the CPU operators is here, with the CPU's semantics (lamb_op.cc): AMSGrad,
 * decoupled weight decay, the weight EMA (its momentum in params), the gradient statistics (per-tensor multipliers and the skip of a non-finite
 * step, from mxlamb_cuda_grad_stats' control and grad_sumsq), device step counts, per-tensor
 * lr, wd, step count and layer adaptation, Keras' epsilon, float64 weights. The host passes the
 * double hyper-parameters and per-tensor host values; each tensor's coefficients are made on
 * the device, by lamb_math.h's tensor_coeffs and gradient_scale, since they may depend on
 * device state (counts, gradient statistics).
 *
 * CUDA graphs. A captured call keeps what it was given on the host: lrs, wds, step_counts,
 * rescale_grad, clipnorm and every other host value are baked into the graph's kernel
 * arguments, so replaying it repeats that step's values (a learning-rate schedule is ignored).
 * What lives in device memory moves on with each replay: device step counts (counts), the
 * gradient statistics and the loss scale (step_state). Capture a new graph when a host value
 * changes. Make one eager call of each entry point before capturing: the first call of a kernel
 * loads its module and queries its occupancy, which a capture must not do.
 *
 * Every function returns a cudaError_t value (0 = success): cudaErrorInvalidValue, before
 * anything is enqueued, for a call the kernels could not run safely (a NULL array of a
 * non-empty tensor, a NULL sumsq, a float64 master with a low-precision copy, a workspace too
 * small, ...).
 */
#ifndef MXLAMB_LAMB_CUDA_H_
#define MXLAMB_LAMB_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#include "lamb_math.h"

extern "C" {

/* Storage types, numbered as MXNet's (mshadow's) dtype flags. */
enum MxlambDType : int {
  MXLAMB_FLOAT32 = 0,
  MXLAMB_FLOAT64 = 1,
  MXLAMB_FLOAT16 = 2,
  MXLAMB_BFLOAT16 = 12
};

/* One group of tensors for phase 1, phase 2, the one-call step and the trust-ratio read-out.
 * Pointer arrays are host arrays (one entry per tensor) of device pointers; per-tensor values
 * are host arrays; control, grad_sumsq and counts are device arrays. NULL switches an option
 * off, as an absent attribute does for the operators. */
struct MxlambCudaGroup {
  int num_tensors;
  MxlambDType math_dtype;       /* FLOAT32 or FLOAT64: weights, moments, vmax, average */
  MxlambDType lowp_dtype;       /* FLOAT16 or BFLOAT16: weights_lowp's type */
  void* const* weights;         /* w; the fp32 master copy under multi-precision */
  void* const* weights_out;     /* phase 2: where the updated w goes; NULL: in place */
  const void* const* grads;     /* phase 1 */
  const int* grad_dtypes;       /* phase 1: each gradient's MxlambDType */
  void* const* means;
  void* const* vars;
  void* const* vmaxes;          /* AMSGrad: phase 1 updates it, phase 2 uses it as v; NULL */
  void* const* averages;        /* weight EMA, updated by phase 2 after the step; NULL */
  void* const* weights_lowp;    /* phase 2: the rounded model weights; NULL */
  const int64_t* sizes;         /* elements per tensor; NULL: all 0 (trust-ratio read-out) */
  const double* lrs;
  const double* wds;
  const double* decays;         /* decoupled weight decay (Keras') per tensor; NULL: none */
  const double* step_counts;    /* the host's t (>= 1) per tensor, where counts is NULL */
  const int64_t* count_slots;   /* each tensor's row of counts */
  const int64_t* stat_rows;     /* each tensor's row of grad_sumsq */
  const unsigned char* layer_adaptation; /* 0: lr alone (AdamW, exclusions); NULL: all 1 */
  mxlamb::LambParams params;
  double rescale_grad;          /* the gradient multiplier where control is NULL */
  double clipnorm;              /* per-tensor clipping (needs grad_sumsq); <= 0: off */
  const double* control;        /* (2,) [multiplier, apply] from mxlamb_cuda_grad_stats */
  const double* grad_sumsq;     /* (P,) from mxlamb_cuda_grad_stats */
  double* counts;               /* applied-step counts: phase 1 adds 1, phase 2 reads */
  /* 8-bit moments (state_bits=8, lamb_math.h; math_dtype FLOAT32): each tensor's block scales
   * (float, ceil(n / 256)) of mean, var and vmax; means, vars and vmaxes are then their uint8
   * codes. NULL: float moments. vmax_scales: with vmaxes. */
  float* const* mean_scales;
  float* const* var_scales;
  float* const* vmax_scales;
};

/* Device workspace bytes that any call on this group needs. */
size_t mxlamb_cuda_workspace_bytes(const MxlambCudaGroup* group);

/* Phase 1 and the per-tensor norms: m, v (and vmax, counts) updated; sumsq (device, 2 doubles
 * per tensor) gets sum(w^2) and sum(u^2), or NaN for a step that control skips. */
int mxlamb_cuda_phase1(const MxlambCudaGroup* group, double* sumsq, void* workspace,
                       size_t workspace_bytes, void* stream);

/* Phase 2: w <- w - lr * trust_ratio * u (u recomputed from m, v), then the low-precision
 * weight and the EMA; nothing is written for a step that control skips. */
int mxlamb_cuda_phase2(const MxlambCudaGroup* group, const double* sumsq, void* workspace,
                       size_t workspace_bytes, void* stream);

/* Phase 1, norms and phase 2 in one call (one table upload): what mxlamb_step runs. */
int mxlamb_cuda_step(const MxlambCudaGroup* group, double* sumsq, void* workspace,
                     size_t workspace_bytes, void* stream);

/* The ratios phase 2 multiplied lr by: 1 where layer adaptation is off, NaN for a skipped
 * step (ratios: device, one double per tensor). Reads params.lower_bound/upper_bound and
 * layer_adaptation only. */
int mxlamb_cuda_trust_ratio(const MxlambCudaGroup* group, const double* sumsq, double* ratios,
                            void* workspace, size_t workspace_bytes, void* stream);

/* The gradient statistics of one step (mxlamb_grad_stats): grad_sumsq[t] = sum(g_t^2) in
 * double, then control and step_state by lamb_math.h's grad_stats_control. */
struct MxlambCudaGradStats {
  int num_tensors;
  const void* const* grads;     /* host array of device pointers */
  const int* grad_dtypes;       /* FLOAT32, FLOAT64, FLOAT16 or BFLOAT16 per gradient */
  const int64_t* sizes;
  mxlamb::GradStatsParams params;
  double* grad_sumsq;           /* device (num_tensors,) */
  double* control;              /* device (2,) */
  double* step_state;           /* device (3,) [loss scale, clean steps, skipped steps] */
};

size_t mxlamb_cuda_grad_stats_workspace_bytes(const MxlambCudaGradStats* stats);

int mxlamb_cuda_grad_stats(const MxlambCudaGradStats* stats, void* workspace,
                           size_t workspace_bytes, void* stream);

}  /* extern "C" */

#endif /* MXLAMB_LAMB_CUDA_H_ */
