// The LAMB update, one element at a time (You et al., arXiv:1904.00962, Algorithm 2).
//
// This header is the only place the LAMB arithmetic is written, and the only place where the
// step's coefficients are rounded from the optimizer's double hyper-parameters. The CPU kernels
// (every ISA level, SIMD body and scalar tail alike) and the CUDA kernels call these functions;
// nothing else computes a moment, a raw update, a trust ratio or a coefficient.
//
// Stages, named after the paper:
//   (Keras)  w <- w - w * decay * lr  (decoupled decay) -> decayed
//   phase 1  g = clip(grad_scale * grad)              -> scaled_grad
//            m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2   -> update_moments
//            (AMSGrad: v' = max(v', v), used in place of v) -> amsgrad_var
//            u = (m / c1) / (sqrt(v / c2) + eps) + wd w   -> raw_update
//            the three composed for one element           -> phase1_element
//   norms    r1 = ||w|| (clamped to [lower, upper]), r2 = ||u||
//   phase 2  w <- w - lr * trust_ratio(r1, r2) * u      -> apply_update, step_size
//            u recomputed and applied to one element      -> phase2_element
//            avg <- mu avg + (1 - mu) w  (weight EMA)     -> moving_average, ema_of
//
// grad_scale is rescale_grad times whatever the step's gradient statistics ask for (loss
// unscaling, global and per-tensor norm clipping, 1/N for accumulated gradients): see
// gradient_scale and grad_stats_control below.
//
// Phase 2 does not read a stored u: it recomputes u from the (already updated) m and v with
// the same raw_update, so the u it applies is bit-for-bit the u whose norm phase 1 took, and
// no model-sized temporary buffer exists.
#ifndef MXLAMB_LAMB_MATH_H_
#define MXLAMB_LAMB_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define MXLAMB_HD __host__ __device__ __forceinline__
#else
#define MXLAMB_HD inline __attribute__((always_inline))
#endif

namespace mxlamb {

// The arithmetic type T of the stages below is the "math type" of the weights: float for
// float32 weights and for float16 (and, in the CUDA kernels, bfloat16) weights with their
// float32 master copy, double for float64 weights. The functions are written once for both;
// what is computed in double for every T (bias corrections, norms, trust ratio, step size,
// gradient multipliers) takes double.
//
// Lanes. The element functions (scaled_grad, update_moments, amsgrad_var, decayed, raw_update,
// apply_update, phase2_element, moving_average and the 8-bit codes below) take their values as
// L: one element of type T (the CPU's loops, the CUDA kernels), or a GCC vector of float lanes
// (the CPU's 8-bit kernels, lamb_kernels.cc), on which every operation is done lane by lane: the
// same operations, so the same bits, as on one float. Lanes<L> gives what differs: the type of
// one lane, the square root and the type of an L's float32 bits. The CPU kernels specialise it
// for their vectors.
template <typename L>
struct Lanes {
  using Element = L;      // the type of one lane
  using Bits = uint32_t;  // (float lanes only)
  static MXLAMB_HD L sqrt(L x) { return std::sqrt(x); }
};

// L's lanes are of the math type T (float lanes with float coefficients, not double ones).
#define MXLAMB_LANES_OF(L, T) \
  static_assert(std::is_same<typename Lanes<L>::Element, T>::value, "lanes of the math type")

// The bits of x as a To of the same size (memcpy: no aliasing rules broken).
template <typename To, typename From>
MXLAMB_HD To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast keeps the size");
  To to;
  memcpy(&to, &x, sizeof(to));
  return to;
}

// The hyper-parameters of a step as the optimizer gives them, in double. The coefficients
// below are made from them and rounded to T once, here, for the CPU and the GPU alike.
struct LambParams {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-6;
  double clip_gradient = -1.0;  // < 0: no element-wise clipping
  double lower_bound = -1.0;    // <= 0: ||w|| not clamped from below
  double upper_bound = -1.0;    // <= 0: ||w|| not clamped from above
  bool bias_correction = true;
  bool epsilon_hat = false;     // Keras' epsilon, see step_epsilon
  double ema_momentum = 0.99;   // the weight EMA's (where the caller keeps one)
  double ema_first_step = 1.0;  // the step count t of a tensor's first update, see ema_of
};

