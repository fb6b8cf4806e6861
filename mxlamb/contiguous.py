"""Contiguous parameters: :func:`make_contiguous`, and the fast path it gives a Gluon Trainer.

After ``make_contiguous``, each context's weights (of one dtype) are views of one flat buffer
and their gradients views of another (:mod:`mxlamb.flat`); LAMB lays out the moments and
float32 master copies it makes for them the same way. The Trainer's step then needs one
``mxlamb_step`` call with four arrays per context and dtype. What is left is Python: Gluon's
Trainer and MXNet's Updater look at every parameter array several times per step (freshness,
dtype, state lookups), about 3 microseconds per parameter. The fast path installed on the
Trainer does that bookkeeping for the whole model at once while everything is as it was when
it was planned, and otherwise hands the step to the Trainer's own ``_update``.
"""
import ctypes
import operator
import weakref

import numpy

from mxnet import autograd
from mxnet.base import _LIB

from ._library import native
from . import dispatch
from .flat import FlatBuffer, Layout, _is_np, context_of, flat_run
from .lamb import LAMB
from .options import WHOLE_STEP
from .state import LOW_PRECISION, ParameterStates

__all__ = ["make_contiguous"]

# The Parameters' flat weight and gradient buffers, kept alive while the Parameters are.
_HELD = weakref.WeakKeyDictionary()

native.mxlamb_fresh_grads.restype = ctypes.c_int
native.mxlamb_fresh_grads.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                      ctypes.c_int]
_GET_GRAD_STATE = ctypes.cast(_LIB.MXNDArrayGetGradState, ctypes.c_void_p).value
_SET_GRAD_STATE = ctypes.cast(_LIB.MXNDArraySetGradState, ctypes.c_void_p).value


def make_contiguous(params_or_trainer):
    """Moves the weights and gradients of Gluon Parameters into one flat buffer per context
    and dtype each, every parameter's array becoming a view of its own shape into it.

    LAMB (``mxlamb.LAMB``, ``mxlamb.AdamW``) then makes the moments (and, under
    ``multi_precision``, the float32 master copies) of these parameters in flat buffers of the
    same layout, and updates a group of them with one operator call that takes four arrays
    (weights, gradients, moments and float16 weights, each flat) instead of two or more per
    parameter. Results are bit-identical to ordinary storage.

    Given a ``gluon.Trainer``, its parameters are moved, optimizer states already made are
    moved into flat buffers too (their values kept), and ``trainer.step`` gets a fast path:
    while every parameter's arrays, the optimizer and its states are the ones it planned with
    (checked by identity at every step), it checks the gradients' freshness as the Trainer
    does, keeps MXNet's update counts, the learning-rate schedule and ``lr_mult`` /
    ``wd_mult``, and runs one ``mxlamb_step`` per context and dtype. It needs a LAMB whose step
    is the plain one (no ``global_clipnorm``, ``clipnorm``, ``skip_nonfinite``,
    ``loss_scaler``, ``use_ema``, ``gradient_accumulation_steps``, AMSGrad), CPU parameters and
    ``update_on_kvstore=False`` (or no kvstore); it updates the whole step in one call per
    context and dtype, as ``aggregate_num=numpy.inf`` (the default) does, and for other values
    where no ``lr_scheduler`` is set (the results are then the same). Anything
    else, and a step with a stale gradient (the Trainer's warning, or its
    ``ignore_stale_grad`` skipping), goes through the Trainer's own update, on the same views.

    Call it after the parameters are initialised (with deferred initialisation, after the
    first forward pass) and again after anything that replaces their arrays
    (``Parameter.cast``, ``reset_ctx``, ``initialize(force_reinit=True)``) or the optimizer
    states (``Trainer.load_states``, ``mxlamb.load_states``): until then those parameters are
    updated through their own arrays, correctly, only slower.

    Parameters
    ----------
    params_or_trainer : gluon.Trainer, ParameterDict, dict or list of Parameter
        The parameters to move (a Trainer's own). Parameters with ``grad_req='null'``, sparse
        storage or no elements are left as they are.
    """
    from mxnet import gluon

    trainer = params_or_trainer if isinstance(params_or_trainer, gluon.Trainer) else None
    params = list(trainer._params) if trainer is not None else _parameters(params_or_trainer)
    members = {}  # (context, dtype) -> [(param, context position)] in parameter order
    for param in params:
        if param.grad_req == "null" or getattr(param, "_stype", "default") != "default" \
                or getattr(param, "_grad_stype", "default") != "default":
            continue
        if param._data is None:
            if param._deferred_init:
                raise ValueError(
                    "mxlamb.make_contiguous: parameter %r is not initialised yet (deferred "
                    "initialisation: its shape is known after the first forward pass); run one "
                    "forward pass first, then make_contiguous" % param.name)
            raise ValueError("mxlamb.make_contiguous: parameter %r is not initialised; call "
                             "initialize() first" % param.name)
        for j, data in enumerate(param._data):
            if data.size:
                key = (context_of(data), numpy.dtype(data.dtype))
                members.setdefault(key, []).append((param, j))
    moved = set()
    fresh = {param: [data._fresh_grad for data in param._data]
             for param in {param for group in members.values() for param, _ in group}}
    for (context, dtype), group in members.items():
        datas = [param._data[j] for param, j in group]
        grads = [param._grad[j] for param, j in group]
        layout = Layout(context, [param.name for param, _ in group], [d.shape for d in datas])
        np_views = _is_np(datas[0])
        weights = FlatBuffer(layout, dtype, "weight", np_views, values=datas)
        gradients = FlatBuffer(layout, dtype, "grad", np_views, values=grads)
        for k, (param, j) in enumerate(group):
            data, grad = list(param._data), list(param._grad)
            data[j], grad[j] = weights.views[k], gradients.views[k]
            param._data, param._grad = data, grad
            held = _HELD.setdefault(param, {})
            held[j] = (weights, gradients)
            moved.add(param)
    for param in params:
        if param in moved:
            # The views are the variables autograd writes the gradients into; a gradient
            # written before stays fresh for the next step.
            autograd.mark_variables(param._data, param._grad, param.grad_req)
            for data, flag in zip(param._data, fresh[param]):
                data._fresh_grad = flag
    if trainer is not None:
        _adopt_states(trainer)
        fast = trainer.__dict__.get("_update")
        if not isinstance(fast, _FastUpdate):
            trainer._update = _FastUpdate(trainer)
        else:
            fast.plan = None


