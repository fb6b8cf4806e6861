"""The whole-step machinery: step counts (per device, as MXNet keeps its own), the step state
of skipped steps and loss scaling, gradient accumulation, the collection of the Updater's
calls into whole steps for the options that need every gradient first, and the plans that a
step whose arrays are the same objects as the last one replays."""
import collections
import itertools
import operator

import numpy

from mxnet import ndarray

from .devices import device_key

__all__ = ["StepCounters", "StepCollector", "StepPlan", "GroupPlan", "accumulate"]


class StepCounters:
    """Every count of a LAMB optimizer but MXNet's own ``_index_update_count`` (the schedule's).

    - host counts: applied updates (bias correction's t - 1, from ``begin``) and gradients
      accumulated since the last update, per device id: with several devices and
      update_on_kvstore=False each device's Updater steps every parameter once per step;
    - device counts (when a step can be skipped on the device): float64 arrays per context,
      one slot per parameter, incremented by phase 1 for applied steps only;
    - step states: ``[loss scale, clean steps, skipped steps]`` per device, without a
      LossScaler (whose own state is then used).
    """

    def __init__(self, begin):
        self.begin = begin
        self.all_applied = {}    # device_id -> {index: applied updates, from begin}
        self.all_micro = {}      # device_id -> {index: gradients accumulated}
        self.device_counts = {}  # context -> float64 applied-step counts (by count slot)
        self.count_slots = {}    # index -> slot in those counts
        self.step_states = {}    # device_key(context) -> [loss scale, clean, skipped]
        self.use_device(0)

    def use_device(self, device_id):
        self.applied = self.all_applied.setdefault(device_id, {})
        self.micro = self.all_micro.setdefault(device_id, {})

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["applied"], state["micro"]  # the current device's: chosen again
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.use_device(0)

    def host_counts(self, indices):
        """Applied updates so far of each index on the current device (t - 1)."""
        return list(map(self.applied.get, indices, itertools.repeat(self.begin)))

    def count_applied(self, indices):
        """One more applied update of each index (in one pass where all counts are equal, as
        in every step of a model whose parameters all step)."""
        if not indices:
            return
        applied = self.applied
        counts = self.host_counts(indices)
        if counts.count(counts[0]) == len(counts):
            applied.update(dict.fromkeys(indices, counts[0] + 1))
            return
        for index, count in zip(indices, counts):
            applied[index] = count + 1

    def device_counts_for(self, indices, context):
        """The device step counts of ``context`` and the slots of ``indices`` in them."""
        for index in indices:
            self.count_slots.setdefault(index, len(self.count_slots))
        counts = self.device_counts.get(context)
        needed = len(self.count_slots)
        if counts is None or counts.shape[0] < needed:
            # A count starts at begin_num_update, as MXNet's _index_update_count does.
            grown = ndarray.full((max(16, 2 * needed),), self.begin, ctx=context,
                                 dtype=numpy.float64)
            if counts is not None:
                grown[:counts.shape[0]] = counts
            counts = self.device_counts[context] = grown
        return counts, [self.count_slots[index] for index in indices]

    def step_state(self, loss_scaler, context=None, create=False):
        """[loss scale, clean steps, skipped steps] of ``context``'s device (each device that
        steps keeps its own, so that several devices do not count one step twice); without a
        context, the first device's (all devices see the same gradients and agree)."""
        if loss_scaler is not None:
            return loss_scaler.state if context is None else loss_scaler.state_on(context)
        if context is None:
            return next(iter(self.step_states.values()), None)
        device = device_key(context)
        state = self.step_states.get(device)
        if state is None and create:
            state = self.step_states[device] = ndarray.array([1.0, 0.0, 0.0], ctx=context,
                                                             dtype=numpy.float64)
        return state

    def state_dict(self):
        """The host counts as plain numbers: ``{"applied": {device_id: {index: n}}, "micro":
        ..., "count_slots": {index: slot}}`` (the arrays are ``device_counts`` and
        ``step_states``, which a checkpoint stores as arrays)."""
        return {"applied": {d: dict(c) for d, c in self.all_applied.items()},
                "micro": {d: dict(c) for d, c in self.all_micro.items()},
                "count_slots": dict(self.count_slots)}

    def load_state_dict(self, state):
        """Restores what :meth:`state_dict` returned (keys may be strings, as in JSON)."""
        def ints(mapping):
            return {int(k): int(v) for k, v in mapping.items()}
        self.all_applied = {int(d): ints(c) for d, c in state.get("applied", {}).items()}
        self.all_micro = {int(d): ints(c) for d, c in state.get("micro", {}).items()}
        self.count_slots = ints(state.get("count_slots", {}))
        self.use_device(0)