// Hyper-parameters shared by every tensor of one step.
template <typename T>
struct StepCoeffs {
  T beta1;
  T beta2;
  // 1 - beta, rounded from double: in float, 1 - 0.999f is 1.3e-5 relative off.
  T one_minus_beta1;
  T one_minus_beta2;
  T clip_gradient;  // < 0: no clipping
  double lower_bound;  // of ||w|| in the trust ratio, in double as the norms; <= 0: none
  double upper_bound;
};

// Exponential moving average of the weights, after the update: avg = mu avg + (1 - mu) w.
template <typename T>
struct EmaCoeffs {
  T momentum;
  T one_minus_momentum;  // from double
};

// Per-tensor values: they differ inside one group (lr_mult, wd_mult, per-index step counts,
// per-tensor gradient clipping).
template <typename T>
struct TensorCoeffs {
  T inv_bias1;   // 1 / (1 - beta1^t), from double; 1 when bias correction is off
  T inv_bias2;   // 1 / (1 - beta2^t), from double; 1 when bias correction is off
  T epsilon;     // see step_epsilon
  T grad_scale;  // see gradient_scale
  T wd;          // weight decay inside u (MXNet's): scaled by the trust ratio
  double lr;     // kept in double: step_size forms lr * trust_ratio in double, rounds once
  // Decoupled weight decay (Keras'): w <- w - w * decay * decay_lr before the step; see
  // decayed. decoupled is false where decay is 0, and w is then read as it is.
  T decay;
  T decay_lr;
  bool decoupled;
  EmaCoeffs<T> ema;  // this step's, see ema_of
};

// Bias correction 1 / (1 - beta^t) in double (1 when off).
MXLAMB_HD double inverse_bias(double beta, double t, bool bias_correction) {
  return bias_correction ? 1.0 / (1.0 - std::pow(beta, t)) : 1.0;
}

// The epsilon added to sqrt(v_hat). LAMB and MXNet add epsilon itself. Keras' Adam/AdamW add
// it to sqrt(v) before bias correction (the "epsilon hat" of Kingma & Ba, section 2):
// m_hat / (sqrt(v) + eps) * sqrt(1 - beta2^t) = m_hat / (sqrt(v_hat) + eps * sqrt(inv_bias2)).
MXLAMB_HD double step_epsilon(double epsilon, double inv_bias2, bool epsilon_hat) {
  return epsilon_hat ? epsilon * std::sqrt(inv_bias2) : epsilon;
}

template <typename T>
MXLAMB_HD StepCoeffs<T> step_coeffs(const LambParams& p) {
  return StepCoeffs<T>{static_cast<T>(p.beta1), static_cast<T>(p.beta2),
                       static_cast<T>(1.0 - p.beta1), static_cast<T>(1.0 - p.beta2),
                       static_cast<T>(p.clip_gradient), p.lower_bound, p.upper_bound};
}

// The EMA of a tensor's update with step count t: the first update (t = ema_first_step, the
// count the tensor starts from plus one) sets the average to the weights (momentum 0, as Keras
// does); every later one moves it by the momentum.
template <typename T>
MXLAMB_HD EmaCoeffs<T> ema_of(const LambParams& p, double step_count) {
  const double momentum = step_count == p.ema_first_step ? 0.0 : p.ema_momentum;
  return EmaCoeffs<T>{static_cast<T>(momentum), static_cast<T>(1.0 - momentum)};
}

