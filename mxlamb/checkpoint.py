"""Trainer state files that hold only arrays and plain numbers, written atomically and checked
whole before anything is loaded.

``gluon.Trainer.save_states``/``load_states`` pickle the optimizer and its states, so loading
a downloaded file can run arbitrary code, and a save killed half way leaves a broken file in
place of the last good one. :func:`save_states` writes one ``mx.nd.save`` file: every state
array under a plain key, one uint8 array holding JSON (what the file holds, below), and a
digest of both. It writes a temporary file beside ``path``, flushes it to the disk, and renames
it onto ``path``: an interrupted save leaves the previous file as it was.

What a file (format version 3) says it holds, and :func:`load_states` checks, all of it before
it changes anything:

- the optimizer's class, and the options that shape its states: the state's arrays by name in
  order (``mean, var[, var_max][, average][, accum]``), AMSGrad, EMA, gradient accumulation,
  loss scaling, skipping, multi-precision, ``state_bits`` (with 8, the moments of tensors of
  4,096 elements or more are their codes and block scales, saved as they are);
- the parameters (names, shapes, dtypes), and each state array's dtype and shape;
- the counts: MXNet's update counts (the schedule's), and per device and parameter the step
  count t of the bias correction, which counts applied updates only (read from the device
  where steps can be skipped there);
- a digest (BLAKE2b) of the JSON and every array, so that a corrupted file is refused.

What may differ between the saving optimizer and the loading one, and what happens:

- hyper-parameters that do not shape the states (learning rate, betas, epsilon, bounds, wd,
  clipping): they are the loading optimizer's;
- ``skip_nonfinite`` or a ``LossScaler`` on one side only: t goes on from the applied updates;
  the count of skipped steps is kept; a loss scale is kept where both have a LossScaler, and
  otherwise starts from the loading scaler's initial scale (or is not needed);
- EMA on the loading side only: each average starts from the weight as loaded;
- ``state_bits``: float32 moments load into an 8-bit optimizer encoded (as its phase 1 would
  store them), and 8-bit moments into a float32 one decoded (their stored values, exactly);
  a UserWarning says how many parameters were converted;
- gradient accumulation on one side only, or another number of steps: accepted where no
  gradient is pending in the file's sums (they start at zero);
- everything else (another class, AMSGrad on one side only, EMA on the saving side only, a
  pending accumulated gradient the loading side would drop or miscount, another dtype, shape
  or structure) is a ValueError naming the path and the first difference, and nothing changes.

Parameters are matched by name, or, where the names differ only in Gluon's automatic prefix
counters (a model re-created in the same process), by position, every shape checked. Files of
versions 1 and 2 (mxlamb 0.2 and 0.3) still load: they do not say which options made their
states, so only each state's structure, dtypes and shapes are checked.

:func:`convert_lamb` moves a run between MXNet's LAMB and mxlamb's, both ways, with its
moments and step counts: ``Trainer.save_states`` pickles the optimizer object itself, so its
files resume with the class that wrote them.
"""
import hashlib
import json
import os
import re
import tempfile

import numpy

from mxnet import ndarray

from .lamb import LAMB
from .options import MOMENTS, warn_trap, with_scales
from .state import (LOW_PRECISION, decode_moment, dtype_name, encode_moment, layout_of, legacy,
                    quantized)

__all__ = ["save_states", "load_states", "convert_lamb"]

_FORMAT = "mxlamb-trainer-states"
_VERSION = 3  # 3: what the states are, their dtypes, the truth of t, a digest; atomic writes
_META = "__mxlamb_meta__"
_DIGEST = "__mxlamb_digest__"
# Versions 1 and 2: counters kept under these names, per device id (2) or one per parameter
# for every device (1), and LAMB's slots of its device counts.
_SLOTS = "_count_slots"
_V1_COUNTERS = {"_index_update_count": "_all_index_update_counts",
                "_applied_steps": "_all_applied_steps", "_micro_steps": "_all_micro_steps"}
