// LAMB span kernels: load, call lamb_math.h's per-element phase functions, store.
//
// This file is compiled once per ISA level with different -m flags and
// -DMXLAMB_ISA=<name> (see setup.py); each copy defines kernels_<name>(). The loops are written
// so that the compiler vectorises them: a body of blocks of kSumLanes elements whose lane l
// always feeds accumulator l, then a tail block padded with zeros. Both call the same element
// functions, so body and tail cannot disagree.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "lamb_kernels.h"

#ifndef MXLAMB_ISA
#error "compile with -DMXLAMB_ISA=baseline|avx2|avx512"
#endif
#define MXLAMB_CAT_(a, b) a##b
#define MXLAMB_CAT(a, b) MXLAMB_CAT_(a, b)
#define MXLAMB_STR_(a) #a
#define MXLAMB_STR(a) MXLAMB_STR_(a)

namespace mxlamb {
namespace {

// The fixed-order sum of the accumulator lanes (a balanced tree).
inline double sum_lanes(const double* acc) {
  double level[kSumLanes];
  for (int l = 0; l < kSumLanes; ++l) level[l] = acc[l];
  for (int width = kSumLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) level[l] = level[l] + level[l + width];
  }
  return level[0];
}

// The bytes of one vector register at this ISA level: GCC vector types wider than that are not
// vector code here (their selects and conversions become scalar code or go through memory).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// Adds the squares of one block of kSumLanes values to the lane accumulators. Written with
// GCC vector types, so that it is vector code on every ISA level and in every instantiation (a
// plain loop was left scalar in the float16 one); the arithmetic per lane is the same (widen,
// multiply, add: -ffp-contract=off keeps the two roundings). The width is the one measured
// fastest (bench_probe.cc's phase arithmetic): one register of doubles on AVX-512 and AVX2 (8
// doubles, two registers, went through memory on AVX2: phase 1 1.42 -> 0.83 ns/element), but 8
// doubles (four SSE registers) on the baseline (one register, 2 doubles: 1.30 -> 1.53).
constexpr int kDoublesPerVector = kVectorBytes == 16 ? 8 : kVectorBytes / 8;
static_assert(kSumLanes % kDoublesPerVector == 0, "accumulate_squares works in whole vectors");

// Float32 values are widened to float64 first; float64 values convert to themselves.
template <typename T>
MXLAMB_INLINE void accumulate_squares(const T* x, double* acc) {
  typedef T Part __attribute__((vector_size(kDoublesPerVector * sizeof(T))));
  typedef double DoublePart __attribute__((vector_size(kDoublesPerVector * sizeof(double))));
  for (int at = 0; at < kSumLanes; at += kDoublesPerVector) {
    Part value;
    DoublePart sum;
    std::memcpy(&value, x + at, sizeof(value));
    std::memcpy(&sum, acc + at, sizeof(sum));
    const DoublePart wide = __builtin_convertvector(value, DoublePart);
    sum += wide * wide;
    std::memcpy(acc + at, &sum, sizeof(sum));
  }
}

// kDecay: the tensor's decay is decoupled (Keras' weight_decay); the weight is read through
// decayed(). A template parameter, so that the plain loops are what they were.
template <bool kDecay, typename T>
MXLAMB_INLINE T weight_at(const T* __restrict__ w, int64_t i, const TensorCoeffs<T>& tensor) {
  return kDecay ? decayed(w[i], tensor) : w[i];
}

template <bool kAmsgrad, bool kDecay, typename T>
MXLAMB_INLINE T phase1_at(int64_t i, T grad, const T* __restrict__ w, T* __restrict__ m,
                          T* __restrict__ v, T* __restrict__ v_max, const StepCoeffs<T>& step,
                          const TensorCoeffs<T>& tensor) {
  const T weight = weight_at<kDecay>(w, i, tensor);
  if (kAmsgrad) return phase1_element(weight, grad, &m[i], &v[i], &v_max[i], step, tensor);
  return phase1_element(weight, grad, &m[i], &v[i], step, tensor);
}

// Block conversions between a storage type and float, kSumLanes values at a time. The generic
// ones convert each value with precision.h; with F16C (the AVX2 and AVX-512 levels) float16
// uses the conversion instructions. They give the same bits as precision.h for every input
// (checked over all 2^32 floats and 2^16 halves, with and without FTZ/DAZ), except NaNs:
//  - widening keeps a signalling NaN's payload but sets the quiet bit; the first arithmetic
//    on the value (the gradient scale) quiets it in the software path too;
//  - narrowing keeps sign and payload bits, so a NaN is rewritten to precision.h's 0x7e00.
template <typename T>
MXLAMB_INLINE void widen_block(const T* src, float* dst) {
  for (int lane = 0; lane < kSumLanes; ++lane) dst[lane] = to_float(src[lane]);
}

template <typename T>
MXLAMB_INLINE void narrow_block(const float* src, T* dst) {
  for (int lane = 0; lane < kSumLanes; ++lane) dst[lane] = from_float<T>(src[lane]);
}

#if defined(__F16C__)
// One vector of kSumLanes values: the compiler's loops around these blocks use vectors of the
// same width, so every load of a block is forwarded from one store.
#if defined(__AVX512F__)
static_assert(kSumLanes == 16, "one AVX-512 vector of lanes");
#else
static_assert(kSumLanes == 16, "two AVX vectors of lanes");
#endif

// precision.h's NaN for float16: 0x7e00, whatever the sign and payload.
MXLAMB_INLINE __m128i canonical_nan(__m128i half) {
  const __m128i sign_bit = _mm_set1_epi16(static_cast<int16_t>(0x8000));
  const __m128i is_nan = _mm_cmpgt_epi16(_mm_andnot_si128(sign_bit, half), _mm_set1_epi16(0x7c00));
  return _mm_blendv_epi8(half, _mm_set1_epi16(0x7e00), is_nan);
}

template <>
MXLAMB_INLINE void widen_block<half_t>(const half_t* src, float* dst) {
#if defined(__AVX512F__)
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  _mm512_storeu_ps(dst, _mm512_maskz_cvtph_ps(0xffff, half));  // maskz: no undefined input
#else
  for (int octet = 0; octet < kSumLanes; octet += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + octet));
    _mm256_storeu_ps(dst + octet, _mm256_cvtph_ps(half));
  }