// One tensor's coefficients at its step count (the t of beta^t, >= 1), with its lr, wd,
// gradient multiplier (gradient_scale) and decoupled decay (0: none).
template <typename T>
MXLAMB_HD TensorCoeffs<T> tensor_coeffs(const LambParams& p, double step_count, double lr,
                                        double wd, double grad_scale, double decay = 0.0) {
  const double inv_bias2 = inverse_bias(p.beta2, step_count, p.bias_correction);
  TensorCoeffs<T> c;
  c.inv_bias1 = static_cast<T>(inverse_bias(p.beta1, step_count, p.bias_correction));
  c.inv_bias2 = static_cast<T>(inv_bias2);
  c.epsilon = static_cast<T>(step_epsilon(p.epsilon, inv_bias2, p.epsilon_hat));
  c.grad_scale = static_cast<T>(grad_scale);
  c.wd = static_cast<T>(wd);
  c.lr = lr;
  c.decay = static_cast<T>(decay);
  c.decay_lr = static_cast<T>(lr);
  c.decoupled = decay != 0.0;
  c.ema = ema_of<T>(p, step_count);
  return c;
}

// min(1, max_norm / norm), and 1 when no clipping is asked (max_norm <= 0) or the norm is 0
// or not finite (a non-finite gradient is the caller's business: it propagates or is skipped).
MXLAMB_HD double clip_factor(double norm, double max_norm) {
  if (!(max_norm > 0.0) || !(norm > max_norm) || !(norm < HUGE_VAL)) return 1.0;
  return max_norm / norm;
}

// The multiplier of one tensor's raw gradient, in this order:
//   base    = rescale_grad / loss_scale (/ N for N accumulated gradients)
//   global  = clip_factor(base * ||all gradients of the step||, global_clipnorm)
//   tensor  = clip_factor(base * global * ||this gradient||, clipnorm)
// Element-wise clip_gradient comes after, in scaled_grad.
MXLAMB_HD double gradient_scale(double base_and_global, double grad_sumsq, double clipnorm) {
  return base_and_global * clip_factor(base_and_global * std::sqrt(grad_sumsq), clipnorm);
}

// The scalar part of a step's gradient statistics, written once for the CPU forward of
// mxlamb_grad_stats and its CUDA kernel. From the sum of squares of all gradients (added in
// tensor order), it writes control = [multiplier, apply] and updates the loss scaler's
// step_state = [loss scale, clean steps, skipped steps]:
//   base        = rescale_grad / loss scale (the dynamic one, if on)
//   multiplier  = base * clip_factor(base * ||g||, global_clipnorm)
//   apply       = 0 for a non-finite step when skip_nonfinite or dynamic scaling is on
// Dynamic loss scaling (growth_interval > 0) halves the scale (not below 1) on a non-finite
// step and doubles it after growth_interval clean steps.
enum ControlEntry { kControlMultiplier = 0, kControlApply = 1 };
enum StepStateEntry { kLossScale = 0, kCleanSteps = 1, kSkippedSteps = 2 };

struct GradStatsParams {
  double rescale_grad = 1.0;
  double global_clipnorm = -1.0;  // <= 0: off
  double growth_interval = 0.0;   // > 0: dynamic loss scaling
  bool skip_nonfinite = false;
};

MXLAMB_HD void grad_stats_control(const GradStatsParams& p, double total_sumsq, double* control,
                                  double* step_state) {
  const bool dynamic = p.growth_interval > 0;
  const bool skip_nonfinite = p.skip_nonfinite || dynamic;
  const bool finite = total_sumsq - total_sumsq == 0.0;  // false for inf and NaN
  const double base = dynamic ? p.rescale_grad / step_state[kLossScale] : p.rescale_grad;
  control[kControlMultiplier] =
      base * clip_factor(base * std::sqrt(total_sumsq), p.global_clipnorm);
  control[kControlApply] = finite || !skip_nonfinite ? 1.0 : 0.0;
  if (control[kControlApply] == 0.0) step_state[kSkippedSteps] += 1.0;
  if (dynamic) {
    if (!finite) {
      const double halved = step_state[kLossScale] / 2.0;
      step_state[kLossScale] = halved > 1.0 ? halved : 1.0;  // fmax(halved, 1.0), NaN too
      step_state[kCleanSteps] = 0.0;
    } else if ((step_state[kCleanSteps] += 1.0) >= p.growth_interval) {
      step_state[kLossScale] *= 2.0;
      step_state[kCleanSteps] = 0.0;
    }
  }
}

