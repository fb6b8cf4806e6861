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
  p.ema_momentum = r.number("ema_momentum", p.ema_momentum);
  p.ema_first_step = r.number("ema_first_step", p.ema_first_step);
  s->lrs = r.numbers("lrs", n);
  s->wds = r.numbers("wds", n);
  s->decays = r.given("decays") ? r.numbers("decays", n) : std::vector<double>(n, 0.0);
  s->layer_adaptation = r.flags("layer_adaptation", n);
  if (l.has(Slot::kCounts)) {
    s->count_slots = r.numbers("count_slots", n);
  } else {
    s->step_counts = r.numbers("step_counts", n, 1.0);
  }
  if (l.has(Slot::kGradSumsq)) s->stat_rows = r.numbers("stat_rows", n);
  if (r.given("state_bits")) {
    r.integer("state_bits", 8, 8);  // (32, the float32 moments, is the attribute left out)
    if (l.has(Slot::kMoments) || l.has(Slot::kFlatWeight)) {
      return r.fail("state_bits=8 takes each tensor's moments as arrays of their own, not "
                    "packed (moments_offset) or flat (flat_sizes)");
    }
  }
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

namespace {

DType dtype_of(const MXTensor& t) { return static_cast<DType>(static_cast<int>(t.dtype)); }

// Element `at` of a flat array of `t`'s type.
void* element(const MXTensor& t, int64_t at) {
  return static_cast<char*>(t.data_ptr) + at * dtype_bytes(dtype_of(t));
}

}  // namespace