def _parameters(params):
    if hasattr(params, "values"):
        return list(params.values())
    params = list(params)
    from mxnet.gluon import Parameter
    for param in params:
        if not isinstance(param, Parameter):
            raise ValueError("mxlamb.make_contiguous takes a gluon.Trainer, a ParameterDict, a "
                             "dict or a list of Parameters, got a list holding %r" % (param,))
    return params


def _adopt_states(trainer):
    """Moves the LAMB states the Trainer's updaters already hold for contiguous parameters
    (made before make_contiguous, or loaded from a file) into flat buffers, values kept."""
    optimizer = trainer._optimizer
    if not isinstance(optimizer, LAMB) or trainer._update_on_kvstore:
        return
    states = optimizer.param_states
    layout = optimizer.options.state_layout
    for updater in trainer._updaters:
        if updater.optimizer is not optimizer:
            continue
        for index, state in list(updater.states.items()):
            param = optimizer.param_dict.get(index)
            if param is None or param._data is None or not isinstance(state, (tuple, list)):
                continue
            data = [d for d in param._data if context_of(d) == _context_of(state)]
            if len(data) != 1:
                continue
            weight = data[0]
            master = None
            if (optimizer.multi_precision and numpy.dtype(weight.dtype) in LOW_PRECISION
                    and len(state) == 2):
                master, arrays = state  # (weight32, states), as create_state_multi_precision
            else:
                arrays = state
            if not isinstance(arrays, (tuple, list)) or len(arrays) != len(layout):
                continue
            if master is not None:
                flat_master = states.flat.master(weight)
                if flat_master is None:
                    continue
                _copy(master, flat_master)
                master = flat_master
            packed = states.flat.moments(master if master is not None else weight)
            if packed is None:
                continue
            _copy(arrays[0], packed[0])
            _copy(arrays[1], packed[1])
            states.packed.pop(id(arrays[0]), None)  # (its entry would keep the old slab alive)
            states.packed[id(packed[0])] = packed
            arrays = tuple(packed[:2]) + tuple(arrays[2:])
            updater.states[index] = (master, arrays) if master is not None else arrays
    states.checked = {}
    plans = getattr(optimizer, "_plans", None)  # LAMB's step plans name the old states
    if isinstance(plans, dict):
        plans.clear()


