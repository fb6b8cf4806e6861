#include "op_table.h"
#include "lamb_math.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace mxlamb {

bool fail(const char* op, const std::string& message) {
  MX_ERROR_MSG << op << ": " << message;
  return false;
}

namespace {

bool parse_double(const std::string& text, double* out) {
  const char* begin = text.c_str();
  char* end = nullptr;
  errno = 0;
  *out = std::strtod(begin, &end);
  while (*end == ' ') ++end;
  return end != begin && *end == '\0' && errno != ERANGE;
}

// 5 -> "5", 0.1 -> "0.1": the shortest text that reads back as the value, as Python writes it.
std::string number_text(double value) {
  char text[32];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(text, sizeof(text), "%.*g", digits, value);
    if (std::strtod(text, nullptr) == value) break;
  }
  return text;
}

std::string shape_text(const Shape& shape) {
  std::string text = "(";
  for (size_t d = 0; d < shape.size(); ++d) {
    text += (d > 0 ? ", " : "") + std::to_string(shape[d]);
  }
  return text + (shape.size() == 1 ? ",)" : ")");
}

int64_t elements(const Shape& shape) {
  int64_t n = 1;
  for (unsigned int d : shape) n *= d;
  return n;
}

}  // namespace

// ------------------------------------------------------------------------------- attributes

bool table_row(const char* op, const char* key, double value, int64_t size, int64_t* row) {
  if (value >= 0 && value == std::floor(value) && value < static_cast<double>(size)) {
    *row = static_cast<int64_t>(value);
    return true;
  }
  return fail(op, std::string("attribute ") + key + " has " + number_text(value) +
                      ", outside a table of " + std::to_string(size));
}

const std::string* AttrReader::find(const char* key) const {
  auto it = attrs_.find(key);
  return it == attrs_.end() ? nullptr : &it->second;
}

bool AttrReader::fail(const std::string& message) {
  if (ok_) mxlamb::fail(op_, message);
  ok_ = false;
  return false;
}

double AttrReader::number(const char* key, double fallback) {
  const std::string* text = find(key);
  double value;
  if (text == nullptr) return fallback;
  if (parse_double(*text, &value)) return value;
  fail(std::string("attribute ") + key + "='" + *text + "' is not a number");
  return fallback;
}

std::string AttrReader::text(const char* key, const char* fallback) const {
  const std::string* text = find(key);
  return text == nullptr ? std::string(fallback) : *text;
}

bool AttrReader::flag(const char* key, bool fallback) {
  const std::string* text = find(key);
  if (text == nullptr) return fallback;
  if (*text == "True" || *text == "true" || *text == "1") return true;
  if (*text == "False" || *text == "false" || *text == "0") return false;
  fail(std::string("attribute ") + key + "='" + *text + "' is not a bool (True or False)");
  return fallback;
}

int64_t AttrReader::integer(const char* key, int64_t minimum, int64_t maximum) {
  const std::string* text = find(key);
  double value;
  if (text != nullptr && parse_double(*text, &value) && value >= static_cast<double>(minimum) &&
      value <= static_cast<double>(maximum) && value == std::floor(value)) {
    return static_cast<int64_t>(value);
  }
  const std::string range = maximum == kNoMaximum
                                ? ">= " + std::to_string(minimum)
                                : "from " + std::to_string(minimum) + " to " +
                                      std::to_string(maximum);
  fail(std::string("attribute ") + key + " must be an integer " + range +
       (text == nullptr ? ", and is missing" : ", got '" + *text + "'"));
  return minimum;
}

