// MXNet operator registrations (lib_api.h) for the multi-tensor LAMB phases.
//
//   mxlamb_phase1(w_0, g_0, m_0, v_0, ..., w_{N-1}, g_{N-1}, m_{N-1}, v_{N-1})
//       -> sumsq (N, 2) float64: [sum(w_t^2), sum(u_t^2)]; m, v updated in place.
//   mxlamb_phase2(w_0, m_0, v_0, ..., w_{N-1}, m_{N-1}, v_{N-1}, sumsq, out=weights)
//       -> weights updated with lr * trust_ratio * u.
//
// w is the fp32 weight, or under multi_precision the fp32 master copy (then g is the fp16 or
// bfloat16 gradient, phase 2 updates the master in place and writes the rounded model weight
// to out, whose type the attribute weight_dtype gives). Per-tensor values (lrs, wds, step_counts) are comma-separated lists.
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

#include "lamb_cpu.h"
#include "mxnet/lib_api.h"
#ifdef MXLAMB_WITH_CUDA
#include "lamb_cuda.h"
#endif

using mxnet::ext::MXReturnValue;
using mxnet::ext::MXTensor;
using mxnet::ext::OpResource;
using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;
using Attrs = std::unordered_map<std::string, std::string>;

namespace mxlamb {
namespace {

constexpr int kPhase1Slots = 4;  // weight, grad, mean, var
constexpr int kWeight = 0, kGrad = 1, kMean = 2, kVar = 3;
constexpr int kPhase2Slots = 3;  // weight, mean, var
constexpr int kP2Weight = 0, kP2Mean = 1, kP2Var = 2;

bool fail(const std::string& op, const std::string& message) {
  MX_ERROR_MSG << op << ": " << message;
  return false;
}

bool parse_double(const std::string& text, double* out) {
  const char* begin = text.c_str();
  char* end = nullptr;
  errno = 0;
  *out = std::strtod(begin, &end);
  while (*end == ' ') ++end;
  return end != begin && *end == '\0' && errno != ERANGE;
}

bool get_double(const std::string& op, const Attrs& attrs, const char* key, double fallback,
                double* out) {
  auto it = attrs.find(key);
  if (it == attrs.end()) {
    *out = fallback;
    return true;
  }
  if (parse_double(it->second, out)) return true;
  return fail(op, std::string("attribute ") + key + "='" + it->second + "' is not a number");
}

bool get_bool(const Attrs& attrs, const char* key, bool fallback) {
  auto it = attrs.find(key);
  if (it == attrs.end()) return fallback;
  return it->second == "True" || it->second == "true" || it->second == "1";
}

// "(0.1, 0.2)", "[0.1,0.2]" or "0.1,0.2" -> {0.1, 0.2}; exactly n values required.
bool get_list(const std::string& op, const Attrs& attrs, const char* key, int n,
              std::vector<double>* out) {
  auto it = attrs.find(key);
  if (it == attrs.end()) return fail(op, std::string("attribute ") + key + " is missing");
  out->clear();
  std::string item;
  for (char c : it->second + ",") {
    if (c == '(' || c == ')' || c == '[' || c == ']' || c == ' ') continue;
    if (c != ',') {
      item.push_back(c);
      continue;
    }
    if (item.empty()) continue;
    double v;
    if (!parse_double(item, &v)) {
      return fail(op, std::string("attribute ") + key + " has a non-number '" + item + "'");
    }
    out->push_back(v);
    item.clear();
  }
  if (static_cast<int>(out->size()) != n) {
    return fail(op, std::string("attribute ") + key + " has " + std::to_string(out->size()) +
                        " values for num_tensors=" + std::to_string(n));
  }
  return true;
}

bool get_num_tensors(const std::string& op, const Attrs& attrs, int* n) {
  double v;
  auto it = attrs.find("num_tensors");
  if (it == attrs.end() || !parse_double(it->second, &v) || v < 1 || v != std::floor(v)) {
    return fail(op, "attribute num_tensors must be a positive integer");
  }
  *n = static_cast<int>(v);
  return true;
}

struct StepAttrs {
  int n = 0;
  bool multi_precision = false;
  StepCoeffs step{};
  std::vector<TensorCoeffs> tensors;
  double lower_bound = -1.0, upper_bound = -1.0;
};

// Reads everything both phases need; per-tensor bias corrections come from each step count.
bool parse_step(const std::string& op, const Attrs& attrs, StepAttrs* s) {
  double beta1, beta2, epsilon, rescale, clip;
  std::vector<double> lrs, wds, counts;
  if (!get_num_tensors(op, attrs, &s->n) || !get_double(op, attrs, "beta1", 0.9, &beta1) ||
      !get_double(op, attrs, "beta2", 0.999, &beta2) ||
      !get_double(op, attrs, "epsilon", 1e-6, &epsilon) ||
      !get_double(op, attrs, "rescale_grad", 1.0, &rescale) ||
      !get_double(op, attrs, "clip_gradient", -1.0, &clip) ||
      !get_double(op, attrs, "lower_bound", -1.0, &s->lower_bound) ||
      !get_double(op, attrs, "upper_bound", -1.0, &s->upper_bound) ||
      !get_list(op, attrs, "lrs", s->n, &lrs) || !get_list(op, attrs, "wds", s->n, &wds) ||
      !get_list(op, attrs, "step_counts", s->n, &counts)) {
    return false;
  }
  s->multi_precision = get_bool(attrs, "multi_precision", false);
  const bool bias_correction = get_bool(attrs, "bias_correction", true);
  s->step = StepCoeffs{static_cast<float>(beta1),       static_cast<float>(beta2),
                       static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                       static_cast<float>(epsilon),     static_cast<float>(rescale),
                       static_cast<float>(clip)};
  s->tensors.resize(s->n);
  for (int t = 0; t < s->n; ++t) {
    if (counts[t] < 1) return fail(op, "step_counts must be >= 1");
    TensorCoeffs& c = s->tensors[t];
    c.inv_bias1 = bias_correction ? static_cast<float>(1.0 / (1.0 - std::pow(beta1, counts[t])))
                                  : 1.0f;
    c.inv_bias2 = bias_correction ? static_cast<float>(1.0 / (1.0 - std::pow(beta2, counts[t])))
                                  : 1.0f;
    c.wd = static_cast<float>(wds[t]);
    c.lr = static_cast<float>(lrs[t]);
  }
  return true;
}

DType dtype_of(const MXTensor& t) { return static_cast<DType>(static_cast<int>(t.dtype)); }

const char* dtype_name(int flag) {
  switch (flag) {
    case 0: return "float32";
    case 1: return "float64";
    case 2: return "float16";
    case 3: return "uint8";
    case 4: return "int32";
    case 5: return "int8";
    case 6: return "int64";
    case 12: return "bfloat16";
    default: return "an unsupported dtype";
  }
}

bool is_low_precision(int flag) {
  return flag == static_cast<int>(DType::kFloat16) || flag == static_cast<int>(DType::kBfloat16);
}

std::string tensor_label(int t, const char* slot) {
  return std::string(slot) + " of tensor " + std::to_string(t);
}

// ---------------------------------------------------------------------------------- phase 1

const char* const kPhase1 = "mxlamb_phase1";
const char* const kPhase1SlotNames[kPhase1Slots] = {"weight", "grad", "mean", "var"};

MXReturnValue phase1_parse(const Attrs& attrs, int* num_in, int* num_out) {
  int n;
  if (!get_num_tensors(kPhase1, attrs, &n)) return MX_FAIL;
  *num_in = n * kPhase1Slots;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue phase1_type(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  const bool mp = get_bool(attrs, "multi_precision", false);
  for (size_t i = 0; i < in->size(); ++i) {
    const int slot = static_cast<int>(i % kPhase1Slots);
    const int flag = (*in)[i];
    const bool ok = slot == kGrad && mp ? is_low_precision(flag) : flag == 0;
    if (!ok) {
      fail(kPhase1, tensor_label(static_cast<int>(i / kPhase1Slots), kPhase1SlotNames[slot]) +
                        " is " + dtype_name(flag) + ", expected " +
                        (slot == kGrad && mp ? "float16 or bfloat16" : "float32"));
      return MX_FAIL;
    }
  }
  (*out)[0] = static_cast<int>(DType::kFloat64);
  return MX_SUCCESS;
}

MXReturnValue phase1_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                           std::vector<std::vector<unsigned int>>* out) {
  const int n = static_cast<int>(in->size()) / kPhase1Slots;
  for (int t = 0; t < n; ++t) {
    const auto& weight = (*in)[t * kPhase1Slots + kWeight];
    for (int slot = 1; slot < kPhase1Slots; ++slot) {
      if ((*in)[t * kPhase1Slots + slot] != weight) {
        fail(kPhase1, tensor_label(t, kPhase1SlotNames[slot]) + " has another shape than its weight");
        return MX_FAIL;
      }
    }
  }
  (*out)[0] = {static_cast<unsigned int>(n), 2u};
  return MX_SUCCESS;
}

MXReturnValue phase1_mutate(const Attrs& attrs, std::vector<int>* mutated) {
  int n;
  if (!get_num_tensors(kPhase1, attrs, &n)) return MX_FAIL;
  for (int t = 0; t < n; ++t) {
    mutated->push_back(t * kPhase1Slots + kMean);
    mutated->push_back(t * kPhase1Slots + kVar);
  }
  return MX_SUCCESS;
}

MXReturnValue phase1_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase1, attrs, &s)) return MX_FAIL;
  std::vector<Phase1Span> spans(s.n);
  for (int t = 0; t < s.n; ++t) {
    MXTensor* x = &(*in)[t * kPhase1Slots];
    spans[t] = Phase1Span{x[kWeight].data<float>(), x[kGrad].data_ptr, x[kMean].data<float>(),
                          x[kVar].data<float>(), x[kWeight].size(), dtype_of(x[kGrad])};
  }
  lamb_phase1_cpu(spans, s.step, s.tensors, (*out)[0].data<double>());
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------------- phase 2

