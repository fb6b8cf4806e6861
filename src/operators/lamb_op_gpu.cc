// The LAMB operators' GPU forwards (compiled only into a build with the CUDA kernels,
// MXLAMB_CUDA=1, which defines MXLAMB_WITH_CUDA).
//
// Thin glue on purpose: each forward parses and decodes its call with the CPU's own code
// (parse_step and decode_group of lamb_op.cc, over the tables of lamb_op.h), hands the arrays'
// device pointers and the host values to one entry point of lamb_cuda.h on MXNet's stream and
// workspace, and returns. What
// the C-interface tests (tests/test_cuda.py) run is what MXNet runs. Every option the CPU
// forwards take is taken here with the CPU's semantics; the kernels take bfloat16 too, which
// MXNet cannot hand to a library operator.
#include <string>
#include <vector>

#include "lamb_cuda.h"
#include "lamb_op.h"

using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;

namespace mxlamb {
namespace {

MxlambDType cuda_dtype(const MXTensor& t) { return static_cast<MxlambDType>(t.dtype); }

template <typename V>
const typename V::value_type* data_or_null(const V& v) { return v.empty() ? nullptr : v.data(); }

// A LAMB call (phase 1, phase 2, step) as lamb_cuda.h takes it, made from the call's decoded
// Group (decode_group, shared with the CPU forwards); the vectors own the host arrays the
// group points to.
struct CudaGroup {
  StepAttrs s;
  Group decoded;
  std::vector<void*> weights, weights_out, means, vars, vmaxes, averages, lowp;
  std::vector<const void*> grads;
  std::vector<int> grad_dtypes;
  std::vector<int64_t> sizes;
  std::vector<unsigned char> adaptation;
  MxlambCudaGroup group{};

  // Reads the attributes and every tensor's arrays; false (reported) where the call is wrong.
  bool read(const OpTable& op, const Attrs& attrs, std::vector<MXTensor>& in,
            std::vector<MXTensor>* out) {
    if (!parse_step(op, attrs, &s)) return false;
    if (!decode_group(op, s, in, out, &decoded)) return false;
    if (decoded.quantized) {
      return fail(op.name, "state_bits=8 runs on the CPU operators; these GPU forwards do "
                           "not pass 8-bit moments to the CUDA kernels yet");
    }
    const int n = s.inputs.num_tensors();
    const bool phase2 = &op == &kPhase2Op;
    for (const TensorArrays& a : decoded.tensors) {
      weights.push_back(a.weight);
      // (phase 2 without multi_precision writes the weights to out=, maybe the weights)
      if (phase2 && !s.multi_precision) weights_out.push_back(a.weight_out);
      if (a.grad != nullptr) {
        grads.push_back(a.grad);
        grad_dtypes.push_back(static_cast<int>(a.grad_dtype));
      }
      means.push_back(a.mean);
      vars.push_back(a.var);
      if (a.vmax != nullptr) vmaxes.push_back(a.vmax);
      if (a.average != nullptr) averages.push_back(a.average);
      if (a.model != nullptr) lowp.push_back(a.model);
      sizes.push_back(a.size);
    }
    for (int t = 0; t < n; ++t) adaptation.push_back(s.layer_adaptation[t] ? 1 : 0);
    group.num_tensors = n;
    group.math_dtype = decoded.float64 ? MXLAMB_FLOAT64 : MXLAMB_FLOAT32;
    group.lowp_dtype = MXLAMB_FLOAT16;  // MXNet's multi-precision model weights
    group.params = s.params;
    group.rescale_grad = s.rescale_grad;
    group.clipnorm = s.clipnorm;
    group.control = decoded.control;
    group.grad_sumsq = decoded.grad_sumsq;
    group.counts = decoded.counts;
    return true;
  }

  // Points the group at the vectors and runs `entry` (a lamb_cuda.h entry point) on MXNet's
  // stream, with a workspace from MXNet.
  template <typename Entry>
  MXReturnValue launch(const OpResource& res, Entry&& entry) {
    group.weights = data_or_null(weights);
    group.weights_out = data_or_null(weights_out);
    group.grads = data_or_null(grads);
    group.grad_dtypes = data_or_null(grad_dtypes);
    group.means = data_or_null(means);
    group.vars = data_or_null(vars);
    group.vmaxes = data_or_null(vmaxes);
    group.averages = data_or_null(averages);
    group.weights_lowp = data_or_null(lowp);
    group.sizes = data_or_null(sizes);
    group.lrs = data_or_null(s.lrs);
    group.wds = data_or_null(s.wds);
    group.decays = data_or_null(s.decays);
    group.step_counts = data_or_null(s.step_counts);
    group.count_slots = data_or_null(decoded.count_slots);
    group.stat_rows = data_or_null(decoded.stat_rows);
    group.layer_adaptation = data_or_null(adaptation);
    const size_t bytes = mxlamb_cuda_workspace_bytes(&group);
    void* workspace = res.alloc_gpu(static_cast<int>(bytes));
    return check(s.inputs.op().name, entry(&group, workspace, bytes, res.get_cuda_stream()));
  }

