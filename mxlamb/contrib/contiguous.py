"""Contiguous parameters: :class:`ContiguousTrainer`, a Gluon Trainer that steps many small
parameters as one.

Every array an operator call takes costs about a microsecond in MXNet, and Gluon's Trainer and
MXNet's Updater look at every parameter several times per step (freshness, dtype, states), about
3 microseconds per parameter. For a model of many small tensors that is most of a step. A
ContiguousTrainer moves the weights and gradients of its small parameters (up to
``MAX_ELEMENTS`` elements each) into one flat buffer per context and dtype each, every parameter
becoming a view of its own shape, makes their optimizer states side by side in the same layout
(``LAMB.create_states_side_by_side``), and steps them with one ``mxlamb_step`` call of four
arrays. Larger parameters keep their own arrays (their step is the same call it would be through
the Updater), so the trainer is never slower than Gluon's on any model.

The layout is made once, when the trainer is made, and refused where it could go wrong: after
a backward pass has written the gradients, a hybridized block with ``static_shape=True`` keeps
writing into the gradient arrays it bound then, and a parameter whose gradient array was moved
would train on a stale gradient.
"""
import ctypes
import operator

import numpy

from mxnet import autograd, gluon
from mxnet.base import _LIB
from mxnet.ndarray import ndarray as _nd

from .._library import native
from ..lamb import _SCHEDULE_PER_PARAMETER, LAMB
from ..options import WHOLE_STEP
from ..ops import FlatGroup, Path, choose_path
from ..state import check, context_of, is_np_array, legacy, quantized

__all__ = ["ContiguousTrainer", "MAX_ELEMENTS"]

# The largest parameter that goes into the flat buffers: above it the per-array costs are
# small beside the update itself.
MAX_ELEMENTS = 1 << 16

native.mxlamb_fresh_grads.restype = ctypes.c_int
native.mxlamb_fresh_grads.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                      ctypes.c_int]
native.mxlamb_first_written.restype = ctypes.c_int
native.mxlamb_first_written.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
_GET_GRAD_STATE = ctypes.cast(_LIB.MXNDArrayGetGradState, ctypes.c_void_p).value
_SET_GRAD_STATE = ctypes.cast(_LIB.MXNDArraySetGradState, ctypes.c_void_p).value
_WAIT_TO_READ = ctypes.cast(_LIB.MXNDArrayWaitToRead, ctypes.c_void_p).value


class FlatBuffers:
    """The flat weight and gradient arrays of one context and dtype, and each member's views
    (mx.np views for MXNet 2.0's Gluon): member k is parameter ``params[k]``'s array on
    context position ``positions[k]``, from ``offsets[k]`` on."""

    def __init__(self, members):
        self.params = [param for param, _ in members]
        self.positions = [j for _, j in members]
        datas = [param._data[j] for param, j in members]
        grads = [param._grad[j] for param, j in members]
        self.context = context_of(datas[0])
        self.dtype = numpy.dtype(datas[0].dtype)
        self.sizes = [int(d.size) for d in datas]
        self.offsets = numpy.cumsum([0] + self.sizes[:-1]).tolist()
        total = sum(self.sizes)
        np_views = is_np_array(datas[0])
        self.weight = _nd.zeros((total,), self.context, dtype=self.dtype)
        self.grad = _nd.zeros((total,), self.context, dtype=self.dtype)
        self.weight_views = self._views(self.weight, datas, np_views)
        self.grad_views = self._views(self.grad, grads, np_views)

    def _views(self, flat, values, np_views):
        views = []
        for offset, size, value in zip(self.offsets, self.sizes, values):
            view = flat[offset:offset + size].reshape(value.shape)
            legacy(value).copyto(view)
            views.append(view.as_np_ndarray() if np_views else view)
        return views


def _refuse(what):
    raise ValueError("mxlamb.contrib.ContiguousTrainer: %s" % what)


def _written_before(param):
    """Whether a backward pass has already written a gradient of ``param``."""
    for data, grad in zip(param._data, param._grad):
        if data._fresh_grad or float(legacy(grad).abs().max().asscalar()) != 0.0:
            return True
    return False