std::vector<double> AttrReader::numbers(const char* key, int n, double minimum) {
  std::vector<double> values;
  const std::string* text = find(key);
  if (text == nullptr) {
    fail(std::string("attribute ") + key + " is missing");
    values.assign(n, 0.0);
    return values;
  }
  std::string item;
  for (char c : *text + ",") {
    if (c == '(' || c == ')' || c == '[' || c == ']' || c == ' ') continue;
    if (c != ',') {
      item.push_back(c);
      continue;
    }
    if (item.empty()) continue;
    double value;
    if (!parse_double(item, &value)) {
      fail(std::string("attribute ") + key + " has a non-number '" + item + "'");
      value = 0.0;
    } else if (minimum > -HUGE_VAL && !(value >= minimum)) {  // NaN fails a minimum
      fail(std::string("attribute ") + key + " has " + number_text(value) + ", must be >= " +
           number_text(minimum));
    }
    values.push_back(value);
    item.clear();
  }
  if (values.size() == 1 && n > 1) values.assign(n, values.front());
  if (static_cast<int>(values.size()) != n) {
    fail(std::string("attribute ") + key + " has " + std::to_string(values.size()) +
         " values for num_tensors=" + std::to_string(n));
    values.resize(n, 0.0);
  }
  return values;
}

std::vector<int64_t> AttrReader::counts(const char* key, int n) {
  const std::vector<double> values = numbers(key, n, 0.0);
  std::vector<int64_t> out(n, 0);
  for (int t = 0; t < n && ok_; ++t) {
    if (values[t] != std::floor(values[t]) || values[t] > static_cast<double>(kNoMaximum)) {
      fail(std::string("attribute ") + key + " has " + number_text(values[t]) +
           ", not a whole number of elements");
    }
    out[t] = static_cast<int64_t>(values[t]);
  }
  return out;
}

std::vector<bool> AttrReader::flags(const char* key, int n) {
  std::vector<bool> out(n, true);
  if (!given(key)) return out;
  const std::vector<double> values = numbers(key, n);
  for (int t = 0; t < n; ++t) out[t] = values[t] != 0.0;
  return out;
}

// ----------------------------------------------------------------------------- input layout

namespace {

bool holds(const When& when, AttrReader& attrs) {
  if (when.with != nullptr && !attrs.given(when.with)) return false;
  if (when.unless != nullptr && attrs.given(when.unless)) return false;
  switch (when.test) {
    case When::Test::kAlways: return true;
    case When::Test::kNever: return false;
    case When::Test::kFlag: return attrs.flag(when.attr);
    case When::Test::kGiven: return attrs.given(when.attr);
    case When::Test::kNotGiven: return !attrs.given(when.attr);
  }
  return false;
}

}  // namespace

bool InputLayout::resolve(const OpTable& op, AttrReader& attrs) {
  op_ = &op;
  for (const char* key : op.refused) {
    if (attrs.flag(key)) {
      return attrs.fail(std::string(key) + " is not supported by " + op.name + "; " + op.instead);
    }
  }
  num_tensors_ =
      op.takes_num_tensors ? static_cast<int>(attrs.integer("num_tensors", 1, kMaxTensors)) : 0;
  per_tensor_ = after_ = 0;
  for (int s = 0; s < kSlotCount; ++s) where_[s] = -1;
  for (const Input& input : op.per_tensor) {
    if (!holds(input.present, attrs)) continue;
    const int s = static_cast<int>(input.slot);
    where_[s] = per_tensor_;
    in_group_[s] = true;
    rows_[per_tensor_++] = &input;
  }
  for (const Input& input : op.after_tensors) {
    if (!holds(input.present, attrs)) continue;
    const int s = static_cast<int>(input.slot);
    where_[s] = num_tensors_ * per_tensor_ + after_;
    in_group_[s] = false;
    rows_[per_tensor_ + after_++] = &input;
  }
  return attrs.ok();
}

int InputLayout::position(Slot slot, int t) const {
  const int s = static_cast<int>(slot);
  if (where_[s] < 0) return -1;
  return in_group_[s] ? t * per_tensor_ + where_[s] : where_[s];
}

MXTensor* InputLayout::array(std::vector<MXTensor>& in, Slot slot, int t) const {
  const int p = position(slot, t);
  return p < 0 ? nullptr : &in[p];
}

const Input& InputLayout::input_at(int position) const {
  const int group = num_tensors_ * per_tensor_;
  return position < group ? *rows_[position % per_tensor_]
                          : *rows_[per_tensor_ + (position - group)];
}