def _context_of(state):
    first = state[0]
    while isinstance(first, (tuple, list)):
        first = first[0]
    return context_of(first)


def _copy(source, target):
    source = source.as_nd_ndarray() if _is_np(source) else source
    target = target.as_nd_ndarray() if _is_np(target) else target
    source.copyto(target)


def _grouping_free(optimizer):
    """Whether the step's results do not depend on MXNet's grouping, so that the fast path may
    count and update the whole step at once: the whole step is the grouping asked for, or no
    lr_scheduler reads num_update (MXNet's Updater counts each call's updates before its
    learning rates, so with a schedule and parameters of different counts the grouping
    matters)."""
    whole = optimizer.aggregate_num in (WHOLE_STEP, numpy.inf)
    return whole or optimizer.lr_scheduler is None


class _FastUpdate:
    """Stands in for ``trainer._update`` (an instance attribute): the planned step while the
    plan holds, else the Trainer's own ``_update``."""

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)
        self.plan = None
        self.planned_steps = 0  # steps that took the fast path (the tests read it)

    def __call__(self, ignore_stale_grad=False):
        trainer = self._trainer()
        plan = self.plan
        if plan is None or not plan.holds(trainer):
            plan = self.plan = _Plan.make(trainer)
        if plan is not None and plan.run(ignore_stale_grad):
            self.planned_steps += 1
        else:
            type(trainer)._update(trainer, ignore_stale_grad)


