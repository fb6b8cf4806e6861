// The LAMB operators' CPU forwards and their registration with MXNet (lib_api.h). What each
// operator takes is its table in lamb_op.h; the GPU forwards are in lamb_op_gpu.cc.
#include "lamb_op.h"

#include <cmath>
#include <string>
#include <vector>

#include "lamb_cpu.h"
#include "mxnet/lib_api.h"

using mxnet::ext::MXReturnValue;
using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;
using mxnet::ext::OpResource;

namespace mxlamb {

bool parse_step(const OpTable& op, const Attrs& attrs, StepAttrs* s) {
  AttrReader r(op.name, attrs);
  if (!s->inputs.resolve(op, r)) return false;
  const InputLayout& l = s->inputs;
  const int n = l.num_tensors();
  LambParams& p = s->params;
  p.beta1 = r.number("beta1", p.beta1);
  p.beta2 = r.number("beta2", p.beta2);
  p.epsilon = r.number("epsilon", p.epsilon);
  p.clip_gradient = r.number("clip_gradient", p.clip_gradient);
  p.lower_bound = r.number("lower_bound", p.lower_bound);
  p.upper_bound = r.number("upper_bound", p.upper_bound);
  p.bias_correction = r.flag("bias_correction", p.bias_correction);
  p.epsilon_hat = r.flag("epsilon_hat", p.epsilon_hat);
  s->multi_precision = r.flag("multi_precision");
  s->rescale_grad = r.number("rescale_grad", s->rescale_grad);
  s->clipnorm = r.number("clipnorm", s->clipnorm);
  s->ema_momentum = r.number("ema_momentum", s->ema_momentum);
  s->lrs = r.numbers("lrs", n);
  s->wds = r.numbers("wds", n);
  s->layer_adaptation = r.flags("layer_adaptation", n);
  if (l.has(Slot::kCounts)) {
    s->count_slots = r.numbers("count_slots", n);
  } else {
    s->step_counts = r.numbers("step_counts", n, 1.0);
  }
  if (l.has(Slot::kGradSumsq)) s->stat_rows = r.numbers("stat_rows", n);
  if (l.has(Slot::kMoments)) s->moments_offset = r.integer("moments_offset", 0);
  if (l.has(Slot::kFlatWeight)) {
    if (!l.has(Slot::kMoments)) {
      return r.fail("flat_sizes needs moments_offset (flat arrays take packed moments)");
    }
    s->flat_sizes = r.counts("flat_sizes", n);
    s->flat_offset = r.given("flat_offset") ? r.integer("flat_offset", 0) : 0;
  }
  return r.ok();
}

// Each tensor's row of a table input (grad_sumsq, counts), range-checked; none where the call
// has no such input.
bool table_rows(const char* op, const char* key, const std::vector<double>& rows,
                const MXTensor* table, std::vector<int64_t>* out) {
  if (table == nullptr) return true;
  out->resize(rows.size());
  for (size_t t = 0; t < rows.size(); ++t) {
    if (!table_row(op, key, rows[t], table->size(), &(*out)[t])) return false;
  }
  return true;
}

bool parse_grad_stats(const Attrs& attrs, InputLayout* l, GradStatsParams* p) {
  AttrReader r(kGradStatsOp.name, attrs);
  if (!l->resolve(kGradStatsOp, r)) return false;
  p->rescale_grad = r.number("rescale_grad", p->rescale_grad);
  p->global_clipnorm = r.number("global_clipnorm", p->global_clipnorm);
  p->growth_interval = r.number("growth_interval", p->growth_interval);
  p->skip_nonfinite = r.flag("skip_nonfinite");
  return r.ok();
}

bool parse_trust_ratio(const Attrs& attrs, TrustRatioAttrs* a) {
  AttrReader r(kTrustRatioOp.name, attrs);
  if (!a->inputs.resolve(kTrustRatioOp, r)) return false;
  a->lower = r.number("lower_bound", -1.0);
  a->upper = r.number("upper_bound", -1.0);
  a->layer_adaptation = r.flags("layer_adaptation", a->inputs.num_tensors());
  return r.ok();
}

namespace {

DType dtype_of(const MXTensor& t) { return static_cast<DType>(static_cast<int>(t.dtype)); }

bool is_float64(const MXTensor& t) { return dtype_of(t) == DType::kFloat64; }

// Whether the step applies, and the gradient multiplier before per-tensor clipping.
struct StepControl {
  bool apply = true;
  double multiplier = 1.0;
};

StepControl step_control(const StepAttrs& s, std::vector<MXTensor>& in) {
  StepControl c;
  c.multiplier = s.rescale_grad;
  if (MXTensor* control = s.inputs.array(in, Slot::kControl)) {
    c.multiplier = control->data<double>()[kControlMultiplier];
    c.apply = control->data<double>()[kControlApply] != 0.0;
  }
  return c;
}

// ---------------------------------------------------------------------------------- phase 1

template <typename T>
MXReturnValue phase1_forward_typed(const StepAttrs& s, std::vector<MXTensor>* in,
                                   std::vector<MXTensor>* out) {
  const InputLayout& l = s.inputs;
  const int n = l.num_tensors();
  double* sumsq = (*out)[0].data<double>();
  const StepControl control = step_control(s, *in);
  if (!control.apply) {
    // A skipped step touches nothing; its trust ratios read as NaN.
    for (int i = 0; i < 2 * n; ++i) sumsq[i] = std::nan("");
    return MX_SUCCESS;
  }
  if (s.clipnorm > 0 && !l.has(Slot::kGradSumsq)) {
    fail(kPhase1Op.name, "clipnorm needs has_stats=1 (the gradients' sums of squares)");
    return MX_FAIL;
  }
  MXTensor* grad_sumsq_array = l.array(*in, Slot::kGradSumsq);
  MXTensor* counts_array = l.array(*in, Slot::kCounts);
  std::vector<int64_t> slots, rows;
  if (!table_rows(kPhase1Op.name, "count_slots", s.count_slots, counts_array, &slots) ||
      !table_rows(kPhase1Op.name, "stat_rows", s.stat_rows, grad_sumsq_array, &rows)) {
    return MX_FAIL;
  }
  const double* grad_sumsq = grad_sumsq_array ? grad_sumsq_array->data<double>() : nullptr;
  double* counts = counts_array ? counts_array->data<double>() : nullptr;
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<Phase1Span<T>> spans(n);
  for (int t = 0; t < n; ++t) {
    const double count = counts != nullptr ? counts[slots[t]] + 1.0 : s.step_counts[t];
    if (counts != nullptr) counts[slots[t]] = count;
    const double grad_scale =
        grad_sumsq != nullptr ? gradient_scale(control.multiplier, grad_sumsq[rows[t]], s.clipnorm)
                              : control.multiplier;
    coeffs[t] = tensor_coeffs<T>(s.params, count, s.lrs[t], s.wds[t], grad_scale);
    MXTensor& weight = *l.array(*in, Slot::kWeight, t);
    const MXTensor& grad = *l.array(*in, Slot::kGrad, t);
    MXTensor* var_max = l.array(*in, Slot::kVarMax, t);
    spans[t] = Phase1Span<T>{weight.data<T>(),
                             grad.data_ptr,
                             l.array(*in, Slot::kMean, t)->data<T>(),
                             l.array(*in, Slot::kVar, t)->data<T>(),
                             var_max != nullptr ? var_max->data<T>() : nullptr,
                             weight.size(),
                             dtype_of(grad)};
  }
  lamb_phase1_cpu(spans, step_coeffs<T>(s.params), coeffs, sumsq);
  return MX_SUCCESS;
}

MXReturnValue phase1_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase1Op, attrs, &s)) return MX_FAIL;
  return is_float64((*in)[0]) ? phase1_forward_typed<double>(s, in, out)
                              : phase1_forward_typed<float>(s, in, out);
}

