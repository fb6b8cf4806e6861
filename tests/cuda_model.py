"""A NumPy model of lamb_cuda.h's entry points on a NumPy "device", so that the GPU tests'
harness (tests/test_cuda.py: Trainer, the reference's configuration, the tolerances, the checks)
runs in CI, where there is no GPU. It checks the tests, not the kernels: it is written from
lamb_cuda.h's contract and lamb_math.h's formulas, in the math type, and is never compared with
the kernels bit for bit.
"""
import ctypes

import numpy as np

from cuda_interface import BFLOAT16, FLOAT16, FLOAT64, bfloat16_bits, bfloat16_values


class NumpyDevice:
    """Device arrays are NumPy arrays; a pointer is an array's address (views included)."""
    name = "numpy-model"

    def __init__(self):
        self.arrays = {}

    def array(self, host):
        return np.array(host, copy=True)

    def host(self, a):
        return np.array(a, copy=True)

    def ptr(self, a):
        if a.size == 0:
            return None
        self.arrays[a.ctypes.data] = a
        return a.ctypes.data

    def workspace(self, nbytes):
        return np.zeros(max(int(nbytes), 1), np.uint8)

    def stream(self):
        return None

    def synchronize(self):
        pass

    def capture(self, fn):
        return fn  # a "graph" that runs the step again


def _widen(a, dtype):
    if dtype == BFLOAT16:
        return bfloat16_values(a.view(np.uint16))
    return a


