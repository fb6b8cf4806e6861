"""LAMB: layer-wise adaptive moments for large-batch training, on mxlamb's C++ operators.

This module is MXNet's adapter and nothing more: the arguments (validated into
:class:`mxlamb.options.Options`), the states (:mod:`mxlamb.state`), the calls MXNet makes
(``create_state``, ``step``/``fused_step``, 1.x ``update``) and the user's methods. Every step
goes to the optimizer's :class:`mxlamb.engine.Engine`; the operators are :mod:`mxlamb.ops`.
"""
import collections
import contextlib
import dataclasses
import os
import sys

import numpy

from mxnet import ndarray
from mxnet.optimizer import Optimizer, Updater

from .counts import StepCounters
from .devices import in_kvstore_callback, raise_after_callback
from .engine import Engine, cast_into, copy_average
from .options import (OPTIMIZER_KWARGS, TRAINING_OPTIONS, WHOLE_STEP, Options, aggregation,
                      flag, number, warn_trap)
from . import ops, state
from ._library import mxnet_version_number

__all__ = ["LAMB", "TrustRatios"]

TrustRatios = collections.namedtuple("TrustRatios", ["keys", "values"])
TrustRatios.__doc__ = """Per-parameter trust ratios of the last step: ``keys`` (parameter
names, or indices where no name is known) and ``values`` (a float64 NDArray in that order;
NaN for a skipped step, 1 where layer adaptation is off)."""