// Clip without fminf/fmaxf: those turn a NaN gradient into +-clip_gradient, i.e. a finite but
// wrong update. Plain comparisons are false for NaN, so NaN propagates as it does in MXNet.
template <typename L, typename T>
MXLAMB_HD L scaled_grad(L grad, const StepCoeffs<T>& s, const TensorCoeffs<T>& t) {
  MXLAMB_LANES_OF(L, T);
  L g = grad * t.grad_scale;
  if (s.clip_gradient >= T(0)) {
    g = g > s.clip_gradient ? s.clip_gradient : g;
    g = g < -s.clip_gradient ? -s.clip_gradient : g;
  }
  return g;
}

template <typename L, typename T>
MXLAMB_HD void update_moments(L g, L* mean, L* var, const StepCoeffs<T>& s) {
  MXLAMB_LANES_OF(L, T);
  *mean = s.beta1 * *mean + s.one_minus_beta1 * g;
  *var = s.beta2 * *var + s.one_minus_beta2 * g * g;
}

// AMSGrad (Reddi et al.; Keras' amsgrad): the largest second moment so far replaces v.
// A NaN v propagates (the comparison is false).
template <typename L>
MXLAMB_HD L amsgrad_var(L var_max, L var) { return var <= var_max ? var_max : var; }

// The weight a step starts from: with decoupled decay (Keras' weight_decay) the decayed
// weight w - w * decay * lr, in Keras' order of operations; it is the weight whose norm the
// trust ratio takes and the one the update is applied to. Without, the weight itself.
template <typename L, typename T>
MXLAMB_HD L decayed(L weight, const TensorCoeffs<T>& t) {
  MXLAMB_LANES_OF(L, T);
  return t.decoupled ? weight - weight * t.decay * t.decay_lr : weight;
}

// Epsilon is added outside the square root, and weight decay is part of u (as in MXNet), so
// it is scaled by the trust ratio too.
template <typename L, typename T>
MXLAMB_HD L raw_update(L weight, L mean, L var, const TensorCoeffs<T>& t) {
  MXLAMB_LANES_OF(L, T);
  const L mean_hat = mean * t.inv_bias1;
  const L var_hat = var * t.inv_bias2;
  return mean_hat / (Lanes<L>::sqrt(var_hat) + t.epsilon) + t.wd * weight;
}

// Phase 1 of one element: the moments updated in place, u returned. The moments are read
// into locals first, so the compiler need not assume that mean and var alias.
template <typename T>
MXLAMB_HD T phase1_element(T weight, T grad, T* mean, T* var, const StepCoeffs<T>& s,
                           const TensorCoeffs<T>& t) {
  T m = *mean, v = *var;
  update_moments(scaled_grad(grad, s, t), &m, &v, s);
  *mean = m;
  *var = v;
  return raw_update(weight, m, v, t);
}

// The same under AMSGrad: the running max of v is kept and u is made from it.
template <typename T>
MXLAMB_HD T phase1_element(T weight, T grad, T* mean, T* var, T* var_max,
                           const StepCoeffs<T>& s, const TensorCoeffs<T>& t) {
  T m = *mean, v = *var;
  update_moments(scaled_grad(grad, s, t), &m, &v, s);
  const T v_max = amsgrad_var(*var_max, v);
  *mean = m;
  *var = v;
  *var_max = v_max;
  return raw_update(weight, m, v_max, t);
}

// The trust ratio ||w|| / ||u|| from the two sums of squares (accumulated in double).
// Bounds clamp ||w|| only; a bound <= 0 means "not given".
// Zero-norm rule: where ||w|| or ||u|| is 0 the ratio is 1, so a zero-initialised weight still
// moves (by a plain Adam step) and nothing divides by zero.
MXLAMB_HD double trust_ratio(double weight_sumsq, double update_sumsq, double lower_bound,
                             double upper_bound) {
  double r1 = std::sqrt(weight_sumsq);
  const double r2 = std::sqrt(update_sumsq);
  if (lower_bound > 0.0 && r1 < lower_bound) r1 = lower_bound;
  if (upper_bound > 0.0 && r1 > upper_bound) r1 = upper_bound;
  if (r1 == 0.0 || r2 == 0.0) return 1.0;
  return r1 / r2;
}

