// Storage types and their conversion to the float "math type" (CPU side).
//
// The update is always computed in float; half-precision types are storage only. Rounding
// float -> half/bfloat16 is round-to-nearest-even, identical on every ISA level, so results do
// not depend on which code path ran.
#ifndef MXLAMB_PRECISION_H_
#define MXLAMB_PRECISION_H_

#include <cstdint>
#include <cstring>

// Every function here is always inlined: lamb_kernels.cc is compiled once per ISA level, and an
// out-of-line inline function would be merged by the linker into one copy, possibly the AVX-512
// one, then called from the baseline path.
#define MXLAMB_INLINE inline __attribute__((always_inline))

namespace mxlamb {

// mshadow's type flags (MXNet's lib_api.h MXDType stops at kInt64; bfloat16 is mshadow's 12).
enum class DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBfloat16 = 12,
};

// IEEE binary16, stored as its bits. _Float16 gives correctly rounded conversions in software
// on the baseline and F16C / AVX-512 instructions where the compiler may use them.
struct half_t {
  uint16_t bits;
};

// bfloat16: the upper 16 bits of a float.
struct bf16_t {
  uint16_t bits;
};

MXLAMB_INLINE float to_float(float x) { return x; }

MXLAMB_INLINE float to_float(half_t x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, sizeof(h));
  return static_cast<float>(h);
}

MXLAMB_INLINE float to_float(bf16_t x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
MXLAMB_INLINE T from_float(float x);

template <>
MXLAMB_INLINE float from_float<float>(float x) { return x; }

template <>
MXLAMB_INLINE half_t from_float<half_t>(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  half_t out;
  std::memcpy(&out.bits, &h, sizeof(h));
  return out;
}

template <>
MXLAMB_INLINE bf16_t from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  bf16_t out;
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
    out.bits = static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  } else {
    const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    out.bits = static_cast<uint16_t>((u + rounding) >> 16);
  }
  return out;
}

}  // namespace mxlamb

#endif  // MXLAMB_PRECISION_H_
