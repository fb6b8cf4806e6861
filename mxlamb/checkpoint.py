"""Trainer state files that hold only arrays and plain numbers.

``gluon.Trainer.save_states``/``load_states`` pickle the optimizer and its states, so loading
a downloaded file can run arbitrary code. :func:`save_states` writes one ``mx.nd.save`` file:
every state array under a plain key and one uint8 array holding JSON (parameter names and
shapes, the states' nesting, step counters). :func:`load_states` reads it back with
``mx.nd.load`` (no pickle) and refuses a file that does not fit the Trainer's parameters
before it changes anything.

The optimizer's hyper-parameters are not in the file: they are the ones the Trainer was made
with. The learning-rate schedule position (num_update) and every step count are.

Parameters are matched by name, or, where the names differ only in Gluon's automatic prefix
counters (a model re-created in the same process), by position, every shape checked.

:func:`convert_lamb` moves a run between MXNet's LAMB and mxlamb's, both ways, with its
moments and step counts: ``Trainer.save_states`` pickles the optimizer object itself, so its
files resume with the class that wrote them.
"""
import json
import re

import numpy

from mxnet import ndarray

from .devices import device_key
from .lamb import LAMB

__all__ = ["save_states", "load_states", "convert_lamb"]

_FORMAT = "mxlamb-trainer-states"
_VERSION = 2  # 2: counts per device (1: one count per parameter, still read)
_META = "__mxlamb_meta__"
# Optimizer counters kept in the file, under these names: per device id, host dictionaries
# keyed by parameter index (MXNet's own _all_index_update_counts, then LAMB's applied and
# accumulated steps, from its StepCounters.state_dict()); and LAMB's slots of its device counts.
_SLOTS = "_count_slots"
# Version 1's counters, one per parameter for every device, by the per-device name they fill.
_V1_COUNTERS = {"_index_update_count": "_all_index_update_counts",
                "_applied_steps": "_all_applied_steps", "_micro_steps": "_all_micro_steps"}


def _contexts(trainer):
    """The Trainer's devices (MXNet 2.0 renamed _contexts to _devices)."""
    contexts = getattr(trainer, "_contexts", None)
    return contexts if contexts is not None else trainer._devices


def _trainer_parts(trainer):
    # Imported here: mxlamb must import while mxnet is half-imported (a kvstore server
    # unpickles the optimizer then, before mxnet.gluon exists).
    from mxnet.gluon.parameter import DeferredInitializationError

    if not trainer._kv_initialized:
        try:
            trainer._init_kvstore()
        except DeferredInitializationError:
            raise ValueError("mxlamb.save_states/load_states: the Trainer's parameters are not "
                             "initialised yet (deferred initialisation): run one forward pass "
                             "first, as for Trainer.load_states") from None
    if trainer._update_on_kvstore:
        raise ValueError("mxlamb.save_states/load_states: this Trainer updates on the kvstore "
                         "(update_on_kvstore=True), whose states live in the kvstore; use "
                         "update_on_kvstore=False")
    return trainer._optimizer, trainer._updaters


def _flatten(state, arrays, prefix):
    """Nested tuples of NDArrays -> a JSON structure of keys into ``arrays``."""
    if state is None:
        return None
    if isinstance(state, ndarray.NDArray):
        key = "%s/%d" % (prefix, len(arrays))
        arrays[key] = state
        return key
    if isinstance(state, (list, tuple)):
        return [_flatten(s, arrays, prefix) for s in state]
    raise ValueError("mxlamb.save_states: a state holds %r, not arrays" % (type(state),))


