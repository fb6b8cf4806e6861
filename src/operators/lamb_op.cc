// MXNet operator registrations (lib_api.h) for the multi-tensor LAMB step.
//
//   mxlamb_phase1(w_0, g_0, m_0, v_0, [vmax_0], ..., [grad_sumsq, control], [counts])
//       -> sumsq (N, 2) float64: [sum(w_t^2), sum(u_t^2)]; m, v (and vmax) updated in place.
//   mxlamb_phase2(w_0, m_0, v_0, [ema_0], ..., sumsq, [control], [counts], out=weights)
//       -> weights updated with lr * trust_ratio * u (and the EMA after them).
//   mxlamb_step(w_0, g_0, m_0, v_0, [w16_0], ...) -> sumsq (N, 2) float64
//       phase 1 and phase 2 in one call (the plain step: none of the optional inputs below),
//       back to back per batch of tensors that fits in cache; w (the fp32 weight or master
//       copy), m, v and, under multi_precision, the fp16 model weight w16 updated in place.
//   mxlamb_step(w_0, g_0, [w16_0], ..., moments, moments_offset=K) -> the same, with every
//       tensor's m and v packed in one array (see StepLayout).
//   mxlamb_grad_stats(g_0, ..., g_{P-1}, step_state)
//       -> grad_sumsq (P,) float64 and control (2,) float64 = [gradient multiplier, apply];
//          step_state (3,) float64 = [loss scale, clean steps, skipped steps] updated.
//   mxlamb_trust_ratio(sumsq) -> (N,) float64, the ratios phase 2 applied (read on request).
//
// w is the fp32 weight, or under multi_precision the fp32 master copy (then g is the fp16 or
// fp32 gradient, phase 2 updates the master in place and writes the rounded fp16 model weight
// to out, whose type the attribute weight_dtype gives). MXNet's extension API (1.9.1 and
// 2.0.0b1) passes no bfloat16 array to a library operator: the type checks refuse it. Per-tensor
// values (lrs, wds, step_counts, layer_adaptation, stat_rows, count_slots) are comma-separated
// lists.
//
// The optional inputs, each switched on by an attribute:
//   amsgrad=1           vmax per tensor (phase 1 updates it; phase 2 gets it as its v)
//   use_ema=1           the weight average per tensor (phase 2)
//   has_stats=1         grad_sumsq and control from mxlamb_grad_stats: the gradient multiplier
//                       (loss unscaling, global clipping) and whether the step applies; a
//                       skipped step leaves every array untouched
//   device_counts=1     counts: per-parameter applied-step counts (float64), slots count_slots;
//                       phase 1 increments them for an applied step, so t skips skipped steps
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

// "(0.1, 0.2)", "[0.1,0.2]" or "0.1,0.2" -> {0.1, 0.2}; exactly n values, or one value that
// stands for all n (what the optimizer sends when every tensor has the same lr, wd or count).
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
  if (out->size() == 1 && n > 1) out->assign(n, out->front());
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

bool get_flags(const std::string& op, const Attrs& attrs, const char* key, int n,
               std::vector<char>* out) {
  out->assign(n, 1);
  if (attrs.find(key) == attrs.end()) return true;
  std::vector<double> values;
  if (!get_list(op, attrs, key, n, &values)) return false;
  for (int t = 0; t < n; ++t) (*out)[t] = values[t] != 0.0;
  return true;
}

// Which inputs a phase operator has, from its attributes.
struct Layout {
  int n = 0;             // tensors
  int slots = 0;         // inputs per tensor
  int grad_sumsq = -1;   // input positions of the trailing inputs (-1: absent)
  int control = -1;
  int counts = -1;
  int sumsq = -1;        // phase 2 only
  int total = 0;
};

bool layout_of(const std::string& op, const Attrs& attrs, bool phase1, Layout* l) {
  if (!get_num_tensors(op, attrs, &l->n)) return false;
  if (phase1) {
    l->slots = 4 + (get_bool(attrs, "amsgrad", false) ? 1 : 0);
  } else {
    l->slots = 3 + (get_bool(attrs, "use_ema", false) ? 1 : 0);
  }
  int next = l->n * l->slots;
  if (!phase1) l->sumsq = next++;
  if (get_bool(attrs, "has_stats", false)) {
    if (phase1) l->grad_sumsq = next++;
    l->control = next++;
  }
  if (get_bool(attrs, "device_counts", false)) l->counts = next++;
  l->total = next;
  return true;
}

// Phase 1 slots
constexpr int kWeight = 0, kGrad = 1, kMean = 2, kVar = 3, kVarMax = 4;
// Phase 2 slots
constexpr int kP2Weight = 0, kP2Mean = 1, kP2Var = 2, kP2Average = 3;

struct StepAttrs {
  Layout layout;
  LambParams params;
  bool multi_precision = false;
  bool amsgrad = false;
  double rescale = 1.0, clipnorm = -1.0, ema_momentum = 0.99;
  std::vector<double> lrs, wds, counts;    // counts: host step counts (without device_counts)
  std::vector<double> stat_rows, count_slots;
  std::vector<char> layer_adaptation;
};