class LeftGradients:
    """The gradient arrays the parameters had before they were moved, zeroed and watched: a
    block hybridized with static_shape=True that ran backward before (with another trainer,
    say, its gradients since zeroed: nothing else shows it) keeps writing into them, and its
    parameters would train on stale gradients. :meth:`check` refuses a step after such a
    write."""

    def __init__(self, arrays):
        self.arrays = [(name, legacy(a)) for name, a in arrays if a.size > 0]
        for _, array in self.arrays:
            array[:] = 0
        self.handles = (ctypes.c_void_p * len(self.arrays))(
            *[a.handle.value for _, a in self.arrays])
        pointers = []
        for _, array in self.arrays:  # (the arrays are this object's now: they stay put)
            pointer = ctypes.c_void_p()
            _LIB.MXNDArrayGetData(array.handle, ctypes.byref(pointer))
            pointers.append(pointer.value)
        self.data = (ctypes.c_void_p * len(self.arrays))(*pointers)
        self.bytes = (ctypes.c_longlong * len(self.arrays))(
            *[a.size * numpy.dtype(a.dtype).itemsize for _, a in self.arrays])

    def check(self):
        written = native.mxlamb_first_written(_WAIT_TO_READ, self.handles, self.data,
                                              self.bytes, len(self.arrays))
        if written < 0:
            raise RuntimeError("mxlamb.contrib.ContiguousTrainer: MXNet failed to read a "
                               "gradient array")
        if written == len(self.arrays):
            return
        name = self.arrays[written][0]
        for _, array in self.arrays:
            array[:] = 0  # (watched again from here)
        raise RuntimeError(
            "mxlamb.contrib.ContiguousTrainer: the gradient of parameter %r was written into "
            "the array it had before the trainer was made, not into the trainer's: a block "
            "hybridized with static_shape=True ran backward (and a trainer stepped) before the "
            "trainer was made, and writes where it bound then (hybridizing it again does not "
            "change that). Nothing of this step was applied. Make the ContiguousTrainer before "
            "the first backward pass, or train this network with gluon.Trainer" % name)


def _flatten(params, optimizer):
    """Moves the weights and gradients of the small ``params`` into flat buffers; returns
    the FlatBuffers, one per context and dtype, and the LeftGradients. Under state_bits=8 the
    parameters with 8-bit moments keep their own arrays (their states are not flat)."""
    members = {}  # (context, dtype) -> [(param, context position)], in parameter order
    for param in params:
        if param.grad_req == "null" or getattr(param, "_stype", "default") != "default" \
                or getattr(param, "_grad_stype", "default") != "default":
            continue
        if param._data is None:
            _refuse("parameter %r is not initialised%s; make the trainer once the shapes are "
                    "known (after net.initialize() with known shapes, or one forward pass)"
                    % (param.name, " yet (deferred initialisation)" if param._deferred_init
                       else ""))
        if _written_before(param):
            _refuse("a backward pass has already written the gradient of parameter %r. Make "
                    "the trainer before the first backward pass: a block hybridized with "
                    "static_shape=True keeps writing into the gradient arrays it bound then, "
                    "and moving them would train on stale gradients" % param.name)
        for j, data in enumerate(param._data):
            if 0 < data.size <= MAX_ELEMENTS and not (
                    isinstance(optimizer, LAMB)
                    and quantized(optimizer.options.state_bits, data.size)):
                members.setdefault((context_of(data), numpy.dtype(data.dtype)), []).append(
                    (param, j))
    buffers = [FlatBuffers(group) for group in members.values()]
    left = LeftGradients([(param.name, param._grad[j]) for group in members.values()
                          for param, j in group])
    for buffers_ in buffers:
        for k, (param, j) in enumerate(zip(buffers_.params, buffers_.positions)):
            data, grad = list(param._data), list(param._grad)
            data[j], grad[j] = buffers_.weight_views[k], buffers_.grad_views[k]
            param._data, param._grad = data, grad
    for param in {p for b in buffers for p in b.params}:
        # The views are the variables autograd writes the gradients into.
        autograd.mark_variables(param._data, param._grad, param.grad_req)
    return buffers, left