def save_states(trainer, path):
    """Writes the Trainer's optimizer states and counters to ``path`` (no pickle)."""
    optimizer, updaters = _trainer_parts(trainer)
    arrays = {}
    meta = {"format": _FORMAT, "version": _VERSION,
            "optimizer": type(optimizer).__name__,
            "params": [{"name": p.name, "shape": list(p.shape) if p.shape else None}
                       for p in trainer._params],
            "num_update": optimizer.num_update, "updaters": [], "counters": {}}
    for k, updater in enumerate(updaters):
        meta["updaters"].append({str(i): _flatten(s, arrays, "u%d/%s" % (k, i))
                                 for i, s in updater.states.items()})
    per_device = {"_all_index_update_counts": optimizer._all_index_update_counts}
    if isinstance(optimizer, LAMB):
        counters = optimizer.counters.state_dict()
        per_device.update({"_all_applied_steps": counters["applied"],
                           "_all_micro_steps": counters["micro"]})
        meta["counters"][_SLOTS] = {str(i): int(v) for i, v in counters["count_slots"].items()}
    for name, values_by_device in per_device.items():
        meta["counters"][name] = {str(d): {str(i): int(v) for i, v in values.items()}
                                  for d, values in values_by_device.items()}
    if isinstance(optimizer, LAMB):
        meta["device_counts"] = []
        for k, context in enumerate(_contexts(trainer)):
            step_state = optimizer.counters.step_state(optimizer.options.loss_scaler, context)
            if step_state is not None:
                arrays["opt/step_state/%d" % k] = step_state
            counts = optimizer.counters.device_counts.get(context)
            if counts is not None:
                arrays["opt/counts/%d" % k] = counts
                meta["device_counts"].append(k)
    blob = json.dumps(meta, sort_keys=True).encode()
    arrays[_META] = ndarray.array(numpy.frombuffer(blob, dtype=numpy.uint8), dtype=numpy.uint8)
    ndarray.save(path, arrays)


def _restore_counters(optimizer, meta, device_ids, index_of=int):
    """The file's counters into ``optimizer``: per device (version 2), or one count per
    parameter that every device of the Trainer continues from (version 1). ``index_of``: the
    Trainer's parameter index for the file's."""
    counters = meta["counters"]
    if meta["version"] == 1:
        counters = {name: {str(d): counters[flat] for d in device_ids}
                    for flat, name in _V1_COUNTERS.items() if flat in counters}
        counters.update({k: v for k, v in meta["counters"].items() if k == _SLOTS})

    def per_device(name):
        return {int(d): {index_of(i): int(v) for i, v in values.items()}
                for d, values in counters.get(name, {}).items()}

    if "_all_index_update_counts" in counters:
        optimizer._all_index_update_counts = per_device("_all_index_update_counts")
    optimizer._all_index_update_counts.setdefault(0, {})
    if isinstance(optimizer, LAMB):
        optimizer.counters.load_state_dict({
            "applied": per_device("_all_applied_steps"), "micro": per_device("_all_micro_steps"),
            "count_slots": {index_of(i): int(v) for i, v in counters.get(_SLOTS, {}).items()}})
        optimizer.engine.use_device(0)  # (the Updater switches to each device again)
    else:
        optimizer._index_update_count = optimizer._all_index_update_counts[0]


def _refuse(path, what):
    raise ValueError("mxlamb.load_states(%r): %s; nothing was loaded" % (path, what))


# Gluon 1.x names a block after its class and a per-name-scope counter ("dense3_"): the
# counters are the digits just before an underscore.
_COUNTER = re.compile(r"\d+(?=_)")


def _counter_key(name):
    """(name with the counters blanked, the counters): equal first parts mean two names differ
    only in Gluon's counters, and the counters order a model's blocks as they were created."""
    return _COUNTER.sub("#", name), tuple(int(c) for c in _COUNTER.findall(name))