// lr * trust_ratio, once per tensor; lr alone where layer adaptation is off (AdamW, or a
// tensor excluded from adaptation). Computed in double, rounded once to T.
template <typename T>
MXLAMB_HD T step_size(const StepCoeffs<T>& s, const TensorCoeffs<T>& t, double weight_sumsq,
                      double update_sumsq, bool layer_adaptation) {
  if (!layer_adaptation) return static_cast<T>(t.lr);
  return static_cast<T>(t.lr *
                        trust_ratio(weight_sumsq, update_sumsq, s.lower_bound, s.upper_bound));
}

template <typename L, typename T>
MXLAMB_HD L apply_update(L weight, L update, T step) {
  MXLAMB_LANES_OF(L, T);
  return weight - step * update;
}

// Phase 2 of one element: the updated weight, from u recomputed out of the updated moments
// (var: the running max under AMSGrad). `weight` is decayed(w) where decay is decoupled.
template <typename L, typename T>
MXLAMB_HD L phase2_element(L weight, L mean, L var, const TensorCoeffs<T>& t, T step) {
  MXLAMB_LANES_OF(L, T);
  return apply_update(weight, raw_update(weight, mean, var, t), step);
}

template <typename L, typename T>
MXLAMB_HD L moving_average(L average, L weight, const EmaCoeffs<T>& e) {
  MXLAMB_LANES_OF(L, T);
  return e.momentum * average + e.one_minus_momentum * weight;
}

// ------------------------------------------------------------------ 8-bit moments (state_bits=8)
//
// With state_bits=8, m and v of a large tensor are stored as one byte per element with one
// float32 scale per block of kStateBlock elements: the largest magnitude of the block
// (absmax), so that the stored values are code values in [-1, 1] times the scale. The codes
// are minifloats without subnormals (code 0 is the zero), made from the float32 bits with
// integer operations and rounded to nearest even: the same bits on every ISA level, thread
// count and the GPU, with no table and no search.
//   m: sign bit + E4M3 magnitude (2^-15 .. 1, 3 mantissa bits);
//   v: unsigned E5M3 (2^-31 .. 1): v spans twice m's binades (it is m's square, roughly).
// A positive v is never stored as 0 (it becomes the smallest code): a v rounded down to 0
// under a non-zero m would make u = m / eps. Rounding v up only shortens u.
// benchmarks/state_code_study.py measured the codes (docs/8bit.md).
//
// Phase 1 of a block: the moments decoded, updated in float32 (update_moments), the block's
// new scales taken (block_scale), the moments encoded, and decoded again: u and its norm are
// made from the stored values, and phase 2 decodes the same codes, so it applies exactly the u
// whose norm phase 1 took.
constexpr int kStateBlock = 256;

MXLAMB_HD uint32_t float_bits(float x) { return bit_cast<uint32_t>(x); }

MXLAMB_HD float bits_float(uint32_t b) { return bit_cast<float>(b); }

// The codes below take and give float lanes F (one float, or the CPU's vectors) and their bits
// U = Lanes<F>::Bits: a code is a U (one code per lane; the caller stores its low byte).

// The unsigned minifloat of E exponent and M mantissa bits, code 0 the zero: code c > 0 is
// 2^(c / 2^M - emax) * (1 + (c mod 2^M) / 2^M), emax = 2^E - 1. kOne (1.0) is the largest code
// used; a float32 of the same binade has exponent field c / 2^M + 127 - emax, so a code is the
// float32's bits shifted right by 23 - M, less kBias.
template <uint32_t E, uint32_t M>
struct Minifloat {
  static constexpr uint32_t kEmax = (1u << E) - 1u;
  static constexpr uint32_t kShift = 23u - M;
  static constexpr uint32_t kBias = (127u - kEmax) << M;
  static constexpr uint32_t kOne = kEmax << M;
  // Half the smallest positive value 2^-emax (1 + 2^-M), as float32 bits: the rounding point
  // between code 0 and code 1 (a tie goes to code 0, the even one).
  static constexpr uint32_t kHalfSmallest = ((127u - kEmax - 1u) << 23) | (1u << kShift);