# How MXNet's own LAMB reads a schedule where parameters' counts differ: 1.x counts and reads
# it parameter by parameter in every path; 2.0's fused_step counts the whole call first.
_SCHEDULE_PER_PARAMETER = mxnet_version_number() < 20000


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

    The update runs in mxlamb's multi-tensor C++ operators: ``mxlamb_step`` (both phases in
    one call, the plain step on the CPU), or ``mxlamb_phase1`` (moments, raw update, norms)
    and ``mxlamb_phase2`` (trust-ratio apply), after ``mxlamb_grad_stats`` (the whole step's
    gradient statistics) for the options that need them; ``mxlamb.ops`` chooses.
    ``fused_step`` sends ``aggregate_num`` tensors per call; ``step`` sends one at a time.
    Both give bit-identical results. The step itself is :class:`mxlamb.engine.Engine`'s: this
    class is MXNet's adapter (arguments, states, the calls MXNet makes, the user's methods).

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
    aggregate_num : int, None or numpy.inf, default numpy.inf
        Tensors per multi-tensor operator call in ``fused_step``, as MXNet 2.0 reads it: any
        positive integer; None or 0 for one tensor per call; ``numpy.inf`` (the default) for
        the whole step at once (kept as ``sys.maxsize`` on MXNet 1.x, whose Updater slices by
        it), which mxlamb cuts as is fastest: the plain step in one ``mxlamb_step`` call (the
        operator works back to back per cache-sized batch), the two-phase options path in
        batches of consecutive tensors of about a million elements. MXNet's LAMB defaults to
        45 (1.9.1) or 4 (2.0); every grouping gives bit-identical results here, so the
        default is the fastest one (a step of 200 small tensors in groups of 4 costs about 5
        times as much, most of it MXNet's cost per operator call). Where parameters' update
        counts differ and an ``lr_scheduler`` reads num_update, the schedule is read as
        MXNet's own LAMB reads it: parameter by parameter as each is counted (MXNet 1.x, and
        2.0's ``step``), or once after counting the whole call (2.0's ``fused_step``; there
        the learning rate then depends on the grouping, in MXNet's LAMB too).
    use_fused_step : bool, default True
        Whether ``update`` (MXNet's Updater, Trainer) calls go to ``fused_step`` (else
        ``step``).
    global_clipnorm : float or None
        Scale all gradients of the step by ``min(1, global_clipnorm / ||all gradients||)``
        (after rescale_grad and loss unscaling), computed on the device.
    clipnorm : float or None
        Clip each gradient to this L2 norm (after global_clipnorm).
    use_ema, ema_momentum, ema_overwrite_frequency : bool, float in [0, 1), int or None
        Keras' weight average: a parameter's first update sets it to the weights, every
        later call moves it, ``avg = ema_momentum * avg + (1 - ema_momentum) * w`` (also a
        call that only accumulates a gradient), and the weights are replaced by it after the
        calls that belong to every ``ema_overwrite_frequency``-th update (as Keras counts
        them). See :meth:`finalize_variable_values` and :meth:`averaged_weights`. (The
        options named after Keras mean what Keras means; mxlamb's LAMB keeps MXNet's meanings
        for MXNet's own arguments, ``wd`` inside the trust ratio among them: for Keras'
        decoupled ``weight_decay`` use :class:`mxlamb.keras.Lamb`.)
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
    state_bits : 32 or 8, default 32
        8: the moments (and AMSGrad's max) of every tensor of 4,096 elements or more are
        stored in 8 bits, one byte per element and a float32 scale per block of 256 (a
        quarter of the moments' memory; smaller tensors keep float32 moments). The step is
        exact LAMB on the stored values: phase 1 decodes, updates in float32, stores, and
        takes the norm of the u made from the stored values, which phase 2 applies. Needs
        float32 weights or master copies, on the CPU. See docs/8bit.md.
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

    _ema_momentum_closed = False  # (ema_momentum in [0, 1): mxlamb.keras takes 1 too)

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-6,
                 lower_bound=None, upper_bound=None, bias_correction=True,
                 aggregate_num=numpy.inf,
                 use_fused_step=True, global_clipnorm=None, clipnorm=None, use_ema=False,
                 ema_momentum=0.99, ema_overwrite_frequency=None,
                 gradient_accumulation_steps=None, loss_scale_factor=None, loss_scaler=None,
                 skip_nonfinite=False, exclude_from_weight_decay=None,
                 exclude_from_layer_adaptation=None, state_bits=32, **kwargs):
        for key in kwargs:
            if key not in OPTIMIZER_KWARGS:
                raise ValueError("%s: unknown argument %s=%r (it takes learning_rate, beta1, "
                                 "beta2, epsilon, lower_bound, upper_bound, bias_correction, "
                                 "aggregate_num, use_fused_step, state_bits, %s, %s)"
                                 % (type(self).__name__, key, kwargs[key],
                                    ", ".join(TRAINING_OPTIONS), ", ".join(OPTIMIZER_KWARGS)))
        if learning_rate is not None:
            learning_rate = number("learning_rate", learning_rate, low=0.0)
        self.options = Options.validated(
            beta1, beta2, epsilon, lower_bound, upper_bound, bias_correction, global_clipnorm,
            clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
            gradient_accumulation_steps, loss_scale_factor, loss_scaler, skip_nonfinite,
            exclude_from_weight_decay, exclude_from_layer_adaptation,
            ema_momentum_closed=self._ema_momentum_closed, state_bits=state_bits)
        groups = aggregation(aggregate_num)
        use_fused_step = flag("use_fused_step", use_fused_step)
        _check_optimizer_kwargs(kwargs)
        super().__init__(learning_rate=learning_rate, **kwargs)
        # Set after Optimizer.__init__, which resets both (1.x: aggregate_num 0; 2.0:
        # aggregate_num 1 and use_fused_step False, since they are not passed on to it).
        self.aggregate_num = groups
        self.use_fused_step = use_fused_step
        self.counters = StepCounters(self.begin_num_update)
        self._callback_error = None   # what a kvstore callback refused (raise_after_callback)
        self._on_server = False       # unpickled in a kvstore server (see update)
        self._full_sizes = {}         # index -> (name, size), for a kvstore server
        self._reset_transient()

    def _reset_transient(self):
        """What is made again rather than pickled: the engine and the moment slabs' allocator
        (the states in the slabs are pickled as the Updater's own)."""
        self.__dict__["engine"] = Engine(self)
        self.__dict__["slabs"] = state.MomentSlabs()

    # param_dict and idx2name are what names and indices mean: a new one (a new Trainer on this
    # optimizer, the Module API) drops everything the engine derived from the old.

    @property
    def param_dict(self):
        return self.__dict__.get("param_dict", {})

    @param_dict.setter
    def param_dict(self, value):
        self.__dict__["param_dict"] = value
        self._names_changed()

    @property
    def idx2name(self):
        return self.__dict__.get("idx2name", {})

    @idx2name.setter
    def idx2name(self, value):
        self.__dict__["idx2name"] = value
        self._names_changed()

    def _names_changed(self):
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.reset()

    def __getstate__(self):
        state_ = super().__getstate__()
        for transient in ("engine", "slabs", "_callback_error"):
            state_.pop(transient, None)
        # Optimizer.__getstate__ drops param_dict (the Gluon Parameters), so a kvstore server
        # would lose each parameter's name, lr_mult and wd_mult (and with the name the
        # exclusions by name). They travel by index instead; param_dict wins where present.
        params = self.param_dict
        state_["idx2name"] = {**self.idx2name, **{i: p.name for i, p in params.items()}}
        state_["lr_mult"] = {**self.lr_mult, **{i: p.lr_mult for i, p in params.items()}}
        state_["wd_mult"] = {**self.wd_mult, **{i: p.wd_mult for i, p in params.items()}}
        state_["_full_sizes"] = {**self._full_sizes, **{
            i: (p.name, int(numpy.prod(p.shape))) for i, p in params.items()
            if p.shape is not None and all(p.shape)}}
        return state_

    def __setstate__(self, state_):
        for old in ("collector", "param_states", "_last_tables", "_plans", "_names", "_groups"):
            state_.pop(old, None)  # mxlamb 0.3's transient parts
        super().__setstate__(state_)
        self._callback_error = None
        if "options" not in state_:
            _upgrade_pickle_of_version_0_2(self)
        self._reset_transient()
        self._use_device_counts(0)
        self._on_server = os.environ.get("DMLC_ROLE") == "server"
        if self.aggregate_num in (numpy.inf, WHOLE_STEP):
            # A float inf comes back from the pickle as another object than numpy.inf, which
            # MXNet 2.0's Updater tests by identity; and this MXNet may not be the pickler's.
            self.aggregate_num = WHOLE_STEP

    # ------------------------------------------------------------------------------ states

    def create_state(self, index, weight):
        """Mean and variance (zeros, of the weight's dtype: float32 or float64) for
        ``weight``, then AMSGrad's max of the variance, the weight average (a copy of the
        weight) and the gradient sum, each when its option is on. On the CPU, the mean and
        variance of a parameter of up to 65,536 elements are views into a shared moment slab
        (see :mod:`mxlamb.state`)."""
        return state.create(state.legacy(weight), self.options, self.slabs, self.param_dict,
                            lambda: "%s: parameter %s" % (type(self).__name__,
                                                          self._describe(index)))

    def create_state_multi_precision(self, index, weight):
        """``(weight32, create_state(index, weight32))`` for a float16/bfloat16 weight under
        multi_precision, else ``create_state(index, weight)``."""
        try:
            weight = state.legacy(weight)
            if numpy.dtype(weight.dtype) in state.LOW_PRECISION and self.multi_precision:
                master = (weight.astype(numpy.float32) if weight.size else
                          ndarray.empty(weight.shape, weight.context, dtype=numpy.float32))
                return (master, self.create_state(index, master))
            return self.create_state(index, weight)
        except Exception as error:  # noqa: BLE001 (re-raised, or raised by the next step)
            if not in_kvstore_callback():
                raise
            # The Updater calls update next, which refuses the call and raises this after it.
            self._callback_error = self._callback_error or error
            return None

    def create_states_side_by_side(self, indices, weights):
        """The states of parameters that are stepped together (contiguous parameters), as
        ``create_state_multi_precision`` makes them, but with every mean and var side by side
        in one new slab and every float32 master copy in one new buffer, in the order given."""
        weights = [state.legacy(w) for w in weights]
        return state.create_side_by_side(weights, self.options, self.multi_precision,
                                         lambda k: "%s: parameter %s" % (
                                             type(self).__name__, self._describe(indices[k])))

    # ------------------------------------------------------------------------- 2.0 API

    def step(self, indices, weights, grads, states):
        """Per-tensor update: phase 1 then phase 2 for one tensor at a time."""
        self.engine.step(indices, weights, grads, states, group_size=1, per_parameter=True)

    def fused_step(self, indices, weights, grads, states):
        """Multi-tensor update: groups of ``aggregate_num`` tensors per operator call (one
        for 0); for the whole step (numpy.inf, the default) the fastest grouping, see
        :func:`mxlamb.engine.batches`."""
        if self.aggregate_num == WHOLE_STEP or self.aggregate_num == numpy.inf:
            group_size = None
        else:
            group_size = int(max(1, min(self.aggregate_num, len(indices))))
        self.engine.step(indices, weights, grads, states, group_size=group_size,
                         per_parameter=_SCHEDULE_PER_PARAMETER)

    # ------------------------------------------------------------------------- 1.x API

    def update(self, index, weight, grad, state_):
        """MXNet 1.x entry point: single arrays, or lists when the Updater aggregates.

        With options that need every gradient of a step first (global_clipnorm, clipnorm,
        skip_nonfinite, loss_scaler), the Updater's calls of one step (one per weight dtype,
        or per aggregate_num tensors) are collected into one step (see mxlamb.engine)."""
        states = list(state_) if isinstance(index, (list, tuple)) else [state_]
        items = list(zip(_as_list(index), _as_list(weight), _as_list(grad), states))
        if self._on_server:
            from .contrib.dist import check_on_server  # (only a kvstore server needs it)
            check_on_server(self, items)
        if self._callback_error is not None and in_kvstore_callback():
            raise_after_callback(self)  # nothing of a step with an error is applied
            return
        try:
            if self.options.needs_whole_step:
                if in_kvstore_callback():
                    raise ValueError(
                        "%s: %s needs every gradient of a step before the first update, but "
                        "the kvstore updates each parameter as its gradient arrives and sends it "
                        "back at once (update_on_kvstore=True); use "
                        "gluon.Trainer(..., update_on_kvstore=False) (Module API: set "
                        "MXNET_UPDATE_ON_KVSTORE=0)" % (type(self).__name__,
                                                        self.options.whole_step_reason))
                items = self.engine.collect(items) if items else items
                if not items:
                    return
            (self.fused_step if self.use_fused_step else self.step)(*map(list, zip(*items)))
        except Exception as error:  # noqa: BLE001 (re-raised, or raised by the next step)
            if not in_kvstore_callback():
                raise
            self._callback_error = self._callback_error or error
            raise_after_callback(self)

    # The master copy lives in the state and the operators handle it: no separate path.
    update_multi_precision = update

    def _use_device_counts(self, device_id):
        """Switches every step count to those of ``device_id`` (MXNet's Updater does before
        each call): several devices in one process each count their own steps. Called by the
        Updater, it also announces the call's parameters to the engine (Engine.begin_call)."""
        self.engine.use_device(device_id)
        if self.options.needs_whole_step:
            caller = sys._getframe(1)
            updater = caller.f_locals.get("self")
            if isinstance(updater, Updater) and updater.optimizer is self:
                module = caller.f_back  # the Module API's one Updater for all devices
                module_devices = (module.f_locals.get("num_device") if module is not None
                                  and module.f_code.co_name == "_update_params" else None)
                try:
                    self.engine.begin_call(updater, list(caller.f_locals["indices"]),
                                           caller.f_locals["weights"], module_devices)
                except Exception as error:  # noqa: BLE001 (as update does)
                    if not in_kvstore_callback():
                        raise
                    self._callback_error = self._callback_error or error

    # The name MXNet's Updater calls (2.0 renamed it, and warns on the old one).
    if hasattr(Optimizer, "_set_current_device"):
        _set_current_device = _use_device_counts
    else:
        _set_current_context = _use_device_counts

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

    # ------------------------------------------------------------------------ the user's

    @property
    def skipped_steps(self):
        """How many steps were skipped for non-finite gradients (reads the device)."""
        step_state = self.counters.step_state(self.options.loss_scaler)
        return 0 if step_state is None else int(step_state[2].asscalar())

    def trust_ratios(self):
        """The trust ratios of the last step as :class:`TrustRatios`, in parameter order (no
        host sync until the values are read)."""
        keys, parts, ratios = [], [], {}
        newest = self.engine.newest_groups()
        for index, (group, row) in sorted(newest.items(), key=_index_order):
            if id(group) not in ratios:
                ratios[id(group)] = ops.trust_ratios(group.last[1], group.call.ratio_attrs)
            keys.append(self._name_of(index))
            parts.append(ratios[id(group)][row:row + 1])
        values = (ndarray.concat(*parts, dim=0) if parts
                  else ndarray.empty((0,), dtype=numpy.float64))
        return TrustRatios(keys, values)

    def finalize_variable_values(self, params=None):
        """Copies the weight averages into the weights (Keras' name): all parameters this
        optimizer has stepped, or those of ``params`` (Gluon Parameters or a ParameterDict)."""
        for weight, slots in self._ema_targets(params):
            copy_average(slots, weight)

    @contextlib.contextmanager
    def averaged_weights(self, params=None):
        """Within the block the model weights hold the averages (for evaluation); on exit
        they get their trained values back. Master copies are not touched."""
        targets = self._ema_targets(params)
        saved = [(weight, weight.copy()) for weight, _ in targets]
        for weight, slots in targets:
            cast_into(slots.average, weight)
        try:
            yield self
        finally:
            for weight, value in saved:
                value.copyto(weight)

    def _ema_targets(self, params):
        """(model weight, Slots) of every parameter with an average, or of ``params``."""
        if not self.options.use_ema:
            raise ValueError("%s: weight averages need use_ema=True" % type(self).__name__)
        if hasattr(params, "values"):
            params = list(params.values())
        wanted = None if params is None else {id(p) for p in params}
        targets, stepped = [], {}
        for index, weight, slots in self.engine.stepped():
            stepped.setdefault(index, []).append((weight, slots))
        if not stepped:
            raise ValueError(
                "%s: this optimizer knows no weight averages yet: it has not stepped since its "
                "states were made or loaded (Trainer.load_states puts the pickled optimizer in "
                "place, which has not stepped here): take a step first, or load the states with "
                "mxlamb.load_states" % type(self).__name__)
        for index, entries in stepped.items():
            param = self.param_dict.get(index)
            if wanted is not None and id(param) not in wanted:
                continue
            targets += entries
            # With update_on_kvstore=True the weight stepped is the kvstore's copy: the model's
            # arrays on each device get the average as well.
            ids = {id(weight) for weight, _ in entries}
            for data in _model_arrays(param):
                if id(state.legacy(data)) not in ids and id(data) not in ids:
                    targets.append((state.legacy(data), entries[0][1]))
        return targets

    def _name_of(self, index):
        name = self.idx2name.get(index)
        if name is None and index in self.param_dict:
            name = self.param_dict[index].name
        return index if name is None else name

    def _describe(self, index):
        name = self._name_of(index)
        return "%r (%s)" % (index, name) if name != index else repr(index)


# LAMB's hyper-parameters and training options read as attributes (opt.beta1, ...), fixed at
# construction: a new value means a new optimizer (Options is frozen).
for _name in [f.name for f in dataclasses.fields(Options)
              if f.name not in ("layer_adaptation", "epsilon_hat", "amsgrad")]:
    setattr(LAMB, _name, property(lambda self, _n=_name: getattr(self.options, _n)))
del _name


def _index_order(item):
    """Parameters in index order (integers by value, other keys after them, as text)."""
    index = item[0]
    return (0, index, "") if isinstance(index, int) else (1, 0, str(index))


def _check_optimizer_kwargs(kwargs):
    """MXNet's Optimizer arguments that LAMB checks (MXNet takes anything)."""
    if "wd" in kwargs:
        number("wd", kwargs["wd"], low=0.0)
    if "rescale_grad" in kwargs:
        number("rescale_grad", kwargs["rescale_grad"], low=0.0)
    if kwargs.get("clip_gradient") is not None:
        if number("clip_gradient", kwargs["clip_gradient"]) == 0:
            warn_trap("LAMB: clip_gradient=0 does not clip, as in MXNet's LAMB (which "
                      "passes clip_gradient to its kernels only when it is truthy); give "
                      "None for no clipping, or a positive bound")
    if "multi_precision" in kwargs:
        flag("multi_precision", kwargs["multi_precision"])


def _model_arrays(param):
    """The arrays of a Gluon Parameter on each of its devices (none if it has none)."""
    try:
        return list(param.list_data()) if param is not None else []
    except Exception:  # noqa: BLE001 (not initialised: nothing of it was stepped)
        return []


def _upgrade_pickle_of_version_0_2(opt):
    """A LAMB pickled by mxlamb 0.2 (Trainer.save_states) kept its options as attributes and
    one step count per parameter for all devices: each device continues from it."""
    fields = opt.__dict__
    if "rescale_grad" in fields:
        opt._rescale_grad = fields.pop("rescale_grad")
    names = [f.name for f in dataclasses.fields(Options)]
    old = {n: fields.pop(n) for n in names if n in fields}
    old.update({n: fields.pop("_" + n) for n in ("layer_adaptation", "epsilon_hat", "amsgrad")
                if "_" + n in fields})
    for n in ("exclude_from_weight_decay", "exclude_from_layer_adaptation"):
        old[n] = tuple(old.get(n, ()))
    opt.options = Options(**old)
    counters = StepCounters(opt.begin_num_update)
    applied, micro = fields.pop("_applied_steps", {}), fields.pop("_micro_steps", {})
    counters.all_applied = {d: dict(applied) for d in opt._all_index_update_counts}
    counters.all_micro = {d: dict(micro) for d in opt._all_index_update_counts}
    counters.device_counts = fields.pop("_device_counts", {})
    counters.count_slots = fields.pop("_count_slots", {})
    step_state = fields.pop("_step_state", None)
    if step_state is not None:
        from .devices import device_key
        counters.step_states[device_key(step_state.context)] = step_state
    opt.counters = counters
    fields.pop("_known", None)  # (0.2's record of stepped parameters: the Updater has them)
