"""LAMB: layer-wise adaptive moments for large-batch training, on mxlamb's C++ operators."""
import collections
import contextlib
import numbers
import os
import re
import sys
import warnings

import numpy

from mxnet import ndarray
from mxnet.ndarray.ndarray import _DTYPE_MX_TO_NP
from mxnet.optimizer import Optimizer

from ._library import mxnet_version_number
from ._library import native  # noqa: F401  (loads the operators into mxnet.ndarray)
from .dist import stop_server
from .devices import in_kvstore_callback, device_key, same_memory
from .loss_scaler import LossScaler

__all__ = ["LAMB", "TrustRatios"]

_BFLOAT16 = numpy.dtype(_DTYPE_MX_TO_NP[12])
_LOW_PRECISION = (numpy.dtype(numpy.float16), _BFLOAT16)
_FLOAT32 = numpy.dtype(numpy.float32)
_FLOAT64 = numpy.dtype(numpy.float64)
# What aggregate_num=numpy.inf (the whole step in one call) is kept as: MXNet 2.0's Updater
# sends the whole step in one call for numpy.inf itself (it tests `is not numpy.inf`); 1.x's
# Updater slices the step by aggregate_num, which must then be an integer.
_WHOLE_STEP = numpy.inf if mxnet_version_number() >= 20000 else sys.maxsize

# Keyword arguments of mxnet.optimizer.Optimizer that LAMB passes on.
_OPTIMIZER_KWARGS = ("rescale_grad", "param_idx2name", "wd", "clip_gradient", "lr_scheduler",
                     "sym", "begin_num_update", "multi_precision", "param_dict")
# mxlamb's training options (Keras' names), on LAMB and AdamW alike.
_EXTRA_OPTIONS = ("global_clipnorm", "clipnorm", "use_ema", "ema_momentum",
                  "ema_overwrite_frequency", "gradient_accumulation_steps", "loss_scale_factor",
                  "loss_scaler", "skip_nonfinite", "exclude_from_weight_decay",
                  "exclude_from_layer_adaptation")

# MXNet's own switch of _index_update_count to a device (renamed in 2.0).
_MXNET_SET_DEVICE = (getattr(Optimizer, "_set_current_device", None)
                     or Optimizer._set_current_context)

TrustRatios = collections.namedtuple("TrustRatios", ["keys", "values"])
TrustRatios.__doc__ = """Per-parameter trust ratios of the last step: ``keys`` (parameter
names, or indices where no name is known) and ``values`` (a float64 NDArray in that order;
NaN for a skipped step, 1 where layer adaptation is off)."""

# The per-parameter arrays of one step, as _checked_state unpacks a state; moments_at is
# (slab, offset, size) where mean and var are the packed pair at offset in a moment slab.
Slots = collections.namedtuple("Slots", ["master", "mean", "var", "var_max", "average", "accum",
                                         "moments_at"])
# One parameter as checked once and cached (views for the operators, its dtype and size: each
# NDArray property read is a call into libmxnet, and a step of many small tensors adds them up).
Prepared = collections.namedtuple("Prepared", ["weight", "grad", "slots", "dtype", "size"])


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


def _positive_or_none(name, value):
    return None if value is None else _number(name, value, low=0.0, low_open=True)


def _bound_or_none(name, value):
    """A trust-ratio bound: None, or a number >= 0 where 0 means no bound (as in MXNet, which
    passes a bound to its kernels only when it is truthy)."""
    return None if value is None else _number(name, value, low=0.0)


def _aggregate_num(value):
    """aggregate_num as MXNet 2.0 reads it, as kept in ``self.aggregate_num``: None (kept as 1,
    as MXNet 2.0's Optimizer does) and 0 are no aggregation, one tensor per call; numpy.inf
    (any +inf) is the whole step in one call (_WHOLE_STEP); other positive integers are
    tensors per call. A negative, NaN, a bool, a fraction or a non-number is a ValueError."""
    if value is None:
        return 1
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == numpy.inf:
        return _WHOLE_STEP
    raise ValueError("LAMB: aggregate_num must be an integer >= 0, None (no aggregation) or "
                     "numpy.inf (the whole step in one call), got %r" % (value,))


def _warn_trap(message):
    # A plain UserWarning from one place: Python's default filter shows it once per process.
    warnings.warn(message, UserWarning, stacklevel=3)


def _count_or_none(name, value):
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError("LAMB: %s must be an integer >= 1 or None, got %r" % (name, value))
    return int(value)


def _patterns(name, value):
    """A list of compiled regular expressions, or ValueError naming the option."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError("LAMB: %s must be a list of regular expressions, got %r" % (name, value))
    compiled = []
    for pattern in value:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ValueError("LAMB: %s has an invalid regular expression %r (%s)"
                             % (name, pattern, err)) from None
    return compiled


def _legacy(array):
    """MXNet 2.0's Gluon passes ``mx.np`` arrays, and extension operators take legacy
    NDArrays only: the same memory, viewed as one (no copy). Others pass through."""
    return array.as_nd_ndarray() if type(array).__module__.startswith("mxnet.numpy") else array


def _joined(values):
    """An operator's list attribute: one value when all are equal (the operator repeats it)."""
    first = values[0]
    if values.count(first) == len(values):
        return repr(first)
    return ",".join(map(repr, values))


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


# Moment slabs. Every array an operator call takes costs about a microsecond in MXNet (engine
# dependencies, shapes, the copies of the argument lists), more than the update itself of a
# 768-element bias. The moments of parameters up to _PACKED_MAX_ELEMENTS elements are
# therefore allocated side by side in one array per context and dtype (mean, then var, in the
# order their states are made), and a group whose moments lie side by side in one slab passes
# that slab once instead of two arrays per tensor. The states are views into the slab: the
# user, the Updater and checkpoints see ordinary arrays of the parameter's shape.
_PACKED_MAX_ELEMENTS = 1 << 16
_SLAB_ELEMENTS = 1 << 22  # 16 MiB, where param_dict does not tell what the small ones need


