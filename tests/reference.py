"""LAMB in float64 NumPy, written from the paper (arXiv:1904.00962, Algorithm 2) and the MXNet
docs, independent of mxlamb's code. Every implementation is tested against this.

    g = clip(rescale_grad * grad, +-clip_gradient)          (clip when clip_gradient given)
    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t);     v_hat = v / (1 - beta2^t)  (when bias_correction)
    u = m_hat / (sqrt(v_hat) + epsilon) + wd w
    r1 = clamp(||w||, lower_bound, upper_bound);  r2 = ||u||
    ratio = r1 / r2, or 1 when r1 == 0 or r2 == 0
    w = w - lr ratio u
"""
import numpy as np


class ReferenceLAMB:
    def __init__(self, beta1=0.9, beta2=0.999, epsilon=1e-6, lower_bound=None,
                 upper_bound=None, bias_correction=True, rescale_grad=1.0, clip_gradient=None):
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.lower_bound, self.upper_bound = lower_bound, upper_bound
        self.bias_correction = bias_correction
        self.rescale_grad, self.clip_gradient = rescale_grad, clip_gradient
        self.mean, self.var, self.weight, self.t = {}, {}, {}, {}

    def init(self, key, weight):
        w = np.asarray(weight, dtype=np.float64)
        self.weight[key] = w.copy()
        self.mean[key] = np.zeros_like(w)
        self.var[key] = np.zeros_like(w)
        self.t[key] = 0

    def raw_update(self, key, grad, wd):
        """Phase 1: moments and u. Returns u."""
        g = np.asarray(grad, dtype=np.float64) * self.rescale_grad
        if self.clip_gradient is not None:
            g = np.clip(g, -self.clip_gradient, self.clip_gradient)
        self.t[key] += 1
        t = self.t[key]
        m = self.mean[key] = self.beta1 * self.mean[key] + (1 - self.beta1) * g
        v = self.var[key] = self.beta2 * self.var[key] + (1 - self.beta2) * g * g
        if self.bias_correction:
            m = m / (1 - self.beta1 ** t)
            v = v / (1 - self.beta2 ** t)
        return m / (np.sqrt(v) + self.epsilon) + wd * self.weight[key]

    def trust_ratio(self, weight, update):
        r1 = np.sqrt(np.sum(weight * weight))
        r2 = np.sqrt(np.sum(update * update))
        if self.lower_bound is not None:
            r1 = max(r1, self.lower_bound)
        if self.upper_bound is not None:
            r1 = min(r1, self.upper_bound)
        return 1.0 if r1 == 0 or r2 == 0 else r1 / r2

    def step(self, key, grad, lr, wd):
        """One LAMB step of parameter ``key``; returns the new float64 weight."""
        u = self.raw_update(key, grad, wd)
        w = self.weight[key]
        self.weight[key] = w - lr * self.trust_ratio(w, u) * u
        return self.weight[key]