class ContiguousTrainer(gluon.Trainer):
    """A ``gluon.Trainer`` whose small parameters live in flat buffers and are stepped as one.

    Takes what ``gluon.Trainer`` takes. The parameters must be initialised (with known shapes)
    and no backward pass may have written their gradients yet: make it where you would make a
    Trainer, before the training loop. Results are bit-identical to ``gluon.Trainer``'s.

    Its own step (``fast_steps`` counts them) runs where everything is as it laid it out: an
    mxlamb optimizer (``mxlamb.LAMB``, ``mxlamb.AdamW``) with the plain step (no
    ``global_clipnorm``, ``clipnorm``, ``skip_nonfinite``, ``loss_scaler``, ``use_ema``,
    ``gradient_accumulation_steps``, AMSGrad), ``update_on_kvstore=False`` or no kvstore, CPU
    parameters, and the whole step as one group (``aggregate_num=numpy.inf``, the default, or no
    ``lr_scheduler``). Anything else, a step with a stale gradient (the Trainer's warning, or its
    ``ignore_stale_grad`` skipping), and a parameter whose arrays were replaced (``cast``,
    ``reset_ctx``, ``initialize(force_reinit=True)``) go through Gluon's own update, on the same
    arrays. States loaded with ``Trainer.load_states`` are moved into the layout at the next
    step; ``mxlamb.load_states`` loads into the states in place.
    """

    def __init__(self, params, optimizer, optimizer_params=None, **kwargs):
        super().__init__(params, optimizer, optimizer_params, **kwargs)
        self._buffers, self._left_gradients = _flatten(self._params, self._optimizer)
        self._fast = None
        self.fast_steps = 0

    def _update(self, ignore_stale_grad=False):
        self._left_gradients.check()
        fast = self._fast
        if fast is None or not fast.holds(self):
            fast = self._fast = _FastStep.make(self)
        if fast is not None and fast.run(ignore_stale_grad):
            self.fast_steps += 1
        else:
            super()._update(ignore_stale_grad)


def _grouping_free(optimizer):
    """Whether the step's results do not depend on MXNet's grouping, so that the whole step
    may be counted and updated at once: the whole step is the grouping asked for, or no
    lr_scheduler reads num_update (MXNet's Updater counts each call's updates before its
    learning rates, so with a schedule and parameters of different counts the grouping
    matters)."""
    whole = optimizer.aggregate_num in (WHOLE_STEP, numpy.inf)
    return whole or optimizer.lr_scheduler is None


def _eligible(trainer):
    optimizer = trainer._optimizer
    if not isinstance(optimizer, LAMB):
        return False
    options = optimizer.options
    return not (not optimizer.use_fused_step or options.needs_whole_step or options.may_skip
                or options.amsgrad or options.use_ema
                or options.gradient_accumulation_steps is not None or optimizer._on_server
                or not trainer._kv_initialized or trainer._params_to_init
                or (trainer._kvstore and trainer._update_on_kvstore)
                or getattr(trainer, "_amp_loss_scaler", None) is not None
                or not _grouping_free(optimizer))