class _Plan:
    """The Trainer's step for contiguous parameters, as made from its state at one step; it
    holds while every array and state it names is still the same object."""

    @classmethod
    def make(cls, trainer):
        optimizer = trainer._optimizer
        options = optimizer.options if isinstance(optimizer, LAMB) else None
        if (options is None or not optimizer.use_fused_step or options.needs_whole_step
                or options.may_skip or options.amsgrad or options.use_ema
                or options.gradient_accumulation_steps is not None or optimizer._on_server
                or not trainer._kv_initialized or trainer._params_to_init
                or (trainer._kvstore and trainer._update_on_kvstore)
                or getattr(trainer, "_amp_loss_scaler", None) is not None
                or not _grouping_free(optimizer)):
            return None
        plan = cls()
        plan.trainer_params = trainer._params
        plan.optimizer = optimizer
        plan.updaters = list(trainer._updaters)
        plan.param_dict = optimizer.param_dict
        plan.multi_precision = optimizer.multi_precision
        plan.null = [p for p in trainer._params if p.grad_req == "null"]
        plan.per_updater = []
        plan.checks = []  # (params, context position, weights, grads)
        plan.state_checks = []  # (updater, states dict, indices, states)
        data_arrays = []
        active = [(i, p) for i, p in enumerate(trainer._params) if p.grad_req != "null"]
        if not active:
            return None
        for j, updater in enumerate(plan.updaters):
            if updater.optimizer is not optimizer:
                return None
            groups = {}  # dtype -> [items], in order of first appearance (as the Updater)
            for i, p in active:
                if optimizer.param_dict.get(i) is not p or len(p._data) != len(plan.updaters):
                    return None
                weight, grad = p._data[j], p._grad[j]
                state = updater.states.get(i)
                if state is None:
                    # Made as the Updater makes it, from the view itself (MXNet 2.0's Updater
                    # passes a new legacy NDArray of it, which is no view): the master copy
                    # and moments of a contiguous parameter are flat too.
                    try:
                        state = optimizer.create_state_multi_precision(i, weight)
                    except ValueError:
                        return None  # the Trainer's own update raises it
                    updater.states[i] = state
                    updater.states_synced[i] = True
                elif not updater.states_synced.get(i, False):
                    return None  # the Updater moves it to the context first
                groups.setdefault(numpy.dtype(weight.dtype), []).append((i, p, weight, grad,
                                                                         state))
            device_id = context_of(active[0][1]._data[j]).device_id  # as the Updater's
            steps = []
            for dtype, items in groups.items():
                runs = cls._runs(optimizer, options, dtype, items)
                if runs is None:
                    return None
                steps.append(([i for i, *_ in items], runs))
            plan.per_updater.append((device_id, steps))
            params = [p for _, p in active]
            plan.checks.append((params, j, [p._data[j] for p in params],
                                [p._grad[j] for p in params]))
            indices = [i for i, _ in active]
            plan.state_checks.append((updater, updater.states, indices,
                                      [updater.states[i] for i in indices]))
            data_arrays += [p._data[j] for p in params]
        plan.handles = (ctypes.c_void_p * len(data_arrays))(
            *[a.handle.value for a in data_arrays])
        plan.count = len(data_arrays)
        return plan

    @staticmethod
    def _runs(optimizer, options, dtype, items):
        """The flat runs of one dtype's items, or None where any sized item is not flat."""
        runs = []
        current = []
        prepare = optimizer.param_states.prepare
        if context_of(items[0][2]).device_type != "cpu":
            return None  # (the GPU's flat mode has not run on a GPU yet: the ordinary path)
        try:
            prepared = [prepare(i, w, g, s, options, optimizer.multi_precision)
                        for i, _, w, g, s in items]
        except ValueError:
            return None  # the Trainer's own update says what is wrong
        path = dispatch.choose_path(dtype, options, False)
        if path is not dispatch.Path.FUSED:
            return None
        sized = [(item, p) for item, p in zip(items, prepared) if p.size > 0]
        if not sized:
            return []

        def close():
            # A run is LAMB's own GroupPlan (whose GroupCall passes flat groups as four
            # arrays), made only where the run is flat.
            slots = [p.slots for _, p in current]
            if ParameterStates.packed_moments(slots) is None or flat_run(slots) is None:
                return False
            members = [(row, (item[0], p.weight, p.grad, p.slots))
                       for row, (item, p) in enumerate(current)]
            runs.append(optimizer._group_plan(members, path, dtype, context_of(items[0][2]),
                                              False))
            return True

        for item, p in sized:
            at = p.slots.flat_at
            if at is None or p.slots.moments_at is None:
                return None
            if current:
                last = current[-1][1].slots
                if (at.weight is not last.flat_at.weight
                        or at.offset != last.flat_at.offset + last.flat_at.size
                        or p.slots.moments_at[0] is not last.moments_at[0]
                        or p.slots.moments_at[1] != last.moments_at[1] + 2 * last.moments_at[2]):
                    if not close():
                        return None
                    current = []
            current.append((item, p))
        if not close():
            return None
        return runs

    def holds(self, trainer):
        """Whether every object the plan names is still the one it was made with."""
        optimizer = self.optimizer
        if (trainer._optimizer is not optimizer or trainer._params is not self.trainer_params
                or optimizer.param_dict is not self.param_dict
                or optimizer.multi_precision != self.multi_precision
                or not optimizer.use_fused_step or not _grouping_free(optimizer)
                or (trainer._kvstore and trainer._update_on_kvstore)
                or getattr(trainer, "_amp_loss_scaler", None) is not None
                or len(trainer._updaters) != len(self.updaters)
                or not all(map(_is, trainer._updaters, self.updaters))):
            return False
        try:
            for params, j, weights, grads in self.checks:
                if not (all(map(_is, map(_item(j), map(_DATA, params)), weights))
                        and all(map(_is, map(_item(j), map(_GRAD, params)), grads))):
                    return False
        except (TypeError, IndexError):  # a parameter's grad_req became 'null'
            return False
        for updater, states, indices, expected in self.state_checks:
            if (updater.states is not states or updater.optimizer is not optimizer
                    or not all(map(_is, map(states.get, indices), expected))):
                return False
        return all(p._grad is None for p in self.null)

    def run(self, ignore_stale_grad):
        """The step, or False (nothing done) where a gradient is stale: the Trainer then
        warns, or skips it under ignore_stale_grad, as it does."""
        fresh = native.mxlamb_fresh_grads(_GET_GRAD_STATE, _SET_GRAD_STATE, self.handles,
                                          self.count, 1)
        if fresh != self.count:
            return False
        optimizer = self.optimizer
        options = optimizer.options
        counters = optimizer.counters
        for device_id, steps in self.per_updater:
            optimizer._use_device_counts(device_id)  # as the Updater and _run_step do
            for indices, runs in steps:
                optimizer._count_updates(indices)
                grad_scale = optimizer.rescale_grad / (options.loss_scale_factor or 1.0)
                applied = []
                for run in runs:
                    optimizer._update_group(run, grad_scale, None)
                    applied += run.indices
                counters.count_applied(applied)
        return True


# Identity checks over whole lists at C speed (map with operator's functions).
_is = operator.is_
_item = operator.itemgetter
_DATA = operator.attrgetter("_data")
_GRAD = operator.attrgetter("_grad")