_TEMPORARY = ".mxlamb-tmp-"  # path + this + pid + random: a save in progress


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


def _refuse(path, what):
    raise ValueError("mxlamb.load_states(%r): %s; nothing was loaded" % (path, what))


# ------------------------------------------------------------------------------ saving

def _class_of(optimizer):
    """The optimizer's class with its module: MXNet 2.0's own AdamW and mxlamb.AdamW (or
    MXNet's LAMB and mxlamb.LAMB) share a name, not the states' meaning."""
    return "%s.%s" % (type(optimizer).__module__, type(optimizer).__qualname__)


def _layout(optimizer):
    """What shapes an optimizer's states (the file's "layout", compared at load)."""
    if not isinstance(optimizer, LAMB):
        return {"class": _class_of(optimizer)}
    options = optimizer.options
    return {"class": _class_of(optimizer), "state": options.state_layout,
            "amsgrad": options.amsgrad, "use_ema": options.use_ema,
            "gradient_accumulation_steps": options.gradient_accumulation_steps,
            "loss_scaler": options.loss_scaler is not None,
            "skip_nonfinite": options.skip_nonfinite,
            "multi_precision": bool(optimizer.multi_precision),
            "state_bits": options.state_bits}


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


def applied_counts(optimizer, contexts):
    """t per device id and parameter index: the applied updates, from the device counts where
    steps can be skipped there (the host's counts then include skipped steps), else the
    host's."""
    counters = optimizer.counters
    applied = {d: dict(c) for d, c in counters.all_applied.items()}
    for context in contexts:
        counts = counters.device_counts.get(context)
        if counts is None:
            continue
        values = counts.asnumpy()
        own = applied.setdefault(context.device_id, {})
        for index, slot in counters.count_slots.items():
            if index in own and slot < values.shape[0]:  # (stepped on this device)
                own[index] = int(values[slot])
    return applied


def _digest(blob, arrays):
    digest = hashlib.blake2b(blob, digest_size=16)
    for key in sorted(arrays):
        if key in (_META, _DIGEST):
            continue
        array = arrays[key]
        digest.update(key.encode())
        digest.update(numpy.ascontiguousarray(legacy(array).asnumpy()).tobytes())
    return digest.hexdigest()


def _remove_abandoned_temporaries(path):
    """Temporary files of saves to ``path`` whose process is gone (killed mid-save)."""
    folder, base = os.path.split(os.path.abspath(path))
    prefix = base + _TEMPORARY
    for name in os.listdir(folder):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-")[0])
            os.kill(pid, 0)  # still running: its save is in progress
        except (ValueError, ProcessLookupError):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
        except PermissionError:
            pass  # (another user's process: alive)