// ---------------------------------------------------------------------------------- phase 2

template <typename T>
MXReturnValue phase2_forward_typed(const StepAttrs& s, std::vector<MXTensor>* in,
                                   std::vector<MXTensor>* out) {
  const InputLayout& l = s.inputs;
  const int n = l.num_tensors();
  if (!step_control(s, *in).apply) return MX_SUCCESS;  // skipped: nothing is written
  MXTensor* counts_array = l.array(*in, Slot::kCounts);
  std::vector<int64_t> slots;
  if (!table_rows(kPhase2Op.name, "count_slots", s.count_slots, counts_array, &slots)) {
    return MX_FAIL;
  }
  const double* counts = counts_array ? counts_array->data<double>() : nullptr;
  const double* sumsq = l.array(*in, Slot::kSumsq)->data<double>();
  const StepCoeffs<T> step = step_coeffs<T>(s.params);
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<T> step_sizes(n);
  std::vector<Phase2Span<T>> spans(n);
  for (int t = 0; t < n; ++t) {
    // Phase 1 has already counted this step in the device counts. The gradient multiplier
    // plays no part in phase 2.
    const double count = counts != nullptr ? counts[slots[t]] : s.step_counts[t];
    coeffs[t] = tensor_coeffs<T>(s.params, count, s.lrs[t], s.wds[t], s.rescale_grad);
    step_sizes[t] = step_size(step, coeffs[t], sumsq[2 * t], sumsq[2 * t + 1],
                              s.layer_adaptation[t]);
    T* weight = l.array(*in, Slot::kWeight, t)->data<T>();
    MXTensor* average = l.array(*in, Slot::kAverage, t);
    MXTensor& updated = (*out)[t];
    spans[t] = Phase2Span<T>{weight,
                             s.multi_precision ? weight : updated.data<T>(),
                             s.multi_precision ? static_cast<half_t*>(updated.data_ptr) : nullptr,
                             l.array(*in, Slot::kMean, t)->data<T>(),
                             l.array(*in, Slot::kVar, t)->data<T>(),
                             average != nullptr ? average->data<T>() : nullptr,
                             l.array(*in, Slot::kWeight, t)->size()};
  }
  lamb_phase2_cpu(spans, step, coeffs, step_sizes, ema_coeffs<T>(s.ema_momentum));
  return MX_SUCCESS;
}