#endif
}

template <>
MXLAMB_INLINE void narrow_block<half_t>(const float* src, half_t* dst) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#if defined(__AVX512F__)
  const __m256i half = _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(src), kRound);
  const __m128i low = canonical_nan(_mm256_castsi256_si128(half));
  const __m128i high = canonical_nan(_mm256_extracti128_si256(half, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), low);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), high);
#else
  for (int octet = 0; octet < kSumLanes; octet += 8) {
    const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(src + octet), kRound);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + octet), canonical_nan(half));
  }
#endif
}
#endif

// T is the math type, GradT the gradient's storage type (T itself, or float16 for float). kAmsgrad is a template parameter so that the plain loop has no per-element branch.
template <typename T, typename GradT, bool kAmsgrad, bool kDecay>
void phase1_span(const Phase1Span<T>& s, const StepCoeffs<T>& step, const TensorCoeffs<T>& tensor,
                 double* weight_sumsq, double* update_sumsq) {
  const T* __restrict__ w = s.weight;
  const GradT* __restrict__ g = static_cast<const GradT*>(s.grad);
  T* __restrict__ m = s.mean;
  T* __restrict__ v = s.var;
  T* __restrict__ v_max = kAmsgrad ? s.var_max : nullptr;
  double acc_w[kSumLanes] = {};
  double acc_u[kSumLanes] = {};
  T u[kSumLanes];
  T w_decayed[kSumLanes];  // (kDecay: the weights whose norm is taken)

  const int64_t body = s.n - s.n % kSumLanes;
  for (int64_t i = 0; i < body; i += kSumLanes) {
    if constexpr (std::is_same<GradT, T>::value) {
      const T* g_math = reinterpret_cast<const T*>(g);
      for (int lane = 0; lane < kSumLanes; ++lane) {
        u[lane] = phase1_at<kAmsgrad, kDecay>(i + lane, g_math[i + lane], w, m, v, v_max, step,
                                              tensor);
      }
    } else {
      float g_block[kSumLanes];
      widen_block(g + i, g_block);
      for (int lane = 0; lane < kSumLanes; ++lane) {
        u[lane] = phase1_at<kAmsgrad, kDecay>(i + lane, g_block[lane], w, m, v, v_max, step,
                                              tensor);
      }
    }
    if constexpr (kDecay) {
      for (int lane = 0; lane < kSumLanes; ++lane) {
        w_decayed[lane] = weight_at<kDecay>(w, i + lane, tensor);
      }
      accumulate_squares(w_decayed, acc_w);
    } else {
      accumulate_squares(w + i, acc_w);
    }
    accumulate_squares(u, acc_u);
  }
  // The tail continues the same lane pattern with zeros in the unused lanes (0^2 adds nothing).
  if (body < s.n) {
    T w_tail[kSumLanes] = {};
    T u_tail[kSumLanes] = {};
    for (int64_t i = body; i < s.n; ++i) {
      w_tail[i - body] = weight_at<kDecay>(w, i, tensor);
      u_tail[i - body] = phase1_at<kAmsgrad, kDecay>(i, to_float(g[i]), w, m, v, v_max, step,
                                                     tensor);
    }
    accumulate_squares(w_tail, acc_w);
    accumulate_squares(u_tail, acc_u);
  }
  *weight_sumsq = sum_lanes(acc_w);
  *update_sumsq = sum_lanes(acc_u);
}