def _write_atomically(path, arrays):
    """mx.nd.save into a temporary file beside ``path``, flushed to the disk, then renamed
    onto it (and the directory flushed): a reader sees the old file or the new one, never a
    part of one."""
    folder = os.path.dirname(os.path.abspath(path))
    _remove_abandoned_temporaries(path)
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + _TEMPORARY +
                                     "%d-" % os.getpid(), dir=folder)
    os.close(fd)
    try:
        ndarray.save(temporary, arrays)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # (a file system that does not open directories)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_states(trainer, path):
    """Writes the Trainer's optimizer states and counters to ``path`` (no pickle), atomically:
    a save that is interrupted leaves the file that was at ``path`` before."""
    optimizer, updaters = _trainer_parts(trainer)
    contexts = _contexts(trainer)
    arrays = {}
    meta = {"format": _FORMAT, "version": _VERSION, "optimizer": type(optimizer).__name__,
            "layout": _layout(optimizer),
            "params": [{"name": p.name, "shape": list(p.shape) if p.shape else None,
                        "dtype": dtype_name(p.dtype)} for p in trainer._params],
            "num_update": optimizer.num_update, "updaters": [],
            "update_counts": {str(d): {str(i): int(v) for i, v in c.items()}
                              for d, c in optimizer._all_index_update_counts.items()}}
    for k, updater in enumerate(updaters):
        meta["updaters"].append({str(i): _flatten(s, arrays, "u%d/%s" % (k, i))
                                 for i, s in updater.states.items()})
    if isinstance(optimizer, LAMB):
        counters = optimizer.counters
        meta["applied"] = {str(d): {str(i): int(v) for i, v in c.items()}
                           for d, c in applied_counts(optimizer, contexts).items()}
        meta["micro"] = {str(d): {str(i): int(v) for i, v in c.items()}
                         for d, c in counters.all_micro.items()}
        meta["step_states"] = []
        for k, context in enumerate(contexts):
            step_state = counters.step_state(optimizer.options.loss_scaler, context)
            if step_state is not None:
                arrays["opt/step_state/%d" % k] = step_state
                meta["step_states"].append(k)
    meta["arrays"] = {key: [dtype_name(a.dtype), list(a.shape)] for key, a in arrays.items()}
    blob = json.dumps(meta, sort_keys=True).encode()
    arrays[_META] = ndarray.array(numpy.frombuffer(blob, dtype=numpy.uint8), dtype=numpy.uint8)
    digest = _digest(blob, arrays).encode()
    arrays[_DIGEST] = ndarray.array(numpy.frombuffer(digest, dtype=numpy.uint8),
                                    dtype=numpy.uint8)
    _write_atomically(path, arrays)


# ----------------------------------------------------------------------------- loading

def _read(path):
    """The file's arrays and its metadata, or a ValueError naming the path and what is wrong
    with it (a truncated or corrupted file, another kind of file)."""
    from mxnet.base import MXNetError

    if not os.path.exists(path):
        _refuse(path, "no such file")
    try:
        arrays = ndarray.load(path)
    except MXNetError as err:
        _refuse(path, "it cannot be read as an MXNet array file (truncated, or not a state "
                "file?): %s" % str(err).strip().splitlines()[0])
    if not isinstance(arrays, dict) or _META not in arrays:
        _refuse(path, "not an mxlamb state file (no %s entry)" % _META)
    blob = arrays.pop(_META).asnumpy().tobytes()
    digest = arrays.pop(_DIGEST, None)
    if digest is not None and digest.asnumpy().tobytes().decode(errors="replace") != \
            _digest(blob, arrays):
        _refuse(path, "its contents do not match their digest: the file is corrupted")
    try:
        meta = json.loads(blob.decode())
    except ValueError as err:
        _refuse(path, "its metadata is not JSON (%s)" % err)
    if not isinstance(meta, dict):
        _refuse(path, "its metadata is not a JSON object")
    if meta.get("format") != _FORMAT or meta.get("version") not in (1, 2, _VERSION):
        _refuse(path, "format %r version %r, expected %r version 1, 2 or %d"
                % (meta.get("format"), meta.get("version"), _FORMAT, _VERSION))
    if meta["version"] >= 3 and digest is None:
        _refuse(path, "its digest is missing (the file was cut or altered)")
    required = ["params", "updaters", "num_update"] + (
        ["layout", "arrays", "update_counts"] if meta["version"] >= 3 else ["counters"])
    for key in required:
        if key not in meta:
            _refuse(path, "its metadata has no %r entry" % key)
    return arrays, meta


def _context_of(state):
    first = state
    while isinstance(first, (tuple, list)):
        first = first[0]
    return first.context


# Gluon 1.x names a block after its class and a per-name-scope counter ("dense3_"): the
# counters are the digits just before an underscore.
_COUNTER = re.compile(r"\d+(?=_)")