const char* const kPhase2 = "mxlamb_phase2";
const char* const kPhase2SlotNames[kPhase2Slots] = {"weight", "mean", "var"};

MXReturnValue phase2_parse(const Attrs& attrs, int* num_in, int* num_out) {
  int n;
  if (!get_num_tensors(kPhase2, attrs, &n)) return MX_FAIL;
  *num_in = n * kPhase2Slots + 1;
  *num_out = n;
  return MX_SUCCESS;
}

MXReturnValue phase2_type(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  const bool mp = get_bool(attrs, "multi_precision", false);
  const int n = static_cast<int>(out->size());
  for (int i = 0; i < n * kPhase2Slots; ++i) {
    if ((*in)[i] != 0) {
      fail(kPhase2, tensor_label(i / kPhase2Slots, kPhase2SlotNames[i % kPhase2Slots]) + " is " +
                        dtype_name((*in)[i]) + ", expected float32");
      return MX_FAIL;
    }
  }
  if (in->back() != static_cast<int>(DType::kFloat64)) {
    fail(kPhase2, "sumsq must be the float64 output of mxlamb_phase1");
    return MX_FAIL;
  }
  // MXNet infers output types before it looks at out=, so the model weights' type under
  // multi-precision comes as an attribute (mshadow's flag: 2 float16, 12 bfloat16).
  double weight_dtype = 0;
  if (mp && (!get_double(kPhase2, attrs, "weight_dtype", -1, &weight_dtype) ||
             !is_low_precision(static_cast<int>(weight_dtype)))) {
    fail(kPhase2, "with multi_precision, attribute weight_dtype must be 2 (float16) or "
                  "12 (bfloat16)");
    return MX_FAIL;
  }
  for (int t = 0; t < n; ++t) (*out)[t] = static_cast<int>(weight_dtype);
  return MX_SUCCESS;
}