// Reads the attributes both phases share.
bool parse_step(const std::string& op, const Attrs& attrs, bool phase1, StepAttrs* s) {
  Layout& l = s->layout;
  LambParams& p = s->params;
  if (!layout_of(op, attrs, phase1, &l) || !get_double(op, attrs, "beta1", 0.9, &p.beta1) ||
      !get_double(op, attrs, "beta2", 0.999, &p.beta2) ||
      !get_double(op, attrs, "epsilon", 1e-6, &p.epsilon) ||
      !get_double(op, attrs, "rescale_grad", 1.0, &s->rescale) ||
      !get_double(op, attrs, "clip_gradient", -1.0, &p.clip_gradient) ||
      !get_double(op, attrs, "clipnorm", -1.0, &s->clipnorm) ||
      !get_double(op, attrs, "ema_momentum", 0.99, &s->ema_momentum) ||
      !get_double(op, attrs, "lower_bound", -1.0, &p.lower_bound) ||
      !get_double(op, attrs, "upper_bound", -1.0, &p.upper_bound) ||
      !get_list(op, attrs, "lrs", l.n, &s->lrs) || !get_list(op, attrs, "wds", l.n, &s->wds) ||
      !get_flags(op, attrs, "layer_adaptation", l.n, &s->layer_adaptation)) {
    return false;
  }
  if (l.counts >= 0 ? !get_list(op, attrs, "count_slots", l.n, &s->count_slots)
                    : !get_list(op, attrs, "step_counts", l.n, &s->counts)) {
    return false;
  }
  if (l.grad_sumsq >= 0 && !get_list(op, attrs, "stat_rows", l.n, &s->stat_rows)) return false;
  for (double c : s->counts) {
    if (!(c >= 1)) return fail(op, "step_counts must be >= 1");
  }
  s->multi_precision = get_bool(attrs, "multi_precision", false);
  s->amsgrad = get_bool(attrs, "amsgrad", false);
  p.bias_correction = get_bool(attrs, "bias_correction", true);
  p.epsilon_hat = get_bool(attrs, "epsilon_hat", false);
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

bool is_half(int flag) { return flag == static_cast<int>(DType::kFloat16); }

std::string tensor_label(int t, const char* slot) {
  return std::string(slot) + " of tensor " + std::to_string(t);
}

constexpr int kFloat32Flag = static_cast<int>(DType::kFloat32);
constexpr int kFloat64Flag = static_cast<int>(DType::kFloat64);

// The math type of an operator call (see lamb_math.h) is its first weight's type: float32 or
// float64, and float32 under multi_precision (the weights are then the float32 master copies).
// Every other weight, moment and state of the call has that type; so has every gradient, but
// for a float16 one under multi_precision.
bool math_type_of(const char* op, const std::vector<int>& in, bool multi_precision, int* math) {
  *math = in[0];
  if (*math == kFloat32Flag || (*math == kFloat64Flag && !multi_precision)) return true;
  return fail(op, tensor_label(0, "weight") + " is " + dtype_name(*math) + ", expected " +
                      (multi_precision ? "float32 (the master copy, under multi_precision)"
                                       : "float32 or float64"));
}

bool is_float64(const MXTensor& t) { return dtype_of(t) == DType::kFloat64; }


// Type and shape checks of the trailing float64 inputs that phase 1 and phase 2 share.
bool check_trailing_types(const char* op, const Layout& l, const std::vector<int>& in) {
  const int64_t kF64 = static_cast<int>(DType::kFloat64);
  for (int i = l.n * l.slots; i < l.total; ++i) {
    if (in[i] != kF64) {
      const char* what = i == l.sumsq ? "sumsq" : i == l.grad_sumsq ? "grad_sumsq"
                         : i == l.control ? "control" : "counts";
      return fail(op, std::string(what) + " is " + dtype_name(in[i]) + ", expected float64");
    }
  }
  return true;
}

bool check_trailing_shapes(const char* op, const Layout& l,
                           const std::vector<std::vector<unsigned int>>& in) {
  if (l.grad_sumsq >= 0 && in[l.grad_sumsq].size() != 1) {
    return fail(op, "grad_sumsq must be the 1-d output of mxlamb_grad_stats");
  }
  if (l.control >= 0 && in[l.control] != std::vector<unsigned int>{2u}) {
    return fail(op, "control must be the (2,) output of mxlamb_grad_stats");
  }
  if (l.counts >= 0 && in[l.counts].size() != 1) return fail(op, "counts must be 1-d");
  if (l.sumsq >= 0 && in[l.sumsq] != std::vector<unsigned int>{static_cast<unsigned>(l.n), 2u}) {
    return fail(op, "sumsq must have shape (num_tensors, 2)");
  }
  return true;
}

// Every tensor slot must have its weight's shape.
bool check_slot_shapes(const char* op, const Layout& l, const char* const* names,
                       const std::vector<std::vector<unsigned int>>& in) {
  for (int t = 0; t < l.n; ++t) {
    const auto& weight = in[t * l.slots];
    for (int slot = 1; slot < l.slots; ++slot) {
      if (in[t * l.slots + slot] != weight) {
        return fail(op, tensor_label(t, names[slot]) + " has another shape than its weight");
      }
    }
  }
  return true;
}

// Row `value` of a table of `size` rows, or an error naming the attribute.
bool check_index(const char* op, const char* key, double value, int64_t size, int64_t* out) {
  if (!(value >= 0) || value != std::floor(value) || value >= static_cast<double>(size)) {
    return fail(op, std::string("attribute ") + key + " has " + std::to_string(value) +
                        ", outside a table of " + std::to_string(size));
  }
  *out = static_cast<int64_t>(value);
  return true;
}

// Whether the step applies, and the gradient multiplier before per-tensor clipping.
struct StepControl {
  bool apply = true;
  double multiplier = 1.0;
};

StepControl step_control(const StepAttrs& s, std::vector<MXTensor>& in) {
  StepControl c;
  c.multiplier = s.rescale;
  if (s.layout.control >= 0) {
    const double* control = in[s.layout.control].data<double>();
    c.multiplier = control[0];
    c.apply = control[1] != 0.0;
  }
  return c;
}

// Slots of the device step counts, range-checked.
bool count_slots(const char* op, const StepAttrs& s, std::vector<MXTensor>& in,
                 std::vector<int64_t>* slots) {
  if (s.layout.counts < 0) return true;
  const int64_t size = in[s.layout.counts].size();
  slots->resize(s.layout.n);
  for (int t = 0; t < s.layout.n; ++t) {
    if (!check_index(op, "count_slots", s.count_slots[t], size, &(*slots)[t])) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------- phase 1

const char* const kPhase1 = "mxlamb_phase1";
const char* const kPhase1SlotNames[] = {"weight", "grad", "mean", "var", "vmax"};

MXReturnValue phase1_parse(const Attrs& attrs, int* num_in, int* num_out) {
  Layout l;
  if (!layout_of(kPhase1, attrs, true, &l)) return MX_FAIL;
  *num_in = l.total;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue phase1_type(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  Layout l;
  int math;
  const bool mp = get_bool(attrs, "multi_precision", false);
  if (!layout_of(kPhase1, attrs, true, &l) || !math_type_of(kPhase1, *in, mp, &math)) {
    return MX_FAIL;
  }
  for (int i = 0; i < l.n * l.slots; ++i) {
    const int slot = i % l.slots;
    const int flag = (*in)[i];
    // Under multi-precision the gradient is the model's type, or float32 (accumulated).
    const bool ok = slot == kGrad && mp ? is_half(flag) || flag == kFloat32Flag
                                        : flag == math;
    if (!ok) {
      fail(kPhase1, tensor_label(i / l.slots, kPhase1SlotNames[slot]) + " is " +
                        dtype_name(flag) + ", expected " +
                        (slot == kGrad && mp ? "float16 or float32" : dtype_name(math)));
      return MX_FAIL;
    }
  }
  if (!check_trailing_types(kPhase1, l, *in)) return MX_FAIL;
  (*out)[0] = static_cast<int>(DType::kFloat64);
  return MX_SUCCESS;
}

MXReturnValue phase1_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                           std::vector<std::vector<unsigned int>>* out) {
  Layout l;
  if (!layout_of(kPhase1, attrs, true, &l) ||
      !check_slot_shapes(kPhase1, l, kPhase1SlotNames, *in) ||
      !check_trailing_shapes(kPhase1, l, *in)) {
    return MX_FAIL;
  }
  (*out)[0] = {static_cast<unsigned int>(l.n), 2u};
  return MX_SUCCESS;
}

MXReturnValue phase1_mutate(const Attrs& attrs, std::vector<int>* mutated) {
  Layout l;
  if (!layout_of(kPhase1, attrs, true, &l)) return MX_FAIL;
  for (int t = 0; t < l.n; ++t) {
    for (int slot = kMean; slot < l.slots; ++slot) mutated->push_back(t * l.slots + slot);
  }
  if (l.counts >= 0) mutated->push_back(l.counts);
  return MX_SUCCESS;
}

template <typename T>
MXReturnValue phase1_forward_typed(const StepAttrs& s, std::vector<MXTensor>* in,
                                   std::vector<MXTensor>* out) {
  const Layout& l = s.layout;
  double* sumsq = (*out)[0].data<double>();
  const StepControl control = step_control(s, *in);
  if (!control.apply) {
    // A skipped step touches nothing; its trust ratios read as NaN.
    for (int i = 0; i < 2 * l.n; ++i) sumsq[i] = std::nan("");
    return MX_SUCCESS;
  }
  if (s.clipnorm > 0 && l.grad_sumsq < 0) {
    fail(kPhase1, "clipnorm needs has_stats=1 (the gradients' sums of squares)");
    return MX_FAIL;
  }
  std::vector<int64_t> slots, rows(l.n);
  if (!count_slots(kPhase1, s, *in, &slots)) return MX_FAIL;
  const double* grad_sumsq = nullptr;
  if (l.grad_sumsq >= 0) {
    grad_sumsq = (*in)[l.grad_sumsq].data<double>();
    const int64_t size = (*in)[l.grad_sumsq].size();
    for (int t = 0; t < l.n; ++t) {
      if (!check_index(kPhase1, "stat_rows", s.stat_rows[t], size, &rows[t])) return MX_FAIL;
    }
  }
  double* counts = l.counts >= 0 ? (*in)[l.counts].data<double>() : nullptr;
  std::vector<TensorCoeffs<T>> coeffs(l.n);
  std::vector<Phase1Span<T>> spans(l.n);
  for (int t = 0; t < l.n; ++t) {
    double count = counts != nullptr ? counts[slots[t]] + 1.0 : s.counts[t];
    if (counts != nullptr) counts[slots[t]] = count;
    const double grad_scale =
        grad_sumsq != nullptr ? gradient_scale(control.multiplier, grad_sumsq[rows[t]], s.clipnorm)
                              : control.multiplier;
    coeffs[t] = tensor_coeffs<T>(s.params, count, s.lrs[t], s.wds[t], grad_scale);
    MXTensor* x = &(*in)[t * l.slots];
    spans[t] = Phase1Span<T>{x[kWeight].data<T>(),
                             x[kGrad].data_ptr,
                             x[kMean].data<T>(),
                             x[kVar].data<T>(),
                             s.amsgrad ? x[kVarMax].data<T>() : nullptr,
                             x[kWeight].size(),
                             dtype_of(x[kGrad])};
  }
  lamb_phase1_cpu(spans, step_coeffs<T>(s.params), coeffs, sumsq);
  return MX_SUCCESS;
}

MXReturnValue phase1_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase1, attrs, true, &s)) return MX_FAIL;
  return is_float64((*in)[0]) ? phase1_forward_typed<double>(s, in, out)
                              : phase1_forward_typed<float>(s, in, out);
}