def _counter_key(name):
    """(name with the counters blanked, the counters): equal first parts mean two names differ
    only in Gluon's counters, and the counters order a model's blocks as they were created."""
    return _COUNTER.sub("#", name), tuple(int(c) for c in _COUNTER.findall(name))


def _match_parameters(path, saved, params, by_order, subset=False):
    """For each saved parameter (file order), the index of the Trainer's parameter it goes to.

    By name where the names are the Trainer's; by position with ``by_order``; where the names
    differ only in Gluon's prefix counters, by position in creation order (a model re-created
    in the same process counts on from the first one). With ``subset``, by name, every one of
    the Trainer's names in the file, and None for the file's others. Every pair must have the
    same shape."""
    names = [p["name"] for p in saved]
    ours = [p.name for p in params]
    if subset:
        if len(set(names)) != len(names) or len(set(ours)) != len(ours):
            _refuse(path, "subset=True matches by name, and the names repeat")
        missing = sorted(set(ours) - set(names))
        if missing:
            _refuse(path, "subset=True: the Trainer's parameters %s are not in the file"
                    % missing)
        where = {name: i for i, name in enumerate(ours)}
        mapping = [where.get(name) for name in names]
        _check_shapes(path, saved, params, mapping, "by name (subset=True)")
        return mapping
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
    _check_shapes(path, saved, params, mapping, how)
    return mapping


def _check_shapes(path, saved, params, mapping, how):
    wrong = []
    names = [p["name"] for p in saved]
    for j, i in enumerate(mapping):
        if i is None:
            continue
        shape = tuple(params[i].shape or ())
        theirs = tuple(saved[j]["shape"] or ())
        # A deferred-initialisation parameter has 0 for the dimensions it does not know yet.
        if len(shape) != len(theirs) or any(known and known != dim
                                            for known, dim in zip(shape, theirs)):
            wrong.append("%s %s <- %s %s" % (params[i].name, shape, names[j], theirs))
    if wrong:
        _refuse(path, "matched %s, %d parameter(s) have another shape than their state in the "
                "file: %s" % (how, len(wrong), "; ".join(wrong)))




def _layout_changes(path, theirs, optimizer, micro):
    """How a LAMB optimizer takes a version-3 file whose states were made with ``theirs``
    (the file's layout): {"ema_from_weights", "accumulation_from_zero"}, or a refusal naming
    the first difference that cannot be carried over. ``micro``: the file's pending
    accumulation counts."""
    ours = _layout(optimizer)
    if theirs.get("class") != ours["class"]:
        _refuse(path, "it was saved by %s, this optimizer is %s"
                % (theirs.get("class"), ours["class"]))
    if not isinstance(optimizer, LAMB):
        return {}

    def said(name, value):
        return "saved with %s=%r, this optimizer has %s=%r" % (name, value, name, ours[name])

    if theirs.get("amsgrad") != ours["amsgrad"]:
        _refuse(path, said("amsgrad", theirs.get("amsgrad")) + " (the running max of the "
                "variance cannot be made up or dropped)")
    if theirs.get("use_ema") and not ours["use_ema"]:
        _refuse(path, said("use_ema", True) + " (its weight averages would be lost: make the "
                "optimizer with use_ema=True, or copy the averages into the weights first with "
                "finalize_variable_values)")
    pending = any(n for counts in micro.values() for n in counts.values())
    theirs_steps = theirs.get("gradient_accumulation_steps")
    if theirs_steps != ours["gradient_accumulation_steps"] and pending:
        _refuse(path, said("gradient_accumulation_steps", theirs_steps) + ", and gradients are "
                "pending in the file's sums (save at an update, or load with the same value)")
    return {"ema_from_weights": ours["use_ema"] and not theirs.get("use_ema"),
            "accumulation_from_zero": theirs_steps != ours["gradient_accumulation_steps"]}


