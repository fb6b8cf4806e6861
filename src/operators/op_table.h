// Operator contracts as data, and the MXNet callbacks that read them.
//
// Each operator is described by one table (OpTable; the LAMB operators' tables are in
// lamb_op.h): the arrays it takes in order, first a group per tensor and then those after all
// tensors, each with its dtype rule, its shape rule, the attribute that switches it on and
// whether the operator writes it; its outputs; the attributes it refuses. The callbacks every
// lib_api.h operator registers (parse attributes, infer types, infer shapes, mutated inputs)
// are written once, here, for any table. A forward finds its arrays by slot name through
// InputLayout, and reads its attributes with AttrReader; both name the operator and the
// attribute or array in every error.
#ifndef MXLAMB_OP_TABLE_H_
#define MXLAMB_OP_TABLE_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "mxnet/lib_api.h"

namespace mxlamb {

using Attrs = std::unordered_map<std::string, std::string>;
using Shape = std::vector<unsigned int>;
using mxnet::ext::MXReturnValue;
using mxnet::ext::MXTensor;

// Adds "op: message" to MXNet's error messages. Returns false, for `return fail(...)`.
bool fail(const char* op, const std::string& message);

// The row of an array of `size` rows that an entry `value` of list attribute `key` names
// (stat_rows, count_slots); false (reported) where there is no such row.
bool table_row(const char* op, const char* key, double value, int64_t size, int64_t* row);

// Reads the attributes of one operator call, typed. The first missing or malformed attribute
// is reported (naming the operator and the attribute) and turns ok() false; reads after it
// return their fallbacks. A parser is then a straight list of reads and one ok() at the end.
class AttrReader {
 public:
  AttrReader(const char* op, const Attrs& attrs) : op_(op), attrs_(attrs) {}

  const char* op() const { return op_; }
  bool ok() const { return ok_; }
  bool given(const char* key) const { return attrs_.find(key) != attrs_.end(); }

  // A number; `fallback` when the attribute is absent.
  double number(const char* key, double fallback);
  // A bool: True, true or 1; False, false or 0. `fallback` when absent.
  bool flag(const char* key, bool fallback = false);
  // The attribute's text, e.g. a dtype's name; `fallback` when absent.
  std::string text(const char* key, const char* fallback = "") const;
  // A whole number in [minimum, maximum] (required).
  static constexpr int64_t kNoMaximum = int64_t{1} << 53;  // doubles are whole numbers to here
  int64_t integer(const char* key, int64_t minimum, int64_t maximum = kNoMaximum);
  // n numbers, written "(0.1, 0.2)", "[0.1,0.2]" or "0.1,0.2"; one value stands for all n
  // (what the optimizer sends when every tensor has the same lr, wd or count). Required; with
  // a minimum, each >= it.
  std::vector<double> numbers(const char* key, int n, double minimum = -HUGE_VAL);
  // n bools, as a list of numbers (0: false); all true when the attribute is absent.
  std::vector<bool> flags(const char* key, int n);
  // n element counts (whole numbers >= 0), as a list of numbers. Required.
  std::vector<int64_t> counts(const char* key, int n);
  // Reports a message about this call's attributes. Returns false.
  bool fail(const std::string& message);

 private:
  const std::string* find(const char* key) const;

