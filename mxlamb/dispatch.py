"""The one place that chooses how a group of tensors is updated, and builds the operators'
inputs from the named slots of each tensor (state.Slots).

The paths:

- ``FUSED``: the plain step on the CPU, both phases in one mxlamb_step call, back to back per
  cache-sized batch (moments passed as one slab where they lie side by side in one);
- ``PHASES``: mxlamb_phase1 (moments, raw update, sums of squares) then mxlamb_phase2
  (trust-ratio apply), for the options with inputs of their own (gradient statistics, device
  step counts, AMSGrad, EMA) and for the GPU;
- ``BFLOAT16``: the two phases on the float32 master copy, the bfloat16 gradient widened
  and the model weight rounded by MXNet's own cast: MXNet 1.9's extension API cannot hand a
  bfloat16 array to a library operator (lib_api.cc rejects dtype flag 12).
"""
import enum

import numpy

from mxnet import ndarray

from .flat import flat_run
from .options import joined
from .state import BFLOAT16, LOW_PRECISION, ParameterStates

__all__ = ["Path", "choose_path", "update_group", "gradient_statistics"]


class Path(enum.Enum):
    FUSED = "mxlamb_step"
    PHASES = "mxlamb_phase1 + mxlamb_phase2"
    BFLOAT16 = "float32 phases on the master copy, cast by MXNet"


def choose_path(dtype, context, options, has_stats):
    """The path of a group of weight dtype ``dtype`` on ``context``."""
    if dtype == BFLOAT16:
        return Path.BFLOAT16
    plain = not (has_stats or options.may_skip or options.amsgrad or options.use_ema)
    if plain and context.device_type == "cpu":
        return Path.FUSED
    return Path.PHASES


def kernel_grad(grad):
    """The gradient as the kernels take it: bfloat16 widened to float32 (see BFLOAT16)."""
    if numpy.dtype(grad.dtype) == BFLOAT16:
        return grad.astype(numpy.float32)
    return grad


def gradient_statistics(options, grads, grad_scale, step_state):
    """mxlamb_grad_stats over every gradient of the step: (grad_sumsq, control)."""
    attrs = options.grad_stats_attributes(len(grads), grad_scale)
    return ndarray.mxlamb_grad_stats(*[kernel_grad(g) for g in grads], step_state, **attrs)


def update_group(path, attrs, weights, grads, slots, stats=None, counts=None):
    """Updates one group on ``path`` with the operators' ``attrs``; returns the phase-1
    table (per tensor: sum of squares of the weight and of the raw update).

    ``stats`` (grad_sumsq, control) and ``counts`` (the device step counts) are the optional
    inputs the attributes switched on; ``weights`` are the model weights, ``slots`` each
    tensor's Slots (``master`` is the weight itself without multi-precision)."""
    if path is Path.FUSED:
        return _fused_step(attrs, weights, grads, slots)
    if path is Path.BFLOAT16:
        grads = [kernel_grad(g) for g in grads]
    amsgrad, ema = "amsgrad" in attrs, "use_ema" in attrs
    phase1, phase2 = [], []
    for s, g in zip(slots, grads):
        phase1 += [s.master, g, s.mean, s.var] + ([s.var_max] if amsgrad else [])
        phase2 += [s.master, s.mean, s.var_max if amsgrad else s.var]
        phase2 += [s.average] if ema else []
    extra1 = [] if stats is None else [stats[0], stats[1]]
    extra2 = [] if stats is None else [stats[1]]
    if counts is not None:
        extra1.append(counts)
        extra2.append(counts)
    table = ndarray.mxlamb_phase1(*phase1, *extra1, **attrs)
    masters = [s.master for s in slots]
    ndarray.mxlamb_phase2(*phase2, table, *extra2,
                          out=masters if path is Path.BFLOAT16 else list(weights), **attrs)
    if path is Path.BFLOAT16:
        for weight, master in zip(weights, masters):
            ndarray.cast(master, dtype=weight.dtype, out=weight)
    return table


def _fused_step(attrs, weights, grads, slots):
    packed = ParameterStates.packed_moments(slots)
    with_model = "multi_precision" in attrs
    if packed:
        flat = flat_run(slots)
        if flat is not None:
            # Contiguous parameters (mxlamb.make_contiguous): four arrays for the whole group.
            weight, grad, model, offset, sizes = flat
            inputs = [weight, grad, packed[0]] + ([model] if with_model else [])
            return ndarray.mxlamb_step(*inputs, **dict(
                attrs, moments_offset=packed[1], flat_offset=offset, flat_sizes=joined(sizes)))
    inputs = []
    for w, g, s in zip(weights, grads, slots):
        inputs += [s.master, g] if packed else [s.master, g, s.mean, s.var]
        if with_model:
            inputs.append(w)  # the float16 model weight, rounded from the master
    if packed:
        inputs.append(packed[0])
        attrs = dict(attrs, moments_offset=packed[1])
    return ndarray.mxlamb_step(*inputs, **attrs)


def model_dtype(dtype, multi_precision, path):
    """The model weight's dtype name the operators write under multi-precision, else None
    (the BFLOAT16 path writes the float32 master, and MXNet casts)."""
    if multi_precision and dtype in LOW_PRECISION and path is not Path.BFLOAT16:
        return numpy.dtype(dtype).name
    return None