def _expected_state(optimizer, weight):
    """(master dtype or None, {state name: (dtype, shape)}) that ``optimizer`` keeps for a
    parameter whose array on a device is ``weight``."""
    dtype = numpy.dtype(weight.dtype)
    multi = bool(optimizer.multi_precision) and dtype in LOW_PRECISION
    math = numpy.dtype(numpy.float64) if dtype == numpy.float64 else numpy.dtype(numpy.float32)
    specs = layout_of(optimizer.options, weight.shape, math)
    return ((numpy.dtype(numpy.float32) if multi else None),
            {name: (dtype_, shape) for name, dtype_, shape in specs})


def _file_names(names, state_bits, shape):
    """The names of the arrays a file's state holds for a parameter of ``shape``: the file's
    layout, with each moment's block scales where the file's state_bits made it 8-bit."""
    size = int(numpy.prod(shape)) if shape else 1
    return with_scales(names) if quantized(state_bits, size) else names


def _scale_of(name):
    """The moment whose block scales array ``name`` is, or None."""
    return name[:-len("_scale")] if name.endswith("_scale") else None


def _convert_moments(values, expected):
    """The file's moments in the loading optimizer's format (8-bit or float32): True where
    they were converted."""
    converted = False
    for name in MOMENTS:
        if name not in values or name not in expected:
            continue
        file_quantized = (name + "_scale") in values
        ours_quantized = (name + "_scale") in expected
        if file_quantized and not ours_quantized:
            values[name] = decode_moment(values[name], values.pop(name + "_scale"), name)
            converted = True
        elif ours_quantized and not file_quantized:
            if numpy.dtype(values[name].dtype) == numpy.float32:
                values[name], values[name + "_scale"] = encode_moment(values[name], name)
                converted = True
    return converted


def _saved_state(path, structure, names, arrays, describe):
    """(master key or None, {name: key}) of one state in the file, from its structure and the
    names of its arrays (the file's, or for versions 1 and 2 this optimizer's)."""
    master = None
    if (isinstance(structure, list) and len(structure) == 2 and isinstance(structure[1], list)
            and isinstance(structure[0], str)):
        master, structure = structure  # (weight32, states): multi-precision
    if not isinstance(structure, list) or not all(isinstance(k, str) for k in structure):
        _refuse(path, "the state of parameter %s is not a tuple of arrays" % describe())
    if len(structure) != len(names):
        _refuse(path, "the state of parameter %s holds %d arrays, this optimizer keeps %d (%s): "
                "made with other options?" % (describe(), len(structure), len(names),
                                               ", ".join(names)))
    for key in structure + ([master] if master else []):
        if key not in arrays:
            _refuse(path, "array %s is missing" % key)
    return master, dict(zip(names, structure))


def _check_array(path, array, dtype, shape, what):
    if numpy.dtype(array.dtype) != numpy.dtype(dtype):
        _refuse(path, "%s is %s in the file, this optimizer keeps %s"
                % (what, dtype_name(array.dtype), dtype_name(dtype)))
    if len(array.shape) != len(shape) or any(
            known and known != dim for known, dim in zip(shape, array.shape)):
        _refuse(path, "%s has shape %s in the file, the parameter %s"
                % (what, tuple(array.shape), tuple(shape)))


def _rebuild(structure, arrays, context, path, shape, what):
    """A state of another optimizer class (not mxlamb's): its arrays as saved, each shape
    checked."""
    if structure is None:
        return None
    if isinstance(structure, list):
        return tuple(_rebuild(s, arrays, context, path, shape, what) for s in structure)
    if structure not in arrays:
        _refuse(path, "array %s is missing" % structure)
    array = arrays[structure]
    if len(array.shape) != len(shape) or any(
            known and known != dim for known, dim in zip(shape, array.shape)):
        _refuse(path, "%s has shape %s, the state in the file %s" % (what, shape, array.shape))
    return array.as_in_context(context)