class ModelLibrary:
    """lamb_cuda.h's functions, called as the tests call the ctypes library."""

    def __init__(self, device):
        self.dev = device

    def _at(self, ptrs, t, size):
        if not ptrs or size == 0:
            return None
        return self.dev.arrays[ptrs[t]]

    def mxlamb_cuda_workspace_bytes(self, ref):
        return 256

    def mxlamb_cuda_grad_stats_workspace_bytes(self, ref):
        return 256

    def mxlamb_cuda_grad_stats(self, ref, ws, nbytes, stream):
        s = ref._obj
        sums = []
        for t in range(s.num_tensors):
            g = self._at(s.grads, t, s.sizes[t])
            g = np.zeros(0) if g is None else _widen(g, s.grad_dtypes[t]).astype(np.float64)
            sums.append(float(np.sum(g * g)))
        self.dev.arrays[s.grad_sumsq][:] = sums
        total = 0.0
        for x in sums:
            total += x
        p = s.params
        control, state = self.dev.arrays[s.control], self.dev.arrays[s.step_state]
        dynamic = p.growth_interval > 0
        skip = p.skip_nonfinite or dynamic
        finite = np.isfinite(total)
        base = p.rescale_grad / state[0] if dynamic else p.rescale_grad
        control[0] = base * _clip_factor(base * np.sqrt(total), p.global_clipnorm)
        control[1] = 1.0 if finite or not skip else 0.0
        if control[1] == 0.0:
            state[2] += 1
        if dynamic:
            if not finite:
                state[0], state[1] = max(state[0] / 2, 1.0), 0.0
            else:
                state[1] += 1
                if state[1] >= p.growth_interval:
                    state[0], state[1] = state[0] * 2, 0.0
        return 0

    def _coeffs(self, g, count_step):
        T = np.float64 if g.math_dtype == FLOAT64 else np.float32
        p = g.params
        control = self.dev.arrays[g.control] if g.control else None
        counts = self.dev.arrays[g.counts] if g.counts else None
        grad_sumsq = self.dev.arrays[g.grad_sumsq] if g.grad_sumsq else None
        multiplier = control[0] if control is not None else g.rescale_grad
        if self._skipped(g):
            count_step = False  # a skipped step counts nothing (and changes nothing)
        out = []
        for t in range(g.num_tensors):
            if counts is not None:
                count = counts[g.count_slots[t]] + (1.0 if count_step else 0.0)
                if count_step:
                    counts[g.count_slots[t]] = count
            else:
                count = g.step_counts[t]
            scale = multiplier
            if grad_sumsq is not None:
                scale = multiplier * _clip_factor(
                    multiplier * np.sqrt(grad_sumsq[g.stat_rows[t]]), g.clipnorm)
            ib1 = 1 / (1 - p.beta1 ** count) if p.bias_correction else 1.0
            ib2 = 1 / (1 - p.beta2 ** count) if p.bias_correction else 1.0
            eps = p.epsilon * np.sqrt(ib2) if p.epsilon_hat else p.epsilon
            decay = g.decays[t] if g.decays else 0.0
            momentum = 0.0 if count == p.ema_first_step else p.ema_momentum
            out.append(dict(ib1=T(ib1), ib2=T(ib2), eps=T(eps), scale=T(scale),
                            wd=T(g.wds[t]), lr=g.lrs[t], decay=T(decay), decay_lr=T(g.lrs[t]),
                            ema=(T(momentum), T(1 - momentum))))
        return T, out

    def _skipped(self, g):
        return bool(g.control) and self.dev.arrays[g.control][1] == 0.0

    def _u(self, T, p, c, w, m, v):
        return (m * c["ib1"]) / (np.sqrt(v * c["ib2"]) + c["eps"]) + c["wd"] * w

    @staticmethod
    def _decayed(w, c):
        return w - w * c["decay"] * c["decay_lr"] if c["decay"] != 0 else w

    def _phase1(self, g, sumsq, coeffs):
        T, cs = coeffs
        p = g.params
        out = self.dev.arrays[sumsq].reshape(-1)
        if self._skipped(g):
            out[:] = np.nan
            return
        for t in range(g.num_tensors):
            n = g.sizes[t]
            if n == 0:
                out[2 * t: 2 * t + 2] = 0.0
                continue
            c = cs[t]
            w = self._decayed(self._at(g.weights, t, n), c)
            grad = _widen(self._at(g.grads, t, n), g.grad_dtypes[t]).astype(T)
            m, v = self._at(g.means, t, n), self._at(g.vars, t, n)
            gs = grad * c["scale"]
            if p.clip_gradient >= 0:
                gs = np.clip(gs, -T(p.clip_gradient), T(p.clip_gradient))
            m[:] = T(p.beta1) * m + T(1 - p.beta1) * gs
            v[:] = T(p.beta2) * v + T(1 - p.beta2) * gs * gs
            vmax = self._at(g.vmaxes, t, n)
            if vmax is not None:
                vmax[:] = np.maximum(vmax, v)
            u = self._u(T, p, c, w, m, v if vmax is None else vmax)
            out[2 * t] = np.sum(w.astype(np.float64) ** 2)
            out[2 * t + 1] = np.sum(u.astype(np.float64) ** 2)

    def _phase2(self, g, sumsq, coeffs):
        T, cs = coeffs
        p = g.params
        if self._skipped(g):
            return
        s = self.dev.arrays[sumsq].reshape(-1)
        for t in range(g.num_tensors):
            n = g.sizes[t]
            if n == 0:
                continue
            c = cs[t]
            r1, r2 = np.sqrt(s[2 * t]), np.sqrt(s[2 * t + 1])
            if p.lower_bound > 0:
                r1 = max(r1, p.lower_bound)
            if p.upper_bound > 0:
                r1 = min(r1, p.upper_bound)
            ratio = 1.0 if r1 == 0 or r2 == 0 else r1 / r2
            adapt = not g.layer_adaptation or g.layer_adaptation[t]
            step = T(c["lr"] * ratio if adapt else c["lr"])
            weight = self._at(g.weights, t, n)
            w = self._decayed(weight, c)
            vmax = self._at(g.vmaxes, t, n)
            v = vmax if vmax is not None else self._at(g.vars, t, n)
            w_new = w - step * self._u(T, p, c, w, self._at(g.means, t, n), v)
            out = self._at(g.weights_out, t, n) if g.weights_out else weight
            out[:] = w_new
            avg = self._at(g.averages, t, n)
            if avg is not None:
                avg[:] = c["ema"][0] * avg + c["ema"][1] * w_new
            lowp = self._at(g.weights_lowp, t, n)
            if lowp is not None:
                lowp[:] = (bfloat16_bits(w_new) if g.lowp_dtype == BFLOAT16
                           else w_new.astype(np.float16))
        assert g.lowp_dtype in (0, FLOAT16, BFLOAT16)

    def mxlamb_cuda_phase1(self, ref, sumsq, ws, nbytes, stream):
        g = ref._obj
        self._phase1(g, sumsq, self._coeffs(g, True))
        return 0

    def mxlamb_cuda_phase2(self, ref, sumsq, ws, nbytes, stream):
        g = ref._obj
        self._phase2(g, sumsq, self._coeffs(g, False))
        return 0

    def mxlamb_cuda_step(self, ref, sumsq, ws, nbytes, stream):
        g = ref._obj
        coeffs = self._coeffs(g, True)
        self._phase1(g, sumsq, coeffs)
        self._phase2(g, sumsq, coeffs)
        return 0

    def mxlamb_cuda_trust_ratio(self, ref, sumsq, ratios, ws, nbytes, stream):
        g = ref._obj
        s, out = self.dev.arrays[sumsq].reshape(-1), self.dev.arrays[ratios]
        for t in range(g.num_tensors):
            w, u = s[2 * t], s[2 * t + 1]
            if np.isnan(w):
                out[t] = w
            elif g.layer_adaptation and not g.layer_adaptation[t]:
                out[t] = 1.0
            else:
                r1, r2 = np.sqrt(w), np.sqrt(u)
                if g.params.lower_bound > 0:
                    r1 = max(r1, g.params.lower_bound)
                if g.params.upper_bound > 0:
                    r1 = min(r1, g.params.upper_bound)
                out[t] = 1.0 if r1 == 0 or r2 == 0 else r1 / r2
        return 0


def _clip_factor(norm, max_norm):
    if not max_norm > 0 or not norm > max_norm or not np.isfinite(norm):
        return 1.0
    return max_norm / norm


__all__ = ["NumpyDevice", "ModelLibrary", "ctypes"]