def _match_parameters(path, saved, params, by_order):
    """For each saved parameter (file order), the index of the Trainer's parameter it goes to.

    By name where the names are the Trainer's; by position with ``by_order``; where the names
    differ only in Gluon's prefix counters, by position in creation order (a model re-created
    in the same process counts on from the first one). Every pair must have the same shape."""
    names = [p["name"] for p in saved]
    ours = [p.name for p in params]
    if len(names) != len(ours):
        _refuse(path, "it holds %d parameters %s, the Trainer has %d: %s"
                % (len(names), names, len(ours), ours))
    unique = len(set(names)) == len(names) and len(set(ours)) == len(ours)
    if unique and sorted(names) == sorted(ours):
        where = {name: i for i, name in enumerate(ours)}
        mapping, how = [where[name] for name in names], "by name"
    elif by_order or (not unique and names == ours):
        # MXNet 2.0's Parameters are named 'weight', 'bias', ... (the structure is in
        # collect_params()' keys, which the Trainer does not keep): the same names in the same
        # order are matched by position.
        mapping, how = list(range(len(names))), ("by order (by_order=True)" if by_order else
                                                  "by order (the names repeat)")
    elif sorted(_counter_key(n)[0] for n in names) == sorted(_counter_key(n)[0] for n in ours):
        order_saved = sorted(range(len(names)), key=lambda j: _counter_key(names[j]))
        order_ours = sorted(range(len(ours)), key=lambda i: _counter_key(ours[i]))
        mapping = [None] * len(names)
        for j, i in zip(order_saved, order_ours):
            mapping[j] = i
        how = "by order of creation (the names differ only in Gluon's prefix counters)"
    else:
        only_file = sorted(set(names) - set(ours))
        only_ours = sorted(set(ours) - set(names))
        _refuse(path, "its parameter names are not the Trainer's: only in the file %s, only in "
                "the Trainer %s (names that differ only in Gluon's prefix counters, as in a "
                "model re-created in the same process, are matched by order of creation; "
                "load_states(..., by_order=True) matches by position, every shape checked)"
                % (only_file, only_ours))
    wrong = []
    for j, i in enumerate(mapping):
        shape = tuple(params[i].shape or ())
        theirs = tuple(saved[j]["shape"] or ())
        # A deferred-initialisation parameter has 0 for the dimensions it does not know yet.
        if len(shape) != len(theirs) or any(known and known != dim
                                            for known, dim in zip(shape, theirs)):
            wrong.append("%s %s <- %s %s" % (params[i].name, shape, names[j], theirs))
    if wrong:
        _refuse(path, "matched %s, %d parameter(s) have another shape than their state in the "
                "file: %s" % (how, len(wrong), "; ".join(wrong)))
    return mapping


def load_states(trainer, path, by_order=False):
    """Restores what :func:`save_states` wrote into a Trainer over the same parameters.

    Parameters are matched by name (by position where names repeat, as MXNet 2.0's 'weight'
    and 'bias' do, and the file's names are the Trainer's in the same order). Where the names
    differ only in Gluon's automatic prefix
    counters (``dense3_weight`` for the saved ``dense0_weight``: a model re-created in the same
    process), and with ``by_order=True`` whatever the names, they are matched by position
    (in order of creation for the counters), and every pair must have the same shape.

    Refuses (ValueError, nothing changed) a file of another format, parameters that do not
    match (saying which), a state of another shape, or another number of devices."""
    optimizer, updaters = _trainer_parts(trainer)
    arrays = ndarray.load(path)
    if not isinstance(arrays, dict) or _META not in arrays:
        _refuse(path, "not an mxlamb state file (no %s entry)" % _META)
    try:
        meta = json.loads(arrays.pop(_META).asnumpy().tobytes().decode())
    except ValueError as err:
        _refuse(path, "its metadata is not JSON (%s)" % err)
    if meta.get("format") != _FORMAT or meta.get("version") not in (1, _VERSION):
        _refuse(path, "format %r version %r, expected %r version 1 or %d"
                % (meta.get("format"), meta.get("version"), _FORMAT, _VERSION))
    mapping = _match_parameters(path, meta["params"], trainer._params, by_order)
    if len(meta["updaters"]) != len(updaters):
        _refuse(path, "it was saved on %d device(s), the Trainer has %d"
                % (len(meta["updaters"]), len(updaters)))

    def target(key):
        """The Trainer's index for the file's parameter index ``key``."""
        if not 0 <= int(key) < len(mapping):
            _refuse(path, "parameter index %s in the file, which holds %d parameters"
                    % (key, len(mapping)))
        return mapping[int(key)]

    def rebuild(structure, index, context):
        if structure is None:
            return None
        if isinstance(structure, list):
            return tuple(rebuild(s, index, context) for s in structure)
        if structure not in arrays:
            _refuse(path, "array %s is missing" % structure)
        array = arrays[structure]
        shape = tuple(trainer._params[index].shape or ())
        # A deferred-initialisation parameter has 0 for the dimensions it does not know yet.
        if len(array.shape) != len(shape) or any(
                known and known != dim for known, dim in zip(shape, array.shape)):
            _refuse(path, "parameter %s has shape %s, the state in the file %s"
                    % (trainer._params[index].name, shape, array.shape))
        return array.as_in_context(context)

    restored = []
    for k, (updater, saved) in enumerate(zip(updaters, meta["updaters"])):
        context = _contexts(trainer)[k]
        states = {}
        for key, structure in saved.items():
            index = target(key)
            states[index] = rebuild(structure, index, context)
        restored.append(states)
    for name, values in meta["counters"].items():  # every parameter index in them maps
        per_device = meta["version"] != 1 and name != _SLOTS
        for key, value in values.items():
            for index in (value if per_device else [key]):
                target(index)
    # Everything checked: now change the Trainer.
    for updater, states in zip(updaters, restored):
        updater.states = states
        updater.states_synced = {i: True for i in states}
    optimizer.num_update = int(meta["num_update"])
    _restore_counters(optimizer, meta, [c.device_id for c in _contexts(trainer)], target)
    if isinstance(optimizer, LAMB):
        # Version 1 kept one step state (and loss scale) for all devices.
        for k, context in enumerate(_contexts(trainer)):
            saved = arrays.get("opt/step_state/%d" % k, arrays.get("opt/step_state"))
            if optimizer.options.loss_scaler is not None:
                saved = arrays.get("opt/loss_scaler", saved)
                if saved is not None:
                    saved.copyto(optimizer.loss_scaler.state_on(context))
            elif saved is not None:
                optimizer.counters.step_states[device_key(context)] = saved.as_in_context(context)
        optimizer.counters.device_counts = {_contexts(trainer)[k]: arrays["opt/counts/%d" % k]
                                            for k in meta.get("device_counts", [])}
        optimizer.engine.reset()


