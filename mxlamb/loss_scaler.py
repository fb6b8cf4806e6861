"""Dynamic loss scaling for float16 training, on the device (no host synchronisation)."""
import copy
import uuid
import warnings
import weakref

import numpy

from mxnet import context as _context
from mxnet import ndarray

from .devices import device_key
from .options import count_or_none, number

__all__ = ["LossScaler"]

# The scalers of this process, by token: an optimizer unpickled here (Trainer.load_states)
# gets back the very scaler the user holds, not a copy whose scale the user's would not see.
_LIVE = weakref.WeakValueDictionary()


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

    The state is one float64 array ``[scale, clean steps, skipped steps]`` per device that
    steps (:meth:`state_on`): with several devices in one process each device's update keeps
    its own copy, and all agree since they see the same gradients. :attr:`state` is the copy of
    the device ``ctx`` names, or of the first device that stepped when none of them is ``ctx``.
    Reading :attr:`loss_scale` or :attr:`skipped_steps` waits for the device, nothing else does.
    """

    def __init__(self, init_scale=2.0 ** 15, growth_interval=2000, ctx=None):
        init_scale = number("init_scale", init_scale, low=1.0, owner="LossScaler")
        if growth_interval is None:
            raise ValueError("LossScaler: growth_interval must be an integer >= 1, got None")
        self.growth_interval = count_or_none("growth_interval", growth_interval,
                                             owner="LossScaler")
        ctx = ctx or _context.current_context()
        self._initial = ndarray.array([float(init_scale), 0.0, 0.0], ctx=ctx, dtype=numpy.float64)
        self._states = {}  # device_key(context) -> that device's state
        self._register()

    def _register(self):
        self._token = uuid.uuid4().hex
        _LIVE[self._token] = self

    @property
    def state(self):
        """The state of ``ctx``'s device, else of the first device that stepped."""
        if not self._states:
            return self._initial
        own = self._states.get(device_key(self._initial.context))
        return own if own is not None else next(iter(self._states.values()))

    def state_on(self, context):
        """The state that the optimizer updates on ``context``'s device (made at first use
        from :attr:`state`, the initial scale until a device has stepped)."""
        memory = device_key(context)
        state = self._states.get(memory)
        if state is None:
            if memory == device_key(self._initial.context):
                state = self._initial
            else:
                state = self.state.copyto(context)
            self._states[memory] = state
        return state

    def __setstate__(self, fields):
        if "state" in fields:  # pickled by mxlamb 0.2: one state
            fields["_initial"], fields["_states"] = fields.pop("state"), {}
        self.__dict__.update(fields)
        if "_token" not in fields:
            self._register()

    def __reduce__(self):
        return _restore, (self._token, self.growth_interval, self._initial, dict(self._states))

    def __deepcopy__(self, memo):
        clone = LossScaler.__new__(LossScaler)
        clone.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()
                               if k != "_token"})
        clone._register()
        return clone

    def scale_loss(self, loss):
        """``loss * scale`` (in the loss's type), recorded by autograd like any product."""
        scale = self.state_on(loss.context)[0:1].astype(loss.dtype)
        scale = scale.reshape((1,) * max(loss.ndim, 1))
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


def _restore(token, growth_interval, initial, states):
    """A pickled LossScaler: the live one of this process with the saved values (the one the
    user scales the loss with), or, in another process, a new one."""
    scaler = _LIVE.get(token)
    if scaler is not None:
        initial.copyto(scaler._initial)
        for key, saved in states.items():
            own = scaler._states.get(key)
            if own is None:
                scaler._states[key] = saved
            else:
                saved.copyto(own)
        return scaler
    others = len(_LIVE)
    scaler = LossScaler.__new__(LossScaler)
    scaler.growth_interval, scaler._initial, scaler._states = growth_interval, initial, states
    scaler._register()
    if others:
        warnings.warn(
            "mxlamb.LossScaler: a pickled LossScaler was loaded (Trainer.load_states?) beside "
            "one made in this process: the optimizer now scales with the loaded one, "
            "trainer._optimizer.loss_scaler; scale the loss with that one, or resume with "
            "mxlamb.load_states, which keeps your optimizer and its scaler", UserWarning,
            stacklevel=2)
    return scaler
