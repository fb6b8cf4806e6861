"""LAMB: layer-wise adaptive moments for large-batch training, on mxlamb's C++ operators."""
import numbers

import numpy

from mxnet import ndarray
from mxnet.ndarray.ndarray import _DTYPE_MX_TO_NP
from mxnet.optimizer import Optimizer

from ._library import native  # noqa: F401  (loads the operators into mxnet.ndarray)

__all__ = ["LAMB"]

_BFLOAT16 = numpy.dtype(_DTYPE_MX_TO_NP[12])
_LOW_PRECISION = (numpy.dtype(numpy.float16), _BFLOAT16)
_FLOAT32 = numpy.dtype(numpy.float32)

# Keyword arguments of mxnet.optimizer.Optimizer that LAMB passes on.
_OPTIMIZER_KWARGS = ("rescale_grad", "param_idx2name", "wd", "clip_gradient", "lr_scheduler",
                     "sym", "begin_num_update", "multi_precision", "param_dict")


def _number(name, value, low=None, high=None, low_open=False, high_open=False):
    """``value`` as a float, or ValueError naming ``name`` and the value."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and numpy.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + repr(low)
        hi = "" if high is None else repr(high) + (")" if high_open else "]")
        where = " in %s, %s" % (lo or "(-inf", hi or "inf)") if (lo or hi) else ""
        raise ValueError("LAMB: %s must be a finite number%s, got %r" % (name, where, value))
    return float(value)


def _flag(name, value):
    if not isinstance(value, (bool, numpy.bool_)):
        raise ValueError("LAMB: %s must be True or False, got %r" % (name, value))
    return bool(value)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


class LAMB(Optimizer):
    """LAMB optimizer: Adam moments, scaled per layer by the trust ratio ||w|| / ||u||.

    For each parameter ``w`` with gradient ``grad`` at its own step count ``t``::

        g = clip(rescale_grad * grad, -clip_gradient, clip_gradient)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t),  v_hat = v / (1 - beta2**t)     (if bias_correction)
        u = m_hat / (sqrt(v_hat) + epsilon) + wd * w
        r1 = clip(||w||, lower_bound, upper_bound),  r2 = ||u||
        w = w - lr * (r1 / r2) * u

    where the trust ratio ``r1 / r2`` is 1 when ``r1`` or ``r2`` is 0 (a zero-initialised
    weight still moves). Norms are accumulated in float64.

    The update runs in mxlamb's multi-tensor C++ operators (``mxlamb_phase1``: moments and
    norms; ``mxlamb_phase2``: trust-ratio apply). ``fused_step`` sends ``aggregate_num``
    tensors per call; ``step`` sends one at a time. Both give bit-identical results.

    Parameters
    ----------
    learning_rate : float, default 0.001
        The learning rate (``lr``); ``lr_mult`` of a parameter scales it.
    beta1 : float, default 0.9
        Exponential decay rate of the first moment, in [0, 1).
    beta2 : float, default 0.999
        Exponential decay rate of the second moment, in [0, 1).
    epsilon : float, default 1e-6
        Added to ``sqrt(v_hat)`` (outside the root); must be > 0.
    lower_bound : float or None, default None
        Lower clamp of ``||w||`` in the trust ratio (> 0), or None for none.
    upper_bound : float or None, default None
        Upper clamp of ``||w||`` in the trust ratio (> 0, >= lower_bound), or None for none.
    bias_correction : bool, default True
        Divide the moments by ``1 - beta**t``.
    aggregate_num : int, default 4
        Tensors per multi-tensor operator call in ``fused_step`` (any positive number).
    use_fused_step : bool, default True
        Whether MXNet 1.x's ``update`` calls go to ``fused_step`` (else ``step``).
    **kwargs
        The usual :class:`mxnet.optimizer.Optimizer` arguments: ``wd`` (>= 0, part of ``u``
        and so scaled by the trust ratio, as in MXNet), ``rescale_grad``, ``clip_gradient``
        (None or > 0), ``lr_scheduler``, ``multi_precision`` (float16 and bfloat16 weights
        keep a float32 master copy and float32 moments; required for them),
        ``param_idx2name``, ``begin_num_update``, ``sym``, ``param_dict``.

    References
    ----------
    You et al., Large Batch Optimization for Deep Learning: Training BERT in 76 minutes,
    arXiv:1904.00962.
    """

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-6,
                 lower_bound=None, upper_bound=None, bias_correction=True, aggregate_num=4,
                 use_fused_step=True, **kwargs):
        for key in kwargs:
            if key not in _OPTIMIZER_KWARGS:
                raise ValueError("LAMB: unknown argument %s=%r (LAMB takes learning_rate, beta1, "
                                 "beta2, epsilon, lower_bound, upper_bound, bias_correction, "
                                 "aggregate_num, use_fused_step, %s)"
                                 % (key, kwargs[key], ", ".join(_OPTIMIZER_KWARGS)))
        if learning_rate is not None:
            learning_rate = _number("learning_rate", learning_rate, low=0.0)
        self.beta1 = _number("beta1", beta1, 0.0, 1.0, high_open=True)
        self.beta2 = _number("beta2", beta2, 0.0, 1.0, high_open=True)
        self.epsilon = _number("epsilon", epsilon, low=0.0, low_open=True)
        self.lower_bound = None if lower_bound is None else _number(
            "lower_bound", lower_bound, low=0.0, low_open=True)
        self.upper_bound = None if upper_bound is None else _number(
            "upper_bound", upper_bound, low=0.0, low_open=True)
        if (self.lower_bound is not None and self.upper_bound is not None
                and self.lower_bound > self.upper_bound):
            raise ValueError("LAMB: lower_bound=%r is greater than upper_bound=%r"
                             % (lower_bound, upper_bound))
        self.bias_correction = _flag("bias_correction", bias_correction)
        if (not isinstance(aggregate_num, numbers.Integral) or isinstance(aggregate_num, bool)
                or aggregate_num < 1):
            raise ValueError("LAMB: aggregate_num must be an integer >= 1, got %r"
                             % (aggregate_num,))
        self.use_fused_step = _flag("use_fused_step", use_fused_step)
        if "wd" in kwargs:
            _number("wd", kwargs["wd"], low=0.0)
        if "rescale_grad" in kwargs:
            _number("rescale_grad", kwargs["rescale_grad"], low=0.0, low_open=True)
        if kwargs.get("clip_gradient") is not None:
            _number("clip_gradient", kwargs["clip_gradient"], low=0.0, low_open=True)
        if "multi_precision" in kwargs:
            _flag("multi_precision", kwargs["multi_precision"])
        super().__init__(learning_rate=learning_rate, **kwargs)
        # Set after Optimizer.__init__, which resets it to 0.
        self.aggregate_num = int(aggregate_num)
        self._checked = {}  # index -> (weight, grad, state, (master, mean, var)) as last checked

    def __getstate__(self):
        state = super().__getstate__()
        del state["_checked"]  # holds arrays; rebuilt on the first step
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._checked = {}

    # ------------------------------------------------------------------------------ states

    def create_state(self, index, weight):
        """Mean and variance (float32, zeros) for ``weight``."""
        if weight.stype != "default":
            raise ValueError("LAMB: parameter %s has %s storage; LAMB needs dense weights "
                             "(its trust ratio is a whole-tensor norm)"
                             % (self._describe(index), weight.stype))
        if numpy.dtype(weight.dtype) != _FLOAT32:
            raise ValueError(
                "LAMB: parameter %s is %s; LAMB updates float32 weights, and float16/bfloat16 "
                "weights with multi_precision=True" % (self._describe(index),
                                                       self._dtype_name(weight.dtype)))
        return (self._zeros(weight), self._zeros(weight))

    def create_state_multi_precision(self, index, weight):
        """``(weight32, (mean, var))`` for a float16/bfloat16 weight under multi_precision,
        else ``create_state(index, weight)``."""
        if numpy.dtype(weight.dtype) in _LOW_PRECISION and self.multi_precision:
            master = (weight.astype(numpy.float32) if weight.size else
                      ndarray.empty(weight.shape, weight.context, dtype=numpy.float32))
            return (master, self.create_state(index, master))
        return self.create_state(index, weight)

    @staticmethod
    def _zeros(weight):
        # MXNet 1.x cannot run any operator (zeros included) on a zero-size array.
        if weight.size == 0:
            return ndarray.empty(weight.shape, weight.context, dtype=numpy.float32)
        return ndarray.zeros(weight.shape, weight.context, dtype=numpy.float32)

    # ------------------------------------------------------------------------- 2.0 API

    def step(self, indices, weights, grads, states):
        """Per-tensor update: phase 1 then phase 2 for one tensor at a time."""
        for index, weight, grad, state in zip(indices, weights, grads, states):
            self._update_count(index)
            self._update_group([index], [weight], [grad], [state])

    def fused_step(self, indices, weights, grads, states):
        """Multi-tensor update: groups of ``aggregate_num`` tensors per operator call."""
        self._update_count(list(indices))
        # One weight dtype per operator call (the mode and the output type are per call).
        by_dtype = {}
        for item in zip(indices, weights, grads, states):
            by_dtype.setdefault(numpy.dtype(item[1].dtype), []).append(item)
        for items in by_dtype.values():
            for start in range(0, len(items), self.aggregate_num):
                self._update_group(*zip(*items[start:start + self.aggregate_num]))

    # ------------------------------------------------------------------------- 1.x API

    def update(self, index, weight, grad, state):
        """MXNet 1.x entry point: single arrays, or lists when the Updater aggregates."""
        indices, weights, grads = _as_list(index), _as_list(weight), _as_list(grad)
        states = list(state) if isinstance(index, (list, tuple)) else [state]
        if self.use_fused_step:
            self.fused_step(indices, weights, grads, states)
        else:
            self.step(indices, weights, grads, states)

    # The master copy lives in the state and the operators handle it: no separate path.
    update_multi_precision = update

    # --------------------------------------------------------------------- the kernels

    def _update_group(self, indices, weights, grads, states):
        """One phase-1/phase-2 pair over a group of tensors of one mode."""
        unpacked = [self._checked_state(*item) for item in zip(indices, weights, grads, states)]
        live = [i for i, w in enumerate(weights) if w.size > 0]
        if not live:
            return
        weights = [weights[i] for i in live]
        grads = [grads[i] for i in live]
        masters, means, variances = zip(*(unpacked[i] for i in live))
        # MXNet 1.9's extension API cannot hand a bfloat16 array to a library operator
        # (lib_api.cc rejects dtype flag 12): bfloat16 gradients are widened by MXNet's cast,
        # the float32 kernels update the master copy, and MXNet's cast (round to nearest
        # even) writes the model weight.
        bfloat16 = numpy.dtype(weights[0].dtype) == _BFLOAT16
        if bfloat16:
            grads = [g.astype(numpy.float32) for g in grads]
        attrs = self._attributes([indices[i] for i in live], weights[0], bfloat16)
        phase1_inputs = [x for t in zip(masters, grads, means, variances) for x in t]
        sumsq = ndarray.mxlamb_phase1(*phase1_inputs, **attrs)
        phase2_inputs = [x for t in zip(masters, means, variances) for x in t]
        ndarray.mxlamb_phase2(*phase2_inputs, sumsq, out=list(masters if bfloat16 else weights),
                              **attrs)
        if bfloat16:
            for weight, master in zip(weights, masters):
                ndarray.cast(master, dtype=weight.dtype, out=weight)

    def _attributes(self, indices, weight, float32_kernels=False):
        multi_precision = self._is_multi_precision(weight) and not float32_kernels
        attrs = {
            "num_tensors": len(indices),
            "multi_precision": multi_precision,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "epsilon": self.epsilon,
            "bias_correction": self.bias_correction,
            "rescale_grad": self.rescale_grad,
            "clip_gradient": -1.0 if self.clip_gradient is None else self.clip_gradient,
            "lower_bound": -1.0 if self.lower_bound is None else self.lower_bound,
            "upper_bound": -1.0 if self.upper_bound is None else self.upper_bound,
            "lrs": ",".join(map(repr, self._get_lrs(indices))),
            "wds": ",".join(map(repr, self._get_wds(indices))),
            "step_counts": ",".join(str(self._index_update_count[i]) for i in indices),
        }
        if multi_precision:
            attrs["weight_dtype"] = 2  # float16
        return attrs

    def _is_multi_precision(self, weight):
        return self.multi_precision and numpy.dtype(weight.dtype) in _LOW_PRECISION

    def _checked_state(self, index, weight, grad, state):
        """``(master, mean, var)`` of one parameter (master is the weight itself without
        multi-precision). Refuses, naming the parameter, what the operators would get wrong,
        before any array is written.

        Trainer and Updater pass the same array objects every step: a parameter whose weight,
        gradient and state are the very objects checked before is not checked again (the
        cache keeps them alive, so an identity cannot be reused by a new array)."""
        cached = self._checked.get(index)
        if (cached is not None and cached[0] is weight and cached[1] is grad
                and cached[2] is state):
            return cached[3]
        result = self._check_state(index, weight, grad, state)
        self._checked[index] = (weight, grad, state, result)
        return result

    def _check_state(self, index, weight, grad, state):
        def refuse(what):
            raise ValueError("LAMB: parameter %s: %s" % (self._describe(index), what))

        dtype = numpy.dtype(weight.dtype)
        multi_precision = self._is_multi_precision(weight)
        if dtype != _FLOAT32 and not multi_precision:
            refuse("weight is %s; LAMB updates float32 weights, and float16/bfloat16 weights "
                   "with multi_precision=True" % self._dtype_name(dtype))
        if grad.stype != "default" or weight.stype != "default":
            refuse("%s storage; LAMB needs dense weights and gradients (the trust ratio is a "
                   "whole-tensor norm, and densifying a sparse gradient would decay rows it "
                   "never touched)" % (grad.stype if grad.stype != "default" else weight.stype))
        if grad.shape != weight.shape:
            refuse("gradient has shape %s, weight has %s" % (grad.shape, weight.shape))
        if numpy.dtype(grad.dtype) != dtype:
            refuse("gradient is %s, weight is %s"
                   % (self._dtype_name(grad.dtype), self._dtype_name(dtype)))
        if grad.context != weight.context:
            refuse("gradient is on %s, weight on %s" % (grad.context, weight.context))
        try:
            master, (mean, var) = state if multi_precision else (weight, state)
        except (TypeError, ValueError):
            refuse("state is not %s" % ("(weight32, (mean, var))" if multi_precision
                                         else "(mean, var)"))
        for name, array in (("weight32", master), ("mean", mean), ("var", var)):
            if (array.shape != weight.shape or numpy.dtype(array.dtype) != _FLOAT32
                    or array.context != weight.context):
                refuse("state %s is %s %s on %s, expected float32 %s on %s"
                       % (name, self._dtype_name(array.dtype), array.shape, array.context,
                          weight.shape, weight.context))
        return master, mean, var

    def _describe(self, index):
        name = self.idx2name.get(index)
        if name is None and index in self.param_dict:
            name = self.param_dict[index].name
        return "%r (%s)" % (index, name) if name is not None and name != index else repr(index)

    @staticmethod
    def _dtype_name(dtype):
        return "bfloat16" if numpy.dtype(dtype) == _BFLOAT16 else numpy.dtype(dtype).name
