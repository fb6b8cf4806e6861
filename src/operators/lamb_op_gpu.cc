// The LAMB operators' GPU forwards (compiled only into a build with the CUDA kernels,
// MXLAMB_CUDA=1, which defines MXLAMB_WITH_CUDA): the arrays found through the operator tables
// of lamb_op.h, the coefficients made by lamb_math.h exactly as the CPU forwards make them, the
// kernels of lamb_cuda.cu run on MXNet's stream and workspace.
//
// The CUDA kernels take plain LAMB: every MXNet LAMB option, and Keras' epsilon (a coefficient
// like any other); float32 weights, and float16 ones with a float32 master copy (the kernels
// also take bfloat16, which MXNet cannot hand to a library operator). The other mxlamb extras
// (AMSGrad, EMA, gradient statistics, device step counts, per-tensor layer adaptation) and
// float64 weights are CPU-only for now and refused here by name.
#include <string>
#include <vector>

#include "lamb_cuda.h"
#include "lamb_op.h"

using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;

namespace mxlamb {
namespace {

bool gpu_supports(const char* op, const Attrs& attrs, const std::vector<MXTensor>& in) {
  if (in[0].dtype == mxnet::ext::kFloat64) {
    return fail(op, "float64 weights are not implemented on GPU yet (CPU only; the CUDA "
                    "kernels update float32 weights and float32 master copies)");
  }
  AttrReader r(op, attrs);
  for (const char* key : {"amsgrad", "use_ema", "has_stats", "device_counts"}) {
    if (r.flag(key)) return fail(op, std::string(key) + " is not implemented on GPU yet (CPU only)");
  }
  if (r.given("layer_adaptation")) {
    return fail(op, "layer_adaptation (exclude_from_layer_adaptation, AdamW) is not "
                    "implemented on GPU yet (CPU only)");
  }
  return r.ok();
}

// A phase operator's call as the CUDA interface takes it; the vectors own the host-side
// arrays the group points to.
struct CudaGroup {
  StepAttrs s;
  std::vector<float*> weights, means, vars;
  std::vector<const void*> grads;
  std::vector<void*> lowp;
  std::vector<int64_t> sizes;
  std::vector<TensorCoeffs<float>> coeffs;
  MxlambCudaGroup group{};

  // Reads the call's attributes and every tensor's weight, moments, size and coefficients;
  // false (reported) where the GPU cannot run it.
  bool read(const OpTable& op, const Attrs& attrs, std::vector<MXTensor>& in) {
    if (!gpu_supports(op.name, attrs, in) || !parse_step(op, attrs, &s)) return false;
    const InputLayout& l = s.inputs;
    for (int t = 0; t < l.num_tensors(); ++t) {
      MXTensor& weight = *l.array(in, Slot::kWeight, t);
      weights.push_back(weight.data<float>());
      means.push_back(l.array(in, Slot::kMean, t)->data<float>());
      vars.push_back(l.array(in, Slot::kVar, t)->data<float>());
      sizes.push_back(weight.size());
      coeffs.push_back(
          tensor_coeffs<float>(s.params, s.step_counts[t], s.lrs[t], s.wds[t], s.rescale_grad));
    }
    group.num_tensors = l.num_tensors();
    group.step = step_coeffs<float>(s.params);
    return true;
  }

  // Takes the group's workspace from MXNet and runs `kernel` (a lamb_cuda.h entry point) on
  // MXNet's stream.
  template <typename Kernel>
  MXReturnValue launch(const OpResource& res, Kernel&& kernel) {
    group.weights = weights.data();
    group.grads = grads.empty() ? nullptr : grads.data();
    group.means = means.data();
    group.vars = vars.data();
    group.weights_lowp = lowp.empty() ? nullptr : lowp.data();
    group.sizes = sizes.data();
    group.coeffs = coeffs.data();
    const size_t bytes = mxlamb_cuda_workspace_bytes(&group);
    void* workspace = res.alloc_gpu(static_cast<int>(bytes));
    const int err = kernel(&group, workspace, bytes, res.get_cuda_stream());
    if (err == 0) return MX_SUCCESS;
    fail(s.inputs.op().name, "CUDA error " + std::to_string(err));
    return MX_FAIL;
  }
};

MxlambDType cuda_dtype(const MXTensor& t) { return static_cast<MxlambDType>(t.dtype); }

}  // namespace

MXReturnValue phase1_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res) {
  CudaGroup g;
  if (!g.read(kPhase1Op, attrs, *in)) return MX_FAIL;
  const InputLayout& l = g.s.inputs;
  for (int t = 0; t < l.num_tensors(); ++t) {
    const MXTensor& grad = *l.array(*in, Slot::kGrad, t);
    if (t > 0 && cuda_dtype(grad) != g.group.grad_dtype) {
      fail(kPhase1Op.name, "the gradients of one call must share a dtype on GPU; " +
                               l.label(l.position(Slot::kGrad, t)) + " differs from the first");
      return MX_FAIL;
    }
    g.grads.push_back(grad.data_ptr);
    g.group.grad_dtype = cuda_dtype(grad);
  }
  double* sumsq = (*out)[0].data<double>();
  return g.launch(res, [&](MxlambCudaGroup* group, void* ws, size_t bytes, void* stream) {
    return mxlamb_cuda_phase1(group, sumsq, ws, bytes, stream);
  });
}

MXReturnValue phase2_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res) {
  CudaGroup g;
  if (!g.read(kPhase2Op, attrs, *in)) return MX_FAIL;
  const InputLayout& l = g.s.inputs;
  const bool multi_precision = g.s.multi_precision;
  g.group.lowp_dtype = multi_precision ? cuda_dtype((*out)[0]) : MXLAMB_FLOAT32;
  for (int t = 0; t < l.num_tensors(); ++t) {
    MXTensor& updated = (*out)[t];
    // Under multi-precision the fp32 master copy is updated in place and the model weight
    // written to out; without it out is the fp32 weight, which phase 2 reads and writes.
    if (multi_precision) {
      g.lowp.push_back(updated.data_ptr);
    } else {
      g.weights[t] = updated.data<float>();
    }
  }
  const double* sumsq = l.array(*in, Slot::kSumsq)->data<double>();
  return g.launch(res, [&](MxlambCudaGroup* group, void* ws, size_t bytes, void* stream) {
    return mxlamb_cuda_phase2(group, sumsq, ws, bytes, stream);
  });
}

}  // namespace mxlamb