bool decode_group(const OpTable& op, const StepAttrs& s, std::vector<MXTensor>& in,
                  std::vector<MXTensor>* out, Group* g) {
  const InputLayout& l = s.inputs;
  const int n = l.num_tensors();
  const bool phase2 = &op == &kPhase2Op;
  // (Phase 2 takes the same attributes as phase 1; per-tensor clipping is phase 1's.)
  if (s.clipnorm > 0 && !phase2 && !l.has(Slot::kGradSumsq)) {
    return fail(op.name, "clipnorm needs has_stats=1 (the gradients' sums of squares)");
  }
  MXTensor* counts = l.array(in, Slot::kCounts);
  MXTensor* grad_sumsq = l.array(in, Slot::kGradSumsq);
  if (!table_rows(op.name, "count_slots", s.count_slots, counts, &g->count_slots) ||
      !table_rows(op.name, "stat_rows", s.stat_rows, grad_sumsq, &g->stat_rows)) {
    return false;
  }
  g->counts = counts != nullptr ? counts->data<double>() : nullptr;
  g->grad_sumsq = grad_sumsq != nullptr ? grad_sumsq->data<double>() : nullptr;
  MXTensor* control = l.array(in, Slot::kControl);
  g->control = control != nullptr ? control->data<double>() : nullptr;
  MXTensor* sumsq = l.array(in, Slot::kSumsq);
  g->sumsq = sumsq != nullptr ? sumsq->data<double>() : nullptr;
  // mxlamb_step's packed moments: m then v of each tensor, tensor after tensor; its flat
  // arrays: tensor t is the span of flat_sizes[t] elements after tensor t - 1's in each.
  MXTensor* moments = l.array(in, Slot::kMoments);
  MXTensor* flat_weight = l.array(in, Slot::kFlatWeight);
  MXTensor* flat_grad = l.array(in, Slot::kFlatGrad);
  MXTensor* flat_model = l.array(in, Slot::kFlatModelWeight);
  const MXTensor& first = flat_weight != nullptr ? *flat_weight : *l.array(in, Slot::kWeight, 0);
  g->float64 = dtype_of(first) == DType::kFloat64;
  g->quantized = l.has(Slot::kMeanScale);
  if (g->quantized && g->float64) {
    return fail(op.name, "state_bits=8 needs float32 weights (or float32 master copies): "
                         "float64 weights keep float64 moments");
  }
  int64_t packed = s.moments_offset;
  int64_t at = s.flat_offset;
  g->tensors.resize(n);
  for (int t = 0; t < n; ++t) {
    TensorArrays& a = g->tensors[t];
    if (flat_weight != nullptr) {
      a.size = s.flat_sizes[t];
      a.weight = element(*flat_weight, at);
      a.grad = element(*flat_grad, at);
      a.grad_dtype = dtype_of(*flat_grad);
      if (flat_model != nullptr) a.model = element(*flat_model, at);
      at += a.size;
    } else {
      MXTensor& weight = *l.array(in, Slot::kWeight, t);
      a.size = weight.size();
      a.weight = weight.data_ptr;
      if (MXTensor* grad = l.array(in, Slot::kGrad, t)) {
        a.grad = grad->data_ptr;
        a.grad_dtype = dtype_of(*grad);
      }
      if (MXTensor* model = l.array(in, Slot::kModelWeight, t)) a.model = model->data_ptr;
    }
    // Under multi_precision phase 2 updates the master copy in place and writes the rounded
    // model weight to out; without it the weight goes to out.
    a.weight_out = a.weight;
    if (phase2) {
      (s.multi_precision ? a.model : a.weight_out) = (*out)[t].data_ptr;
    }
    if (moments != nullptr) {
      a.mean = element(*moments, packed);
      a.var = element(*moments, packed + a.size);
      packed += 2 * a.size;
    } else {
      a.mean = l.array(in, Slot::kMean, t)->data_ptr;
      a.var = l.array(in, Slot::kVar, t)->data_ptr;
    }
    if (MXTensor* vmax = l.array(in, Slot::kVarMax, t)) a.vmax = vmax->data_ptr;
    if (MXTensor* average = l.array(in, Slot::kAverage, t)) a.average = average->data_ptr;
    if (g->quantized) {
      a.mean_scales = l.array(in, Slot::kMeanScale, t)->data<float>();
      a.var_scales = l.array(in, Slot::kVarScale, t)->data<float>();
      if (MXTensor* scales = l.array(in, Slot::kVarMaxScale, t)) {
        a.vmax_scales = scales->data<float>();
      }
    }
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

template <typename T>
T* as(void* p) { return static_cast<T*>(p); }

// A tensor's kernel spans, as decode_group read its arrays (mxlamb_step's have no vmax, EMA or
// out=: its TensorArrays say so). With 8-bit moments the codes and scales go to the q_ fields
// and the float moments stay nullptr.
QuantizedMoment quantized(void* codes, float* scales) {
  return QuantizedMoment{static_cast<uint8_t*>(codes), scales};
}

template <typename T>
Phase1Span<T> phase1_span_of(const TensorArrays& a, bool quantized_moments) {
  Phase1Span<T> span{as<T>(a.weight), a.grad, nullptr, nullptr, nullptr, a.size, a.grad_dtype,
                     {}, {}, {}};
  if (quantized_moments) {
    span.q_mean = quantized(a.mean, a.mean_scales);
    span.q_var = quantized(a.var, a.var_scales);
    if (a.vmax != nullptr) span.q_var_max = quantized(a.vmax, a.vmax_scales);
  } else {
    span.mean = as<T>(a.mean);
    span.var = as<T>(a.var);
    span.var_max = as<T>(a.vmax);
  }
  return span;
}

template <typename T>
Phase2Span<T> phase2_span_of(const TensorArrays& a, bool quantized_moments) {
  Phase2Span<T> span{as<T>(a.weight), as<T>(a.weight_out), as<half_t>(a.model), nullptr,
                     nullptr, as<T>(a.average), a.size, {}, {}};
  if (quantized_moments) {
    span.q_mean = quantized(a.mean, a.mean_scales);
    span.q_var = quantized(a.var, a.var_scales);
  } else {
    span.mean = as<T>(a.mean);
    span.var = as<T>(a.var);
  }
  return span;
}

// ---------------------------------------------------------------------------------- phase 1

template <typename T>
void phase1_typed(const StepAttrs& s, const Group& g, double multiplier, double* sumsq) {
  const int n = static_cast<int>(g.tensors.size());
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<Phase1Span<T>> spans(n);
  for (int t = 0; t < n; ++t) {
    const TensorArrays& a = g.tensors[t];
    const double count = g.counts != nullptr ? g.counts[g.count_slots[t]] + 1.0
                                             : s.step_counts[t];
    if (g.counts != nullptr) g.counts[g.count_slots[t]] = count;
    const double grad_scale =
        g.grad_sumsq != nullptr
            ? gradient_scale(multiplier, g.grad_sumsq[g.stat_rows[t]], s.clipnorm)
            : multiplier;
    coeffs[t] = tensor_coeffs<T>(s.params, count, s.lrs[t], s.wds[t], grad_scale, s.decays[t]);
    spans[t] = phase1_span_of<T>(a, g.quantized);
  }
  lamb_phase1_cpu(spans, step_coeffs<T>(s.params), coeffs, sumsq);
}

MXReturnValue phase1_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase1Op, attrs, &s)) return MX_FAIL;
  double* sumsq = (*out)[0].data<double>();
  const StepControl control = step_control(s, *in);
  if (!control.apply) {
    // A skipped step touches nothing; its trust ratios read as NaN.
    for (int i = 0; i < 2 * s.inputs.num_tensors(); ++i) sumsq[i] = std::nan("");
    return MX_SUCCESS;
  }
  Group g;
  if (!decode_group(kPhase1Op, s, *in, out, &g)) return MX_FAIL;
  if (g.float64) {
    phase1_typed<double>(s, g, control.multiplier, sumsq);
  } else {
    phase1_typed<float>(s, g, control.multiplier, sumsq);
  }
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------------- phase 2