MXReturnValue phase2_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                           std::vector<std::vector<unsigned int>>* out) {
  const int n = static_cast<int>(out->size());
  for (int t = 0; t < n; ++t) {
    const auto& weight = (*in)[t * kPhase2Slots + kP2Weight];
    for (int slot = 1; slot < kPhase2Slots; ++slot) {
      if ((*in)[t * kPhase2Slots + slot] != weight) {
        fail(kPhase2, tensor_label(t, kPhase2SlotNames[slot]) + " has another shape than its weight");
        return MX_FAIL;
      }
    }
    (*out)[t] = weight;
  }
  const std::vector<unsigned int> expected = {static_cast<unsigned int>(n), 2u};
  if (in->back() != expected) {
    fail(kPhase2, "sumsq must have shape (num_tensors, 2)");
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

MXReturnValue phase2_mutate(const Attrs& attrs, std::vector<int>* mutated) {
  int n;
  if (!get_num_tensors(kPhase2, attrs, &n)) return MX_FAIL;
  // Under multi-precision the fp32 master copy is updated in place; without it the weight is
  // written through out= only.
  if (get_bool(attrs, "multi_precision", false)) {
    for (int t = 0; t < n; ++t) mutated->push_back(t * kPhase2Slots + kP2Weight);
  }
  return MX_SUCCESS;
}

MXReturnValue phase2_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase2, attrs, &s)) return MX_FAIL;
  std::vector<Phase2Span> spans(s.n);
  for (int t = 0; t < s.n; ++t) {
    MXTensor* x = &(*in)[t * kPhase2Slots];
    MXTensor& o = (*out)[t];
    float* master = x[kP2Weight].data<float>();
    spans[t] = s.multi_precision
                   ? Phase2Span{master, master, o.data_ptr, dtype_of(o), x[kP2Mean].data<float>(),
                                x[kP2Var].data<float>(), x[kP2Weight].size()}
                   : Phase2Span{master, o.data<float>(), nullptr, DType::kFloat32,
                                x[kP2Mean].data<float>(), x[kP2Var].data<float>(),
                                x[kP2Weight].size()};
  }
  lamb_phase2_cpu(spans, s.step, s.tensors, in->back().data<double>(), s.lower_bound,
                  s.upper_bound);
  return MX_SUCCESS;
}