def accumulate(items, counters, steps, scale):
    """With gradient_accumulation_steps ``steps``: adds each gradient (times ``scale``) to
    its sum and returns the items whose N-th gradient this is, with their sums as gradients,
    and 1/N as the scale. Without (``steps`` None): the items and ``scale``."""
    if steps is None:
        return items, scale
    ready = []
    micro = counters.micro
    for index, weight, grad, slots in items:
        accum = slots.accum
        accum += grad.astype(accum.dtype, copy=False) * scale
        micro[index] = micro.get(index, 0) + 1
        if micro[index] == steps:
            micro[index] = 0
            ready.append((index, weight, slots.accum, slots))
    return ready, 1.0 / steps


class StepCollector:
    """Holds the Updater's calls until a whole step of a context has come (MXNet's Updater
    sends a step in groups of aggregate_num, one call per weight dtype)."""

    def __init__(self):
        self.known = {}    # context -> indices whose states were made there
        self.pending = {}  # context -> {index: item} of a step still being collected

    def __getstate__(self):
        return {"known": self.known, "pending": {}}  # a half-collected step is not kept

    def note(self, context, index):
        self.known.setdefault(context, set()).add(index)

    def expected(self, context, param_dict):
        expected = set(self.known.get(context, ()))
        for index, param in param_dict.items():
            if getattr(param, "grad_req", "write") != "null":
                expected.add(index)
        return expected

    def collect(self, items, param_dict, reason, describe):
        """The whole step once every expected parameter has come, else None."""
        context = items[0][1].context
        pending = self.pending.setdefault(context, collections.OrderedDict())
        for item in items:
            if item[0] in pending:
                missing = sorted(self.expected(context, param_dict) - set(pending), key=str)
                self.pending[context] = collections.OrderedDict()
                raise RuntimeError(
                    "LAMB: %s needs the gradients of every parameter in each step, but "
                    "parameter(s) %s got none before parameter %s came again (frozen, or "
                    "Trainer.step(ignore_stale_grad=True) skipping it?); the step was not applied"
                    % (reason, ", ".join(describe(i) for i in missing), describe(item[0])))
            pending[item[0]] = item
            self.note(context, item[0])
        if not self.expected(context, param_dict) <= set(pending):
            return None
        self.pending[context] = collections.OrderedDict()
        return list(pending.values())


class StepPlan:
    """A step's parameters as checked (``items``: index, weight, gradient, Slots; their
    ``dtypes`` and ``sizes`` by index) and its ``groups`` (GroupPlans; None where they depend
    on the step, under gradient accumulation). MXNet's Updater and Trainer pass the same
    array objects every step, and such a step replays the plan: no array is checked, no
    operator input list built again; only learning rates, weight decays, the gradient scale
    and step counts are derived anew (LAMB._update_group). The plan holds the arrays, so an
    identity it compares cannot be reused by a new array."""

    def __init__(self, indices, weights, grads, states, items, dtypes, sizes):
        self.indices = tuple(indices)
        self.arrays = (list(weights), list(grads), list(states))
        self.items, self.dtypes, self.sizes = items, dtypes, sizes
        self.groups = None

    def replays(self, indices, weights, grads, states):
        """Whether a step of these very arrays (the same objects, in the same order) can
        replay this plan."""
        same = operator.is_
        known_weights, known_grads, known_states = self.arrays
        return (len(weights) == len(known_weights) and tuple(indices) == self.indices
                and all(map(same, weights, known_weights)) and all(map(same, grads, known_grads))
                and all(map(same, states, known_states)))


# One operator group of a plan: its indices, context, rows excluded from weight decay, the
# attributes that stay the same (Options.group_attributes, stats_attributes), those of its
# trust-ratio read-out, and its dispatch.GroupCall.
GroupPlan = collections.namedtuple("GroupPlan", ["indices", "context", "excluded", "attrs",
                                                 "ratio_attrs", "call"])
