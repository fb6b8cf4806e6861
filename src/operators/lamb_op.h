// The LAMB operators' contract: the arrays each takes, in order, and what their attributes
// mean. One table per operator (op_table.h says how a table reads); the generic lib_api.h
// callbacks, the CPU forwards (lamb_op.cc) and the GPU forwards (lamb_op_gpu.cc) all read
// these tables.
//
//   mxlamb_phase1(per tensor: w, g, m, v, [vmax]; then [grad_sumsq, control], [counts])
//       -> sumsq (N, 2) float64: [sum(w_t^2), sum(u_t^2)]; m, v (and vmax) updated in place.
//   mxlamb_phase2(per tensor: w, m, v, [ema]; then sumsq, [control], [counts]; out=weights)
//       -> the weights updated with lr * trust_ratio * u (and the EMA after them).
//   mxlamb_step(per tensor: w, g, [m, v], [w16]; then [moments]) -> sumsq (N, 2) float64
//   mxlamb_step(flat_w, flat_g, moments, [flat_w16]; flat_sizes=...) -> the same
//       phase 1 and phase 2 in one call (the plain step: none of the phase operators'
//       optional arrays), back to back per batch of tensors that fits in cache; w, m, v and
//       w16 updated in place. With attribute moments_offset, every tensor's m and v are packed
//       in one array, `moments` (ShapeRule::kPackedMoments): one array for the whole group
//       instead of two per tensor, and each array costs about a microsecond per call. With
//       attribute flat_sizes (each tensor's element count; moments_offset then required) there
//       are no per-tensor arrays at all: the tensors lie side by side from attribute
//       flat_offset (default 0) in flat_w, flat_g and flat_w16 (ShapeRule::kFlat), as
//       mxlamb.make_contiguous lays out a model's parameters: four arrays for any group.
//   mxlamb_grad_stats(per gradient: g; then step_state)
//       -> grad_sumsq (P,) float64 and control (2,) float64 = [gradient multiplier, apply];
//          step_state (3,) float64 = [loss scale, clean steps, skipped steps] updated.
//   mxlamb_trust_ratio(sumsq) -> (N,) float64, the ratios phase 2 applied (read on request).
//
// w is the float32 or float64 weight, or under multi_precision the float32 master copy (then
// g is the float16 or float32 gradient, phase 2 updates the master in place and writes the
// rounded float16 model weight to out, and mxlamb_step updates w16). Per-tensor values (lrs,
// wds, decays, step_counts, layer_adaptation, stat_rows, count_slots) are comma-separated lists.
// decays is Keras' decoupled weight decay (w <- w - w * decay * lr before the step, outside the
// trust ratio), where wds is MXNet's (inside u); ema_first_step is the step count t of a
// tensor's first update, whose average is the weight itself (lamb_math.h's ema_of).
//
// The optional arrays, each switched on by an attribute:
//   state_bits=8        8-bit moments (lamb_math.h): mean, var (and vmax) per tensor are uint8
//                       codes, followed in the tensor's group by their float32 block scales
//                       (ceil(n / 256),); float32 math only, each tensor's moments as arrays
//                       of their own (not with moments_offset or flat_sizes)
//   amsgrad=1           vmax per tensor (phase 1 updates it; phase 2 gets it as its v)
//   use_ema=1           the weight average per tensor (phase 2)
//   has_stats=1         grad_sumsq and control from mxlamb_grad_stats: the gradient multiplier
//                       (loss unscaling, global clipping) and whether the step applies; a
//                       skipped step leaves every array untouched
//   device_counts=1     counts: per-parameter applied-step counts (float64), rows count_slots;
//                       phase 1 increments them for an applied step, so t skips skipped steps
//   multi_precision=1   w16 per tensor (mxlamb_step); model_dtype names its type (float16)
//   moments_offset=K    the packed moments instead of m and v per tensor (mxlamb_step)
//   flat_sizes=...      flat w, g (and w16) instead of per-tensor arrays (mxlamb_step)
// An option that is off is an attribute left out: clip_gradient, lower_bound, upper_bound,
// clipnorm and global_clipnorm are then not applied (a value <= 0 reads the same).
#ifndef MXLAMB_LAMB_OP_H_
#define MXLAMB_LAMB_OP_H_

#include <vector>

#include "lamb_math.h"
#include "op_table.h"
#include "precision.h"