// ---------------------------------------------------------------------------------- phase 2

const char* const kPhase2 = "mxlamb_phase2";
const char* const kPhase2SlotNames[] = {"weight", "mean", "var", "average"};

MXReturnValue phase2_parse(const Attrs& attrs, int* num_in, int* num_out) {
  Layout l;
  if (!layout_of(kPhase2, attrs, false, &l)) return MX_FAIL;
  *num_in = l.total;
  *num_out = l.n;
  return MX_SUCCESS;
}

MXReturnValue phase2_type(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  Layout l;
  int math;
  const bool mp = get_bool(attrs, "multi_precision", false);
  if (!layout_of(kPhase2, attrs, false, &l) || !math_type_of(kPhase2, *in, mp, &math)) {
    return MX_FAIL;
  }
  for (int i = 0; i < l.n * l.slots; ++i) {
    if ((*in)[i] != math) {
      fail(kPhase2, tensor_label(i / l.slots, kPhase2SlotNames[i % l.slots]) + " is " +
                        dtype_name((*in)[i]) + ", expected " + dtype_name(math));
      return MX_FAIL;
    }
  }
  if (!check_trailing_types(kPhase2, l, *in)) return MX_FAIL;
  // MXNet infers output types before it looks at out=, so the model weights' type under
  // multi-precision comes as an attribute (mshadow's flag: 2, float16). Without it the outputs
  // are the weights, of the math type.
  double weight_dtype = math;
  if (mp && (!get_double(kPhase2, attrs, "weight_dtype", -1, &weight_dtype) ||
             !is_half(static_cast<int>(weight_dtype)))) {
    fail(kPhase2, "with multi_precision, attribute weight_dtype must be 2 (float16)");
    return MX_FAIL;
  }
  for (int t = 0; t < l.n; ++t) (*out)[t] = static_cast<int>(weight_dtype);
  return MX_SUCCESS;
}