template <typename T>
void phase2_typed(const StepAttrs& s, const Group& g) {
  const int n = static_cast<int>(g.tensors.size());
  const StepCoeffs<T> step = step_coeffs<T>(s.params);
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<T> step_sizes(n);
  std::vector<Phase2Span<T>> spans(n);
  for (int t = 0; t < n; ++t) {
    const TensorArrays& a = g.tensors[t];
    // Phase 1 has already counted this step in the device counts. The gradient multiplier
    // plays no part in phase 2.
    const double count = g.counts != nullptr ? g.counts[g.count_slots[t]] : s.step_counts[t];
    coeffs[t] = tensor_coeffs<T>(s.params, count, s.lrs[t], s.wds[t], s.rescale_grad,
                                 s.decays[t]);
    step_sizes[t] = step_size(step, coeffs[t], g.sumsq[2 * t], g.sumsq[2 * t + 1],
                              s.layer_adaptation[t]);
    spans[t] = phase2_span_of<T>(a, g.quantized);
  }
  lamb_phase2_cpu(spans, step, coeffs, step_sizes);
}

MXReturnValue phase2_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                             std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kPhase2Op, attrs, &s)) return MX_FAIL;
  if (!step_control(s, *in).apply) return MX_SUCCESS;  // skipped: nothing is written
  Group g;
  if (!decode_group(kPhase2Op, s, *in, out, &g)) return MX_FAIL;
  if (g.float64) {
    phase2_typed<double>(s, g);
  } else {
    phase2_typed<float>(s, g);
  }
  return MX_SUCCESS;
}

// ------------------------------------------------------------------------ phase 1 + phase 2

template <typename T>
void step_typed(const StepAttrs& s, const Group& g, double* sumsq) {
  const int n = static_cast<int>(g.tensors.size());
  const StepCoeffs<T> step = step_coeffs<T>(s.params);
  std::vector<TensorCoeffs<T>> coeffs(n);
  std::vector<Phase1Span<T>> first(n);
  std::vector<Phase2Span<T>> second(n);
  for (int t = 0; t < n; ++t) {
    const TensorArrays& a = g.tensors[t];
    coeffs[t] = tensor_coeffs<T>(s.params, s.step_counts[t], s.lrs[t], s.wds[t], s.rescale_grad,
                                 s.decays[t]);
    first[t] = phase1_span_of<T>(a, g.quantized);
    second[t] = phase2_span_of<T>(a, g.quantized);
  }
  lamb_step_cpu(first, second, step, coeffs,
                [&](int t, double weight_sumsq, double update_sumsq) {
                  return step_size(step, coeffs[t], weight_sumsq, update_sumsq,
                                   s.layer_adaptation[t]);
                },
                sumsq);
}

MXReturnValue step_forward(const Attrs& attrs, std::vector<MXTensor>* in,
                           std::vector<MXTensor>* out, const OpResource&) {
  StepAttrs s;
  if (!parse_step(kStepOp, attrs, &s)) return MX_FAIL;
  Group g;
  if (!decode_group(kStepOp, s, *in, out, &g)) return MX_FAIL;
  double* sumsq = (*out)[0].data<double>();
  if (g.float64) {
    step_typed<double>(s, g, sumsq);
  } else {
    step_typed<float>(s, g, sumsq);
  }
  return MX_SUCCESS;
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