def _per_device(counters, name, index_of):
    """{device id: {index: count}} of one counter, the file's indices mapped to the
    Trainer's (None: a parameter the Trainer does not have, dropped)."""
    out = {}
    for d, values in counters.get(name, {}).items():
        mapped = ((index_of(i), int(v)) for i, v in values.items())
        out[int(d)] = {i: v for i, v in mapped if i is not None}
    return out


def _old_counts(meta, arrays, device_ids, index_of):
    """Versions 1 and 2: (MXNet's update counts, t, pending accumulation), per device id.
    t is read from the device counts the file kept where it kept them (they skip skipped
    steps; the host's include them)."""
    counters = meta["counters"]
    if meta["version"] == 1:
        counters = {name: {str(d): counters[flat] for d in device_ids}
                    for flat, name in _V1_COUNTERS.items() if flat in counters}
        counters.update({k: v for k, v in meta["counters"].items() if k == _SLOTS})
    updates = _per_device(counters, "_all_index_update_counts", index_of)
    applied = _per_device(counters, "_all_applied_steps", index_of)
    micro = _per_device(counters, "_all_micro_steps", index_of)
    slots = {index_of(i): int(v) for i, v in counters.get(_SLOTS, {}).items()}
    slots.pop(None, None)
    for k in meta.get("device_counts", []):
        values = arrays["opt/counts/%d" % k].asnumpy()
        own = applied.setdefault(device_ids[k], {})
        for index, slot in slots.items():
            if slot < values.shape[0] and index in own:
                own[index] = int(values[slot])
    return updates, applied, micro


