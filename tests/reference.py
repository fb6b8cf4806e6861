"""LAMB in float64 NumPy, written from the paper (arXiv:1904.00962, Algorithm 2) and the MXNet
docs, independent of mxlamb's code. Every implementation is tested against this.

    g = clip(rescale_grad * grad, +-clip_gradient)          (clip when clip_gradient > 0)
    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t);     v_hat = v / (1 - beta2^t)  (when bias_correction)
    u = m_hat / (sqrt(v_hat) + epsilon) + wd w
    r1 = clamp(||w||, lower_bound, upper_bound);  r2 = ||u||   (a bound applies when > 0)
    ratio = r1 / r2, or 1 when r1 == 0 or r2 == 0
    w = w - lr ratio u

None, 0 or a negative clip_gradient or bound is "not given", as MXNet's multi_lamb_update
documents it ("If clip_gradient <= 0, gradient clipping is turned off", "If lower_bound <= 0,
Lower limit is not set") and as MXNet's LAMB passes them (only when truthy).
"""
import numpy as np


class ReferenceLAMB:
    def __init__(self, beta1=0.9, beta2=0.999, epsilon=1e-6, lower_bound=None,
                 upper_bound=None, bias_correction=True, rescale_grad=1.0, clip_gradient=None,
                 amsgrad=False, epsilon_hat=False):
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon
        self.lower_bound, self.upper_bound = lower_bound, upper_bound
        self.bias_correction = bias_correction
        self.rescale_grad, self.clip_gradient = rescale_grad, clip_gradient
        # AMSGrad (Reddi et al.): u from the running max of v. Keras' epsilon: added to sqrt(v)
        # before bias correction.
        self.amsgrad, self.epsilon_hat = amsgrad, epsilon_hat
        self.mean, self.var, self.vmax, self.weight, self.t = {}, {}, {}, {}, {}

    def init(self, key, weight):
        w = np.asarray(weight, dtype=np.float64)
        self.weight[key] = w.copy()
        self.mean[key] = np.zeros_like(w)
        self.var[key] = np.zeros_like(w)
        self.vmax[key] = np.zeros_like(w)
        self.t[key] = 0

    def raw_update(self, key, grad, wd):
        """Phase 1: moments and u. Returns u."""
        g = np.asarray(grad, dtype=np.float64) * self.rescale_grad
        if self.clip_gradient is not None and self.clip_gradient > 0:
            g = np.clip(g, -self.clip_gradient, self.clip_gradient)
        self.t[key] += 1
        t = self.t[key]
        m = self.mean[key] = self.beta1 * self.mean[key] + (1 - self.beta1) * g
        v = self.var[key] = self.beta2 * self.var[key] + (1 - self.beta2) * g * g
        if self.amsgrad:
            v = self.vmax[key] = np.maximum(self.vmax[key], v)
        c1 = 1 - self.beta1 ** t if self.bias_correction else 1.0
        c2 = 1 - self.beta2 ** t if self.bias_correction else 1.0
        if self.epsilon_hat:  # Keras: m_hat / (sqrt(v) + eps) * sqrt(c2)
            return (m / c1) / (np.sqrt(v) + self.epsilon) * np.sqrt(c2) + wd * self.weight[key]
        return (m / c1) / (np.sqrt(v / c2) + self.epsilon) + wd * self.weight[key]

    def trust_ratio(self, weight, update):
        r1 = np.sqrt(np.sum(weight * weight))
        r2 = np.sqrt(np.sum(update * update))
        if self.lower_bound is not None and self.lower_bound > 0:
            r1 = max(r1, self.lower_bound)
        if self.upper_bound is not None and self.upper_bound > 0:
            r1 = min(r1, self.upper_bound)
        return 1.0 if r1 == 0 or r2 == 0 else r1 / r2

    def step(self, key, grad, lr, wd):
        """One LAMB step of parameter ``key``; returns the new float64 weight."""
        u = self.raw_update(key, grad, wd)
        w = self.weight[key]
        self.weight[key] = w - lr * self.trust_ratio(w, u) * u
        return self.weight[key]


