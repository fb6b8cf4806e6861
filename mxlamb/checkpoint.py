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

from .lamb import LAMB

__all__ = ["save_states", "load_states"]

_FORMAT = "mxlamb-trainer-states"
_VERSION = 1
_META = "__mxlamb_meta__"
# Optimizer counters kept in the file: host dictionaries keyed by parameter index.
_COUNTERS = ("_index_update_count", "_applied_steps", "_micro_steps", "_count_slots")


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
    for name in _COUNTERS:
        values = getattr(optimizer, name, None)
        if values is not None:
            meta["counters"][name] = {str(i): int(v) for i, v in values.items()}
    if isinstance(optimizer, LAMB):
        if optimizer._step_state is not None:
            arrays["opt/step_state"] = optimizer._step_state
        if optimizer.loss_scaler is not None:
            arrays["opt/loss_scaler"] = optimizer.loss_scaler.state
        meta["device_counts"] = []
        for k, context in enumerate(trainer._contexts):
            counts = optimizer._device_counts.get(context)
            if counts is not None:
                arrays["opt/counts/%d" % k] = counts
                meta["device_counts"].append(k)
    blob = json.dumps(meta, sort_keys=True).encode()
    arrays[_META] = ndarray.array(numpy.frombuffer(blob, dtype=numpy.uint8), dtype=numpy.uint8)
    ndarray.save(path, arrays)


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
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        _refuse(path, "format %r version %r, expected %r version %d"
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
    for name, values in meta["counters"].items():
        if hasattr(optimizer, name):
            setattr(optimizer, name, {int(i): int(v) for i, v in values.items()})
    if isinstance(optimizer, LAMB):
        if "opt/step_state" in arrays:
            optimizer._step_state = arrays["opt/step_state"]
        if "opt/loss_scaler" in arrays and optimizer.loss_scaler is not None:
            arrays["opt/loss_scaler"].copyto(optimizer.loss_scaler.state)
        optimizer._device_counts = {trainer._contexts[k]: arrays["opt/counts/%d" % k]
                                    for k in meta.get("device_counts", [])}
        optimizer._checked = {}
        optimizer._known = {c: set(s) for c, s in zip(trainer._contexts, restored)}