int InputLayout::tensor_at(int position) const {
  return position < num_tensors_ * per_tensor_ ? position / per_tensor_ : -1;
}

std::string InputLayout::label(int position) const {
  const int t = tensor_at(position);
  const std::string name = input_at(position).name;
  return t < 0 ? name : name + " of tensor " + std::to_string(t);
}

// -------------------------------------------------------------------------------- callbacks

namespace {

using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;

// mshadow's flag for bfloat16, which lib_api.h's MXDType (1.9.1 and 2.0.0b1) leaves out.
constexpr int kBfloat16Flag = 12;

const char* dtype_name(int flag) {
  switch (flag) {
    case mxnet::ext::kFloat32: return "float32";
    case mxnet::ext::kFloat64: return "float64";
    case mxnet::ext::kFloat16: return "float16";
    case mxnet::ext::kUint8: return "uint8";
    case mxnet::ext::kInt32: return "int32";
    case mxnet::ext::kInt8: return "int8";
    case mxnet::ext::kInt64: return "int64";
    case kBfloat16Flag: return "bfloat16";
    default: return "an unsupported dtype";
  }
}

bool dtype_allowed(DTypeRule rule, int flag, int math, bool multi_precision, bool quantized) {
  switch (rule) {
    case DTypeRule::kMath: return flag == math;
    case DTypeRule::kState: return flag == (quantized ? mxnet::ext::kUint8 : math);
    case DTypeRule::kFloat32: return flag == mxnet::ext::kFloat32;
    case DTypeRule::kGrad:
      return multi_precision ? flag == mxnet::ext::kFloat16 || flag == mxnet::ext::kFloat32
                             : flag == math;
    case DTypeRule::kHalf: return flag == mxnet::ext::kFloat16;
    case DTypeRule::kAnyGrad:
      return flag == mxnet::ext::kFloat32 || flag == mxnet::ext::kFloat64 ||
             flag == mxnet::ext::kFloat16;
    case DTypeRule::kFloat64: return flag == mxnet::ext::kFloat64;
    default: return false;  // output rules
  }
}

std::string dtype_expected(DTypeRule rule, int math, bool multi_precision, bool quantized) {
  switch (rule) {
    case DTypeRule::kState:
      return quantized ? "uint8 (the codes of an 8-bit moment, state_bits=8)" : dtype_name(math);
    case DTypeRule::kFloat32: return "float32";
    case DTypeRule::kGrad:
      return multi_precision ? "float16 or float32" : dtype_name(math);
    case DTypeRule::kHalf: return "float16";
    case DTypeRule::kAnyGrad: return "float32, float64 or float16";
    case DTypeRule::kFloat64: return "float64";
    default: return dtype_name(math);
  }
}

// "grad of tensor 0 is bfloat16, expected float16 or float32 (...)".
bool wrong_dtype(const InputLayout& l, int position, int flag, const std::string& expected) {
  const Input& input = l.input_at(position);
  std::string message = l.label(position) + (input.plural ? " are " : " is ") +
                        dtype_name(flag) + ", expected " + expected;
  if (input.origin != nullptr) message += std::string(" (") + input.origin + ")";
  if (flag == kBfloat16Flag) {
    message += "; MXNet's extension API passes no bfloat16 array to a library operator: "
               "cast it to float32";
  }
  return fail(l.op().name, message);
}

bool wrong_shape(const InputLayout& l, int position, const Shape& shape,
                 const std::string& expected) {
  const Input& input = l.input_at(position);
  std::string message = l.label(position) + " has shape " + shape_text(shape) + ", expected " +
                        expected;
  if (input.origin != nullptr) message += std::string(" (") + input.origin + ")";
  return fail(l.op().name, message);
}

// The call's math type, from its first weight; -1 for an operator without weights.
bool math_type(const InputLayout& l, const std::vector<int>& in, bool multi_precision,
               int* math) {
  *math = -1;
  if (l.total() == 0 || l.input_at(0).dtype != DTypeRule::kMath) return true;
  *math = in[0];
  if (*math == mxnet::ext::kFloat32 || (*math == mxnet::ext::kFloat64 && !multi_precision)) {
    return true;
  }
  return wrong_dtype(l, 0, *math,
                     multi_precision ? "float32 (the master copy, under multi_precision)"
                                     : "float32 or float64");
}

int output_count(const OpTable& op, int num_tensors) {
  int count = 0;
  for (const Output& output : op.outputs) count += output.per_tensor ? num_tensors : 1;
  return count;
}

}  // namespace