MXReturnValue phase2_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                           std::vector<std::vector<unsigned int>>* out) {
  Layout l;
  if (!layout_of(kPhase2, attrs, false, &l) ||
      !check_slot_shapes(kPhase2, l, kPhase2SlotNames, *in) ||
      !check_trailing_shapes(kPhase2, l, *in)) {
    return MX_FAIL;
  }
  for (int t = 0; t < l.n; ++t) (*out)[t] = (*in)[t * l.slots + kP2Weight];
  return MX_SUCCESS;
}

MXReturnValue phase2_mutate(const Attrs& attrs, std::vector<int>* mutated) {
  Layout l;
  if (!layout_of(kPhase2, attrs, false, &l)) return MX_FAIL;
  // Under multi-precision the fp32 master copy is updated in place; without it the weight is
  // written through out= only.
  const bool mp = get_bool(attrs, "multi_precision", false);
  for (int t = 0; t < l.n; ++t) {
    if (mp) mutated->push_back(t * l.slots + kP2Weight);
    if (l.slots > kP2Average) mutated->push_back(t * l.slots + kP2Average);
  }
  return MX_SUCCESS;
}

template <typename T>
MXReturnValue phase2_forward_typed(const StepAttrs& s, std::vector<MXTensor>* in,
                                   std::vector<MXTensor>* out) {
  const Layout& l = s.layout;
  if (!step_control(s, *in).apply) return MX_SUCCESS;  // skipped: nothing is written
  std::vector<int64_t> slots;
  if (!count_slots(kPhase2, s, *in, &slots)) return MX_FAIL;
  const double* counts = l.counts >= 0 ? (*in)[l.counts].data<double>() : nullptr;
  const double* sumsq = (*in)[l.sumsq].data<double>();
  const StepCoeffs<T> step = step_coeffs<T>(s.params);
  std::vector<TensorCoeffs<T>> coeffs(l.n);
  std::vector<T> step_sizes(l.n);
  std::vector<Phase2Span<T>> spans(l.n);
  for (int t = 0; t < l.n; ++t) {
    // Phase 1 has already counted this step in the device counts. The gradient multiplier
    // plays no part in phase 2.
    const double count = counts != nullptr ? counts[slots[t]] : s.counts[t];
    coeffs[t] = tensor_coeffs<T>(s.params, count, s.lrs[t], s.wds[t], s.rescale);
    step_sizes[t] = step_size(step, coeffs[t], sumsq[2 * t], sumsq[2 * t + 1],
                              s.layer_adaptation[t] != 0);
    MXTensor* x = &(*in)[t * l.slots];
    MXTensor& o = (*out)[t];
    T* master = x[kP2Weight].data<T>();
    T* average = l.slots > kP2Average ? x[kP2Average].data<T>() : nullptr;
    spans[t] = s.multi_precision
                   ? Phase2Span<T>{master, master, static_cast<half_t*>(o.data_ptr),
                                   x[kP2Mean].data<T>(), x[kP2Var].data<T>(), average,
                                   x[kP2Weight].size()}
                   : Phase2Span<T>{master, o.data<T>(), nullptr, x[kP2Mean].data<T>(),
                                   x[kP2Var].data<T>(), average, x[kP2Weight].size()};
  }
  lamb_phase2_cpu(spans, step, coeffs, step_sizes, ema_coeffs<T>(s.ema_momentum));
  return MX_SUCCESS;
}