def load_states(trainer, path, by_order=False, subset=False):
    """Restores what :func:`save_states` wrote into a Trainer over the same parameters.

    Everything in the file is checked before anything changes (see the module's
    documentation for what is checked and what may differ): a file that does not fit raises
    ValueError naming the path and the first difference, and the Trainer is as it was.

    Parameters are matched by name (by position where names repeat, as MXNet 2.0's 'weight'
    and 'bias' do, and the file's names are the Trainer's in the same order). Where the names
    differ only in Gluon's automatic prefix counters (``dense3_weight`` for the saved
    ``dense0_weight``: a model re-created in the same process), and with ``by_order=True``
    whatever the names, they are matched by position (in order of creation for the
    counters), and every pair must have the same shape.

    With ``subset=True`` the Trainer may hold some of the file's parameters (a Trainer over
    the parameters that still train, when others are frozen), matched by name: the file's
    others are left out, deliberately.

    The states are loaded into the optimizer's own (made as ``create_state`` makes them, or
    the ones it has, in place), so the steps after a load run as fast as before it."""
    optimizer, updaters = _trainer_parts(trainer)
    contexts = _contexts(trainer)
    device_ids = [c.device_id for c in contexts]
    arrays, meta = _read(path)
    version = meta["version"]
    params = trainer._params
    mapping = _match_parameters(path, meta["params"], params, by_order, subset)
    if len(meta["updaters"]) != len(updaters):
        _refuse(path, "it was saved on %d device(s), the Trainer has %d"
                % (len(meta["updaters"]), len(updaters)))

    def target(key):
        """The Trainer's index for the file's parameter index ``key``."""
        try:
            position = int(key)
        except (TypeError, ValueError):
            position = -1
        if not 0 <= position < len(mapping):
            _refuse(path, "parameter index %r in the file, which holds %d parameters"
                    % (key, len(mapping)))
        return mapping[position]

    # The counts, every index checked.
    if version >= 3:
        updates = _per_device({"u": meta["update_counts"]}, "u", target)
        applied = _per_device({"a": meta.get("applied", {})}, "a", target)
        micro = _per_device({"m": meta.get("micro", {})}, "m", target)
    else:
        updates, applied, micro = _old_counts(meta, arrays, device_ids, target)
    lamb = isinstance(optimizer, LAMB)
    changes = {}
    file_bits = 32
    if version >= 3:
        changes = _layout_changes(path, meta["layout"], optimizer, micro)
        file_names = meta["layout"].get("state")
        file_bits = meta["layout"].get("state_bits", 32)
    else:
        file_names = optimizer.options.state_layout if lamb else None
    converted = 0  # parameters whose moments change format (state_bits)

    # Every state checked, and what each becomes.
    plans = []  # per updater: {index: (weight, master array or None, {name: array}) or state}
    for k, (updater, saved) in enumerate(zip(updaters, meta["updaters"])):
        context = contexts[k]
        plan = {}
        for key, structure in saved.items():
            index = target(key)
            if index is None:
                continue  # (subset=True: a parameter the Trainer does not have)
            param = params[index]
            shape = tuple(param.shape or ())
            describe = lambda param=param: param.name  # noqa: E731
            if not lamb:
                plan[index] = _rebuild(structure, arrays, context, path, shape,
                                       "parameter %s" % param.name)
                continue
            weight = legacy(param.list_data()[k])
            master_key, keys = _saved_state(path, structure,
                                            _file_names(file_names, file_bits, shape), arrays,
                                            describe)
            master_dtype, expected = _expected_state(optimizer, weight)
            if (master_key is None) != (master_dtype is None):
                _refuse(path, "parameter %s (%s) was saved %s a float32 master copy; this "
                        "optimizer (multi_precision=%s) keeps %s" % (
                            param.name, dtype_name(weight.dtype),
                            "with" if master_key else "without", optimizer.multi_precision,
                            "one" if master_dtype is not None else "none"))
            master = None
            if master_key is not None:
                master = arrays[master_key]
                _check_array(path, master, master_dtype, shape,
                             "the master copy of parameter %s" % param.name)
            values = {name: arrays[key_] for name, key_ in keys.items()
                      if name in expected or _scale_of(name) in expected}
            converted += _convert_moments(values, expected)
            for name in list(values):
                if name not in expected:
                    del values[name]  # (accumulated sums the loading side does not keep: zero)
                    continue
                _check_array(path, values[name], expected[name][0], expected[name][1],
                             "state %s of parameter %s" % (name, param.name))
            plan[index] = (weight, master, values)
        plans.append(plan)
    for name in ("opt/step_state/%d" % k for k in meta.get("step_states", [])):
        if name not in arrays:
            _refuse(path, "array %s is missing" % name)

    if converted:
        warn_trap("mxlamb.load_states: %s: the moments of %d parameter state(s) were saved "
                  "with state_bits=%d and are converted to this optimizer's state_bits=%d "
                  "(%s)" % (path, converted, file_bits, optimizer.options.state_bits,
                            "encoded as its phase 1 stores them" if file_bits == 32 else
                            "their stored values, exactly"))

    # Everything checked: now change the Trainer.
    for k, (updater, plan) in enumerate(zip(updaters, plans)):
        for index in [i for i in updater.states if i not in plan]:
            del updater.states[index]
            updater.states_synced.pop(index, None)
        for index, entry in plan.items():
            if not lamb:
                updater.states[index] = entry
            else:
                updater.states[index] = _load_state(optimizer, index, updater.states.get(index),
                                                    updater.states_synced.get(index, False),
                                                    *entry, changes)
            updater.states_synced[index] = True
    optimizer.num_update = int(meta["num_update"])
    optimizer._all_index_update_counts = {d: dict(c) for d, c in updates.items()}
    optimizer._all_index_update_counts.setdefault(0, {})
    if lamb:
        _load_counts(optimizer, contexts, applied, micro, changes)
        _load_step_states(optimizer, contexts, arrays, meta)
        optimizer.engine.reset()
        for updater, plan in zip(updaters, plans):  # (the EMA read-outs find them now)
            for index, (weight, _, _) in plan.items():
                optimizer.engine.remember(index, weight, updater.states[index])
    else:
        optimizer._index_update_count = optimizer._all_index_update_counts[0]