  // x >= 0 (NaN and x > 1 give kOne), rounded to nearest even. `positive` non-zero: x stands
  // for a value > 0, which then gets at least code 1.
  template <typename F, typename U = typename Lanes<F>::Bits>
  static MXLAMB_HD U encode(F x, U positive) {
    const U b = bit_cast<U>(x);
    const U rounded = (b + ((1u << (kShift - 1u)) - 1u) + ((b >> kShift) & 1u)) >> kShift;
    const U small = positive != 0u || b > kHalfSmallest ? 1u : 0u;  // (the tie: to 0, even)
    const U code = rounded > kBias ? rounded - kBias : small;
    return code < kOne ? code : kOne;
  }

  template <typename F>
  static MXLAMB_HD F decode(typename Lanes<F>::Bits code) {
    return bit_cast<F>(code == 0u ? 0u : (code << kShift) + (kBias << kShift));
  }
};

using MeanCode = Minifloat<4, 3>;  // the magnitude; bit 7 is the sign
using VarCode = Minifloat<5, 3>;

// |x| as float32 bits: their unsigned order is the order of the magnitudes (NaN above
// infinity), so a block's largest is an integer max, exact in any order.
template <typename F>
MXLAMB_HD typename Lanes<F>::Bits magnitude_bits(F x) {
  return bit_cast<typename Lanes<F>::Bits>(x) & 0x7fffffffu;
}

// A block's scale from the largest magnitude_bits of its values.
MXLAMB_HD float block_scale(uint32_t largest_magnitude) { return bits_float(largest_magnitude); }

// 1 / scale, and 0 for a scale of 0 or below float32's normal range (every code is then 0).
MXLAMB_HD float inverse_scale(float scale) {
  return scale >= 0x1p-126f ? 1.0f / scale : 0.0f;
}

template <typename F, typename U = typename Lanes<F>::Bits>
MXLAMB_HD U encode_mean(F m, float inverse) {
  const U b = bit_cast<U>(m);
  const U magnitude = MeanCode::encode(bit_cast<F>(b & 0x7fffffffu) * inverse, U{});
  return magnitude == 0u ? 0u : ((b >> 24) & 0x80u) | magnitude;
}

// Code 0 (of the magnitude) is 0 whatever the scale: an infinite scale (a v that overflowed
// float32 from a finite gradient) or a NaN one leaves the block's zeros zero, as float32
// moments would, rather than 0 * inf = NaN. F: float unless given.
template <typename F = float>
MXLAMB_HD F decode_mean(typename Lanes<F>::Bits code, float scale) {
  using U = typename Lanes<F>::Bits;
  const U magnitude_code = code & 0x7fu;
  const F magnitude = MeanCode::decode<F>(magnitude_code) * scale;
  const U value = bit_cast<U>(magnitude) | ((code & 0x80u) << 24);
  return bit_cast<F>(magnitude_code == 0u ? 0u : value);
}

template <typename F, typename U = typename Lanes<F>::Bits>
MXLAMB_HD U encode_var(F v, float inverse) {
  return VarCode::encode(v * inverse, bit_cast<U>(v));
}

template <typename F = float>
MXLAMB_HD F decode_var(typename Lanes<F>::Bits code, float scale) {
  using U = typename Lanes<F>::Bits;
  const F value = VarCode::decode<F>(code) * scale;
  return bit_cast<F>(code == 0u ? 0u : bit_cast<U>(value));
}

}  // namespace mxlamb

#endif  // MXLAMB_LAMB_MATH_H_