MXReturnValue phase2_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase2, attrs, false, &s)) return MX_FAIL;
  return is_float64((*in)[0]) ? phase2_forward_typed<double>(s, in, out)
                              : phase2_forward_typed<float>(s, in, out);
}

// ------------------------------------------------------------------------ phase 1 + phase 2

const char* const kStep = "mxlamb_step";
const char* const kStepSlotNames[] = {"weight", "grad", "mean", "var", "model weight"};
const char* const kPackedSlotNames[] = {"weight", "grad", "model weight"};

// Which inputs mxlamb_step has. Per tensor: w, g, m, v (and w16 under multi_precision); or,
// with the attribute moments_offset, w, g (and w16) per tensor and one float32 array of
// packed moments last: tensor t's mean is the n_t elements at offset_t, its var the n_t after
// them, offset_0 = moments_offset and offset_{t+1} = offset_t + 2 n_t (the layout in which
// the optimizer allocates the moments of small parameters: one array for the whole group
// instead of two per tensor, and each array is a cost in every operator call).
struct StepLayout {
  int n = 0;
  int slots = 0;     // inputs per tensor
  int lowp = -1;     // slot of the fp16 model weight, or -1
  bool packed = false;
  int64_t moments_offset = 0;
  int total() const { return n * slots + (packed ? 1 : 0); }
  int moments() const { return n * slots; }  // input position of the packed moments
};

// The fused step takes none of the optional inputs: refuse their attributes by name.
bool step_layout(const Attrs& attrs, StepLayout* l) {
  for (const char* option : {"amsgrad", "use_ema", "has_stats", "device_counts"}) {
    if (get_bool(attrs, option, false)) {
      return fail(kStep, std::string(option) + " is not supported by " + kStep +
                             "; use mxlamb_phase1 and mxlamb_phase2");
    }
  }
  if (!get_num_tensors(kStep, attrs, &l->n)) return false;
  const bool mp = get_bool(attrs, "multi_precision", false);
  l->packed = attrs.find("moments_offset") != attrs.end();
  if (l->packed) {
    double offset;
    if (!get_double(kStep, attrs, "moments_offset", 0.0, &offset) || !(offset >= 0) ||
        offset != std::floor(offset)) {
      return fail(kStep, "attribute moments_offset must be an integer >= 0");
    }
    l->moments_offset = static_cast<int64_t>(offset);
  }
  l->slots = (l->packed ? 2 : 4) + (mp ? 1 : 0);
  l->lowp = mp ? l->slots - 1 : -1;
  return true;
}

const char* step_slot_name(const StepLayout& l, int slot) {
  return l.packed ? kPackedSlotNames[slot == l.lowp ? 2 : slot] : kStepSlotNames[slot];
}

MXReturnValue step_parse(const Attrs& attrs, int* num_in, int* num_out) {
  StepLayout l;
  if (!step_layout(attrs, &l)) return MX_FAIL;
  *num_in = l.total();
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue step_type(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  StepLayout l;
  int math;
  if (!step_layout(attrs, &l)) return MX_FAIL;
  const bool mp = l.lowp >= 0;
  if (!math_type_of(kStep, *in, mp, &math)) return MX_FAIL;
  for (int i = 0; i < l.n * l.slots; ++i) {
    const int slot = i % l.slots;
    const int flag = (*in)[i];
    const bool ok = slot == l.lowp ? is_half(flag)
                    : slot == kGrad && mp ? is_half(flag) || flag == kFloat32Flag
                                          : flag == math;
    if (!ok) {
      fail(kStep, tensor_label(i / l.slots, step_slot_name(l, slot)) + " is " +
                      dtype_name(flag) + ", expected " +
                      (slot == l.lowp ? "float16"
                       : slot == kGrad && mp ? "float16 or float32"
                                             : dtype_name(math)));
      return MX_FAIL;
    }
  }
  if (l.packed && (*in)[l.moments()] != math) {
    fail(kStep, std::string("the packed moments are ") + dtype_name((*in)[l.moments()]) +
                    ", expected " + dtype_name(math));
    return MX_FAIL;
  }
  (*out)[0] = static_cast<int>(DType::kFloat64);
  return MX_SUCCESS;
}

MXReturnValue step_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  StepLayout l;
  if (!step_layout(attrs, &l)) return MX_FAIL;
  for (int t = 0; t < l.n; ++t) {
    const auto& weight = (*in)[t * l.slots];
    for (int slot = 1; slot < l.slots; ++slot) {
      if ((*in)[t * l.slots + slot] != weight) {
        fail(kStep, tensor_label(t, step_slot_name(l, slot)) + " has another shape than its "
                    "weight");
        return MX_FAIL;
      }
    }
  }
  if (l.packed) {
    int64_t needed = l.moments_offset;
    for (int t = 0; t < l.n; ++t) {
      int64_t size = 1;
      for (unsigned int d : (*in)[t * l.slots]) size *= d;
      needed += 2 * size;
    }
    const auto& moments = (*in)[l.moments()];
    int64_t have = 1;
    for (unsigned int d : moments) have *= d;
    if (moments.size() != 1 || have < needed) {
      fail(kStep, "the packed moments must be one-dimensional with at least " +
                      std::to_string(needed) + " elements (moments_offset " +
                      std::to_string(l.moments_offset) + " plus mean and var of every tensor), "
                      "got " + std::to_string(have) + " in " + std::to_string(moments.size()) +
                      " dimension(s)");
      return MX_FAIL;
    }
  }
  (*out)[0] = {static_cast<unsigned int>(l.n), 2u};
  return MX_SUCCESS;
}