MXReturnValue phase2_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase2Op, attrs, &s)) return MX_FAIL;
  return is_float64((*in)[0]) ? phase2_forward_typed<double>(s, in, out)
                              : phase2_forward_typed<float>(s, in, out);
}

// ------------------------------------------------------------------------ phase 1 + phase 2

template <typename T>
MXReturnValue step_forward_typed(const StepAttrs& s, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out) {
  const InputLayout& l = s.inputs;
  const int n = l.num_tensors();
  double* sumsq = (*out)[0].data<double>();
  MXTensor* moments = l.array(*in, Slot::kMoments);
  T* packed = moments != nullptr ? moments->data<T>() + s.moments_offset : nullptr;
  // Flat arrays: tensor t is the span of flat_sizes[t] elements after tensor t - 1's in each.
  MXTensor* flat_weight = l.array(*in, Slot::kFlatWeight);
  MXTensor* flat_grad = l.array(*in, Slot::kFlatGrad);
  MXTensor* flat_model = l.array(*in, Slot::kFlatModelWeight);
  const bool flat = flat_weight != nullptr;
  int64_t at = s.flat_offset;
  const StepCoeffs<T> step = step_coeffs<T>(s.params);
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<Phase1Span<T>> first(n);
  std::vector<Phase2Span<T>> second(n);
  for (int t = 0; t < n; ++t) {
    coeffs[t] = tensor_coeffs<T>(s.params, s.step_counts[t], s.lrs[t], s.wds[t], s.rescale_grad);
    const MXTensor& grad = flat ? *flat_grad : *l.array(*in, Slot::kGrad, t);
    const DType grad_type = dtype_of(grad);
    T* weight;
    const void* grad_data;
    half_t* model_weight = nullptr;
    int64_t size;
    if (flat) {
      size = s.flat_sizes[t];
      weight = flat_weight->data<T>() + at;
      grad_data = grad_type == DType::kFloat16
                      ? static_cast<const void*>(static_cast<const half_t*>(grad.data_ptr) + at)
                  : grad_type == DType::kFloat64
                      ? static_cast<const void*>(static_cast<const double*>(grad.data_ptr) + at)
                      : static_cast<const void*>(static_cast<const float*>(grad.data_ptr) + at);
      if (flat_model != nullptr) model_weight = static_cast<half_t*>(flat_model->data_ptr) + at;
      at += size;
    } else {
      weight = l.array(*in, Slot::kWeight, t)->data<T>();
      size = l.array(*in, Slot::kWeight, t)->size();
      grad_data = grad.data_ptr;
      MXTensor* model = l.array(*in, Slot::kModelWeight, t);
      if (model != nullptr) model_weight = static_cast<half_t*>(model->data_ptr);
    }
    T* mean;
    T* var;
    if (packed != nullptr) {
      mean = packed;
      var = packed + size;
      packed += 2 * size;
    } else {
      mean = l.array(*in, Slot::kMean, t)->data<T>();
      var = l.array(*in, Slot::kVar, t)->data<T>();
    }
    first[t] = Phase1Span<T>{weight, grad_data, mean, var, nullptr, size, grad_type};
    second[t] = Phase2Span<T>{weight, weight, model_weight, mean, var, nullptr, size};
  }
  lamb_step_cpu(first, second, step, coeffs,
                [&](int t, double weight_sumsq, double update_sumsq) {
                  return step_size(step, coeffs[t], weight_sumsq, update_sumsq,
                                   s.layer_adaptation[t]);
                },
                sumsq);
  return MX_SUCCESS;
}

MXReturnValue step_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                           std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kStepOp, attrs, &s)) return MX_FAIL;
  return is_float64((*in)[0]) ? step_forward_typed<double>(s, in, out)
                              : step_forward_typed<float>(s, in, out);
}

// ----------------------------------------------------------------------------- grad stats