#ifdef MXLAMB_WITH_CUDA
// ------------------------------------------------------------------------------------ GPU

// The group as the CUDA interface takes it; the vectors own the host-side pointer arrays.
struct CudaGroup {
  std::vector<float*> weights, means, vars;
  std::vector<const void*> grads;
  std::vector<void*> lowp;
  std::vector<int64_t> sizes, counts;
  std::vector<float> lrs, wds;
  MxlambCudaGroup group{};

  CudaGroup(const StepAttrs& s, const Attrs& attrs) {
    std::vector<double> count_values;
    get_list("mxlamb", attrs, "step_counts", s.n, &count_values);
    for (int t = 0; t < s.n; ++t) {
      lrs.push_back(s.tensors[t].lr);
      wds.push_back(s.tensors[t].wd);
      counts.push_back(static_cast<int64_t>(count_values[t]));
    }
    double beta1, beta2;
    get_double("mxlamb", attrs, "beta1", 0.9, &beta1);
    get_double("mxlamb", attrs, "beta2", 0.999, &beta2);
    group.num_tensors = s.n;
    group.lrs = lrs.data();
    group.wds = wds.data();
    group.step_counts = counts.data();
    group.beta1 = static_cast<float>(beta1);
    group.beta2 = static_cast<float>(beta2);
    group.epsilon = s.step.epsilon;
    group.rescale_grad = s.step.rescale_grad;
    group.clip_gradient = s.step.clip_gradient;
    group.bias_correction = get_bool(attrs, "bias_correction", true);
    group.lower_bound = s.lower_bound;
    group.upper_bound = s.upper_bound;
  }

  void finish() {
    group.weights = weights.data();
    group.grads = grads.empty() ? nullptr : grads.data();
    group.means = means.data();
    group.vars = vars.data();
    group.weights_lowp = lowp.empty() ? nullptr : lowp.data();
    group.sizes = sizes.data();
  }
};