// LowT: the storage type of the model weight written beside the master copy (float16, math
// type float), or T itself where there is none.
template <typename T, typename LowT, bool kEma, bool kDecay>
void phase2_span(const Phase2Span<T>& s, const TensorCoeffs<T>& tensor, T step_size) {
  constexpr bool kLowp = !std::is_same<LowT, T>::value;
  const T* w = s.weight;  // may alias w_out: no __restrict__
  T* w_out = s.weight_out;
  LowT* __restrict__ w_lowp = reinterpret_cast<LowT*>(s.model_weight);
  const T* __restrict__ m = s.mean;
  const T* __restrict__ v = s.var;
  T* __restrict__ avg = s.average;
  auto element = [&](int64_t i) {
    const T updated = phase2_element(weight_at<kDecay>(w, i, tensor), m[i], v[i], tensor,
                                     step_size);
    w_out[i] = updated;
    if (kEma) avg[i] = moving_average(avg[i], updated, tensor.ema);
    return updated;
  };
  int64_t body = 0;
  if constexpr (kLowp) {  // blocks, so that the narrowing is block conversions
    body = s.n - s.n % kSumLanes;
    float block[kSumLanes];
    for (int64_t i = 0; i < body; i += kSumLanes) {
      for (int lane = 0; lane < kSumLanes; ++lane) block[lane] = element(i + lane);
      narrow_block(block, w_lowp + i);
    }
  }
  for (int64_t i = body; i < s.n; ++i) {
    const T updated = element(i);
    if constexpr (kLowp) w_lowp[i] = from_float<LowT>(updated);
  }
}

// ------------------------------------------------------------------ 8-bit moments, in lanes
//
// The 8-bit kernels work on kLanes elements at a time as GCC vectors (FloatLanes), one vector
// register of floats wide: 16 on AVX-512, 8 on AVX2, 4 on the baseline. lamb_math.h's
// functions instantiated for lanes (Lanes<FloatLanes> below) do every operation lane by lane,
// the same operations as on one float, so every ISA level gives the same bits as the scalar
// code (runtime.cc's encode_moment, the CUDA kernels). The sums keep kSumLanes lanes whatever
// the width: element i goes to lane i % kSumLanes, kSumLanes / kLanes vectors of accumulators
// taken in turn.
constexpr int kLanes = kVectorBytes / sizeof(float);
constexpr int kAccumulators = kSumLanes / kLanes;
static_assert(kSumLanes % kLanes == 0 && kStateBlock % kSumLanes == 0,
              "a block is whole groups of lanes, and lanes meet the same accumulator each time");
