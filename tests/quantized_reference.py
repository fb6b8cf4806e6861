"""LAMB with 8-bit moments (state_bits=8) in NumPy: the judge of the kernels.

Written from the format's definition (docs/8bit.md), not from mxlamb's code: one byte per
element, one float32 scale per block of 256 elements (the largest magnitude of the block's
moments), codes that are minifloats without subnormals made from the float32 bits:

- m: sign bit + magnitude E4M3: code c in 1..120 is 2^(c // 8 - 15) * (1 + (c % 8) / 8);
- v: E5M3: code c in 1..248 is 2^(c // 8 - 31) * (1 + (c % 8) / 8); a positive v is never 0;
- code 0 is 0, whatever the scale; x = |value| * (1 / scale) in float32 (1 / scale is 0 for a
  scale of 0 or below float32's normal range) is rounded to the nearest code value, ties to the
  even code (the even mantissa), and x above 1 (and NaN) to 1.

The codes here are found by a search for the nearest value in float64 over the code table, not
by the kernels' integer rounding of the float32 bits, so the tests compare two ways of reaching
the same definition.

One step of a tensor, in float32 where the kernels compute in float32 (every operation rounds
to float32, no fused multiply-add, as NumPy does), norms in float64:

    m, v = decode(codes, scales)
    g = grad * grad_scale (clipped);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g
    scales = max |m|, max |v| per block;  codes = encode(m / scale, v / scale)
    m, v = decode(codes, scales)       (the stored values)
    [AMSGrad: vmax = encode/decode(max(decode(vmax), v)) the same way; v = vmax]
    u = (m / c1) / (sqrt(v / c2) + eps) + wd w;  w = w - lr * ||w|| / ||u|| * u

The moments do not depend on the norms, so the kernels' codes and scales must equal these bit
for bit; the weights agree to float32 rounding (the norms are summed in another order).
"""
import numpy as np

BLOCK = 256
F32 = np.float32
U32 = np.uint32


def bits(x):
    return np.ascontiguousarray(x, dtype=F32).view(U32)


def values(b):
    return np.ascontiguousarray(b, dtype=U32).view(F32)


class Minifloat:
    """Unsigned minifloat codes of E exponent and M mantissa bits, without subnormals."""

    def __init__(self, exponent_bits, mantissa_bits):
        self.emax = 2 ** exponent_bits - 1
        self.shift = 23 - mantissa_bits
        self.bias = (127 - self.emax) << mantissa_bits  # a float32's (exponent, mantissa) > this
        self.one = self.emax << mantissa_bits
        self.mantissa_bits = mantissa_bits

    def value(self, code):
        """The value of each code, in float64, from the definition."""
        code = np.asarray(code, dtype=np.int64)
        m = self.mantissa_bits
        out = np.ldexp(1.0 + (code % 2 ** m) / 2.0 ** m, (code >> m) - self.emax)
        return np.where(code == 0, 0.0, out)

    def encode(self, x, positive):
        """Codes of x >= 0 (float32): the nearest code value, ties to the even code, x > 1
        and NaN to `one`; ``positive``: at least code 1."""
        table = self.value(np.arange(self.one + 1))  # increasing, table[one] = 1
        x = np.asarray(x, dtype=np.float64)
        clean = np.where(np.isnan(x), 1.0, np.minimum(x, 1.0))
        above = np.searchsorted(table, clean).clip(1, self.one)  # table[above-1] < x <= ...
        low, high = table[above - 1], table[above]
        down, up = clean - low, high - clean
        code = np.where(down < up, above - 1, above)
        tie = down == up
        code = np.where(tie & ((above - 1) % 2 == 0), above - 1, code)
        code = np.where(np.asarray(positive) & (code == 0), 1, code)
        return code.astype(U32)

    def decode(self, code):
        code = np.asarray(code, dtype=U32)
        return np.where(code == 0, F32(0), values((code << U32(self.shift))
                                                 + U32(self.bias << self.shift)))


MEAN = Minifloat(4, 3)
VAR = Minifloat(5, 3)