MXReturnValue parse_attrs(const OpTable& op, const Attrs& attrs, int* num_in, int* num_out) {
  AttrReader reader(op.name, attrs);
  InputLayout l;
  if (!l.resolve(op, reader)) return MX_FAIL;
  *num_in = l.total();
  *num_out = output_count(op, l.num_tensors());
  return MX_SUCCESS;
}

MXReturnValue infer_type(const OpTable& op, const Attrs& attrs, std::vector<int>* in,
                         std::vector<int>* out) {
  AttrReader reader(op.name, attrs);
  InputLayout l;
  if (!l.resolve(op, reader)) return MX_FAIL;
  const bool multi_precision = reader.flag("multi_precision");
  const bool quantized = reader.given("state_bits");
  int math;
  if (!reader.ok() || !math_type(l, *in, multi_precision, &math)) return MX_FAIL;
  for (int p = 0; p < l.total(); ++p) {
    const DTypeRule rule = l.input_at(p).dtype;
    if (!dtype_allowed(rule, (*in)[p], math, multi_precision, quantized)) {
      wrong_dtype(l, p, (*in)[p], dtype_expected(rule, math, multi_precision, quantized));
      return MX_FAIL;
    }
  }
  int o = 0;
  for (const Output& output : op.outputs) {
    int flag = mxnet::ext::kFloat64;
    if (output.dtype == DTypeRule::kUpdatedWeight) {
      flag = multi_precision ? mxnet::ext::kFloat16 : math;
      if (multi_precision && reader.text("model_dtype") != "float16") {
        reader.fail("with multi_precision, attribute model_dtype must be float16 (the model "
                    "weight's type), got '" + reader.text("model_dtype") + "'");
      }
    }
    for (int copy = 0; copy < (output.per_tensor ? l.num_tensors() : 1); ++copy) {
      (*out)[o++] = flag;
    }
  }
  return reader.ok() ? MX_SUCCESS : MX_FAIL;
}