typedef float FloatLanes __attribute__((vector_size(sizeof(float) * kLanes)));
typedef uint32_t BitLanes __attribute__((vector_size(sizeof(uint32_t) * kLanes)));
typedef double DoubleLanes __attribute__((vector_size(sizeof(double) * kLanes)));

}  // namespace

template <>
struct Lanes<FloatLanes> {
  using Element = float;
  using Bits = BitLanes;
  static MXLAMB_INLINE FloatLanes sqrt(FloatLanes x) {
    FloatLanes root;
    for (int lane = 0; lane < kLanes; ++lane) root[lane] = std::sqrt(x[lane]);
    return root;
  }
};

namespace {

MXLAMB_INLINE FloatLanes load_lanes(const float* x) {
  FloatLanes lanes;
  std::memcpy(&lanes, x, sizeof(lanes));
  return lanes;
}

MXLAMB_INLINE void store_lanes(float* x, FloatLanes lanes) {
  std::memcpy(x, &lanes, sizeof(lanes));
}

MXLAMB_INLINE BitLanes load_codes(const uint8_t* codes) {
  BitLanes lanes;
  for (int lane = 0; lane < kLanes; ++lane) lanes[lane] = codes[lane];
  return lanes;
}

// The low byte of each lane. AVX-512 narrows in one instruction (vpmovdb), which GCC finds in
// the plain loop; below it the loop became one extract per lane, and a byte shuffle is faster
// (in cache, one thread, 8-bit phase 1: AVX2 2.10 -> 1.91 ns/element, baseline 4.86 -> 4.69; on
// AVX-512 the shuffle took 1.37 against the loop's 1.24).
template <size_t... kLane>
MXLAMB_INLINE void store_low_bytes(uint8_t* codes, BitLanes lanes,
                                   std::index_sequence<kLane...>) {
  typedef uint8_t LaneBytes __attribute__((vector_size(sizeof(BitLanes))));
  typedef uint8_t Codes __attribute__((vector_size(kLanes)));
  LaneBytes bytes;
  std::memcpy(&bytes, &lanes, sizeof(bytes));
  const Codes low = __builtin_shufflevector(bytes, bytes, (kLane * sizeof(uint32_t))...);
  std::memcpy(codes, &low, sizeof(low));
}

MXLAMB_INLINE void store_codes(uint8_t* codes, BitLanes lanes) {
  if constexpr (kVectorBytes == 64) {
    for (int lane = 0; lane < kLanes; ++lane) codes[lane] = static_cast<uint8_t>(lanes[lane]);
  } else {
    store_low_bytes(codes, lanes, std::make_index_sequence<kLanes>());
  }
}

MXLAMB_INLINE BitLanes max_lanes(BitLanes a, BitLanes b) { return a > b ? a : b; }

// The largest of the lanes (an integer max: the same in any order).
MXLAMB_INLINE uint32_t largest_lane(BitLanes a) {
  uint32_t largest = 0;
  for (int lane = 0; lane < kLanes; ++lane) largest = largest > a[lane] ? largest : a[lane];
  return largest;
}

// x^2 added to one vector of accumulators: widened, squared and added in double, as
// accumulate_squares does.
MXLAMB_INLINE void accumulate_square_lanes(FloatLanes x, DoubleLanes* acc) {
  const DoubleLanes wide = __builtin_convertvector(x, DoubleLanes);
  *acc += wide * wide;
}

// The sums of squares of w and u, kSumLanes lanes as kAccumulators vectors.
struct LaneSums {
  DoubleLanes w[kAccumulators] = {};
  DoubleLanes u[kAccumulators] = {};
};

// The moments of one block: codes and scale, where phase 1 reads and writes them.
struct BlockMoment {
  uint8_t* codes;
  float* scale;
};

// Phase 1 on one block of kStateBlock elements (a short last block comes zero-padded, see
// phase1_q8_tail; `valid`: its elements, the rest add nothing to the sums): the moments
// decoded and updated, the block's scales taken; then encoded, decoded again, u made from the
// stored values and the sums taken.
template <typename GradT, bool kAmsgrad, bool kDecay, bool kPadded>
MXLAMB_INLINE void phase1_q8_block(const float* __restrict__ w, const GradT* __restrict__ g,
                                   BlockMoment mean, BlockMoment var, BlockMoment var_max,
                                   int valid, const StepCoeffs<float>& step,
                                   const TensorCoeffs<float>& tensor, LaneSums* sums) {
  alignas(64) float m[kStateBlock], v[kStateBlock];
  const float* grad = reinterpret_cast<const float*>(g);
  alignas(64) float widened[std::is_same<GradT, float>::value ? 1 : kStateBlock];
  if constexpr (!std::is_same<GradT, float>::value) {  // float16: widened as widen_block does
    for (int i = 0; i < kStateBlock; i += kSumLanes) widen_block(g + i, widened + i);
    grad = widened;
  }
  // Padding lanes (kPadded: lane_index + i >= valid) hold 0 in m, v, w and u whatever the
  // coefficients (an infinite gradient scale makes 0 * inf = NaN of a padding gradient), as
  // the CUDA kernel's lanes past the end do: they add nothing to a scale or a sum.
  BitLanes lane_index;
  for (int lane = 0; lane < kLanes; ++lane) lane_index[lane] = static_cast<uint32_t>(lane);
  const float m_scale = *mean.scale, v_scale = *var.scale;
  BitLanes m_largest{}, v_largest{};
  for (int i = 0; i < kStateBlock; i += kLanes) {
    FloatLanes mi = decode_mean<FloatLanes>(load_codes(mean.codes + i), m_scale);
    FloatLanes vi = decode_var<FloatLanes>(load_codes(var.codes + i), v_scale);
    update_moments(scaled_grad(load_lanes(grad + i), step, tensor), &mi, &vi, step);
    if constexpr (kPadded) {
      const auto inside = lane_index + static_cast<uint32_t>(i) < static_cast<uint32_t>(valid);
      mi = inside ? mi : 0.0f;
      vi = inside ? vi : 0.0f;
    }
    store_lanes(m + i, mi);
    store_lanes(v + i, vi);
    m_largest = max_lanes(m_largest, magnitude_bits(mi));
    v_largest = max_lanes(v_largest, magnitude_bits(vi));
  }
  const float m_stored = block_scale(largest_lane(m_largest));
  const float v_stored = block_scale(largest_lane(v_largest));
  const float m_inverse = inverse_scale(m_stored), v_inverse = inverse_scale(v_stored);
  *mean.scale = m_stored;
  *var.scale = v_stored;
  float x_stored = 0.0f, x_inverse = 0.0f;
  if constexpr (kAmsgrad) {  // the running max of the stored v, itself stored in 8 bits
    const float x_scale = *var_max.scale;
    BitLanes x_largest{};
    for (int i = 0; i < kStateBlock; i += kLanes) {
      const BitLanes code = encode_var(load_lanes(v + i), v_inverse);
      store_codes(var.codes + i, code);
      const FloatLanes largest = amsgrad_var(
          decode_var<FloatLanes>(load_codes(var_max.codes + i), x_scale),
          decode_var<FloatLanes>(code, v_stored));
      store_lanes(v + i, largest);
      x_largest = max_lanes(x_largest, magnitude_bits(largest));
    }
    x_stored = block_scale(largest_lane(x_largest));
    x_inverse = inverse_scale(x_stored);
    *var_max.scale = x_stored;
  }
  LaneSums local = *sums;  // (a local: kept in registers)
  for (int i = 0; i < kStateBlock; i += kLanes) {
    const BitLanes mcode = encode_mean(load_lanes(m + i), m_inverse);
    store_codes(mean.codes + i, mcode);
    FloatLanes vi;
    if constexpr (kAmsgrad) {  // u is made from the running max
      const BitLanes xcode = encode_var(load_lanes(v + i), x_inverse);
      store_codes(var_max.codes + i, xcode);
      vi = decode_var<FloatLanes>(xcode, x_stored);
    } else {
      const BitLanes vcode = encode_var(load_lanes(v + i), v_inverse);
      store_codes(var.codes + i, vcode);
      vi = decode_var<FloatLanes>(vcode, v_stored);
    }
    FloatLanes weight = load_lanes(w + i);
    if constexpr (kDecay) weight = decayed(weight, tensor);
    FloatLanes u = raw_update(weight, decode_mean<FloatLanes>(mcode, m_stored), vi, tensor);
    if constexpr (kPadded) {  // (u: 0 / eps, or NaN for eps 0; w: 0 * inf for an infinite decay)
      const auto inside = lane_index + static_cast<uint32_t>(i) < static_cast<uint32_t>(valid);
      weight = inside ? weight : 0.0f;
      u = inside ? u : 0.0f;
    }
    const int k = (i / kLanes) % kAccumulators;  // element i + l goes to lane (i + l) % kSumLanes
    accumulate_square_lanes(weight, &local.w[k]);
    accumulate_square_lanes(u, &local.u[k]);
  }
  *sums = local;
}

// A short last block: its elements copied beside zeros (gradient 0, codes 0), the block run
// with its padding lanes held at 0, its codes copied back.
template <typename GradT, bool kAmsgrad, bool kDecay>
void phase1_q8_tail(const Phase1Span<float>& s, int64_t begin, const StepCoeffs<float>& step,
                    const TensorCoeffs<float>& tensor, LaneSums* sums) {
  const int len = static_cast<int>(s.n - begin);
  const int64_t block = begin / kStateBlock;
  const GradT* g = static_cast<const GradT*>(s.grad) + begin;
  alignas(64) float w[kStateBlock] = {};
  alignas(64) GradT grad[kStateBlock] = {};  // (float16: all bits 0 is +0)
  alignas(64) uint8_t codes[3][kStateBlock] = {};
  const QuantizedMoment* moments[3] = {&s.q_mean, &s.q_var, &s.q_var_max};
  for (int i = 0; i < len; ++i) {
    w[i] = s.weight[begin + i];
    grad[i] = g[i];
  }
  BlockMoment padded[3] = {};
  for (int k = 0; k < 3; ++k) {
    if (moments[k]->codes == nullptr) continue;
    std::memcpy(codes[k], moments[k]->codes + begin, len);
    padded[k] = BlockMoment{codes[k], moments[k]->scales + block};
  }
  phase1_q8_block<GradT, kAmsgrad, kDecay, true>(w, grad, padded[0], padded[1], padded[2], len,
                                                 step, tensor, sums);
  for (int k = 0; k < 3; ++k) {
    if (moments[k]->codes != nullptr) std::memcpy(moments[k]->codes + begin, codes[k], len);
  }
}

template <typename GradT, bool kAmsgrad, bool kDecay>
void phase1_q8_span(const Phase1Span<float>& s, const StepCoeffs<float>& step,
                    const TensorCoeffs<float>& tensor, double* weight_sumsq,
                    double* update_sumsq) {
  const GradT* g = static_cast<const GradT*>(s.grad);
  auto part = [](const QuantizedMoment& q, int64_t begin) {
    return BlockMoment{q.codes == nullptr ? nullptr : q.codes + begin,
                       q.scales == nullptr ? nullptr : q.scales + begin / kStateBlock};
  };
  LaneSums sums;
  const int64_t whole = s.n - s.n % kStateBlock;
  for (int64_t begin = 0; begin < whole; begin += kStateBlock) {
    phase1_q8_block<GradT, kAmsgrad, kDecay, false>(
        s.weight + begin, g + begin, part(s.q_mean, begin), part(s.q_var, begin),
        part(s.q_var_max, begin), kStateBlock, step, tensor, &sums);
  }
  if (whole < s.n) phase1_q8_tail<GradT, kAmsgrad, kDecay>(s, whole, step, tensor, &sums);
  double lanes_w[kSumLanes], lanes_u[kSumLanes];
  std::memcpy(lanes_w, sums.w, sizeof(lanes_w));
  std::memcpy(lanes_u, sums.u, sizeof(lanes_u));
  *weight_sumsq = sum_lanes(lanes_w);
  *update_sumsq = sum_lanes(lanes_u);
}

// Phase 2 with 8-bit moments: per block, its scales once, then the codes decoded as phase 1
// stored them, so that u is the one whose norm phase 1 took. In lanes, and the elements after
// the last whole group of lanes one at a time: the same functions, the same bits.
template <typename LowT, bool kEma, bool kDecay>
void phase2_q8_span(const Phase2Span<float>& s, const TensorCoeffs<float>& tensor,
                    float step_size) {
  constexpr bool kLowp = !std::is_same<LowT, float>::value;
  const float* w = s.weight;  // may alias w_out (element for element): no __restrict__
  float* w_out = s.weight_out;
  LowT* __restrict__ w_lowp = reinterpret_cast<LowT*>(s.model_weight);
  float* __restrict__ avg = s.average;
  const QuantizedMoment qm = s.q_mean, qv = s.q_var;
  for (int64_t begin = 0; begin < s.n; begin += kStateBlock) {
    const int64_t block = begin / kStateBlock;
    const int64_t end = s.n - begin < kStateBlock ? s.n : begin + kStateBlock;
    const float m_scale = qm.scales[block], v_scale = qv.scales[block];
    int64_t i = begin;
    for (; i + kSumLanes <= end; i += kSumLanes) {  // kSumLanes at a time, then one by one
      alignas(64) float updated[kSumLanes];  // (for the float16 copy: one block conversion)
      for (int lane = 0; lane < kSumLanes; lane += kLanes) {
        FloatLanes weight = load_lanes(w + i + lane);
        if constexpr (kDecay) weight = decayed(weight, tensor);
        const FloatLanes mean =
            decode_mean<FloatLanes>(load_codes(qm.codes + i + lane), m_scale);
        const FloatLanes var = decode_var<FloatLanes>(load_codes(qv.codes + i + lane), v_scale);
        const FloatLanes result = phase2_element(weight, mean, var, tensor, step_size);
        store_lanes(w_out + i + lane, result);
        if constexpr (kEma) {
          store_lanes(avg + i + lane,
                      moving_average(load_lanes(avg + i + lane), result, tensor.ema));
        }
        store_lanes(updated + lane, result);
      }
      if constexpr (kLowp) narrow_block(updated, w_lowp + i);
    }
    for (; i < end; ++i) {
      const float updated =
          phase2_element(weight_at<kDecay>(w, i, tensor), decode_mean(qm.codes[i], m_scale),
                         decode_var(qv.codes[i], v_scale), tensor, step_size);
      w_out[i] = updated;
      if constexpr (kEma) avg[i] = moving_average(avg[i], updated, tensor.ema);
      if constexpr (kLowp) w_lowp[i] = from_float<LowT>(updated);
    }
  }
}

template <typename GradT>
double grad_sumsq_span(const GradSpan& s) {
  using MathT = decltype(to_float(GradT{}));
  const GradT* __restrict__ g = static_cast<const GradT*>(s.grad);
  double acc[kSumLanes] = {};
  MathT block[kSumLanes];
  const int64_t body = s.n - s.n % kSumLanes;
  for (int64_t i = 0; i < body; i += kSumLanes) {
    for (int lane = 0; lane < kSumLanes; ++lane) block[lane] = to_float(g[i + lane]);
    accumulate_squares(block, acc);
  }
  if (body < s.n) {
    MathT tail[kSumLanes] = {};
    for (int64_t i = body; i < s.n; ++i) tail[i - body] = to_float(g[i]);
    accumulate_squares(tail, acc);
  }
  return sum_lanes(acc);
}

template <typename T, typename GradT, bool kAmsgrad>
void phase1_decay(const Phase1Span<T>& s, const StepCoeffs<T>& step,
                  const TensorCoeffs<T>& tensor, double* weight_sumsq, double* update_sumsq) {
  if constexpr (std::is_same<T, float>::value) {
    if (s.q_mean.codes != nullptr) {
      if (tensor.decoupled) {
        return phase1_q8_span<GradT, kAmsgrad, true>(s, step, tensor, weight_sumsq,
                                                     update_sumsq);
      }
      return phase1_q8_span<GradT, kAmsgrad, false>(s, step, tensor, weight_sumsq,
                                                    update_sumsq);
    }
  }
  if (tensor.decoupled) {
    return phase1_span<T, GradT, kAmsgrad, true>(s, step, tensor, weight_sumsq, update_sumsq);
  }
  return phase1_span<T, GradT, kAmsgrad, false>(s, step, tensor, weight_sumsq, update_sumsq);
}

template <typename T, typename GradT>
void phase1_typed(const Phase1Span<T>& s, const StepCoeffs<T>& step, const TensorCoeffs<T>& tensor,
                  double* weight_sumsq, double* update_sumsq) {
  if (s.var_max != nullptr || s.q_var_max.codes != nullptr) {
    return phase1_decay<T, GradT, true>(s, step, tensor, weight_sumsq, update_sumsq);
  }
  return phase1_decay<T, GradT, false>(s, step, tensor, weight_sumsq, update_sumsq);
}

void phase1(const Phase1Span<float>& s, const StepCoeffs<float>& step,
            const TensorCoeffs<float>& tensor, double* weight_sumsq, double* update_sumsq) {
  switch (s.grad_type) {
    case DType::kFloat16:
      return phase1_typed<float, half_t>(s, step, tensor, weight_sumsq, update_sumsq);
    default:
      return phase1_typed<float, float>(s, step, tensor, weight_sumsq, update_sumsq);
  }
}

// float64 weights have float64 gradients (the operators' type checks).
void phase1_f64(const Phase1Span<double>& s, const StepCoeffs<double>& step,
                const TensorCoeffs<double>& tensor, double* weight_sumsq, double* update_sumsq) {
  return phase1_typed<double, double>(s, step, tensor, weight_sumsq, update_sumsq);
}

template <typename T, typename LowT, bool kEma>
void phase2_decay(const Phase2Span<T>& s, const TensorCoeffs<T>& tensor, T step_size) {
  if constexpr (std::is_same<T, float>::value) {
    if (s.q_mean.codes != nullptr) {
      if (tensor.decoupled) return phase2_q8_span<LowT, kEma, true>(s, tensor, step_size);
      return phase2_q8_span<LowT, kEma, false>(s, tensor, step_size);
    }
  }
  if (tensor.decoupled) return phase2_span<T, LowT, kEma, true>(s, tensor, step_size);
  return phase2_span<T, LowT, kEma, false>(s, tensor, step_size);
}

template <typename T, typename LowT>
void phase2_typed(const Phase2Span<T>& s, const TensorCoeffs<T>& tensor, T step_size) {
  if (s.average != nullptr) return phase2_decay<T, LowT, true>(s, tensor, step_size);
  return phase2_decay<T, LowT, false>(s, tensor, step_size);
}

void phase2(const Phase2Span<float>& s, const StepCoeffs<float>&, const TensorCoeffs<float>& tensor,
            float step_size) {
  if (s.model_weight == nullptr) return phase2_typed<float, float>(s, tensor, step_size);
  return phase2_typed<float, half_t>(s, tensor, step_size);
}

void phase2_f64(const Phase2Span<double>& s, const StepCoeffs<double>&,
                const TensorCoeffs<double>& tensor, double step_size) {
  return phase2_typed<double, double>(s, tensor, step_size);
}

double grad_sumsq(const GradSpan& s) {
  switch (s.grad_type) {
    case DType::kFloat16: return grad_sumsq_span<half_t>(s);
    case DType::kFloat64: return grad_sumsq_span<double>(s);
    default: return grad_sumsq_span<float>(s);
  }
}

}  // namespace

KernelTable MXLAMB_CAT(kernels_, MXLAMB_ISA)() {
  return KernelTable{MXLAMB_STR(MXLAMB_ISA), {&phase1, &phase2}, {&phase1_f64, &phase2_f64},
                     &grad_sumsq};
}

}  // namespace mxlamb