def block_max(x):
    """The largest |x| of each block (float32; NaN above infinity), as an integer max."""
    magnitude = bits(x) & U32(0x7FFFFFFF)
    padded = np.zeros(-(-x.size // BLOCK) * BLOCK, dtype=U32)
    padded[:x.size] = magnitude
    return values(padded.reshape(-1, BLOCK).max(axis=1))


def inverse(scale):
    with np.errstate(divide="ignore"):
        return np.where(scale >= F32(2.0 ** -126), F32(1) / scale, F32(0)).astype(F32)


def per_element(scales, n):
    return np.repeat(scales, BLOCK)[:n]


def encode_mean(m, scales):
    b = bits(m)
    magnitude = MEAN.encode(values(b & U32(0x7FFFFFFF)) * per_element(inverse(scales), m.size),
                            False)
    return np.where(magnitude == 0, 0, ((b >> U32(24)) & U32(0x80)) | magnitude).astype(np.uint8)


def decode_mean(codes, scales):
    codes = codes.astype(U32)
    with np.errstate(invalid="ignore"):
        magnitude = MEAN.decode(codes & U32(0x7F)) * per_element(scales, codes.size)
    signed = values(bits(magnitude) | ((codes & U32(0x80)) << U32(24)))
    return np.where((codes & U32(0x7F)) == 0, F32(0), signed)


def encode_var(v, scales):
    return VAR.encode(v * per_element(inverse(scales), v.size), bits(v) != 0).astype(np.uint8)


def decode_var(codes, scales):
    codes = codes.astype(U32)
    with np.errstate(invalid="ignore"):
        return np.where(codes == 0, F32(0), VAR.decode(codes) * per_element(scales, codes.size))


def store(x, encode, decode):
    """x stored: (codes, scales, the stored values)."""
    scales = block_max(x)
    codes = encode(x, scales)
    return codes, scales, decode(codes, scales)


class QuantizedMoments:
    """One tensor's 8-bit moments (flat), as the optimizer keeps them; zero at first."""

    def __init__(self, n, amsgrad=False):
        blocks = -(-n // BLOCK)
        self.mean = np.zeros(n, np.uint8)
        self.var = np.zeros(n, np.uint8)
        self.mean_scale = np.zeros(blocks, F32)
        self.var_scale = np.zeros(blocks, F32)
        self.amsgrad = amsgrad
        if amsgrad:
            self.var_max = np.zeros(n, np.uint8)
            self.var_max_scale = np.zeros(blocks, F32)


class QuantizedLAMB:
    """The judge: LAMB (or, with layer_adaptation=False and epsilon_hat=True, AdamW) on 8-bit
    moments. ``step`` takes float32 weights (the master copy) and gradients (float32, or
    float16 widened), flat, and returns the new weights."""

    def __init__(self, beta1=0.9, beta2=0.999, epsilon=1e-6, clip_gradient=None,
                 bias_correction=True, layer_adaptation=True, epsilon_hat=False, amsgrad=False):
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.clip_gradient = clip_gradient
        self.bias_correction = bias_correction
        self.layer_adaptation, self.epsilon_hat, self.amsgrad = (layer_adaptation, epsilon_hat,
                                                                 amsgrad)

    def moments(self, n):
        return QuantizedMoments(n, self.amsgrad)

    def step(self, weight, grad, state, t, lr, wd=0.0, grad_scale=1.0, decay=0.0):
        b1, b2 = F32(self.beta1), F32(self.beta2)
        one_minus_b1, one_minus_b2 = F32(1.0 - self.beta1), F32(1.0 - self.beta2)
        c1 = 1.0 / (1.0 - self.beta1 ** t) if self.bias_correction else 1.0
        c2 = 1.0 / (1.0 - self.beta2 ** t) if self.bias_correction else 1.0
        eps = self.epsilon * np.sqrt(c2) if self.epsilon_hat else self.epsilon
        w = weight.astype(F32)
        if decay:  # Keras' decoupled decay, before the step
            w = w - w * F32(decay) * F32(lr)
        g = grad.astype(F32) * F32(grad_scale)
        if self.clip_gradient is not None and self.clip_gradient >= 0:
            c = F32(self.clip_gradient)
            g = np.where(g > c, c, g)
            g = np.where(g < -c, -c, g)
        m = b1 * decode_mean(state.mean, state.mean_scale) + one_minus_b1 * g
        v = b2 * decode_var(state.var, state.var_scale) + one_minus_b2 * g * g
        state.mean, state.mean_scale, m = store(m, encode_mean, decode_mean)
        state.var, state.var_scale, v = store(v, encode_var, decode_var)
        if self.amsgrad:
            before = decode_var(state.var_max, state.var_max_scale)
            v = np.where(v <= before, before, v)
            state.var_max, state.var_max_scale, v = store(v, encode_var, decode_var)
        u = (m * F32(c1)) / (np.sqrt(v * F32(c2)) + F32(eps)) + F32(wd) * w
        ratio = 1.0
        if self.layer_adaptation:
            r1 = np.sqrt(np.sum(w.astype(np.float64) ** 2))
            r2 = np.sqrt(np.sum(u.astype(np.float64) ** 2))
            ratio = 1.0 if r1 == 0 or r2 == 0 else r1 / r2
        return w - F32(lr * ratio) * u