def _load_state(optimizer, index, existing, synced, weight, master, values, changes):
    """The optimizer's state for a parameter holding the file's values: ``existing`` where it
    fits (loaded in place), else one made as create_state makes it."""
    state = existing
    if not (synced and _fits(optimizer, existing, weight)):
        state = optimizer.create_state_multi_precision(index, weight)
    own_master, moments = (state[0], state[1]) if master is not None else (None, state)
    if master is not None:
        master.copyto(own_master)
    math = numpy.float64 if numpy.dtype(weight.dtype) == numpy.float64 else numpy.float32
    named = dict(zip([name for name, _, _ in layout_of(optimizer.options, weight.shape, math)],
                     moments))
    for name, array in named.items():
        if name in values:
            values[name].copyto(array)
        elif name == "average":  # EMA from here on: the average starts from the weight
            (own_master if own_master is not None else weight).copyto(array)
        else:  # "accum": nothing pending
            array[:] = 0
    return state


def _fits(optimizer, state, weight):
    """Whether ``state`` is a state the optimizer would make for ``weight`` (structure, dtype,
    shape, device)."""
    if state is None:
        return False
    master_dtype, expected = _expected_state(optimizer, weight)
    try:
        if master_dtype is not None:
            master, state = state
            arrays = [(master, master_dtype)]
        else:
            arrays = []
        state = tuple(state)
    except (TypeError, ValueError):
        return False
    if len(state) != len(expected):
        return False
    arrays = [(a, (dtype, weight.shape)) for a, dtype in arrays]
    arrays += list(zip(state, expected.values()))
    return all(isinstance(a, ndarray.NDArray) and numpy.dtype(a.dtype) == dtype
               and a.shape == shape and a.context == weight.context
               for a, (dtype, shape) in arrays)


def _load_counts(optimizer, contexts, applied, micro, changes):
    """t from the file's applied updates, on the host and, where steps can be skipped on the
    device, in the device counts; the pending accumulation counts."""
    counters = optimizer.counters
    if changes.get("accumulation_from_zero") or optimizer.options.gradient_accumulation_steps \
            is None:
        micro = {d: {} for d in applied}
    counters.load_state_dict({"applied": applied, "micro": micro})
    counters.device_counts = {}
    if optimizer.options.may_skip:
        for context in contexts:
            own = applied.get(context.device_id, {})
            if not own:
                continue
            indices = sorted(own, key=str)
            counts, slots = counters.device_counts_for(indices, context)
            values = counts.asnumpy()
            for index, slot in zip(indices, slots):
                values[slot] = own[index]
            counts[:] = values
    optimizer.engine.use_device(0)  # (the Updater switches to each device again)


def _load_step_states(optimizer, contexts, arrays, meta):
    """[loss scale, clean steps, skipped steps] per device: the count of skipped steps is
    kept; the loss scale and its clean steps where both sides scale dynamically."""
    scaler = optimizer.options.loss_scaler
    counters = optimizer.counters
    counters.step_states = {}
    with_scaler = meta.get("layout", {}).get("loss_scaler", scaler is not None)
    for k, context in enumerate(contexts):
        saved = arrays.get("opt/step_state/%d" % k, arrays.get("opt/step_state"))
        if scaler is not None:
            saved = arrays.get("opt/loss_scaler", saved)  # (version 1)
            if saved is None:
                continue
            state = scaler.state_on(context)
            if with_scaler:
                saved.copyto(state)
            else:
                state[2:3] = saved[2:3].as_in_context(state.context)
        elif optimizer.options.may_skip and saved is not None:
            state = counters.step_state(None, context, create=True)
            state[2:3] = saved[2:3].as_in_context(state.context)


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
          "exclude_from_layer_adaptation": optimizer.exclude_from_layer_adaptation or None,
          "state_bits": 8 if optimizer.options.state_bits == 8 else None}
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