# ------------------------------------------------------------------- MXNet's LAMB <-> mxlamb

# The hyper-parameters both classes have, under the same names and meanings.
_LAMB_ARGUMENTS = ("beta1", "beta2", "epsilon", "lower_bound", "upper_bound", "bias_correction")


def _builtin_lamb():
    from mxnet import optimizer
    lamb = getattr(optimizer, "lamb", None)  # MXNet 2.0: its own module
    return lamb.LAMB if lamb is not None else optimizer.optimizer.LAMB


def _mxlamb_only_options(optimizer):
    """mxlamb's options that are on, which MXNet's LAMB does not have."""
    on = {"global_clipnorm": optimizer.global_clipnorm, "clipnorm": optimizer.clipnorm,
          "use_ema": optimizer.use_ema or None,
          "gradient_accumulation_steps": optimizer.gradient_accumulation_steps,
          "loss_scale_factor": optimizer.loss_scale_factor, "loss_scaler": optimizer.loss_scaler,
          "skip_nonfinite": optimizer.skip_nonfinite or None,
          "exclude_from_weight_decay": optimizer.exclude_from_weight_decay or None,
          "exclude_from_layer_adaptation": optimizer.exclude_from_layer_adaptation or None}
    return sorted(name for name, value in on.items() if value is not None)


def _float32_moments(updaters, refuse):
    """Every updater's states as {index: (master or None, mean, var)}, refusing other layouts."""
    converted = []
    for updater in updaters:
        states = {}
        for index, state in updater.states.items():
            master = None
            if (isinstance(state, (tuple, list)) and len(state) == 2
                    and isinstance(state[1], (tuple, list))):
                master, state = state  # multi-precision: (weight32, (mean, var))
            if not (isinstance(state, (tuple, list)) and len(state) == 2 and all(
                    isinstance(a, ndarray.NDArray) and numpy.dtype(a.dtype) == numpy.float32
                    for a in state)):
                refuse("the state of parameter %d is not float32 (mean, var) (float16 weights "
                       "need multi_precision=True in mxlamb)" % index)
            states[index] = (master,) + tuple(state)
        converted.append(states)
    return converted