class _FastStep:
    """The trainer's step as laid out at one step; it holds while every array and state it
    names is still the same object."""

    @classmethod
    def make(cls, trainer):
        if not _eligible(trainer):
            return None
        optimizer = trainer._optimizer
        active = [(i, p) for i, p in enumerate(trainer._params) if p.grad_req != "null"]
        if not active:
            return None
        fast = cls()
        fast.optimizer, fast.param_dict = optimizer, optimizer.param_dict
        fast.trainer_params, fast.updaters = trainer._params, list(trainer._updaters)
        fast.null = [p for p in trainer._params if p.grad_req == "null"]
        fast.devices, fast.checks, data_arrays = [], [], []
        for j, updater in enumerate(fast.updaters):
            if updater.optimizer is not optimizer or any(
                    optimizer.param_dict.get(i) is not p or len(p._data) != len(fast.updaters)
                    for i, p in active):
                return None
            context = context_of(active[0][1]._data[j])
            if context.device_type != "cpu":
                return None  # (the flat mode has not run on a GPU yet)
            try:
                by_dtype = cls._lay_out(trainer, optimizer, updater, j, active)
            except ValueError:
                return None  # Gluon's own update says what is wrong
            if by_dtype is None:
                return None
            fast.devices.append((context.device_id, by_dtype))
            params = [p for _, p in active]
            indices = [i for i, _ in active]
            fast.checks.append((params, j, [p._data[j] for p in params],
                                [p._grad[j] for p in params], updater, updater.states,
                                indices, [updater.states[i] for i in indices]))
            data_arrays += [p._data[j] for p in params]
        fast.handles = (ctypes.c_void_p * len(data_arrays))(
            *[a.handle.value for a in data_arrays])
        fast.count = len(data_arrays)
        return fast

    @staticmethod
    def _lay_out(trainer, optimizer, updater, j, active):
        """[(indices of a dtype, [GroupPlan])] of context position ``j``: runs of flat
        members (their states made or moved side by side), then the other parameters."""
        engine = optimizer.engine
        flat_of = {}  # id(weight view) -> (FlatBuffers, member)
        for buffers in trainer._buffers:
            for k, (param, position) in enumerate(zip(buffers.params, buffers.positions)):
                if position == j:
                    flat_of[id(param._data[j])] = (buffers, k)
        by_dtype = {}  # dtype -> [(index, param)] in parameter order
        for i, p in active:
            by_dtype.setdefault(numpy.dtype(p._data[j].dtype), []).append((i, p))
        laid_out = []
        for dtype, members in by_dtype.items():
            path = choose_path(dtype, optimizer.options, False)
            if path is not Path.FUSED:
                return None
            runs, rest, run = [], [], []
            for i, p in members:
                found = flat_of.get(id(p._data[j]))
                if (found is None or found[0].weight_views[found[1]] is not p._data[j]
                        or found[0].grad_views[found[1]] is not p._grad[j]):
                    rest.append((i, p))
                    continue
                if run and (found[0] is not run[-1][2][0] or found[1] != run[-1][2][1] + 1):
                    runs.append(run)
                    run = []
                run.append((i, p, found))
            if run:
                runs.append(run)
            groups = []
            for run in runs:
                groups.append(_FastStep._flat_group(optimizer, updater, j, run, dtype))
            if rest:
                items = []
                for i, p in rest:
                    weight, grad = p._data[j], p._grad[j]
                    if i not in updater.states:
                        updater.states[i] = optimizer.create_state_multi_precision(i, weight)
                        updater.states_synced[i] = True
                    elif not updater.states_synced.get(i, False):
                        return None  # the Updater moves it to the context first
                    slots = _checked(optimizer, i, weight, grad, updater.states[i])
                    if weight.size > 0:
                        items.append((i, legacy(weight), legacy(grad), slots))
                if items:
                    indices, weights, grads, slots = zip(*items)
                    groups.append(engine.group_plan(indices, weights, grads, slots, path, dtype,
                                                    legacy(weights[0]).context))
            laid_out.append(([i for i, _ in members], groups))
        return laid_out

    @staticmethod
    def _flat_group(optimizer, updater, j, run, dtype):
        """The GroupPlan of a run of consecutive members of one FlatBuffers: their states
        side by side (made now, or moved there with their values), one flat operator call."""
        buffers = run[0][2][0]
        indices = [i for i, _, _ in run]
        weights = [p._data[j] for _, p, _ in run]
        states = [updater.states.get(i) for i in indices]
        side_by_side = _states_side_by_side(optimizer, states)
        if not side_by_side:
            fresh = optimizer.create_states_side_by_side(indices, weights)
            for i, old, new in zip(indices, states, fresh):
                if old is not None:
                    _copy_state(old, new)
                updater.states[i] = new
                updater.states_synced[i] = True
            states = fresh
        slots = [_checked(optimizer, i, legacy(w), legacy(p._grad[j]), s)
                 for (i, p, _), w, s in zip(run, weights, states)]
        # The run's spans of the flat arrays, as views (from offset 0 each): the weights and
        # gradients from the run's first member on, the masters from the first's master.
        sizes = [buffers.sizes[k] for _, _, (_, k) in run]
        start, total = buffers.offsets[run[0][2][1]], sum(sizes)
        weight = buffers.weight[start:start + total]
        grad = buffers.grad[start:start + total]
        master_at = slots[0].master_at
        if master_at is not None:
            masters = master_at[0][master_at[1]:master_at[1] + total]
            flat = FlatGroup(masters, grad, weight, 0, sizes)
        else:
            flat = FlatGroup(weight, grad, None, 0, sizes)
        return optimizer.engine.group_plan(indices, [legacy(w) for w in weights],
                                           [legacy(p._grad[j]) for _, p, _ in run], slots,
                                           Path.FUSED, dtype, buffers.context, flat=flat)

    def holds(self, trainer):
        """Whether every object the step names is still the one it was made with."""
        optimizer = self.optimizer
        if (trainer._optimizer is not optimizer or trainer._params is not self.trainer_params
                or optimizer.param_dict is not self.param_dict or not _eligible(trainer)
                or len(trainer._updaters) != len(self.updaters)
                or not all(map(operator.is_, trainer._updaters, self.updaters))):
            return False
        try:
            for params, j, weights, grads, updater, states, indices, expected in self.checks:
                if not (all(map(operator.is_, (p._data[j] for p in params), weights))
                        and all(map(operator.is_, (p._grad[j] for p in params), grads))):
                    return False
                if (updater.states is not states or updater.optimizer is not optimizer
                        or not all(map(operator.is_, map(states.get, indices), expected))):
                    return False
        except (TypeError, IndexError):  # a parameter's grad_req became 'null'
            return False
        return all(p._grad is None for p in self.null)

    def run(self, ignore_stale_grad):
        """The step, or False (nothing done) where a gradient is stale: Gluon's Trainer then
        warns, or skips it under ignore_stale_grad, as it does."""
        fresh = native.mxlamb_fresh_grads(_GET_GRAD_STATE, _SET_GRAD_STATE, self.handles,
                                          self.count, 1)
        if fresh != self.count:
            return False
        optimizer = self.optimizer
        engine = optimizer.engine
        grad_scale = optimizer.rescale_grad / (optimizer.options.loss_scale_factor or 1.0)
        for device_id, by_dtype in self.devices:
            engine.use_device(device_id)  # as the Updater does
            for indices, groups in by_dtype:
                engine.count_updates(indices, per_parameter=_SCHEDULE_PER_PARAMETER)
                for group in groups:
                    engine.run_group(group, grad_scale, None)
                optimizer.counters.count_applied([i for g in groups for i in g.indices])
        return True


