"""Dynamic loss scaling for float16 training, on the device (no host synchronisation)."""
import numbers

import numpy

from mxnet import context as _context
from mxnet import ndarray

__all__ = ["LossScaler"]


class LossScaler:
    """A loss scale that lives on the device, for ``LAMB(loss_scaler=...)``.

    Multiply the loss by it before ``backward`` (:meth:`scale_loss`); the optimizer divides the
    gradients by the same scale. A step whose gradients hold an inf or NaN is skipped on the
    device (weights, moments and step counts untouched) and the scale halves (not below 1);
    after ``growth_interval`` clean steps in a row it doubles::

        scaler = mxlamb.LossScaler(init_scale=2.0 ** 15, growth_interval=2000)
        trainer = gluon.Trainer(params, 'lamb', {'multi_precision': True, 'loss_scaler': scaler})
        with autograd.record():
            loss = scaler.scale_loss(loss_fn(net(x), y))
        loss.backward()
        trainer.step(batch_size)

    The state is one float64 array ``[scale, clean steps, skipped steps]``; reading
    :attr:`loss_scale` or :attr:`skipped_steps` waits for the device, nothing else does.
    """

    def __init__(self, init_scale=2.0 ** 15, growth_interval=2000, ctx=None):
        ok = (isinstance(init_scale, numbers.Real) and not isinstance(init_scale, bool)
              and numpy.isfinite(init_scale) and init_scale >= 1)
        if not ok:
            raise ValueError("LossScaler: init_scale must be a finite number >= 1, got %r"
                             % (init_scale,))
        if (not isinstance(growth_interval, numbers.Integral) or isinstance(growth_interval, bool)
                or growth_interval < 1):
            raise ValueError("LossScaler: growth_interval must be an integer >= 1, got %r"
                             % (growth_interval,))
        self.growth_interval = int(growth_interval)
        ctx = ctx or _context.current_context()
        self.state = ndarray.array([float(init_scale), 0.0, 0.0], ctx=ctx, dtype=numpy.float64)

    def scale_loss(self, loss):
        """``loss * scale`` (in the loss's type), recorded by autograd like any product."""
        scale = self.state[0:1].astype(loss.dtype).reshape((1,) * max(loss.ndim, 1))
        return ndarray.broadcast_mul(loss, scale)

    @property
    def loss_scale(self):
        return float(self.state[0].asscalar())

    @property
    def skipped_steps(self):
        return int(self.state[2].asscalar())

    def __repr__(self):
        return "LossScaler(loss_scale=%g, growth_interval=%d)" % (self.loss_scale,
                                                                  self.growth_interval)