MXReturnValue step_mutate(const Attrs& attrs, std::vector<int>* mutated) {
  StepLayout l;
  if (!step_layout(attrs, &l)) return MX_FAIL;
  for (int t = 0; t < l.n; ++t) {
    for (int slot = 0; slot < l.slots; ++slot) {
      if (slot != kGrad) mutated->push_back(t * l.slots + slot);
    }
  }
  if (l.packed) mutated->push_back(l.moments());
  return MX_SUCCESS;
}

template <typename T>
MXReturnValue step_forward_typed(const StepLayout& l, const StepAttrs& s,
                                 std::vector<MXTensor>* in, std::vector<MXTensor>* out) {
  const int n = l.n;
  double* sumsq = (*out)[0].data<double>();
  T* packed = l.packed ? (*in)[l.moments()].data<T>() + l.moments_offset : nullptr;
  const StepCoeffs<T> step = step_coeffs<T>(s.params);
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<Phase1Span<T>> first(n);
  std::vector<Phase2Span<T>> second(n);
  for (int t = 0; t < n; ++t) {
    coeffs[t] = tensor_coeffs<T>(s.params, s.counts[t], s.lrs[t], s.wds[t], s.rescale);
    MXTensor* x = &(*in)[t * l.slots];
    T* weight = x[kWeight].data<T>();
    const int64_t size = x[kWeight].size();
    T* mean;
    T* var;
    if (l.packed) {
      mean = packed;
      var = packed + size;
      packed += 2 * size;
    } else {
      mean = x[kMean].data<T>();
      var = x[kVar].data<T>();
    }
    first[t] = Phase1Span<T>{weight, x[kGrad].data_ptr, mean, var, nullptr, size,
                             dtype_of(x[kGrad])};
    half_t* model_weight = l.lowp >= 0 ? static_cast<half_t*>(x[l.lowp].data_ptr) : nullptr;
    second[t] = Phase2Span<T>{weight, weight, model_weight, mean, var, nullptr, size};
  }
  lamb_step_cpu(first, second, step, coeffs,
                [&](int t, double weight_sumsq, double update_sumsq) {
                  return step_size(step, coeffs[t], weight_sumsq, update_sumsq,
                                   s.layer_adaptation[t] != 0);
                },
                sumsq);
  return MX_SUCCESS;
}

MXReturnValue step_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                           std::vector<MXTensor>* out, const OpResource&) {
  StepLayout l;
  StepAttrs s;
  if (!step_layout(attrs, &l) || !parse_step(kStep, attrs, true, &s)) return MX_FAIL;
  return is_float64((*in)[0]) ? step_forward_typed<double>(l, s, in, out)
                              : step_forward_typed<float>(l, s, in, out);
}

// ----------------------------------------------------------------------------- grad stats

const char* const kGradStats = "mxlamb_grad_stats";
constexpr int kLossScale = 0, kCleanSteps = 1, kSkippedSteps = 2;

MXReturnValue grad_stats_parse(const Attrs& attrs, int* num_in, int* num_out) {
  int n;
  if (!get_num_tensors(kGradStats, attrs, &n)) return MX_FAIL;
  *num_in = n + 1;
  *num_out = 2;
  return MX_SUCCESS;
}

MXReturnValue grad_stats_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  const int n = static_cast<int>(in->size()) - 1;
  for (int t = 0; t < n; ++t) {
    const int flag = (*in)[t];
    if (flag != kFloat32Flag && flag != kFloat64Flag && !is_half(flag)) {
      fail(kGradStats, tensor_label(t, "grad") + " is " + dtype_name(flag) +
                           ", expected float32, float64 or float16");
      return MX_FAIL;
    }
  }
  if (in->back() != static_cast<int>(DType::kFloat64)) {
    fail(kGradStats, "step_state must be float64");
    return MX_FAIL;
  }
  (*out)[0] = (*out)[1] = static_cast<int>(DType::kFloat64);
  return MX_SUCCESS;
}

MXReturnValue grad_stats_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                               std::vector<std::vector<unsigned int>>* out) {
  if (in->back() != std::vector<unsigned int>{3u}) {
    fail(kGradStats, "step_state must have shape (3,)");
    return MX_FAIL;
  }
  (*out)[0] = {static_cast<unsigned int>(in->size() - 1)};
  (*out)[1] = {2u};
  return MX_SUCCESS;
}