def _checked(optimizer, index, weight, grad, state):
    def refuse(what):
        raise ValueError("%s: parameter %s: %s" % (type(optimizer).__name__,
                                                    optimizer._describe(index), what))
    return check(weight, grad, state, optimizer.options, optimizer.multi_precision, refuse)


def _states_side_by_side(optimizer, states):
    """Whether ``states`` are side by side as create_states_side_by_side makes them."""
    if any(s is None for s in states):
        return False
    moments = [s[1] if getattr(s, "master_at", None) is not None else s for s in states]
    packed = [getattr(m, "packed", None) for m in moments]
    if any(p is None for p in packed):
        return False
    masters = [getattr(s, "master_at", None) for s in states]
    expected_moment, expected_master = packed[0][1], None if masters[0] is None else masters[0][1]
    for p, m in zip(packed, masters):
        if p[0] is not packed[0][0] or p[1] != expected_moment:
            return False
        expected_moment += 2 * p[2]
        if (m is None) != (masters[0] is None):
            return False
        if m is not None:
            if m[0] is not masters[0][0] or m[1] != expected_master:
                return False
            expected_master += m[2]
    return True


def _copy_state(old, new):
    """The values of a state into another of the same structure."""
    if isinstance(old, (tuple, list)):
        for a, b in zip(old, new):
            _copy_state(a, b)
    elif old is not None:
        legacy(old).copyto(legacy(new))