bool cuda_ok(const char* op, int err) {
  if (err == 0) return true;
  return fail(op, "CUDA error " + std::to_string(err));
}

MXReturnValue phase1_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res) {
  StepAttrs s;
  if (!parse_step(kPhase1, attrs, &s)) return MX_FAIL;
  CudaGroup g(s, attrs);
  for (int t = 0; t < s.n; ++t) {
    MXTensor* x = &(*in)[t * kPhase1Slots];
    g.weights.push_back(x[kWeight].data<float>());
    g.grads.push_back(x[kGrad].data_ptr);
    g.means.push_back(x[kMean].data<float>());
    g.vars.push_back(x[kVar].data<float>());
    g.sizes.push_back(x[kWeight].size());
    g.group.grad_dtype = static_cast<int>(x[kGrad].dtype);
  }
  g.finish();
  const size_t bytes = mxlamb_cuda_workspace_bytes(&g.group);
  void* workspace = res.alloc_gpu(static_cast<int>(bytes));
  return cuda_ok(kPhase1, mxlamb_cuda_phase1(&g.group, (*out)[0].data<double>(), workspace, bytes,
                                             res.get_cuda_stream()))
             ? MX_SUCCESS
             : MX_FAIL;
}

MXReturnValue phase2_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res) {
  StepAttrs s;
  if (!parse_step(kPhase2, attrs, &s)) return MX_FAIL;
  CudaGroup g(s, attrs);
  g.group.lowp_dtype = s.multi_precision ? static_cast<int>((*out)[0].dtype) : 0;
  for (int t = 0; t < s.n; ++t) {
    MXTensor* x = &(*in)[t * kPhase2Slots];
    MXTensor& o = (*out)[t];
    // Without multi-precision the output is the fp32 weight; phase 2 reads and writes it.
    g.weights.push_back(s.multi_precision ? x[kP2Weight].data<float>() : o.data<float>());
    if (s.multi_precision) g.lowp.push_back(o.data_ptr);
    g.means.push_back(x[kP2Mean].data<float>());
    g.vars.push_back(x[kP2Var].data<float>());
    g.sizes.push_back(x[kP2Weight].size());
  }
  g.finish();
  const size_t bytes = mxlamb_cuda_workspace_bytes(&g.group);
  void* workspace = res.alloc_gpu(static_cast<int>(bytes));
  return cuda_ok(kPhase2, mxlamb_cuda_phase2(&g.group, in->back().data<double>(), workspace,
                                             bytes, res.get_cuda_stream()))
             ? MX_SUCCESS
             : MX_FAIL;
}
#endif  // MXLAMB_WITH_CUDA

}  // namespace
}  // namespace mxlamb

REGISTER_OP(mxlamb_phase1)
    .setParseAttrs(mxlamb::phase1_parse)
    .setInferType(mxlamb::phase1_type)
    .setInferShape(mxlamb::phase1_shape)
    .setMutateInputs(mxlamb::phase1_mutate)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::phase1_forward_gpu, "gpu")
#endif
    .setForward(mxlamb::phase1_forward, "cpu");

REGISTER_OP(mxlamb_phase2)
    .setParseAttrs(mxlamb::phase2_parse)
    .setInferType(mxlamb::phase2_type)
    .setInferShape(mxlamb::phase2_shape)
    .setMutateInputs(mxlamb::phase2_mutate)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::phase2_forward_gpu, "gpu")
#endif
    .setForward(mxlamb::phase2_forward, "cpu");

// Called by mx.library.load: refuse an MXNet other than the one this library was built for
// (the Python loader checks first and raises an ImportError that says what to run).
MXReturnValue initialize(int version) {
  if (version != MXLAMB_MXNET_VERSION) {
    MX_ERROR_MSG << "mxlamb operators were built for MXNet " << MXLAMB_MXNET_VERSION
                 << " but are being loaded into MXNet " << version
                 << "; rebuild with: pip install --no-build-isolation --force-reinstall .";
    return MX_FAIL;
  }
  return MX_SUCCESS;
}
