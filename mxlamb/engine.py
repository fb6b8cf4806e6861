"""The engine: the one owner of an optimizer's steps.

LAMB (``mxlamb.lamb``) hands every step to its :class:`Engine`. A step goes:

1. MXNet's bookkeeping, as its Updater expects: the update counts that drive the schedule
   (``_index_update_count``), per-device step counts (``mxlamb.counts``);
2. the step compiled for these arrays (:class:`CompiledStep`): each parameter's state checked
   (``mxlamb.state.check``), the exclusions derived from the parameter names, the tensors put
   into operator groups (``mxlamb.ops.GroupCall``). A step whose weights, gradients and states
   are the very objects of the last one on the same device replays it;
3. gradient accumulation (the sums, and the steps that are due), the step's gradient
   statistics where an option needs every gradient first (``ops.grad_stats``), then one
   operator call per group with what changes every step: learning rates and weight decays
   (the schedule, lr_mult, wd_mult), the gradient scale, the step counts;
4. the host counts advanced, accumulators cleared, EMA overwrites.

Nothing is cached but the compiled steps, and they are dropped at the few points where what
they derived can change (:meth:`Engine.reset`): a new ``param_dict`` or ``idx2name`` (a new
Trainer, the Module API), loaded states (``mxlamb.load_states``). A replaced array, a new
state (``create_state``) or a cast is seen by identity at the next step. The compiled steps
hold the arrays they compare, so an identity cannot be reused by a new array.

The options that need every gradient of a step before its first update (global_clipnorm,
clipnorm, skip_nonfinite, a LossScaler) collect the calls of MXNet's Updater (one per dtype,
or per ``aggregate_num`` tensors) into one step: the Updater announces each call's indices
(``LAMB._set_current_context``, see :meth:`Engine.begin_call`), and a parameter that has a
state on the device but is not among them (frozen with ``grad_req='null'``, or skipped by
``ignore_stale_grad``) stops the step there, before anything is applied. A call that comes
without an Updater (``fused_step``, ``step``, ``update`` called directly) is a whole step.
"""
import collections
import itertools
import operator

import numpy

from mxnet import ndarray
from mxnet.optimizer import Optimizer

from . import ops
from .devices import device_key
from .state import check, legacy

__all__ = ["Engine", "CompiledStep", "GroupPlan"]

# MXNet's own switch of _index_update_count to a device (renamed in 2.0).
_MXNET_SET_DEVICE = (getattr(Optimizer, "_set_current_device", None)
                     or Optimizer._set_current_context)

# Elements of a batch of the two-phase paths when the whole step comes at once: the
# back-to-back batch of mxlamb_step (kBackToBackElements in lamb_cpu.h), whose arrays a server
# CPU's last-level cache keeps between the two passes.
BATCH_ELEMENTS = 1 << 20

# One operator group of a compiled step: its indices, context, the rows excluded from weight
# decay, and its ops.GroupCall; ``last`` is [sequence, table] of its last run (trust ratios).
GroupPlan = collections.namedtuple("GroupPlan", ["indices", "context", "excluded", "call",
                                                 "last"])


class CompiledStep:
    """One call's step as compiled for its arrays: ``items`` (index, weight, gradient, Slots)
    of the tensors with elements, their ``dtypes`` and ``sizes``, and ``groups`` (GroupPlans;
    None under gradient accumulation, where the groups depend on which tensors are due)."""

    def __init__(self, indices, weights, grads, states, params, items, dtypes, sizes):
        self.indices = tuple(indices)
        self.arrays = (list(weights), list(grads), list(states), params)
        self.items, self.dtypes, self.sizes = items, dtypes, sizes
        self.groups = None
        self.last_run = -1  # the engine's sequence number of its last run

    def replays(self, indices, weights, grads, states, params):
        """Whether a step of these very arrays (the same objects, in the same order, and the
        same Gluon Parameters behind the indices) can replay this one."""
        same = operator.is_
        known_weights, known_grads, known_states, known_params = self.arrays
        return (len(weights) == len(known_weights) and tuple(indices) == self.indices
                and all(map(same, weights, known_weights)) and all(map(same, grads, known_grads))
                and all(map(same, states, known_states)) and all(map(same, params, known_params)))