  const char* op_;
  const Attrs& attrs_;
  bool ok_ = true;
};

// Every array an operator of this library can take, by what it holds. The first group is
// repeated per tensor, the second comes after all tensors.
enum class Slot {
  kWeight,       // the float32/float64 weight, or the float32 master copy
  kGrad,
  kMean,
  kVar,
  kVarMax,       // AMSGrad's running max of var
  kAverage,      // the weight EMA
  kMeanScale,    // state_bits=8: the block scales of mean (then uint8 codes), var and vmax
  kVarScale,
  kVarMaxScale,
  kModelWeight,  // the float16 model weight beside its float32 master copy
  kMoments,      // every tensor's mean and var, packed in one array
  kFlatWeight,   // every tensor's weight (or master copy) side by side in one array
  kFlatGrad,     // every tensor's gradient, laid out as the flat weight
  kFlatModelWeight,  // every tensor's float16 model weight, laid out as the flat weight
  kGradSumsq,    // mxlamb_grad_stats' per-gradient sums of squares
  kControl,      // mxlamb_grad_stats' [gradient multiplier, apply]
  kCounts,       // per-parameter applied-step counts kept on the device
  kSumsq,        // the phase-1 table [sum(w^2), sum(u^2)] per tensor
  kStepState,    // [loss scale, clean steps, skipped steps]
};
constexpr int kSlotCount = static_cast<int>(Slot::kStepState) + 1;

// When an array is present, or written: always, never, or as one attribute says; and, where
// `with` or `unless` names a second attribute, only while it is given, or not given.
struct When {
  enum class Test { kAlways, kNever, kFlag, kGiven, kNotGiven };
  Test test;
  const char* attr;
  const char* with = nullptr;
  const char* unless = nullptr;
};
constexpr When kAlways{When::Test::kAlways, nullptr};
constexpr When kNever{When::Test::kNever, nullptr};
// A bool attribute is true.
constexpr When if_flag(const char* attr) { return When{When::Test::kFlag, attr}; }
// The attribute is there, whatever its value.
constexpr When if_given(const char* attr) { return When{When::Test::kGiven, attr}; }
constexpr When unless_given(const char* attr) { return When{When::Test::kNotGiven, attr}; }
// A bool attribute is true, and another attribute is given (with) or not given (unless).
constexpr When if_flag_with(const char* attr, const char* with) {
  return When{When::Test::kFlag, attr, with, nullptr};
}
constexpr When if_flag_unless(const char* attr, const char* unless) {
  return When{When::Test::kFlag, attr, nullptr, unless};
}

enum class DTypeRule {
  // The call's math type (lamb_math.h), its first weight's type: float32 or float64, and
  // float32 under multi_precision (the weights are then the float32 master copies).
  kMath,
  // The math type; under multi_precision float16 (the model's) or float32 (accumulated).
  kGrad,
  // float16: the model weight beside its float32 master copy.
  kHalf,
  // float32, float64 or float16: any parameter's gradient.
  kAnyGrad,
  kFloat64,
  kFloat32,
  // A moment (mean, var, vmax): the math type, or uint8 codes where attribute state_bits is
  // given (lamb_math.h's 8-bit moments).
  kState,
  // Outputs only. The updated weights: float16 under multi_precision (MXNet infers output
  // types before it looks at out=, so attribute model_dtype names it), else the math type.
  kUpdatedWeight,
};

enum class ShapeRule {
  kAny,
  kLikeWeight,      // its tensor's weight's shape
  kVector,          // one-dimensional
  kPerTensor,       // (num_tensors,)
  kTwoPerTensor,    // (num_tensors, 2)
  kFixed,           // (length,)
  // mxlamb_step's packed moments: one-dimensional, with room for tensor t's mean (n_t elements
  // at offset_t) and var (the n_t after them), offset_0 = attribute moments_offset and
  // offset_{t+1} = offset_t + 2 n_t.
  kPackedMoments,
  // mxlamb_step's flat arrays: one-dimensional, with room for every tensor's n_t elements
  // side by side from attribute flat_offset (n_t is entry t of attribute flat_sizes).
  kFlat,
  // An 8-bit moment's block scales: (ceil(n / kStateBlock),) for its tensor's n elements.
  kStateBlocks,
};

struct Input {
  Slot slot;
  const char* name;  // as messages say it
  DTypeRule dtype;
  ShapeRule shape;
  When present;
  When written;
  const char* origin;  // where a caller gets it, said in its errors; or nullptr
  bool plural;         // "counts are", not "counts is"
  unsigned length;     // for ShapeRule::kFixed
};

struct Output {
  const char* name;
  DTypeRule dtype;
  ShapeRule shape;
  bool per_tensor;  // one output per tensor, else one
  unsigned length;  // for ShapeRule::kFixed
};

// A constant array seen as a range.
template <typename T>
struct List {
  const T* items = nullptr;
  int size = 0;
  constexpr List() = default;
  template <size_t N>
  constexpr List(const T (&array)[N]) : items(array), size(static_cast<int>(N)) {}  // NOLINT
  const T* begin() const { return items; }
  const T* end() const { return items + size; }
};

struct OpTable {
  const char* name;
  bool takes_num_tensors;      // attribute num_tensors: how often per_tensor repeats
  List<Input> per_tensor;      // the group of arrays of one tensor, repeated num_tensors times
  List<Input> after_tensors;   // the arrays after every tensor's group
  List<Output> outputs;
  List<const char*> refused;   // bool attributes this operator does not take
  const char* instead;         // what to use when a refused attribute is set
};

// The most tensors one call may take: the positions of all their arrays stay within an int.
constexpr int kMaxTensors = 1 << 24;

// The arrays of one call: which of its table's inputs are present, and where.
class InputLayout {
 public:
  // False (reported) where an attribute is malformed, refused, or num_tensors is missing.
  bool resolve(const OpTable& op, AttrReader& attrs);