def convert_lamb(trainer, to):
    """Moves a run between MXNet's LAMB and :class:`mxlamb.LAMB`, in either direction.

    The Trainer (or ``mx.optimizer.Updater``) gets an optimizer of the other class with the
    same hyper-parameters, learning rate and schedule (``num_update``), lr/wd multipliers and
    per-parameter step counts, and keeps its moments and multi-precision master weights: the
    next step is the one the old optimizer would have taken, to float32 rounding.

    ``Trainer.save_states`` pickles the optimizer object, so a file written with MXNet's LAMB
    resumes with MXNet's LAMB, even after ``import mxlamb`` (and an mxlamb one with mxlamb)::

        trainer = gluon.Trainer(net.collect_params(), 'lamb', {...})
        trainer.load_states('mxnet_lamb.states')     # now MXNet's LAMB, whatever 'lamb' means
        mxlamb.convert_lamb(trainer, to='mxlamb')    # continues with mxlamb.LAMB

    Parameters
    ----------
    trainer : gluon.Trainer or mx.optimizer.Updater
        On one device or several (each keeps its own step counts).
    to : {'mxlamb', 'mxnet'}
        The class to continue with. Converting to the class already in use changes nothing.

    Returns
    -------
    The optimizer now in use.

    Raises ValueError, changing nothing, for what the other class cannot continue: mxlamb
    options that MXNet's LAMB does not have (``global_clipnorm``, EMA, accumulation, loss
    scaling, ``skip_nonfinite``, exclusions by name), ``mxlamb.AdamW``, states that are not
    float32 moments, or a Trainer that updates on the kvstore.
    """
    from mxnet.optimizer import Updater

    def refuse(what):
        raise ValueError("mxlamb.convert_lamb(to=%r): %s; nothing was changed" % (to, what))

    if to not in ("mxlamb", "mxnet"):
        raise ValueError("mxlamb.convert_lamb: to must be 'mxlamb' or 'mxnet', not %r" % (to,))
    if isinstance(trainer, Updater):
        old, updaters = trainer.optimizer, [trainer]
    else:
        old, updaters = _trainer_parts(trainer)
    builtin = _builtin_lamb()
    target = LAMB if to == "mxlamb" else builtin
    if type(old) is target:
        return old
    source = builtin if to == "mxlamb" else LAMB
    if type(old) is not source:
        refuse("the optimizer is %s.%s, not %s.%s"
               % (type(old).__module__, type(old).__name__, source.__module__, source.__name__))
    if to == "mxnet" and _mxlamb_only_options(old):
        refuse("MXNet's LAMB has no %s" % ", ".join(_mxlamb_only_options(old)))
    moments = _float32_moments(updaters, refuse)
    # The step count t of each parameter on each device: MXNet's LAMB counts its updates in
    # _all_index_update_counts; mxlamb counts applied updates apart (every call counts there).
    counts = old._all_index_update_counts if to == "mxlamb" else old.counters.all_applied
    counts = {int(device): dict(steps) for device, steps in counts.items()}

    kwargs = {name: getattr(old, name) for name in _LAMB_ARGUMENTS}
    # With a schedule, learning_rate=None: a value would reset the schedule's base_lr, which
    # schedules such as FactorScheduler move as they go.
    kwargs.update(learning_rate=None if old.lr_scheduler is not None else old.lr,
                  lr_scheduler=old.lr_scheduler, wd=old.wd,
                  rescale_grad=old.rescale_grad, clip_gradient=old.clip_gradient,
                  multi_precision=old.multi_precision, param_dict=old.param_dict,
                  begin_num_update=old.begin_num_update)
    new = target(**kwargs)
    new.idx2name, new.lr_mult, new.wd_mult = (dict(old.idx2name), dict(old.lr_mult),
                                              dict(old.wd_mult))
    new.lr, new.num_update = old.lr, old.num_update
    new._all_index_update_counts = {d: dict(steps) for d, steps in counts.items()}
    new._all_index_update_counts.setdefault(0, {})
    if to == "mxlamb":
        new.counters.load_state_dict({"applied": counts, "micro": {d: {} for d in counts}})
        new.engine.use_device(0)  # (MXNet's Updater switches devices before each update)
    else:
        new._index_update_count = new._all_index_update_counts[0]
    for updater, states in zip(updaters, moments):
        for index, (master, mean, var) in states.items():
            # Arrays of their own: mxlamb's small moments are views into a shared slab. (After
            # Trainer.load_states every device holds device 0's states, not yet synced: the
            # Updater copies them to its device at its first update, as it would have.)
            pair = (mean.copy(), var.copy())
            updater.states[index] = pair if master is None else (master, pair)
            updater.states_synced.setdefault(index, False)
    for updater in updaters:
        updater.optimizer = new
    if not isinstance(trainer, Updater):
        trainer._optimizer = new
    return new