class Engine:
    """Owns the steps of one optimizer (``optimizer``, an mxlamb.LAMB): their compiled form,
    the collection of whole steps, and the trust-ratio tables of the last run of each group.
    Nothing here is pickled: it is derived again after unpickling."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.reset()

    def reset(self):
        """Drops everything derived from names, indices and arrays (see the module's doc)."""
        self.compiled = {}   # (device type, device id, first index, group size) -> CompiledStep
        self.expected = {}   # device -> indices the Updater's current call brings
        self.pending = {}    # device -> {index: item} of a whole step being collected
        self.sequence = itertools.count()  # orders the groups' runs
        self.call_lrs = None  # this step's learning rates where MXNet reads them per parameter
        self.latest = {}     # index -> the GroupPlan that last stepped it (trust_ratios())
        self.states = {}     # (device, index) -> (model weight, Slots) last compiled or loaded

    def use_device(self, device_id):
        """Switches every step count to those of ``device_id``, as MXNet's Updater does before
        each call: several devices in one process each count their own steps."""
        _MXNET_SET_DEVICE(self.optimizer, device_id)
        self.optimizer.counters.use_device(device_id)

    # ------------------------------------------------------------------ whole steps

    def begin_call(self, updater, indices, weights, module_devices=None):
        """MXNet's Updater begins a call with ``indices`` (all of them: it may then call
        update once per dtype or per aggregate_num). With an option that needs the whole step,
        refuses a step that leaves out a parameter that stepped before on this device: one
        with a state in this Updater that is (Gluon) one of the Trainer's parameters, (the
        Module API, ``module_devices`` devices) one of this device's keys, or (an Updater of
        one's own) on this device."""
        options = self.optimizer.options
        if not options.needs_whole_step or not weights:
            return
        device = device_key(legacy(weights[0]).context)
        self.expected[device] = set(indices)
        self.pending[device] = collections.OrderedDict()
        states = updater.states
        others = set(states).difference(indices)
        param_dict = self.optimizer.param_dict
        if param_dict:  # a Gluon Trainer: each device has an Updater of its own
            missing = [i for i in others if i in param_dict]
        elif module_devices:  # one Updater for every device; keys index * devices + device
            missing = [i for i in others if isinstance(i, int)
                       and i % module_devices == indices[0] % module_devices]
        else:
            missing = [i for i in others if states[i] is not None
                       and updater.states_synced.get(i, False)
                       and device_key(_context_of(states[i])) == device]
        if missing:
            describe = self.optimizer._describe
            raise RuntimeError(
                "%s: %s needs the gradients of every parameter in each step, but "
                "parameter(s) %s, which stepped before, got none in this step (frozen with "
                "grad_req='null', or skipped by Trainer.step(ignore_stale_grad=True)); nothing "
                "of the step was applied. To train on without them: mxlamb.save_states(trainer, "
                "path), a new Trainer over the parameters that still train, and "
                "mxlamb.load_states(new_trainer, path, subset=True)" % (
                    type(self.optimizer).__name__, options.whole_step_reason, ", ".join(
                    describe(i) for i in sorted(missing, key=str))))

    def collect(self, items):
        """The whole step once every parameter of the Updater's call has come, else None;
        the items themselves where no Updater announced the call."""
        device = device_key(legacy(items[0][1]).context)
        expected = self.expected.get(device)
        if expected is None:
            return items
        pending = self.pending[device]
        for item in items:
            pending[item[0]] = item
        if not expected.issubset(pending):
            return None
        del self.expected[device], self.pending[device]
        return list(pending.values())

    # ------------------------------------------------------------------------- a step

    def step(self, indices, weights, grads, states, group_size, per_parameter=False):
        """One step of the tensors of one device, in operator groups of ``group_size``
        consecutive tensors (None: the fastest grouping of the whole step);
        ``per_parameter``: see count_updates."""
        opt = self.optimizer
        options = opt.options
        if not weights:
            return
        # Counts are per device (MXNet's Updater switches them too; a direct call may not).
        context = legacy(weights[0]).context
        self.use_device(context.device_id)
        self.count_updates(indices, per_parameter)
        params = list(map(opt.param_dict.get, indices))
        key = (context.device_typeid, context.device_id, indices[0], group_size)
        compiled = self.compiled.get(key)
        if compiled is None or not compiled.replays(indices, weights, grads, states, params):
            compiled = self.compiled[key] = self.compile(indices, weights, grads, states, params,
                                                         group_size)
        before = None  # (each tensor's applied updates before this call: for the EMA)
        if options.use_ema:
            before = dict(zip((item[0] for item in compiled.items),
                              opt.counters.host_counts([item[0] for item in compiled.items])))
        items, grad_scale = accumulate(compiled.items, opt.counters,
                                       options.gradient_accumulation_steps,
                                       opt.rescale_grad / (options.loss_scale_factor or 1.0))
        if items:
            groups = (compiled.groups if items is compiled.items
                      else self.group(items, compiled, group_size))
            stats = None
            if options.needs_whole_step:
                step_state = opt.counters.step_state(options.loss_scaler, items[0][1].context,
                                                     create=True)
                stats = ops.grad_stats(options, [item[2] for item in items], grad_scale,
                                       step_state)
            for group in groups:
                self.run_group(group, grad_scale, stats)
            compiled.last_run = groups[-1].last[0]
            opt.counters.count_applied([item[0] for item in items])
            for _, _, _, slots in items:
                if slots.accum is not None:
                    slots.accum[:] = 0
        if options.use_ema:
            self.average(compiled.items, items, before)

    def average(self, called, updated, before):
        """The weight averages after a call, as Keras keeps them: phase 2 moved those of the
        tensors updated (from their first update, which sets them to the weights); the others
        (a call that only accumulates) move towards the weights too, and Keras' overwrite
        frequency counts the updates the call belongs to: after the call that completes
        update k, or any call on the way to it, the weights become the averages where k is
        a multiple of ema_overwrite_frequency."""
        options = self.optimizer.options
        begin = self.optimizer.counters.begin
        if len(updated) != len(called):
            done = {item[0] for item in updated}
            for index, weight, _, slots in called:
                if index not in done:
                    first = before[index] == begin  # never updated: the average is the weight
                    ops.ema_towards(slots.average, slots.master,
                                    0.0 if first else options.ema_momentum)
        frequency = options.ema_overwrite_frequency
        if frequency is not None:
            for index, weight, _, slots in called:
                if (before[index] - begin + 1) % frequency == 0:
                    copy_average(slots, weight)

    def compile(self, indices, weights, grads, states, params, group_size):
        """Checks every parameter's state (refusing, naming the parameter, what the operators
        would get wrong, before any array is written) and, unless gradients are accumulated,
        groups the tensors."""
        opt = self.optimizer
        items, dtypes, sizes = [], {}, {}
        for index, weight, grad, state in zip(indices, weights, grads, states):
            def refuse(what, index=index):
                raise ValueError("%s: parameter %s: %s" % (type(opt).__name__,
                                                            opt._describe(index), what))
            slots = check(weight, grad, state, opt.options, opt.multi_precision, refuse)
            self.states[(device_key(legacy(weight).context), index)] = (legacy(weight), slots)
            if weight.size > 0:
                items.append((index, legacy(weight), legacy(grad), slots))
                dtypes[index], sizes[index] = numpy.dtype(weight.dtype), weight.size
        compiled = CompiledStep(indices, weights, grads, states, params, items, dtypes, sizes)
        if opt.options.gradient_accumulation_steps is None and items:
            compiled.groups = self.group(items, compiled, group_size)
        return compiled

    def group(self, items, compiled, group_size):
        """The GroupPlans of a step's ``items``: one weight dtype and one kind of moments
        (float, or 8-bit) per operator call (the mode, the output type and the moments' types
        are per call), then :func:`batches`."""
        by_dtype = collections.OrderedDict()
        for row, item in enumerate(items):
            kind = (compiled.dtypes[item[0]], item[3].mean_scale is not None)
            by_dtype.setdefault(kind, []).append((row, item))
        options = self.optimizer.options
        has_stats = options.needs_whole_step
        groups = []
        for (dtype, _), members in by_dtype.items():
            context = members[0][1][1].context
            path = ops.choose_path(dtype, options, has_stats)
            sizes = [compiled.sizes[item[0]] for _, item in members]
            for batch in batches(members, sizes, group_size, path):
                rows = [row for row, _ in batch]
                indices, weights, grads, slots = zip(*(item for _, item in batch))
                groups.append(self.group_plan(indices, weights, grads, slots, path, dtype,
                                              context, rows if has_stats else None))
        return groups

    def group_plan(self, indices, weights, grads, slots, path, dtype, context, stat_rows=None,
                   flat=None):
        """A GroupPlan, its exclusions derived from the parameters' names now."""
        excluded, layer_adaptation = self.exclusions(indices)
        call = ops.GroupCall(path, self.optimizer.options, dtype, self.optimizer.multi_precision,
                             weights, grads, slots, layer_adaptation, stat_rows, flat,
                             first_step=self.optimizer.counters.begin + 1)
        return GroupPlan(tuple(indices), context, excluded, call, [None, None])

    def run_group(self, group, grad_scale, stats):
        """One step of a GroupPlan with what changes from step to step."""
        opt, indices = self.optimizer, group.indices
        wds = self.weight_decays(indices)
        if group.excluded:
            wds = [0.0 if row in group.excluded else wd for row, wd in enumerate(wds)]
        lrs = (self.learning_rates(indices) if self.call_lrs is None
               else [self.call_lrs[i] for i in indices])
        if group.call.device_counts:
            counts, count_slots = opt.counters.device_counts_for(indices, group.context)
            table = group.call(lrs, wds, grad_scale, opt.clip_gradient, counts=counts,
                               count_slots=count_slots, stats=stats)
        else:
            step_counts = [count + 1 for count in opt.counters.host_counts(indices)]
            table = group.call(lrs, wds, grad_scale, opt.clip_gradient, step_counts=step_counts,
                               stats=stats)
        group.last[:] = [next(self.sequence), table]
        self.latest.update(dict.fromkeys(indices, group))

    def exclusions(self, indices):
        """(rows excluded from weight decay, per-tensor layer adaptation or None where every
        tensor adapts), from the parameters' current names."""
        opt = self.optimizer
        options = opt.options
        excluded, adapt = set(), []
        for row, index in enumerate(indices):
            name = opt._name_of(index)
            name = name if isinstance(name, str) else ""
            param = opt.param_dict.get(index)
            if (any(p.search(name) for p in options.exclude_from_weight_decay)
                    or any(param is p for p in options.exclude_parameters)):
                excluded.add(row)
            adapt.append(options.layer_adaptation and not any(
                p.search(name) for p in options.exclude_from_layer_adaptation))
        return excluded, None if all(adapt) else adapt

    # MXNet's per-index bookkeeping of a step, in bulk: the same results as its
    # _update_count, _get_lrs and _get_wds (which a subclass may override: then they are
    # called), without a Python loop over the tensors where no per-parameter value differs.

    def count_updates(self, indices, per_parameter=False):
        """Optimizer._update_count(indices).

        Where the counts differ (a parameter frozen for a while, say) and a schedule reads
        num_update, MXNet's LAMB reads the schedule for each parameter right after counting
        it, in order (``per_parameter``: MXNet 1.x, and 2.0's ``step``; 2.0's ``fused_step``
        counts the whole call first): then each parameter's learning rate of this step is
        kept in ``call_lrs``."""
        opt = self.optimizer
        self.call_lrs = None
        counts = opt._index_update_count
        values = list(map(counts.get, indices))
        if (values and values[0] is not None and values.count(values[0]) == len(values)
                and type(opt)._update_count is Optimizer._update_count):
            counts.update(dict.fromkeys(indices, values[0] + 1))
            opt.num_update = max(values[0] + 1, opt.num_update)
        elif per_parameter and opt.lr_scheduler is not None:
            lrs = {}
            for index in indices:  # (rare: counts that differ)
                opt._update_count(index)
                lrs[index] = opt._get_lr(index)
            self.call_lrs = lrs
        else:
            opt._update_count(list(indices))

    def learning_rates(self, indices):
        """Optimizer._get_lrs(indices)."""
        opt = self.optimizer
        if type(opt)._get_lrs is not Optimizer._get_lrs:
            return opt._get_lrs(indices)
        lr = opt.lr_scheduler(opt.num_update) if opt.lr_scheduler is not None else opt.lr
        return self._multiplied(lr, indices, "lr_mult", opt.lr_mult) or opt._get_lrs(indices)

    def weight_decays(self, indices):
        """Optimizer._get_wds(indices)."""
        opt = self.optimizer
        if type(opt)._get_wds is not Optimizer._get_wds:
            return opt._get_wds(indices)
        return self._multiplied(opt.wd, indices, "wd_mult", opt.wd_mult) or opt._get_wds(indices)

    def _multiplied(self, value, indices, attribute, by_index):
        """``value`` times each index's multiplier where they come from one place (the Gluon
        Parameters of param_dict, or none at all), else None."""
        param_dict = self.optimizer.param_dict
        if not param_dict and not by_index:
            return [value] * len(indices)  # (and idx2name names find no multiplier either)
        if param_dict and all(map(param_dict.__contains__, indices)):
            getter = operator.attrgetter(attribute)
            return [value * m for m in map(getter, map(param_dict.__getitem__, indices))]
        return None

    # -------------------------------------------------------------------- read-outs

    def newest_groups(self):
        """{index: (GroupPlan, row)} of the group that last stepped each parameter, on any
        device."""
        return {index: (group, group.indices.index(index))
                for index, group in self.latest.items()}

    def remember(self, index, weight, state):
        """Records a parameter's state on ``weight``'s device as the one its next steps use
        (what mxlamb.load_states loads): the EMA read-outs find it before any step."""
        opt = self.optimizer

        def refuse(what):
            raise ValueError("%s: parameter %s: %s" % (type(opt).__name__, opt._describe(index),
                                                        what))
        weight = legacy(weight)
        slots = check(weight, weight, state, opt.options, opt.multi_precision, refuse)
        self.states[(device_key(weight.context), index)] = (weight, slots)

    def stepped(self):
        """(index, model weight, Slots) of every parameter whose state the engine knows (from
        its compiled steps, or loaded), one per device."""
        for (_, index), (weight, slots) in self.states.items():
            yield index, weight, slots


def _context_of(state):
    first = state
    while isinstance(first, (tuple, list)):
        first = first[0]
    return legacy(first).context


def copy_average(slots, weight):
    """The weight average into the master copy and the model weight (EMA overwrite)."""
    if slots.master is not weight:
        slots.average.copyto(slots.master)
    cast_into(slots.average, weight)


def cast_into(source, target):
    """``source``'s values into ``target``, cast to its dtype."""
    if numpy.dtype(source.dtype) == numpy.dtype(target.dtype):
        source.copyto(target)
    else:
        ndarray.cast(source, dtype=target.dtype, out=target)


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


def batches(members, sizes, group_size, path):
    """The groups of one step's ``members`` (of one weight dtype and path; ``sizes`` their
    element counts): ``group_size`` consecutive members per group, as aggregate_num asks; or,
    for the whole step (``group_size`` None, aggregate_num=numpy.inf), the fastest grouping:
    one group on the FUSED path (its operator runs back to back per cache-sized batch
    itself), and batches of consecutive tensors of up to BATCH_ELEMENTS elements on the
    two-phase paths, so that phase 2 finds in cache what phase 1 read. Every grouping gives
    the same bits."""
    if group_size is not None:
        return [members[start:start + group_size]
                for start in range(0, len(members), group_size)]
    if path is ops.Path.FUSED:
        return [members]
    groups, start, elements = [], 0, 0
    for end, size in enumerate(sizes):
        if end > start and elements + size > BATCH_ELEMENTS:
            groups.append(members[start:end])
            start, elements = end, 0
        elements += size
    groups.append(members[start:])
    return groups
