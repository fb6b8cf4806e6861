"""Every step count of an optimizer but MXNet's own ``_index_update_count`` (the schedule's).

The bias correction's t counts applied updates only. Where a step can be skipped on the device
(skip_nonfinite, a LossScaler), t lives in a device array that phase 1 advances for applied
steps, and the host counts are what the host saw; elsewhere the host counts are t.
"""
import itertools

import numpy

from mxnet import ndarray

from .devices import device_key

__all__ = ["StepCounters"]


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