  const OpTable& op() const { return *op_; }
  int num_tensors() const { return num_tensors_; }
  int per_tensor() const { return per_tensor_; }
  int total() const { return num_tensors_ * per_tensor_ + after_; }
  bool has(Slot slot) const { return where_[static_cast<int>(slot)] >= 0; }
  // Position of tensor t's array `slot`, or of an array after the tensors (t ignored); -1 when
  // the call has none.
  int position(Slot slot, int t = 0) const;
  // The array at that position, or nullptr.
  MXTensor* array(std::vector<MXTensor>& in, Slot slot, int t = 0) const;
  // The table row at a position, and its tensor (-1 after the tensors).
  const Input& input_at(int position) const;
  int tensor_at(int position) const;
  // "grad of tensor 3", "control": the array at a position, as messages say it.
  std::string label(int position) const;

 private:
  const OpTable* op_ = nullptr;
  int num_tensors_ = 0;
  int per_tensor_ = 0;
  int after_ = 0;
  const Input* rows_[kSlotCount] = {};  // the present rows: per_tensor_ of them, then after_
  // Per slot: its offset in a tensor's group, or its position after the tensors; -1: absent.
  int where_[kSlotCount];
  bool in_group_[kSlotCount];
};

// The generic lib_api.h callbacks. Registered per operator as, e.g.,
// .setParseAttrs(parse_attrs<kPhase1Op>).
MXReturnValue parse_attrs(const OpTable& op, const Attrs& attrs, int* num_in, int* num_out);
MXReturnValue infer_type(const OpTable& op, const Attrs& attrs, std::vector<int>* in,
                         std::vector<int>* out);
MXReturnValue infer_shape(const OpTable& op, const Attrs& attrs, std::vector<Shape>* in,
                          std::vector<Shape>* out);
MXReturnValue mutate_inputs(const OpTable& op, const Attrs& attrs, std::vector<int>* mutated);

template <const OpTable& kOp>
MXReturnValue parse_attrs(const Attrs& attrs, int* num_in, int* num_out) {
  return parse_attrs(kOp, attrs, num_in, num_out);
}
template <const OpTable& kOp>
MXReturnValue infer_type(const Attrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  return infer_type(kOp, attrs, in, out);
}
template <const OpTable& kOp>
MXReturnValue infer_shape(const Attrs& attrs, std::vector<Shape>* in, std::vector<Shape>* out) {
  return infer_shape(kOp, attrs, in, out);
}
template <const OpTable& kOp>
MXReturnValue mutate_inputs(const Attrs& attrs, std::vector<int>* mutated) {
  return mutate_inputs(kOp, attrs, mutated);
}

}  // namespace mxlamb

#endif  // MXLAMB_OP_TABLE_H_