class ReferenceStep:
    """A whole training step with mxlamb's options, in float64, from their definitions
    (Keras' optimizer docs for the names): on top of ReferenceLAMB (or ReferenceAdamW)

        g_i = grad_i * rescale_grad / loss_scale
        global_clipnorm:  g_i *= min(1, c / sqrt(sum_i ||g_i||^2))
        clipnorm:         g_i *= min(1, c / ||g_i||)
        skip_nonfinite:   a step with any non-finite g_i changes nothing (and is counted)
        exclusions:       wd 0 / trust ratio 1 for names matching the patterns
        decoupled:        Keras' weight_decay: w = w - w wd lr before the step (its norm is
                          the trust ratio's ||w||), and no wd inside u
        EMA:              avg = mu avg + (1 - mu) w after each applied step; the first
                          applied step sets avg = w (Keras' momentum 0 at its first step)
    """

    def __init__(self, inner, global_clipnorm=None, clipnorm=None, loss_scale=1.0,
                 skip_nonfinite=False, ema_momentum=None, no_decay=(), no_adaptation=(),
                 decoupled=False):
        self.inner = inner
        self.decoupled = decoupled
        self.global_clipnorm, self.clipnorm = global_clipnorm, clipnorm
        self.loss_scale, self.skip_nonfinite = loss_scale, skip_nonfinite
        self.ema_momentum = ema_momentum
        self.no_decay, self.no_adaptation = set(no_decay), set(no_adaptation)
        self.average, self.skipped, self.updates = {}, 0, {}

    def init(self, key, weight):
        self.inner.init(key, weight)
        self.average[key] = np.asarray(weight, dtype=np.float64).copy()

    def step(self, grads, lr, wd):
        """grads: {key: gradient}. Returns {key: new weight}."""
        rescale = self.inner.rescale_grad / self.loss_scale
        g = {k: np.asarray(v, dtype=np.float64) * rescale for k, v in grads.items()}
        if not all(np.all(np.isfinite(v)) for v in g.values()) and self.skip_nonfinite:
            self.skipped += 1
            return {k: self.inner.weight[k] for k in grads}
        if self.global_clipnorm is not None:
            norm = np.sqrt(sum(np.sum(v * v) for v in g.values()))
            if norm > self.global_clipnorm:
                g = {k: v * (self.global_clipnorm / norm) for k, v in g.items()}
        if self.clipnorm is not None:
            for k, v in g.items():
                norm = np.sqrt(np.sum(v * v))
                if norm > self.clipnorm:
                    g[k] = v * (self.clipnorm / norm)
        saved = self.inner.rescale_grad
        self.inner.rescale_grad = 1.0
        try:
            for k, v in g.items():
                decay = 0.0 if k in self.no_decay else wd
                if self.decoupled:
                    self.inner.weight[k] = self.inner.weight[k] - self.inner.weight[k] * decay * lr
                    decay = 0.0
                if k in self.no_adaptation:
                    u = self.inner.raw_update(k, v, decay)
                    self.inner.weight[k] = self.inner.weight[k] - lr * u
                else:
                    self.inner.step(k, v, lr, decay)
                self.updates[k] = self.updates.get(k, 0) + 1
                if self.ema_momentum is not None:
                    mu = self.ema_momentum if self.updates[k] > 1 else 0.0
                    self.average[k] = mu * self.average[k] + (1 - mu) * self.inner.weight[k]
        finally:
            self.inner.rescale_grad = saved
        return {k: self.inner.weight[k] for k in grads}


class ReferenceAdamW:
    """Keras' AdamW update, written as Keras documents it (not through LAMB):

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  (amsgrad: vh = max(vh, v); v = vh)
        alpha = lr sqrt(1 - b2^t) / (1 - b1^t)
        w = w - lr wd w - alpha m / (sqrt(v) + epsilon)
    """

    def __init__(self, beta1=0.9, beta2=0.999, epsilon=1e-7, amsgrad=False, rescale_grad=1.0,
                 clip_gradient=None):
        self.beta1, self.beta2, self.epsilon, self.amsgrad = beta1, beta2, epsilon, amsgrad
        self.rescale_grad, self.clip_gradient = rescale_grad, clip_gradient
        self.weight, self.mean, self.var, self.vmax, self.t = {}, {}, {}, {}, {}

    def init(self, key, weight):
        w = np.asarray(weight, dtype=np.float64)
        self.weight[key] = w.copy()
        self.mean[key], self.var[key], self.vmax[key] = (np.zeros_like(w) for _ in range(3))
        self.t[key] = 0

    def step(self, key, grad, lr, wd):
        g = np.asarray(grad, dtype=np.float64) * self.rescale_grad
        if self.clip_gradient is not None:
            g = np.clip(g, -self.clip_gradient, self.clip_gradient)
        self.t[key] += 1
        t = self.t[key]
        self.mean[key] = self.beta1 * self.mean[key] + (1 - self.beta1) * g
        self.var[key] = self.beta2 * self.var[key] + (1 - self.beta2) * g * g
        v = self.var[key]
        if self.amsgrad:
            v = self.vmax[key] = np.maximum(self.vmax[key], v)
        alpha = lr * np.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)
        w = self.weight[key]
        self.weight[key] = w - lr * wd * w - alpha * self.mean[key] / (np.sqrt(v) + self.epsilon)
        return self.weight[key]

    # ReferenceStep calls raw_update for tensors without adaptation; AdamW has none anyway.
    raw_update = None