// One step's gradient statistics, before any phase 1 of the step: every gradient's sum of
// squares, then control and step_state by lamb_math.h's grad_stats_control (which says what
// they hold; the CUDA kernel calls the same function).
MXReturnValue grad_stats_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource&) {
  InputLayout l;
  GradStatsParams p;
  if (!parse_grad_stats(attrs, &l, &p)) return MX_FAIL;
  const int n = l.num_tensors();
  std::vector<GradSpan> grads(n);
  for (int t = 0; t < n; ++t) {
    const MXTensor& grad = *l.array(*in, Slot::kGrad, t);
    grads[t] = GradSpan{grad.data_ptr, grad.size(), dtype_of(grad)};
  }
  double* grad_sumsq = (*out)[0].data<double>();
  grad_sumsq_cpu(grads, grad_sumsq);
  double total = 0.0;
  for (int t = 0; t < n; ++t) total += grad_sumsq[t];
  grad_stats_control(p, total, (*out)[1].data<double>(),
                     l.array(*in, Slot::kStepState)->data<double>());
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------- trust ratio

// The ratio phase 2 multiplied lr by (1 where layer adaptation is off; NaN for a skipped step).
MXReturnValue trust_ratio_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                                  std::vector<MXTensor>* out, const OpResource&) {
  TrustRatioAttrs a;
  if (!parse_trust_ratio(attrs, &a)) return MX_FAIL;
  const double* sumsq = a.inputs.array(*in, Slot::kSumsq)->data<double>();
  double* ratios = (*out)[0].data<double>();
  for (int t = 0; t < a.inputs.num_tensors(); ++t) {
    const bool skipped = std::isnan(sumsq[2 * t]);
    ratios[t] = skipped ? sumsq[2 * t]
                : a.layer_adaptation[t] ? trust_ratio(sumsq[2 * t], sumsq[2 * t + 1], a.lower,
                                                      a.upper)
                                        : 1.0;
  }
  return MX_SUCCESS;
}

}  // namespace
}  // namespace mxlamb

REGISTER_OP(mxlamb_phase1)
    .setParseAttrs(mxlamb::parse_attrs<mxlamb::kPhase1Op>)
    .setInferType(mxlamb::infer_type<mxlamb::kPhase1Op>)
    .setInferShape(mxlamb::infer_shape<mxlamb::kPhase1Op>)
    .setMutateInputs(mxlamb::mutate_inputs<mxlamb::kPhase1Op>)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::phase1_forward_gpu, "gpu")
#endif
    .setForward(mxlamb::phase1_forward, "cpu");

REGISTER_OP(mxlamb_phase2)
    .setParseAttrs(mxlamb::parse_attrs<mxlamb::kPhase2Op>)
    .setInferType(mxlamb::infer_type<mxlamb::kPhase2Op>)
    .setInferShape(mxlamb::infer_shape<mxlamb::kPhase2Op>)
    .setMutateInputs(mxlamb::mutate_inputs<mxlamb::kPhase2Op>)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::phase2_forward_gpu, "gpu")
#endif
    .setForward(mxlamb::phase2_forward, "cpu");

REGISTER_OP(mxlamb_step)
    .setParseAttrs(mxlamb::parse_attrs<mxlamb::kStepOp>)
    .setInferType(mxlamb::infer_type<mxlamb::kStepOp>)
    .setInferShape(mxlamb::infer_shape<mxlamb::kStepOp>)
    .setMutateInputs(mxlamb::mutate_inputs<mxlamb::kStepOp>)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::step_forward_gpu, "gpu")
#endif
    .setForward(mxlamb::step_forward, "cpu");

REGISTER_OP(mxlamb_grad_stats)
    .setParseAttrs(mxlamb::parse_attrs<mxlamb::kGradStatsOp>)
    .setInferType(mxlamb::infer_type<mxlamb::kGradStatsOp>)
    .setInferShape(mxlamb::infer_shape<mxlamb::kGradStatsOp>)
    .setMutateInputs(mxlamb::mutate_inputs<mxlamb::kGradStatsOp>)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::grad_stats_forward_gpu, "gpu")
#endif
    .setForward(mxlamb::grad_stats_forward, "cpu");

REGISTER_OP(mxlamb_trust_ratio)
    .setParseAttrs(mxlamb::parse_attrs<mxlamb::kTrustRatioOp>)
    .setInferType(mxlamb::infer_type<mxlamb::kTrustRatioOp>)
    .setInferShape(mxlamb::infer_shape<mxlamb::kTrustRatioOp>)
#ifdef MXLAMB_WITH_CUDA
    .setForward(mxlamb::trust_ratio_forward_gpu, "gpu")
#endif
    .setForward(mxlamb::trust_ratio_forward, "cpu");

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
