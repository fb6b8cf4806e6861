"""Trainer state files that hold only arrays and plain numbers.

``gluon.Trainer.save_states``/``load_states`` pickle the optimizer and its states, so loading
a downloaded file can run arbitrary code. :func:`save_states` writes one ``mx.nd.save`` file:
every state array under a plain key and one uint8 array holding JSON (parameter names and
shapes, the states' nesting, step counters). :func:`load_states` reads it back with
``mx.nd.load`` (no pickle) and refuses a file that does not fit the Trainer's parameters
before it changes anything.

The optimizer's hyper-parameters are not in the file: they are the ones the Trainer was made
with. The learning-rate schedule position (num_update) and every step count are.
"""
import json

import numpy

from mxnet import ndarray

from .devices import device_key
from .lamb import LAMB

__all__ = ["save_states", "load_states"]

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
        for k, context in enumerate(trainer._contexts):
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


def _restore_counters(optimizer, meta, device_ids):
    """The file's counters into ``optimizer``: per device (version 2), or one count per
    parameter that every device of the Trainer continues from (version 1)."""
    counters = meta["counters"]
    if meta["version"] == 1:
        counters = {per_device: {str(d): counters[flat] for d in device_ids}
                    for flat, per_device in _V1_COUNTERS.items() if flat in counters}
        counters.update({k: v for k, v in meta["counters"].items() if k == _SLOTS})
    if "_all_index_update_counts" in counters:
        optimizer._all_index_update_counts = {
            int(d): {int(i): int(v) for i, v in values.items()}
            for d, values in counters["_all_index_update_counts"].items()}
    optimizer._all_index_update_counts.setdefault(0, {})
    if isinstance(optimizer, LAMB):
        optimizer.counters.load_state_dict({"applied": counters.get("_all_applied_steps", {}),
                                            "micro": counters.get("_all_micro_steps", {}),
                                            "count_slots": counters.get(_SLOTS, {})})
        optimizer._use_device_counts(0)  # (the Updater switches to each device again)
    else:
        optimizer._index_update_count = optimizer._all_index_update_counts[0]


def _refuse(path, what):
    raise ValueError("mxlamb.load_states(%r): %s; nothing was loaded" % (path, what))


def load_states(trainer, path):
    """Restores what :func:`save_states` wrote into a Trainer over the same parameters.
    Refuses (ValueError, nothing changed) a file of another format, other parameter names or
    shapes, or another number of devices."""
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
    names = [p["name"] for p in meta["params"]]
    ours = [p.name for p in trainer._params]
    if names != ours:
        _refuse(path, "it holds parameters %s, the Trainer has %s" % (names, ours))
    if len(meta["updaters"]) != len(updaters):
        _refuse(path, "it was saved on %d device(s), the Trainer has %d"
                % (len(meta["updaters"]), len(updaters)))

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
        context = trainer._contexts[k]
        states = {}
        for key, structure in saved.items():
            index = int(key)
            if not 0 <= index < len(trainer._params):
                _refuse(path, "state for parameter index %d, the Trainer has %d parameters"
                        % (index, len(trainer._params)))
            states[index] = rebuild(structure, index, context)
        restored.append(states)
    # Everything checked: now change the Trainer.
    for updater, states in zip(updaters, restored):
        updater.states = states
        updater.states_synced = {i: True for i in states}
    optimizer.num_update = int(meta["num_update"])
    _restore_counters(optimizer, meta, [c.device_id for c in trainer._contexts])
    if isinstance(optimizer, LAMB):
        # Version 1 kept one step state (and loss scale) for all devices.
        for k, context in enumerate(trainer._contexts):
            saved = arrays.get("opt/step_state/%d" % k, arrays.get("opt/step_state"))
            if optimizer.options.loss_scaler is not None:
                saved = arrays.get("opt/loss_scaler", saved)
                if saved is not None:
                    saved.copyto(optimizer.loss_scaler.state_on(context))
            elif saved is not None:
                optimizer.counters.step_states[device_key(context)] = saved.as_in_context(context)
        optimizer.counters.device_counts = {trainer._contexts[k]: arrays["opt/counts/%d" % k]
                                            for k in meta.get("device_counts", [])}
        optimizer.param_states.checked = {}
        optimizer.collector.known = {c: set(s) for c, s in zip(trainer._contexts, restored)}