  static MXReturnValue check(const char* op, int err) {
    if (err == 0) return MX_SUCCESS;
    fail(op, "CUDA error " + std::to_string(err));
    return MX_FAIL;
  }
};

}  // namespace

MXReturnValue phase1_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res) {
  CudaGroup g;
  if (!g.read(kPhase1Op, attrs, *in, out)) return MX_FAIL;
  double* sumsq = (*out)[0].data<double>();
  return g.launch(res, [&](MxlambCudaGroup* group, void* ws, size_t bytes, void* stream) {
    return mxlamb_cuda_phase1(group, sumsq, ws, bytes, stream);
  });
}

MXReturnValue phase2_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res) {
  CudaGroup g;
  if (!g.read(kPhase2Op, attrs, *in, out)) return MX_FAIL;
  const double* sumsq = g.decoded.sumsq;
  return g.launch(res, [&](MxlambCudaGroup* group, void* ws, size_t bytes, void* stream) {
    return mxlamb_cuda_phase2(group, sumsq, ws, bytes, stream);
  });
}

MXReturnValue step_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                               std::vector<MXTensor>* out, const OpResource& res) {
  CudaGroup g;
  if (!g.read(kStepOp, attrs, *in, out)) return MX_FAIL;
  double* sumsq = (*out)[0].data<double>();
  return g.launch(res, [&](MxlambCudaGroup* group, void* ws, size_t bytes, void* stream) {
    return mxlamb_cuda_step(group, sumsq, ws, bytes, stream);
  });
}

MXReturnValue grad_stats_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                     std::vector<MXTensor>* out, const OpResource& res) {
  InputLayout l;
  MxlambCudaGradStats stats{};
  if (!parse_grad_stats(attrs, &l, &stats.params)) return MX_FAIL;
  std::vector<const void*> grads;
  std::vector<int> dtypes;
  std::vector<int64_t> sizes;
  for (int t = 0; t < l.num_tensors(); ++t) {
    const MXTensor& grad = *l.array(*in, Slot::kGrad, t);
    grads.push_back(grad.data_ptr);
    dtypes.push_back(cuda_dtype(grad));
    sizes.push_back(grad.size());
  }
  stats.num_tensors = l.num_tensors();
  stats.grads = data_or_null(grads);
  stats.grad_dtypes = data_or_null(dtypes);
  stats.sizes = data_or_null(sizes);
  stats.grad_sumsq = (*out)[0].data<double>();
  stats.control = (*out)[1].data<double>();
  stats.step_state = l.array(*in, Slot::kStepState)->data<double>();
  const size_t bytes = mxlamb_cuda_grad_stats_workspace_bytes(&stats);
  void* workspace = res.alloc_gpu(static_cast<int>(bytes));
  return CudaGroup::check(kGradStatsOp.name,
                          mxlamb_cuda_grad_stats(&stats, workspace, bytes,
                                                 res.get_cuda_stream()));
}

MXReturnValue trust_ratio_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                      std::vector<MXTensor>* out, const OpResource& res) {
  TrustRatioAttrs a;
  if (!parse_trust_ratio(attrs, &a)) return MX_FAIL;
  std::vector<unsigned char> adaptation(a.layer_adaptation.begin(), a.layer_adaptation.end());
  MxlambCudaGroup group{};
  group.num_tensors = a.inputs.num_tensors();
  group.layer_adaptation = data_or_null(adaptation);
  group.params.lower_bound = a.lower;
  group.params.upper_bound = a.upper;
  const size_t bytes = mxlamb_cuda_workspace_bytes(&group);
  void* workspace = res.alloc_gpu(static_cast<int>(bytes));
  return CudaGroup::check(
      kTrustRatioOp.name,
      mxlamb_cuda_trust_ratio(&group, a.inputs.array(*in, Slot::kSumsq)->data<double>(),
                              (*out)[0].data<double>(), workspace, bytes,
                              res.get_cuda_stream()));
}

}  // namespace mxlamb