MXReturnValue grad_stats_mutate(const Attrs& attrs, std::vector<int>* mutated) {
  int n;
  if (!get_num_tensors(kGradStats, attrs, &n)) return MX_FAIL;
  mutated->push_back(n);
  return MX_SUCCESS;
}

// One step's gradient statistics, before any phase 1 of the step:
//   base     = rescale_grad / loss scale (the dynamic one from step_state, if on)
//   control  = [base * clip_factor(base * ||g||, global_clipnorm), apply]
// A step whose gradients are not all finite is skipped (apply = 0) when skip_nonfinite or
// dynamic loss scaling is on, and counted in step_state. Dynamic loss scaling halves the
// scale (not below 1) on such a step and doubles it after growth_interval clean steps.
MXReturnValue grad_stats_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource&) {
  int n;
  double rescale, global_clipnorm, growth_interval;
  if (!get_num_tensors(kGradStats, attrs, &n) ||
      !get_double(kGradStats, attrs, "rescale_grad", 1.0, &rescale) ||
      !get_double(kGradStats, attrs, "global_clipnorm", -1.0, &global_clipnorm) ||
      !get_double(kGradStats, attrs, "growth_interval", 0.0, &growth_interval)) {
    return MX_FAIL;
  }
  const bool dynamic = growth_interval > 0;
  const bool skip_nonfinite = get_bool(attrs, "skip_nonfinite", false) || dynamic;
  std::vector<GradSpan> grads(n);
  for (int t = 0; t < n; ++t) {
    grads[t] = GradSpan{(*in)[t].data_ptr, (*in)[t].size(), dtype_of((*in)[t])};
  }
  double* grad_sumsq = (*out)[0].data<double>();
  grad_sumsq_cpu(grads, grad_sumsq);
  double total = 0.0;
  for (int t = 0; t < n; ++t) total += grad_sumsq[t];
  const bool finite = std::isfinite(total);

  double* state = in->back().data<double>();
  const double base = dynamic ? rescale / state[kLossScale] : rescale;
  double* control = (*out)[1].data<double>();
  control[0] = base * clip_factor(base * std::sqrt(total), global_clipnorm);
  control[1] = finite || !skip_nonfinite ? 1.0 : 0.0;
  if (control[1] == 0.0) state[kSkippedSteps] += 1.0;
  if (dynamic) {
    if (!finite) {
      state[kLossScale] = std::fmax(state[kLossScale] / 2.0, 1.0);
      state[kCleanSteps] = 0.0;
    } else if ((state[kCleanSteps] += 1.0) >= growth_interval) {
      state[kLossScale] *= 2.0;
      state[kCleanSteps] = 0.0;
    }
  }
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------- trust ratio

const char* const kTrustRatio = "mxlamb_trust_ratio";

MXReturnValue trust_ratio_parse(const Attrs& attrs, int* num_in, int* num_out) {
  int n;
  if (!get_num_tensors(kTrustRatio, attrs, &n)) return MX_FAIL;
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue trust_ratio_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  if ((*in)[0] != static_cast<int>(DType::kFloat64)) {
    fail(kTrustRatio, "sumsq must be the float64 output of mxlamb_phase1");
    return MX_FAIL;
  }
  (*out)[0] = static_cast<int>(DType::kFloat64);
  return MX_SUCCESS;
}

MXReturnValue trust_ratio_shape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                                std::vector<std::vector<unsigned int>>* out) {
  int n;
  if (!get_num_tensors(kTrustRatio, attrs, &n)) return MX_FAIL;
  if ((*in)[0] != std::vector<unsigned int>{static_cast<unsigned>(n), 2u}) {
    fail(kTrustRatio, "sumsq must have shape (num_tensors, 2)");
    return MX_FAIL;
  }
  (*out)[0] = {static_cast<unsigned int>(n)};
  return MX_SUCCESS;
}

// The ratio phase 2 multiplied lr by (1 where layer adaptation is off; NaN for a skipped step).
MXReturnValue trust_ratio_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                  std::vector<MXTensor>* out, const OpResource&) {
  int n;
  double lower, upper;
  std::vector<char> adapt;
  if (!get_num_tensors(kTrustRatio, attrs, &n) ||
      !get_double(kTrustRatio, attrs, "lower_bound", -1.0, &lower) ||
      !get_double(kTrustRatio, attrs, "upper_bound", -1.0, &upper) ||
      !get_flags(kTrustRatio, attrs, "layer_adaptation", n, &adapt)) {
    return MX_FAIL;
  }
  const double* sumsq = (*in)[0].data<double>();
  double* ratios = (*out)[0].data<double>();
  for (int t = 0; t < n; ++t) {
    const bool skipped = std::isnan(sumsq[2 * t]);
    ratios[t] = skipped ? sumsq[2 * t]
                : adapt[t] ? trust_ratio(sumsq[2 * t], sumsq[2 * t + 1], lower, upper)
                           : 1.0;
  }
  return MX_SUCCESS;
}

#ifdef MXLAMB_WITH_CUDA
// ------------------------------------------------------------------------------------ GPU
//
// The CUDA kernels take plain LAMB (every MXNet LAMB option, and Keras' epsilon: a coefficient
// like any other; fp32 and multi-precision). The other mxlamb extras (AMSGrad, EMA, gradient
// statistics, device step counts, per-tensor layer adaptation) and float64 weights are CPU-only
// for now and refused here by name (the CUDA interface, lamb_cuda.h, takes float32 weights and
// moments).