MXReturnValue infer_shape(const OpTable& op, const Attrs& attrs, std::vector<Shape>* in,
                          std::vector<Shape>* out) {
  AttrReader reader(op.name, attrs);
  InputLayout l;
  if (!l.resolve(op, reader)) return MX_FAIL;
  const unsigned n = static_cast<unsigned>(l.num_tensors());
  auto weight_of = [&](int t) -> const Shape& { return (*in)[t * l.per_tensor()]; };
  // Each tensor's element count: attribute flat_sizes where the call takes flat arrays (then
  // there are no per-tensor arrays), else its weight's.
  std::vector<int64_t> sizes;
  if (l.has(Slot::kFlatWeight)) {
    sizes = reader.counts("flat_sizes", l.num_tensors());
    if (!reader.ok()) return MX_FAIL;
  } else if (l.per_tensor() > 0) {
    for (int t = 0; t < l.num_tensors(); ++t) sizes.push_back(elements(weight_of(t)));
  }
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  for (int p = 0; p < l.total(); ++p) {
    const Input& input = l.input_at(p);
    const Shape& shape = (*in)[p];
    bool ok = true;
    switch (input.shape) {
      case ShapeRule::kLikeWeight: {
        const Shape& weight = weight_of(l.tensor_at(p));
        if (shape != weight) {
          fail(op.name, l.label(p) + " has another shape than its weight: " + shape_text(shape) +
                            ", the weight " + shape_text(weight));
          return MX_FAIL;
        }
        break;
      }
      case ShapeRule::kVector:
        ok = shape.size() == 1 || wrong_shape(l, p, shape, "one dimension");
        break;
      case ShapeRule::kStateBlocks: {
        const int64_t n = elements(weight_of(l.tensor_at(p)));
        const unsigned blocks = static_cast<unsigned>((n + kStateBlock - 1) / kStateBlock);
        ok = shape == Shape{blocks} ||
             wrong_shape(l, p, shape, shape_text({blocks}) + " (a scale per block of " +
                                          std::to_string(kStateBlock) + " elements)");
        break;
      }
      case ShapeRule::kPerTensor:
        ok = shape == Shape{n} || wrong_shape(l, p, shape, "(num_tensors,) = " + shape_text({n}));
        break;
      case ShapeRule::kTwoPerTensor:
        ok = shape == Shape{n, 2u} ||
             wrong_shape(l, p, shape, "(num_tensors, 2) = " + shape_text({n, 2u}));
        break;
      case ShapeRule::kFixed:
        ok = shape == Shape{input.length} || wrong_shape(l, p, shape, shape_text({input.length}));
        break;
      case ShapeRule::kPackedMoments: {
        const int64_t offset = reader.integer("moments_offset", 0);
        if (!reader.ok()) return MX_FAIL;
        const int64_t needed = offset + 2 * total;
        if (shape.size() != 1 || elements(shape) < needed) {
          fail(op.name, l.label(p) + " must be one-dimensional with at least " +
                            std::to_string(needed) + " elements (moments_offset " +
                            std::to_string(offset) + " plus mean and var of every tensor), got " +
                            std::to_string(elements(shape)) + " in " +
                            std::to_string(shape.size()) + " dimension(s)");
          return MX_FAIL;
        }
        break;
      }
      case ShapeRule::kFlat: {
        const int64_t offset = reader.given("flat_offset") ? reader.integer("flat_offset", 0) : 0;
        if (!reader.ok()) return MX_FAIL;
        if (shape.size() != 1 || elements(shape) < offset + total) {
          fail(op.name, l.label(p) + " must be one-dimensional with at least " +
                            std::to_string(offset + total) + " elements (flat_offset " +
                            std::to_string(offset) + " plus the " + std::to_string(n) +
                            " tensors' flat_sizes, which add up to " + std::to_string(total) +
                            "), got " + std::to_string(elements(shape)) + " in " +
                            std::to_string(shape.size()) + " dimension(s)");
          return MX_FAIL;
        }
        break;
      }
      default:
        break;
    }
    if (!ok) return MX_FAIL;
  }
  int o = 0;
  for (const Output& output : op.outputs) {
    for (int copy = 0; copy < (output.per_tensor ? l.num_tensors() : 1); ++copy) {
      switch (output.shape) {
        case ShapeRule::kPerTensor: (*out)[o++] = {n}; break;
        case ShapeRule::kTwoPerTensor: (*out)[o++] = {n, 2u}; break;
        case ShapeRule::kFixed: (*out)[o++] = {output.length}; break;
        default: (*out)[o++] = weight_of(copy); break;  // kLikeWeight
      }
    }
  }
  return MX_SUCCESS;
}

MXReturnValue mutate_inputs(const OpTable& op, const Attrs& attrs, std::vector<int>* mutated) {
  AttrReader reader(op.name, attrs);
  InputLayout l;
  if (!l.resolve(op, reader)) return MX_FAIL;
  std::vector<bool> written(l.per_tensor());
  for (int k = 0; k < l.per_tensor(); ++k) written[k] = holds(l.input_at(k).written, reader);
  for (int p = 0; p < l.num_tensors() * l.per_tensor(); ++p) {
    if (written[p % l.per_tensor()]) mutated->push_back(p);
  }
  for (int p = l.num_tensors() * l.per_tensor(); p < l.total(); ++p) {
    if (holds(l.input_at(p).written, reader)) mutated->push_back(p);
  }
  return reader.ok() ? MX_SUCCESS : MX_FAIL;
}

}  // namespace mxlamb
