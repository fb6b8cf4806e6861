// Storage types and their conversion to the "math type" (CPU side).
//
// The update of float32 and float16 weights is computed in float (float16 is storage only,
// with a float32 master copy); float64 weights are computed in double. Rounding float -> half
// is round-to-nearest-even, identical on every ISA level, so results do not depend on which
// code path ran. There is no bfloat16 here: MXNet's extension API (1.9.1 and 2.0.0b1 alike)
// cannot hand a bfloat16 array to a library operator, so mxlamb widens bfloat16 gradients with
// MXNet's cast and updates the float32 master copy.
#ifndef MXLAMB_PRECISION_H_
#define MXLAMB_PRECISION_H_

#include <cstdint>
#include <cstring>

#include "lamb_math.h"

// Every function here is always inlined: lamb_kernels.cc is compiled once per ISA level, and an
// out-of-line inline function would be merged by the linker into one copy, possibly the AVX-512
// one, then called from the baseline path.
#define MXLAMB_INLINE inline __attribute__((always_inline))

namespace mxlamb {

// The storage types the kernels read and write, numbered as MXNet's dtype flags (lib_api.h).
enum class DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
};

// IEEE binary16, stored as its bits.
struct half_t {
  uint16_t bits;
};

// to_float(x): x in its math type, float for every storage type but double (its own).
MXLAMB_INLINE float to_float(float x) { return x; }
MXLAMB_INLINE double to_float(double x) { return x; }

// Bytes per element of a storage type.
MXLAMB_INLINE int64_t dtype_bytes(DType type) {
  return type == DType::kFloat64 ? 8 : type == DType::kFloat32 ? 4 : 2;
}

// Integer operations and selects only (float_bits and bits_float are lamb_math.h's), so the
// compiler vectorises them on every ISA level and denormal-as-zero settings cannot change the
// result.
MXLAMB_INLINE float to_float(half_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t magnitude = x.bits & 0x7fffu;
  const uint32_t shifted = magnitude << 13;
  // normal: rebias the exponent (15 -> 127); subnormal: 2^-14 + m 2^-24, minus 2^-14;
  // inf/NaN: all exponent bits set.
  const uint32_t normal = shifted + (112u << 23);
  const uint32_t subnormal = float_bits(bits_float(shifted + (113u << 23)) - bits_float(113u << 23));
  const uint32_t special = shifted | 0x7f800000u;
  const uint32_t out = magnitude >= 0x7c00u ? special : (magnitude < 0x0400u ? subnormal : normal);
  return bits_float(out | sign);
}

template <typename T>
MXLAMB_INLINE T from_float(float x);

template <>
MXLAMB_INLINE float from_float<float>(float x) { return x; }

// Round to nearest even (after F. Giesen's float_to_half_fast3_rtne), branch-free.
template <>
MXLAMB_INLINE half_t from_float<half_t>(float x) {
  const uint32_t all = float_bits(x);
  const uint32_t sign = all & 0x80000000u;
  const uint32_t f = all ^ sign;
  // >= 65536 (or inf/NaN): inf, or the quiet NaN
  const uint32_t special = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // < 2^-14: the float addition rounds the subnormal half's mantissa into place
  const uint32_t subnormal = float_bits(bits_float(f) + 0.5f) - (126u << 23);
  // normal: rebias, add half an ulp minus one plus the lowest kept bit, truncate
  const uint32_t normal = (f + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
  const uint32_t out = f >= 0x47800000u ? special : (f < 0x38800000u ? subnormal : normal);
  // A NaN becomes the one quiet NaN 0x7e00, sign dropped: which NaN arithmetic produces (its
  // sign and payload) depends on how the compiler ordered the operands of each level.
  const uint32_t sign_bit = f > 0x7f800000u ? 0u : sign >> 16;
  half_t h;
  h.bits = static_cast<uint16_t>(out | sign_bit);
  return h;
}

}  // namespace mxlamb

#endif  // MXLAMB_PRECISION_H_