bool gpu_supports(const char* op, const Attrs& attrs, const std::vector<MXTensor>& in) {
  if (is_float64(in[0])) {
    return fail(op, "float64 weights are not implemented on GPU yet (CPU only; the CUDA "
                    "kernels update float32 weights and float32 master copies)");
  }
  for (const char* key : {"amsgrad", "use_ema", "has_stats", "device_counts"}) {
    if (get_bool(attrs, key, false)) {
      return fail(op, std::string(key) + " is not implemented on GPU yet (CPU only)");
    }
  }
  if (attrs.find("layer_adaptation") != attrs.end()) {
    return fail(op, "layer_adaptation (exclude_from_layer_adaptation, AdamW) is not "
                    "implemented on GPU yet (CPU only)");
  }
  return true;
}

// The group as the CUDA interface takes it; the vectors own the host-side pointer arrays.
struct CudaGroup {
  std::vector<float*> weights, means, vars;
  std::vector<const void*> grads;
  std::vector<void*> lowp;
  std::vector<int64_t> sizes;
  std::vector<TensorCoeffs<float>> coeffs;  // made as the CPU forwards make theirs
  MxlambCudaGroup group{};

  explicit CudaGroup(const StepAttrs& s) {
    for (int t = 0; t < s.layout.n; ++t) {
      coeffs.push_back(
          tensor_coeffs<float>(s.params, s.counts[t], s.lrs[t], s.wds[t], s.rescale));
    }
    group.num_tensors = s.layout.n;
    group.step = step_coeffs<float>(s.params);
    group.coeffs = coeffs.data();
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
  if (!gpu_supports(kPhase1, attrs, *in) || !parse_step(kPhase1, attrs, true, &s)) return MX_FAIL;
  CudaGroup g(s);
  for (int t = 0; t < s.layout.n; ++t) {
    MXTensor* x = &(*in)[t * s.layout.slots];
    g.weights.push_back(x[kWeight].data<float>());
    g.grads.push_back(x[kGrad].data_ptr);
    g.means.push_back(x[kMean].data<float>());
    g.vars.push_back(x[kVar].data<float>());
    g.sizes.push_back(x[kWeight].size());
    g.group.grad_dtype = static_cast<MxlambDType>(x[kGrad].dtype);
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
  if (!gpu_supports(kPhase2, attrs, *in) || !parse_step(kPhase2, attrs, false, &s)) return MX_FAIL;
  CudaGroup g(s);
  g.group.lowp_dtype = s.multi_precision ? static_cast<MxlambDType>((*out)[0].dtype) : MXLAMB_FLOAT32;
  for (int t = 0; t < s.layout.n; ++t) {
    MXTensor* x = &(*in)[t * s.layout.slots];
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
  return cuda_ok(kPhase2, mxlamb_cuda_phase2(&g.group, (*in)[s.layout.sumsq].data<double>(),
                                             workspace, bytes, res.get_cuda_stream()))
             ? MX_SUCCESS
             : MX_FAIL;
}
#endif  // MXLAMB_WITH_CUDA


// mxlamb_error(x, message=...) -> out: fails when the engine runs it, with ``message``. MXNet
// swallows a Python exception raised inside a kvstore updater callback; the optimizer then
// writes this operator's failure into the weight it could not update (out=weight), so the
// kvstore's pull and everything that reads the weight raise the message: training stops where
// the user reads a value, and no step goes on with weights that silently never change.
MXReturnValue error_parse(const Attrs& attrs, int* num_in, int* num_out) {
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue error_type(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  (*out)[0] = (*in)[0];
  return MX_SUCCESS;
}

MXReturnValue error_shape(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                          std::vector<std::vector<unsigned int>>* out) {
  (*out)[0] = (*in)[0];
  return MX_SUCCESS;
}

MXReturnValue error_forward(const Attrs& attrs, std::vector<MXTensor>*, std::vector<MXTensor>*,
                            const OpResource&) {
  auto it = attrs.find("message");
  MX_ERROR_MSG << (it == attrs.end() ? std::string("mxlamb: the optimizer failed") : it->second);
  return MX_FAIL;
}

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

REGISTER_OP(mxlamb_step)
    .setParseAttrs(mxlamb::step_parse)
    .setInferType(mxlamb::step_type)
    .setInferShape(mxlamb::step_shape)
    .setMutateInputs(mxlamb::step_mutate)
    .setForward(mxlamb::step_forward, "cpu");

REGISTER_OP(mxlamb_grad_stats)
    .setParseAttrs(mxlamb::grad_stats_parse)
    .setInferType(mxlamb::grad_stats_type)
    .setInferShape(mxlamb::grad_stats_shape)
    .setMutateInputs(mxlamb::grad_stats_mutate)
    .setForward(mxlamb::grad_stats_forward, "cpu");

REGISTER_OP(mxlamb_trust_ratio)
    .setParseAttrs(mxlamb::trust_ratio_parse)
    .setInferType(mxlamb::trust_ratio_type)
    .setInferShape(mxlamb::trust_ratio_shape)
    .setForward(mxlamb::trust_ratio_forward, "cpu");

REGISTER_OP(mxlamb_error)
    .setParseAttrs(mxlamb::error_parse)
    .setInferType(mxlamb::error_type)
    .setInferShape(mxlamb::error_shape)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::error_forward, "gpu")
#endif
    .setForward(mxlamb::error_forward, "cpu");

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