class _MomentSlabs:
    """Allocates packed (mean, var) pairs of small parameters, per context and moment dtype
    (float32, or float64 for float64 weights)."""

    def __init__(self):
        self._open = {}  # (context, dtype) -> [slab, elements used]

    def allocate(self, weight, wanted):
        """Zeroed (mean, var, (slab, offset, size)) views for ``weight`` (of the moments'
        dtype); a new slab holds at least ``wanted`` elements."""
        size = weight.size
        key = (weight.context, numpy.dtype(weight.dtype))
        entry = self._open.get(key)
        if entry is None or entry[1] + 2 * size > entry[0].shape[0]:
            slab = ndarray.zeros((max(2 * size, wanted),), weight.context, dtype=key[1])
            entry = self._open[key] = [slab, 0]
        slab, offset = entry
        entry[1] += 2 * size
        mean = slab[offset:offset + size].reshape(weight.shape)
        var = slab[offset + size:offset + 2 * size].reshape(weight.shape)
        return mean, var, (slab, offset, size)


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
        Added to ``sqrt(v_hat)`` (outside the root); >= 0. ``epsilon=0`` is accepted with
        MXNet's meaning and warned about: where a gradient element has been 0 at every step so
        far, ``m = v = 0`` and ``u = 0 / 0`` is NaN, so ``||u||`` and that whole tensor become
        NaN (in MXNet's LAMB too).
    lower_bound : float or None, default None
        Lower clamp of ``||w||`` in the trust ratio (>= 0); None or 0 for none (as in MXNet).
    upper_bound : float or None, default None
        Upper clamp of ``||w||`` in the trust ratio (>= 0, >= lower_bound); None or 0 for none.
    bias_correction : bool, default True
        Divide the moments by ``1 - beta**t``.
    aggregate_num : int, None or numpy.inf, default 4
        Tensors per multi-tensor operator call in ``fused_step``, as MXNet 2.0 reads it: any
        positive integer; None or 0 for one tensor per call; ``numpy.inf`` for the whole step
        in one call (kept as ``sys.maxsize`` on MXNet 1.x, whose Updater slices by it).
    use_fused_step : bool, default True
        Whether ``update`` (MXNet's Updater, Trainer) calls go to ``fused_step`` (else
        ``step``).
    global_clipnorm : float or None
        Scale all gradients of the step by ``min(1, global_clipnorm / ||all gradients||)``
        (after rescale_grad and loss unscaling), computed on the device.
    clipnorm : float or None
        Clip each gradient to this L2 norm (after global_clipnorm).
    use_ema, ema_momentum, ema_overwrite_frequency : bool, float in [0, 1), int or None
        Keep ``avg = ema_momentum * avg + (1 - ema_momentum) * w`` after every applied step;
        every ``ema_overwrite_frequency`` applied steps the weights are replaced by it. See
        :meth:`finalize_variable_values` and :meth:`averaged_weights`.
    gradient_accumulation_steps : int or None
        Sum gradients over N calls and apply one update with their mean on every N-th; the
        learning-rate schedule sees every call, the bias-correction count t only updates.
    loss_scale_factor : float or None
        Gradients are divided by it (a static loss scale).
    loss_scaler : mxlamb.LossScaler or None
        Dynamic loss scaling: gradients are divided by its current scale, a step with
        non-finite gradients is skipped on the device and the scale halves; it doubles after
        ``growth_interval`` clean steps.
    skip_nonfinite : bool, default False
        Skip, on the device, a whole step whose gradients hold an inf or NaN (weights, moments
        and step counts untouched) and count it (:attr:`skipped_steps`). By default a non-finite
        gradient propagates into the weights, as in MXNet.
    exclude_from_weight_decay, exclude_from_layer_adaptation : list of str or None
        Regular expressions searched in parameter names (``param_idx2name`` or the Trainer's
        names); a match gets wd 0, or a trust ratio of 1 (a plain Adam step). BERT recipes
        use ``['bias', 'gamma', 'beta', 'LayerNorm']``.
    **kwargs
        The usual :class:`mxnet.optimizer.Optimizer` arguments: ``wd`` (>= 0, part of ``u``
        and so scaled by the trust ratio, as in MXNet), ``rescale_grad`` (>= 0),
        ``clip_gradient`` (None, or a bound as MXNet's LAMB kernels read it: a negative one
        does not clip, and neither does 0, since MXNet's LAMB passes clip_gradient only when
        it is truthy; 0 is warned about, as it reads like "clip everything to 0"),
        ``lr_scheduler``, ``multi_precision`` (float16 and bfloat16 weights keep a float32
        master copy and float32 moments; required for them), ``param_idx2name``,
        ``begin_num_update``, ``sym``, ``param_dict``.

    Weights are float32, float64 (computed in float64 throughout: moments, raw update and
    norms; no master copy), or float16/bfloat16 with ``multi_precision=True``.

    References
    ----------
    You et al., Large Batch Optimization for Deep Learning: Training BERT in 76 minutes,
    arXiv:1904.00962.
    """

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-6,
                 lower_bound=None, upper_bound=None, bias_correction=True, aggregate_num=4,
                 use_fused_step=True, global_clipnorm=None, clipnorm=None, use_ema=False,
                 ema_momentum=0.99, ema_overwrite_frequency=None,
                 gradient_accumulation_steps=None, loss_scale_factor=None, loss_scaler=None,
                 skip_nonfinite=False, exclude_from_weight_decay=None,
                 exclude_from_layer_adaptation=None, **kwargs):
        for key in kwargs:
            if key not in _OPTIMIZER_KWARGS:
                raise ValueError("%s: unknown argument %s=%r (it takes learning_rate, beta1, "
                                 "beta2, epsilon, lower_bound, upper_bound, bias_correction, "
                                 "aggregate_num, use_fused_step, %s, %s)"
                                 % (type(self).__name__, key, kwargs[key],
                                    ", ".join(_EXTRA_OPTIONS), ", ".join(_OPTIMIZER_KWARGS)))
        if learning_rate is not None:
            learning_rate = _number("learning_rate", learning_rate, low=0.0)
        self.beta1 = _number("beta1", beta1, 0.0, 1.0, high_open=True)
        self.beta2 = _number("beta2", beta2, 0.0, 1.0, high_open=True)
        self.epsilon = _number("epsilon", epsilon, low=0.0)
        if self.epsilon == 0:
            _warn_trap("LAMB: epsilon=0 (accepted, as in MXNet): a gradient element that has "
                       "been 0 at every step gives u = 0/0 = NaN, and its whole tensor becomes "
                       "NaN; a small positive epsilon (the default 1e-6) avoids it")
        self.lower_bound = _bound_or_none("lower_bound", lower_bound)
        self.upper_bound = _bound_or_none("upper_bound", upper_bound)
        if self.lower_bound and self.upper_bound and self.lower_bound > self.upper_bound:
            raise ValueError("LAMB: lower_bound=%r is greater than upper_bound=%r"
                             % (lower_bound, upper_bound))
        self.bias_correction = _flag("bias_correction", bias_correction)
        aggregate_num = _aggregate_num(aggregate_num)
        use_fused_step = _flag("use_fused_step", use_fused_step)
        self.global_clipnorm = _positive_or_none("global_clipnorm", global_clipnorm)
        self.clipnorm = _positive_or_none("clipnorm", clipnorm)
        self.use_ema = _flag("use_ema", use_ema)
        self.ema_momentum = _number("ema_momentum", ema_momentum, 0.0, 1.0, high_open=True)
        self.ema_overwrite_frequency = _count_or_none("ema_overwrite_frequency",
                                                      ema_overwrite_frequency)
        self.gradient_accumulation_steps = _count_or_none("gradient_accumulation_steps",
                                                          gradient_accumulation_steps)
        self.loss_scale_factor = _positive_or_none("loss_scale_factor", loss_scale_factor)
        if loss_scaler is not None and not isinstance(loss_scaler, LossScaler):
            raise ValueError("LAMB: loss_scaler must be an mxlamb.LossScaler or None, got %r"
                             % (loss_scaler,))
        self.loss_scaler = loss_scaler
        self.skip_nonfinite = _flag("skip_nonfinite", skip_nonfinite)
        self.exclude_from_weight_decay = _patterns("exclude_from_weight_decay",
                                                   exclude_from_weight_decay)
        self.exclude_from_layer_adaptation = _patterns("exclude_from_layer_adaptation",
                                                       exclude_from_layer_adaptation)
        if "wd" in kwargs:
            _number("wd", kwargs["wd"], low=0.0)
        if "rescale_grad" in kwargs:
            _number("rescale_grad", kwargs["rescale_grad"], low=0.0)
        if kwargs.get("clip_gradient") is not None:
            if _number("clip_gradient", kwargs["clip_gradient"]) == 0:
                _warn_trap("LAMB: clip_gradient=0 does not clip, as in MXNet's LAMB (which "
                           "passes clip_gradient to its kernels only when it is truthy); give "
                           "None for no clipping, or a positive bound")
        if "multi_precision" in kwargs:
            _flag("multi_precision", kwargs["multi_precision"])
        super().__init__(learning_rate=learning_rate, **kwargs)
        # Set after Optimizer.__init__, which resets both (1.x: aggregate_num 0; 2.0:
        # aggregate_num 1 and use_fused_step False, since they are not passed on to it).
        self.aggregate_num = aggregate_num
        self.use_fused_step = use_fused_step
        # What subclasses change (AdamW): trust ratio on, MXNet's epsilon, no AMSGrad.
        self._layer_adaptation = True
        self._epsilon_hat = False
        self._amsgrad = False
        self._step_states = {}      # device_key(context) -> [loss scale, clean steps, skipped
        #                             steps] of that device, without a loss scaler
        self._device_counts = {}    # context -> float64 applied-step counts (by count slot)
        self._count_slots = {}      # index -> slot in those counts
        # Host counts per device, as MXNet keeps _index_update_count: with several devices and
        # update_on_kvstore=False, each device's Updater steps every parameter once per step.
        self._all_applied_steps = {}  # device_id -> {index: applied updates}
        self._all_micro_steps = {}    # device_id -> {index: gradients accumulated}
        self._use_device_counts(0)
        self._callback_error = None   # what a kvstore callback refused (see _fail_in_callback)
        self._known = {}            # context -> indices whose states were made there
        self._pending = {}          # context -> {index: item} of a step still being collected
        self._last_tables = {}      # index -> (phase-1 table, row, ratio attributes)
        self._names = {}            # index -> (wd excluded, layer adaptation)
        self._groups = {}           # indices -> _group_options
        self._checked = {}          # index -> [(weight, grad, state, Prepared)], one per device
        self._on_server = False     # unpickled in a kvstore server (see update)
        self._full_sizes = {}       # index -> (name, size), for a kvstore server
        self._slabs = _MomentSlabs()
        self._packed = {}           # id(mean) -> (mean, var, (slab, offset, size)) as allocated

    def __getstate__(self):
        state = super().__getstate__()
        for transient in ("_checked", "_pending", "_last_tables", "_names", "_groups", "_slabs",
                          "_packed", "_callback_error"):
            del state[transient]  # arrays of one step, rebuilt on the next; slabs: the
            # states that live in them are pickled (and unpickled) as the Updater's own
        # Optimizer.__getstate__ drops param_dict (the Gluon Parameters), so a kvstore server
        # would lose each parameter's name, lr_mult and wd_mult (and with the name the
        # exclusions by name). They travel by index instead; param_dict wins where present.
        params = self.param_dict
        state["idx2name"] = {**self.idx2name, **{i: p.name for i, p in params.items()}}
        state["lr_mult"] = {**self.lr_mult, **{i: p.lr_mult for i, p in params.items()}}
        state["wd_mult"] = {**self.wd_mult, **{i: p.wd_mult for i, p in params.items()}}
        state["_full_sizes"] = {**self._full_sizes, **{
            i: (p.name, int(numpy.prod(p.shape))) for i, p in params.items()
            if p.shape is not None and all(p.shape)}}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._callback_error = None
        self._upgrade_pickled_counts()
        self._checked, self._pending, self._last_tables, self._names = {}, {}, {}, {}
        self._slabs, self._packed, self._groups = _MomentSlabs(), {}, {}
        self._on_server = os.environ.get("DMLC_ROLE") == "server"
        if self.aggregate_num in (numpy.inf, sys.maxsize):
            # A float inf comes back from the pickle as another object than numpy.inf, which
            # MXNet 2.0's Updater tests by identity; and this MXNet may not be the pickler's.
            self.aggregate_num = _WHOLE_STEP

    def _upgrade_pickled_counts(self):
        """A LAMB pickled by mxlamb 0.2 (Trainer.save_states) kept one count per parameter for
        all devices: each device continues from it."""
        fields = self.__dict__
        if "rescale_grad" in fields:
            self._rescale_grad = fields.pop("rescale_grad")
        if "_all_applied_steps" not in fields:
            applied, micro = fields.pop("_applied_steps", {}), fields.pop("_micro_steps", {})
            self._all_applied_steps = {d: dict(applied) for d in self._all_index_update_counts}
            self._all_micro_steps = {d: dict(micro) for d in self._all_index_update_counts}
        if "_step_states" not in fields:
            old = fields.pop("_step_state", None)
            self._step_states = {} if old is None else {device_key(old.context): old}
        self._use_device_counts(0)

    # ------------------------------------------------------------------------------ states

    def create_state(self, index, weight):
        """Mean and variance (zeros, of the weight's dtype: float32 or float64) for
        ``weight``, then AMSGrad's max of the variance, the weight average (a copy of the
        weight) and the gradient sum, each when its option is on. On the CPU, the mean and
        variance of a parameter of up to 65,536 elements are views into a shared moment slab
        (see _MomentSlabs)."""
        if weight.stype != "default":
            raise ValueError("LAMB: parameter %s has %s storage; LAMB needs dense weights "
                             "(its trust ratio is a whole-tensor norm)"
                             % (self._describe(index), weight.stype))
        if numpy.dtype(weight.dtype) not in (_FLOAT32, _FLOAT64):
            raise ValueError(
                "LAMB: parameter %s is %s; LAMB updates float32 and float64 weights, and "
                "float16/bfloat16 weights with multi_precision=True"
                % (self._describe(index), self._dtype_name(weight.dtype)))
        self._known.setdefault(weight.context, set()).add(index)
        if 0 < weight.size <= _PACKED_MAX_ELEMENTS and weight.context.device_type == "cpu":
            # (mxlamb_step, which takes packed moments, is the CPU's operator)
            packed = self._slabs.allocate(weight, self._slab_elements())
            self._packed[id(packed[0])] = packed
            state = list(packed[:2])
        else:
            state = [self._zeros(weight), self._zeros(weight)]
        if self._amsgrad:
            state.append(self._zeros(weight))
        if self.use_ema:
            state.append(weight.copy())
        if self.gradient_accumulation_steps is not None:
            state.append(self._zeros(weight))
        return tuple(state)

    def create_state_multi_precision(self, index, weight):
        """``(weight32, create_state(index, weight32))`` for a float16/bfloat16 weight under
        multi_precision, else ``create_state(index, weight)``."""
        try:
            return self._create_state_multi_precision(index, weight)
        except Exception as error:  # noqa: BLE001 (re-raised, or raised by the next step)
            if not in_kvstore_callback():
                raise
            # The Updater calls update next, which refuses the call (see _fail_in_callback).
            self._callback_error = self._callback_error or error
            return None

    def _create_state_multi_precision(self, index, weight):
        if numpy.dtype(weight.dtype) in _LOW_PRECISION and self.multi_precision:
            master = (weight.astype(numpy.float32) if weight.size else
                      ndarray.empty(weight.shape, weight.context, dtype=numpy.float32))
            return (master, self.create_state(index, master))
        return self.create_state(index, weight)

    def _slab_elements(self):
        """Elements of a new moment slab: the moments of every small parameter in param_dict
        (the Gluon Trainer's; one slab then holds them all), else _SLAB_ELEMENTS."""
        wanted = 0
        for param in self.param_dict.values():
            shape = getattr(param, "shape", None)
            if shape is not None and all(shape):
                size = int(numpy.prod(shape))
                wanted += 2 * size if size <= _PACKED_MAX_ELEMENTS else 0
        return wanted or _SLAB_ELEMENTS

    @staticmethod
    def _zeros(weight):
        """Zeros of the weight's shape and dtype (float32 or float64: the math type)."""
        # MXNet 1.x cannot run any operator (zeros included) on a zero-size array.
        if weight.size == 0:
            return ndarray.empty(weight.shape, weight.context, dtype=weight.dtype)
        return ndarray.zeros(weight.shape, weight.context, dtype=weight.dtype)

    # ------------------------------------------------------------------------- 2.0 API

    def step(self, indices, weights, grads, states):
        """Per-tensor update: phase 1 then phase 2 for one tensor at a time."""
        self._run_step(indices, weights, grads, states, group_size=1)

    def fused_step(self, indices, weights, grads, states):
        """Multi-tensor update: groups of ``aggregate_num`` tensors per operator call (one
        for 0, all of them for numpy.inf)."""
        group_size = max(1, min(self.aggregate_num, len(indices)))
        self._run_step(indices, weights, grads, states, group_size=int(group_size))

    # ------------------------------------------------------------------------- 1.x API

    def update(self, index, weight, grad, state):
        """MXNet 1.x entry point: single arrays, or lists when the Updater aggregates.

        With options that need every gradient of a step first (global_clipnorm, clipnorm,
        skip_nonfinite, loss_scaler), the Updater's calls of one step (it sends groups of
        aggregate_num, and one call per weight dtype) are collected until every parameter of
        the context has come, and the step runs then."""
        states = list(state) if isinstance(index, (list, tuple)) else [state]
        items = list(zip(_as_list(index), _as_list(weight), _as_list(grad), states))
        if self._on_server:
            self._check_on_server(items)
        if self._callback_error is not None and in_kvstore_callback():
            self._fail_in_callback(self._callback_error, items)
            return
        try:
            if self._needs_whole_step:
                if in_kvstore_callback():
                    raise ValueError(
                        "LAMB: %s needs every gradient of a step before the first update, but "
                        "the kvstore updates each parameter as its gradient arrives and sends it "
                        "back at once (update_on_kvstore=True); use "
                        "gluon.Trainer(..., update_on_kvstore=False) (Module API: set "
                        "MXNET_UPDATE_ON_KVSTORE=0)" % self._whole_step_reason())
                items = self._collect_step(items)
                if not items:
                    return
            (self.fused_step if self.use_fused_step else self.step)(*map(list, zip(*items)))
        except Exception as error:  # noqa: BLE001 (re-raised, or raised by the next step)
            if not in_kvstore_callback():
                raise
            self._fail_in_callback(error, items)

    # The master copy lives in the state and the operators handle it: no separate path.
    update_multi_precision = update

    def _use_device_counts(self, device_id):
        """Switches every step count to those of ``device_id`` (MXNet's Updater does before
        each update): several devices in one process each count their own steps."""
        _MXNET_SET_DEVICE(self, device_id)
        self._applied_steps = self._all_applied_steps.setdefault(device_id, {})
        self._micro_steps = self._all_micro_steps.setdefault(device_id, {})

    # The name MXNet's Updater calls (2.0 renamed it, and warns on the old one).
    if hasattr(Optimizer, "_set_current_device"):
        _set_current_device = _use_device_counts
    else:
        _set_current_context = _use_device_counts

    # ------------------------------------------------------ errors in a kvstore callback

    @property
    def rescale_grad(self):
        return self._rescale_grad

    @rescale_grad.setter
    def rescale_grad(self, value):
        # gluon.Trainer.step sets rescale_grad before anything else: where an error that a
        # kvstore callback could not raise in the step before reaches the user.
        error, self._callback_error = getattr(self, "_callback_error", None), None
        self._rescale_grad = value
        if error is not None:
            raise error

    def _fail_in_callback(self, error, items):
        """MXNet's kvstore calls the updater from a ctypes callback (update_on_kvstore=True),
        which prints an exception and drops it: training would go on with weights that never
        change. Instead nothing of the call is applied, the first error is kept (the next
        gluon.Trainer.step raises it, and every update until then is refused), and each weight
        of the call gets an mxlamb_error operator that fails with the message, so the kvstore's
        pull and whatever reads the weights next raises it (the Module API included)."""
        if self._callback_error is None:
            self._callback_error = error
        message = ("%s: %s [raised in MXNet's kvstore updater: the update was not applied]"
                   % (type(error).__name__, error))
        for item in items:
            weight = _legacy(item[1])
            if weight.size:
                ndarray.mxlamb_error(weight, message=message, out=weight)

    # ------------------------------------------------------------------------ the user's

    @property
    def skipped_steps(self):
        """How many steps were skipped for non-finite gradients (reads the device)."""
        state = self._current_step_state(create=False)
        return 0 if state is None else int(state[2].asscalar())

    def trust_ratios(self):
        """The trust ratios of the last step as :class:`TrustRatios` (no host sync until the
        values are read)."""
        keys, parts = [], []
        by_table = collections.OrderedDict()
        for index, (table, row, attrs) in sorted(self._last_tables.items(),
                                                 key=lambda kv: str(kv[0])):
            by_table.setdefault(id(table), (table, attrs, []))[2].append((index, row))
        for table, attrs, rows in by_table.values():
            ratios = ndarray.mxlamb_trust_ratio(table, **attrs)
            for index, row in rows:
                keys.append(self._name_of(index))
                parts.append(ratios[row:row + 1])
        values = (ndarray.concat(*parts, dim=0) if parts
                  else ndarray.empty((0,), dtype=numpy.float64))
        return TrustRatios(keys, values)

    def finalize_variable_values(self, params=None):
        """Copies the weight averages into the weights (Keras' name): all parameters this
        optimizer has stepped, or those of ``params`` (Gluon Parameters or a ParameterDict)."""
        for weight, slots in self._ema_targets(params):
            self._assign_weight(weight, slots, slots.average)

    @contextlib.contextmanager
    def averaged_weights(self, params=None):
        """Within the block the model weights hold the averages (for evaluation); on exit
        they get their trained values back. Master copies are not touched."""
        saved = [(weight, weight.copy()) for weight, _ in self._ema_targets(params)]
        for weight, slots in self._ema_targets(params):
            self._cast_into(slots.average, weight)
        try:
            yield self
        finally:
            for weight, value in saved:
                value.copyto(weight)

    # ------------------------------------------------------------------ on a kvstore server

    def _check_on_server(self, items):
        """A kvstore server (update_on_kvstore=True) sees one key at a time, and with two or
        more servers possibly a slice of it. MXNet's server swallows an exception from the
        updater and keeps wrong weights, so a step that would be wrong stops the server."""
        if self._needs_whole_step:
            stop_server("LAMB: %s needs every gradient of a step, but a kvstore server sees "
                        "only its own keys, one at a time; use update_on_kvstore=False"
                        % self._whole_step_reason())
        if not self._layer_adaptation:
            return  # elementwise: a slice updates like the whole
        servers = int(os.environ.get("DMLC_NUM_SERVER", "1"))
        bound = int(os.environ.get("MXNET_KVSTORE_BIGARRAY_BOUND", "1000000"))
        for index, weight, _, _ in items:
            name, size = self._full_sizes.get(index, (self._name_of(index), None))
            if size is not None:
                if weight.size != size:
                    stop_server("LAMB: this kvstore server holds %d of the %d elements of "
                                "parameter %r (MXNet slices arrays of at least "
                                "MXNET_KVSTORE_BIGARRAY_BOUND elements across servers), and "
                                "its trust ratio needs the whole tensor; set "
                                "MXNET_KVSTORE_BIGARRAY_BOUND above %d on the workers, or run "
                                "one server (mxlamb.launch does the first)"
                                % (weight.size, size, name, size))
            elif servers > 1 and weight.size >= bound // servers:
                stop_server("LAMB: parameter %r (%d elements on this server) may be a slice of "
                            "a bigger array (MXNET_KVSTORE_BIGARRAY_BOUND=%d, %d servers) and "
                            "its size is unknown here (no Gluon Trainer gave it); set "
                            "MXNET_KVSTORE_BIGARRAY_BOUND above every parameter's size, or run "
                            "one server" % (name, weight.size, bound, servers))

    # ------------------------------------------------------------------------ the step

    @property
    def _needs_whole_step(self):
        return (self.global_clipnorm is not None or self.clipnorm is not None
                or self.skip_nonfinite or self.loss_scaler is not None)

    @property
    def _may_skip(self):
        return self.skip_nonfinite or self.loss_scaler is not None

    def _collect_step(self, items):
        """Holds the Updater's calls until a whole step of this context has come."""
        context = items[0][1].context
        pending = self._pending.setdefault(context, collections.OrderedDict())
        for item in items:
            if item[0] in pending:
                missing = sorted(self._expected(context) - set(pending), key=str)
                self._pending[context] = collections.OrderedDict()
                raise RuntimeError(
                    "LAMB: %s needs the gradients of every parameter in each step, but "
                    "parameter(s) %s got none before parameter %s came again (frozen, or "
                    "Trainer.step(ignore_stale_grad=True) skipping it?); the step was not applied"
                    % (self._whole_step_reason(), ", ".join(self._describe(i) for i in missing),
                       self._describe(item[0])))
            pending[item[0]] = item
            self._known.setdefault(context, set()).add(item[0])
        if not self._expected(context) <= set(pending):
            return None
        self._pending[context] = collections.OrderedDict()
        return list(pending.values())

    def _expected(self, context):
        expected = set(self._known.get(context, ()))
        for index, param in self.param_dict.items():
            if getattr(param, "grad_req", "write") != "null":
                expected.add(index)
        return expected

    def _whole_step_reason(self):
        for name in ("global_clipnorm", "clipnorm", "loss_scaler"):
            if getattr(self, name) is not None:
                return name
        return "skip_nonfinite"

    def _run_step(self, indices, weights, grads, states, group_size):
        if weights:
            # Counts are per device (MXNet's Updater switches them too; a direct call may not).
            self._use_device_counts(_legacy(weights[0]).context.device_id)
        self._update_count(list(indices))
        dtypes = {}
        items = []
        checked = self._checked
        for index, weight, grad, state in zip(indices, weights, grads, states):
            prepared = None
            for cached in checked.get(index, ()):  # _checked_state's cache, inline (per tensor)
                if cached[0] is weight and cached[1] is grad and cached[2] is state:
                    prepared = cached[3]
                    break
            if prepared is None:
                prepared = self._checked_state(index, weight, grad, state)
            if prepared.size > 0:
                items.append((index, prepared.weight, prepared.grad, prepared.slots))
                dtypes[index] = prepared.dtype
        items, grad_scale = self._accumulate(items)
        if not items:
            return
        stats = self._gradient_statistics(items, grad_scale) if self._needs_whole_step else None
        # One weight dtype per operator call (the mode and the output type are per call).
        kinds = set(dtypes.values())
        if len(kinds) == 1:
            by_dtype = {kinds.pop(): list(enumerate(items))}
        else:
            by_dtype = collections.OrderedDict()
            for row, item in enumerate(items):
                by_dtype.setdefault(dtypes[item[0]], []).append((row, item))
        for dtype, members in by_dtype.items():
            for start in range(0, len(members), group_size):
                self._update_group(members[start:start + group_size], grad_scale, stats, dtype)
        applied, begin = self._applied_steps, self.begin_num_update
        if self.gradient_accumulation_steps is None and not self.use_ema:
            for item in items:
                applied[item[0]] = applied.get(item[0], begin) + 1
            return
        for index, weight, _, slots in items:
            applied[index] = applied.get(index, begin) + 1
            if slots.accum is not None:
                slots.accum[:] = 0
            if (self.use_ema and self.ema_overwrite_frequency is not None
                    and self._applied_steps[index] % self.ema_overwrite_frequency == 0):
                self._assign_weight(weight, slots, slots.average)

    def _accumulate(self, items):
        """With gradient_accumulation_steps N: adds each gradient (rescaled) to its sum and
        returns the items whose N-th gradient this is, with their sums as gradients and 1/N
        as the scale. Without: the items and rescale_grad / loss_scale_factor."""
        scale = self.rescale_grad / (self.loss_scale_factor or 1.0)
        steps = self.gradient_accumulation_steps
        if steps is None:
            return items, scale
        ready = []
        for index, weight, grad, slots in items:
            accum = slots.accum
            accum += grad.astype(accum.dtype, copy=False) * scale
            self._micro_steps[index] = self._micro_steps.get(index, 0) + 1
            if self._micro_steps[index] == steps:
                self._micro_steps[index] = 0
                ready.append((index, weight, slots.accum, slots))
        return ready, 1.0 / steps

    def _gradient_statistics(self, items, grad_scale):
        """mxlamb_grad_stats over every gradient of the step: (grad_sumsq, control)."""
        attrs = {"num_tensors": len(items), "rescale_grad": grad_scale,
                 "global_clipnorm": self.global_clipnorm or -1.0,
                 "skip_nonfinite": self._may_skip}
        if self.loss_scaler is not None:
            attrs["growth_interval"] = self.loss_scaler.growth_interval
        grads = [self._kernel_grad(item[2]) for item in items]
        state = self._current_step_state(create=True, context=items[0][1].context)
        return ndarray.mxlamb_grad_stats(*grads, state, **attrs)

    def _current_step_state(self, create, context=None):
        """[loss scale, clean steps, skipped steps] of ``context``'s device (each device that
        steps keeps its own, so that several devices do not count one step twice); without a
        context, the first device's (all devices see the same gradients and agree)."""
        if self.loss_scaler is not None:
            return (self.loss_scaler.state if context is None
                    else self.loss_scaler.state_on(context))
        if context is None:
            return next(iter(self._step_states.values()), None)
        memory = device_key(context)
        state = self._step_states.get(memory)
        if state is None and create:
            state = self._step_states[memory] = ndarray.array([1.0, 0.0, 0.0], ctx=context,
                                                              dtype=numpy.float64)
        return state

    def _counts_for(self, indices, context):
        """The device step counts of ``context`` and the slots of ``indices`` in them."""
        for index in indices:
            self._count_slots.setdefault(index, len(self._count_slots))
        counts = self._device_counts.get(context)
        needed = len(self._count_slots)
        if counts is None or counts.shape[0] < needed:
            # A count starts at begin_num_update, as MXNet's _index_update_count does.
            grown = ndarray.full((max(16, 2 * needed),), self.begin_num_update, ctx=context,
                                 dtype=numpy.float64)
            if counts is not None:
                grown[:counts.shape[0]] = counts
            counts = self._device_counts[context] = grown
        return counts, [self._count_slots[index] for index in indices]

    @staticmethod
    def _kernel_grad(grad):
        # MXNet 1.9's extension API cannot hand a bfloat16 array to a library operator
        # (lib_api.cc rejects dtype flag 12): bfloat16 gradients are widened by MXNet's cast,
        # and the float32 kernels update the master copy.
        if numpy.dtype(grad.dtype) == _BFLOAT16:
            return grad.astype(numpy.float32)
        return grad

    def _update_group(self, members, grad_scale, stats, dtype):
        """One phase-1/phase-2 pair over a group of tensors of weight dtype ``dtype``.
        ``members`` are (row in the step, (index, weight, grad, Slots))."""
        rows = [row for row, _ in members]
        indices, weights, grads, slots = zip(*(item for _, item in members))
        bfloat16 = dtype == _BFLOAT16
        if bfloat16:
            grads = [self._kernel_grad(g) for g in grads]
        attrs = self._attributes(indices, dtype, grad_scale, bfloat16)
        extra1, extra2 = [], []
        if stats is not None:
            attrs["has_stats"] = True
            attrs["stat_rows"] = ",".join(map(str, rows))
            if self.clipnorm is not None:
                attrs["clipnorm"] = self.clipnorm
            extra1 += [stats[0], stats[1]]
            extra2.append(stats[1])
        if self._may_skip:
            counts, count_slots = self._counts_for(indices, weights[0].context)
            attrs["device_counts"] = True
            attrs["count_slots"] = ",".join(map(str, count_slots))
            extra1.append(counts)
            extra2.append(counts)
        else:
            begin = self.begin_num_update
            attrs["step_counts"] = _joined([self._applied_steps.get(i, begin) + 1
                                            for i in indices])
        if (stats is None and not (self._may_skip or self._amsgrad or self.use_ema or bfloat16)
                and weights[0].context.device_type == "cpu"):
            # The plain step: both phases in one operator call (back to back in cache; CPU
            # only, the GPU keeps the two phase operators).
            packed = self._packed_moments(slots)
            inputs = []
            for w, g, s in zip(weights, grads, slots):
                inputs += [s.master, g] if packed else [s.master, g, s.mean, s.var]
                if attrs["multi_precision"]:
                    inputs.append(w)  # the float16 model weight, rounded from the master
            if packed:
                inputs.append(packed[0])
                attrs["moments_offset"] = packed[1]
            table = ndarray.mxlamb_step(*inputs, **attrs)
            self._keep_table(indices, table, attrs)
            return
        phase1_inputs = []
        phase2_inputs = []
        for s, g in zip(slots, grads):
            phase1_inputs += [s.master, g, s.mean, s.var]
            if self._amsgrad:
                phase1_inputs.append(s.var_max)
            phase2_inputs += [s.master, s.mean, s.var_max if self._amsgrad else s.var]
            if self.use_ema:
                phase2_inputs.append(s.average)
        table = ndarray.mxlamb_phase1(*phase1_inputs, *extra1, **attrs)
        masters = [s.master for s in slots]
        ndarray.mxlamb_phase2(*phase2_inputs, table, *extra2,
                              out=list(masters if bfloat16 else weights), **attrs)
        if bfloat16:
            for weight, master in zip(weights, masters):
                ndarray.cast(master, dtype=weight.dtype, out=weight)
        self._keep_table(indices, table, attrs)

    @staticmethod
    def _packed_moments(slots):
        """(slab, offset) where the tensors' moments lie side by side in one slab, in the
        group's order (mxlamb_step's packed layout), else None."""
        first = slots[0].moments_at
        if first is None:
            return None
        slab, expected = first[0], first[1]
        for s in slots:
            at = s.moments_at
            if at is None or at[0] is not slab or at[1] != expected:
                return None
            expected += 2 * at[2]
        return slab, first[1]

    def _keep_table(self, indices, table, attrs):
        """Keeps a group's sums-of-squares table for trust_ratios() (read on request)."""
        ratio_attrs = {"num_tensors": len(indices),
                       "lower_bound": attrs["lower_bound"], "upper_bound": attrs["upper_bound"]}
        if "layer_adaptation" in attrs:
            ratio_attrs["layer_adaptation"] = attrs["layer_adaptation"]
        for row, index in enumerate(indices):
            self._last_tables[index] = (table, row, ratio_attrs)

    def _attributes(self, indices, dtype, grad_scale, float32_kernels=False):
        multi_precision = (dtype in _LOW_PRECISION and self.multi_precision
                           and not float32_kernels)
        excluded, layer_adaptation = self._group_options(indices)
        wds = self._get_wds(indices)
        if excluded:
            wds = [0.0 if i in excluded else wd for i, wd in enumerate(wds)]
        attrs = {
            "num_tensors": len(indices),
            "multi_precision": multi_precision,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "epsilon": self.epsilon,
            "bias_correction": self.bias_correction,
            "rescale_grad": grad_scale,
            # None or 0 (MXNet's "not given") is -1; a negative clip_gradient does not clip.
            "clip_gradient": self.clip_gradient or -1.0,
            "lower_bound": self.lower_bound or -1.0,
            "upper_bound": self.upper_bound or -1.0,
            "lrs": _joined(self._get_lrs(indices)),
            "wds": _joined(wds),
        }
        if layer_adaptation is not None:
            attrs["layer_adaptation"] = layer_adaptation
        if self._epsilon_hat:
            attrs["epsilon_hat"] = True
        if self._amsgrad:
            attrs["amsgrad"] = True
        if self.use_ema:
            attrs["use_ema"] = True
            attrs["ema_momentum"] = self.ema_momentum
        if multi_precision:
            attrs["weight_dtype"] = 2  # float16
        return attrs

    def _group_options(self, indices):
        """(rows excluded from weight decay, the layer_adaptation attribute or None when every
        tensor adapts) of a group, from _tensor_options, cached per group."""
        key = tuple(indices)
        options = self._groups.get(key)
        if options is None:
            per_tensor = [self._tensor_options(i) for i in indices]
            excluded = {row for row, (no_wd, _) in enumerate(per_tensor) if no_wd}
            adapt = [a for _, a in per_tensor]
            options = self._groups[key] = (excluded, None if all(adapt) else
                                           ",".join("1" if a else "0" for a in adapt))
        return options

    def _tensor_options(self, index):
        """(excluded from weight decay, layer adaptation) of a parameter, by its name."""
        options = self._names.get(index)
        if options is None:
            name = self._name_of(index)
            name = name if isinstance(name, str) else ""
            excluded = any(p.search(name) for p in self.exclude_from_weight_decay)
            adapt = self._layer_adaptation and not any(
                p.search(name) for p in self.exclude_from_layer_adaptation)
            options = self._names[index] = (excluded, adapt)
        return options

    def _is_multi_precision(self, weight):
        return self.multi_precision and numpy.dtype(weight.dtype) in _LOW_PRECISION

    # ------------------------------------------------------------------------ EMA helpers

    def _ema_targets(self, params):
        """(model weight, Slots) of every parameter with an average, or of ``params``."""
        if not self.use_ema:
            raise ValueError("LAMB: weight averages need use_ema=True")
        if hasattr(params, "values"):
            params = list(params.values())
        wanted = None if params is None else {id(p) for p in params}
        targets = []
        for index, entries in self._checked.items():
            param = self.param_dict.get(index)
            if not entries or (wanted is not None and id(param) not in wanted):
                continue
            targets += [(cached[0], cached[3].slots) for cached in entries]
            # With update_on_kvstore=True the weight stepped is the kvstore's copy: the model's
            # arrays on each device get the average as well.
            stepped = {id(cached[0]) for cached in entries}
            for data in self._model_arrays(param):
                if id(data) not in stepped:
                    targets.append((data, entries[0][3].slots))
        return targets

    @staticmethod
    def _model_arrays(param):
        """The arrays of a Gluon Parameter on each of its devices (none if it has none)."""
        try:
            return list(param.list_data()) if param is not None else []
        except Exception:  # noqa: BLE001 (not initialised: nothing of it was stepped)
            return []

    @staticmethod
    def _cast_into(source, target):
        if numpy.dtype(source.dtype) == numpy.dtype(target.dtype):
            source.copyto(target)
        else:
            ndarray.cast(source, dtype=target.dtype, out=target)

    def _assign_weight(self, weight, slots, value):
        if slots.master is not weight:
            value.copyto(slots.master)
        self._cast_into(value, weight)

    # ------------------------------------------------------------------------ checks

    def _checked_state(self, index, weight, grad, state):
        """The :class:`Prepared` parameter: its :class:`Slots` (master is the weight itself
        without multi-precision), operator views of weight and gradient, dtype and size.
        Refuses, naming the parameter, what the operators would get wrong, before any array
        is written.

        Trainer and Updater pass the same array objects every step: a parameter whose weight,
        gradient and state are the very objects checked before is not checked again (the
        cache keeps them alive, so an identity cannot be reused by a new array)."""
        entries = self._checked.setdefault(index, [])
        for cached in entries:
            if cached[0] is weight and cached[1] is grad and cached[2] is state:
                return cached[3]
        result = Prepared(_legacy(weight), _legacy(grad),
                          self._check_state(index, weight, grad, state),
                          numpy.dtype(weight.dtype), weight.size)
        # One entry per device (several devices update the same index, each its own copy);
        # an entry of the same device is an older array of this parameter.
        memory = device_key(weight.context)
        entries[:] = [c for c in entries if device_key(c[0].context) != memory]
        entries.append((weight, grad, state, result))
        return result

    def _state_layout(self):
        names = ["mean", "var"]
        if self._amsgrad:
            names.append("var_max")
        if self.use_ema:
            names.append("average")
        if self.gradient_accumulation_steps is not None:
            names.append("accum")
        return names

    def _check_state(self, index, weight, grad, state):
        def refuse(what):
            raise ValueError("LAMB: parameter %s: %s" % (self._describe(index), what))

        dtype = numpy.dtype(weight.dtype)
        multi_precision = self._is_multi_precision(weight)
        if dtype not in (_FLOAT32, _FLOAT64) and not multi_precision:
            refuse("weight is %s; LAMB updates float32 and float64 weights, and "
                   "float16/bfloat16 weights with multi_precision=True" % self._dtype_name(dtype))
        math_dtype = _FLOAT64 if dtype == _FLOAT64 else _FLOAT32  # of master copy and states
        if grad.stype != "default" or weight.stype != "default":
            refuse("%s storage; LAMB needs dense weights and gradients (the trust ratio is a "
                   "whole-tensor norm, and densifying a sparse gradient would decay rows it "
                   "never touched)" % (grad.stype if grad.stype != "default" else weight.stype))
        if grad.shape != weight.shape:
            refuse("gradient has shape %s, weight has %s" % (grad.shape, weight.shape))
        if numpy.dtype(grad.dtype) != dtype:
            refuse("gradient is %s, weight is %s"
                   % (self._dtype_name(grad.dtype), self._dtype_name(dtype)))
        if not same_memory(grad.context, weight.context):
            refuse("gradient is on %s, weight on %s" % (grad.context, weight.context))
        layout = self._state_layout()
        expected = "(%s)" % ", ".join(layout)
        if multi_precision:
            expected = "(weight32, %s)" % expected
        try:
            master, arrays = state if multi_precision else (weight, state)
            arrays = tuple(arrays)
        except (TypeError, ValueError):
            refuse("state is not %s" % expected)
        if len(arrays) != len(layout) or not all(isinstance(a, ndarray.NDArray)
                                                 for a in arrays + (master,)):
            refuse("state is not %s (made with other options?)" % expected)
        named = dict(zip(layout, arrays))
        packed = self._packed.get(id(named["mean"]))
        moments_at = (packed[2] if packed is not None and packed[0] is named["mean"]
                      and packed[1] is named["var"] else None)
        for name, array in [("weight32", master)] + list(named.items()):
            if (array.shape != weight.shape or numpy.dtype(array.dtype) != math_dtype
                    or not same_memory(array.context, weight.context)):
                refuse("state %s is %s %s on %s, expected %s %s on %s"
                       % (name, self._dtype_name(array.dtype), array.shape, array.context,
                          math_dtype.name, weight.shape, weight.context))
        return Slots(*(None if array is None else _legacy(array) for array in (
            master, named["mean"], named["var"], named.get("var_max"), named.get("average"),
            named.get("accum"))), moments_at=moments_at)

    def _name_of(self, index):
        name = self.idx2name.get(index)
        if name is None and index in self.param_dict:
            name = self.param_dict[index].name
        return index if name is None else name

    def _describe(self, index):
        name = self._name_of(index)
        return "%r (%s)" % (index, name) if name != index else repr(index)

    @staticmethod
    def _dtype_name(dtype):
        return "bfloat16" if numpy.dtype(dtype) == _BFLOAT16 else numpy.dtype(dtype).name