namespace mxlamb {

// An array of one tensor's group, with its weight's shape.
constexpr Input tensor_input(Slot slot, const char* name, DTypeRule dtype,
                             When present = kAlways, When written = kNever) {
  return Input{slot, name, dtype, ShapeRule::kLikeWeight, present, written, nullptr, false, 0};
}

// An 8-bit moment's block scales (state_bits=8), beside its codes.
constexpr Input scale_input(Slot slot, const char* name, When present, When written) {
  return Input{slot, name, DTypeRule::kFloat32, ShapeRule::kStateBlocks, present, written,
               nullptr, true, 0};
}
constexpr When kQuantized = if_given("state_bits");

constexpr const char* kFromGradStats = "the output of mxlamb_grad_stats";
constexpr const char* kFromPhase1 = "the output of mxlamb_phase1";

// The arrays after the tensors' groups that more than one operator takes.
//                       slot, name, dtype, shape, present, written, origin, plural, length
constexpr Input kControlInput{Slot::kControl, "control", DTypeRule::kFloat64, ShapeRule::kFixed,
                              if_flag("has_stats"), kNever, kFromGradStats, false, 2};
constexpr Input counts_input(When written) {
  return Input{Slot::kCounts, "counts", DTypeRule::kFloat64, ShapeRule::kVector,
               if_flag("device_counts"), written, nullptr, true, 0};
}
constexpr Input kSumsqInput{Slot::kSumsq, "sumsq", DTypeRule::kFloat64,
                            ShapeRule::kTwoPerTensor, kAlways, kNever, kFromPhase1, false, 0};

// ---------------------------------------------------------------------------- mxlamb_phase1

inline constexpr Input kPhase1Tensor[] = {
    //           slot                name      dtype           present             written
    tensor_input(Slot::kWeight,      "weight", DTypeRule::kMath),
    tensor_input(Slot::kGrad,        "grad",   DTypeRule::kGrad),
    tensor_input(Slot::kMean,        "mean",   DTypeRule::kState, kAlways,            kAlways),
    tensor_input(Slot::kVar,         "var",    DTypeRule::kState, kAlways,            kAlways),
    tensor_input(Slot::kVarMax,      "vmax",   DTypeRule::kState, if_flag("amsgrad"), kAlways),
    scale_input(Slot::kMeanScale,   "mean scales", kQuantized, kAlways),
    scale_input(Slot::kVarScale,    "var scales",  kQuantized, kAlways),
    scale_input(Slot::kVarMaxScale, "vmax scales", if_flag_with("amsgrad", "state_bits"), kAlways),
};
inline constexpr Input kPhase1After[] = {
    {Slot::kGradSumsq, "grad_sumsq", DTypeRule::kFloat64, ShapeRule::kVector,
     if_flag("has_stats"), kNever, kFromGradStats, false, 0},
    kControlInput,
    counts_input(kAlways),  // phase 1 counts an applied step
};
inline constexpr Output kSumsqOutput[] = {
    {"sumsq", DTypeRule::kFloat64, ShapeRule::kTwoPerTensor, false, 0},
};
inline constexpr OpTable kPhase1Op{"mxlamb_phase1", true, kPhase1Tensor, kPhase1After,
                                   kSumsqOutput, {}, nullptr};

// ---------------------------------------------------------------------------- mxlamb_phase2

inline constexpr Input kPhase2Tensor[] = {
    // Under multi_precision the float32 master copy is updated in place (and the float16
    // model weight written through out=); without it the weight is written through out= only.
    tensor_input(Slot::kWeight,  "weight",  DTypeRule::kMath, kAlways, if_flag("multi_precision")),
    tensor_input(Slot::kMean,    "mean",    DTypeRule::kState),
    tensor_input(Slot::kVar,     "var",     DTypeRule::kState),
    tensor_input(Slot::kAverage, "average", DTypeRule::kMath, if_flag("use_ema"), kAlways),
    scale_input(Slot::kMeanScale, "mean scales", kQuantized, kNever),
    scale_input(Slot::kVarScale,  "var scales",  kQuantized, kNever),  // (vmax's under AMSGrad)
};
inline constexpr Input kPhase2After[] = {kSumsqInput, kControlInput, counts_input(kNever)};
inline constexpr Output kPhase2Outputs[] = {
    {"weight", DTypeRule::kUpdatedWeight, ShapeRule::kLikeWeight, true, 0},
};
inline constexpr OpTable kPhase2Op{"mxlamb_phase2", true, kPhase2Tensor, kPhase2After,
                                   kPhase2Outputs, {}, nullptr};

// ------------------------------------------------------------------------------ mxlamb_step

// m and v per tensor: neither packed (moments_offset) nor in a flat call (flat_sizes).
constexpr When kPerTensorMoments{When::Test::kNotGiven, "moments_offset", nullptr, "flat_sizes"};
inline constexpr Input kStepTensor[] = {
    tensor_input(Slot::kWeight, "weight", DTypeRule::kMath, unless_given("flat_sizes"), kAlways),
    tensor_input(Slot::kGrad,   "grad",   DTypeRule::kGrad, unless_given("flat_sizes")),
    tensor_input(Slot::kMean,   "mean",   DTypeRule::kState, kPerTensorMoments, kAlways),
    tensor_input(Slot::kVar,    "var",    DTypeRule::kState, kPerTensorMoments, kAlways),
    tensor_input(Slot::kModelWeight, "model weight", DTypeRule::kHalf,
                 if_flag_unless("multi_precision", "flat_sizes"), kAlways),
    scale_input(Slot::kMeanScale, "mean scales", kQuantized, kAlways),
    scale_input(Slot::kVarScale,  "var scales",  kQuantized, kAlways),
};
constexpr Input flat_input(Slot slot, const char* name, DTypeRule dtype, When present,
                           When written) {
  return Input{slot, name, dtype, ShapeRule::kFlat, present, written, nullptr, false, 0};
}
inline constexpr Input kStepAfter[] = {
    flat_input(Slot::kFlatWeight, "flat weight", DTypeRule::kMath, if_given("flat_sizes"),
               kAlways),
    flat_input(Slot::kFlatGrad, "flat grad", DTypeRule::kGrad, if_given("flat_sizes"), kNever),
    {Slot::kMoments, "packed moments", DTypeRule::kMath, ShapeRule::kPackedMoments,
     if_given("moments_offset"), kAlways, nullptr, true, 0},
    flat_input(Slot::kFlatModelWeight, "flat model weight", DTypeRule::kHalf,
               if_flag_with("multi_precision", "flat_sizes"), kAlways),
};
inline constexpr const char* kStepRefused[] = {"amsgrad", "use_ema", "has_stats",
                                               "device_counts"};
inline constexpr OpTable kStepOp{"mxlamb_step", true, kStepTensor, kStepAfter, kSumsqOutput,
                                 kStepRefused, "use mxlamb_phase1 and mxlamb_phase2"};

// ------------------------------------------------------------------------ mxlamb_grad_stats

inline constexpr Input kGradStatsTensor[] = {
    {Slot::kGrad, "grad", DTypeRule::kAnyGrad, ShapeRule::kAny, kAlways, kNever, nullptr, false,
     0},
};
inline constexpr Input kGradStatsAfter[] = {
    {Slot::kStepState, "step_state", DTypeRule::kFloat64, ShapeRule::kFixed,
     kAlways, kAlways, nullptr, false, 3},
};
inline constexpr Output kGradStatsOutputs[] = {
    {"grad_sumsq", DTypeRule::kFloat64, ShapeRule::kPerTensor, false, 0},
    {"control", DTypeRule::kFloat64, ShapeRule::kFixed, false, 2},
};
inline constexpr OpTable kGradStatsOp{"mxlamb_grad_stats", true, kGradStatsTensor,
                                      kGradStatsAfter, kGradStatsOutputs, {}, nullptr};

// What mxlamb_grad_stats' control output and step_state hold, by index: ControlEntry and
// StepStateEntry of lamb_math.h.

// ----------------------------------------------------------------------- mxlamb_trust_ratio

inline constexpr Input kTrustRatioAfter[] = {kSumsqInput};
inline constexpr Output kTrustRatioOutputs[] = {
    {"ratios", DTypeRule::kFloat64, ShapeRule::kPerTensor, false, 0},
};
inline constexpr OpTable kTrustRatioOp{"mxlamb_trust_ratio", true, {}, kTrustRatioAfter,
                                       kTrustRatioOutputs, {}, nullptr};

// ------------------------------------------------------------- what the LAMB forwards share

// The attributes of mxlamb_phase1, mxlamb_phase2 and mxlamb_step, read once per forward.
struct StepAttrs {
  InputLayout inputs;
  LambParams params;
  bool multi_precision = false;
  double rescale_grad = 1.0;
  double clipnorm = -1.0;            // per-tensor gradient clipping (needs has_stats); <= 0: off
  int64_t moments_offset = 0;        // where the packed moments begin
  int64_t flat_offset = 0;           // where tensor 0 begins in the flat arrays
  std::vector<int64_t> flat_sizes;   // each tensor's elements, where the arrays are flat
  std::vector<double> lrs, wds;
  std::vector<double> decays;        // decoupled weight decay per tensor (Keras'); all 0: off
  std::vector<double> step_counts;   // the host's counts, where the device keeps none
  std::vector<double> stat_rows;     // each tensor's row of grad_sumsq
  std::vector<double> count_slots;   // each tensor's row of counts
  std::vector<bool> layer_adaptation;
};

// False (reported, naming the operator and the attribute) where an attribute is wrong.
bool parse_step(const OpTable& op, const Attrs& attrs, StepAttrs* s);

// Each tensor's row of a table input (grad_sumsq, counts) from `rows` (stat_rows,
// count_slots), range-checked against the table's size; nothing where the call has no table.
bool table_rows(const char* op, const char* key, const std::vector<double>& rows,
                const MXTensor* table, std::vector<int64_t>* out);

// ----------------------------------------------------------------- the group decoder

// One tensor of a LAMB call, as the call's arrays hold it: the one place where mxlamb_step's
// three layouts (per-tensor arrays, packed moments, flat arrays) and the phase operators'
// arrays are read. The CPU forwards make kernel spans of it, the GPU forwards lamb_cuda.h's
// tables. An array the call does not have is nullptr.
struct TensorArrays {
  void* weight = nullptr;      // w, or the float32 master copy under multi_precision
  void* weight_out = nullptr;  // where the updated w goes: w itself, or phase 2's out
  const void* grad = nullptr;  // phase 1 and mxlamb_step
  DType grad_dtype = DType::kFloat32;
  void* mean = nullptr;
  void* var = nullptr;         // phase 2 under AMSGrad: the running max, as the caller passes
  void* vmax = nullptr;        // phase 1 under AMSGrad
  void* average = nullptr;     // the weight EMA (phase 2)
  void* model = nullptr;       // the float16 model weight: mxlamb_step's w16, phase 2's out
  // state_bits=8: the block scales of mean, var (phase 2 under AMSGrad: the running max's)
  // and vmax; mean, var and vmax are then their codes.
  float* mean_scales = nullptr;
  float* var_scales = nullptr;
  float* vmax_scales = nullptr;
  int64_t size = 0;
};

// A decoded call: each tensor's arrays, the range-checked rows of its table inputs, and the
// arrays after the tensors (nullptr where the call has none).
struct Group {
  std::vector<TensorArrays> tensors;
  std::vector<int64_t> count_slots;  // each tensor's row of counts
  std::vector<int64_t> stat_rows;    // each tensor's row of grad_sumsq
  double* counts = nullptr;
  const double* grad_sumsq = nullptr;
  const double* control = nullptr;
  const double* sumsq = nullptr;     // phase 2's input table
  bool float64 = false;              // the math type is double
  bool quantized = false;            // state_bits=8
};

// Decodes a call of `op` (attributes already parsed into `s`); false (reported, naming the
// operator) where a row of a table input is out of range or clipnorm has no statistics.
bool decode_group(const OpTable& op, const StepAttrs& s, std::vector<MXTensor>& in,
                  std::vector<MXTensor>* out, Group* g);

// mxlamb_grad_stats' attributes.
bool parse_grad_stats(const Attrs& attrs, InputLayout* l, GradStatsParams* p);

// mxlamb_trust_ratio's attributes.
struct TrustRatioAttrs {
  InputLayout inputs;
  double lower = -1.0, upper = -1.0;
  std::vector<bool> layer_adaptation;
};
bool parse_trust_ratio(const Attrs& attrs, TrustRatioAttrs* a);

#ifdef MXLAMB_WITH_CUDA
using mxnet::ext::OpResource;
MXReturnValue phase1_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res);
MXReturnValue phase2_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                 std::vector<MXTensor>* out, const OpResource& res);
MXReturnValue step_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                               std::vector<MXTensor>* out, const OpResource& res);
MXReturnValue grad_stats_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                     std::vector<MXTensor>* out, const OpResource& res);
MXReturnValue trust_ratio_forward_gpu(const Attrs& attrs, std::vector<MXTensor>* in,
                                      std::vector<MXTensor>* out, const OpResource& res);
#endif

}  // namespace mxlamb

#endif  // MXLAMB_LAMB_OP_H_
