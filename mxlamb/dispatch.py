"""The one place that chooses how a group of tensors is updated, and builds the operators'
inputs from the named slots of each tensor (state.Slots).

The paths:

- ``FUSED``: the plain step, both phases in one mxlamb_step call: on the CPU back to back per
  cache-sized batch; moments passed as one slab where they lie side by side in one; weights,
  gradients and float16 weights as one flat array each where they are contiguous parameters;
- ``PHASES``: mxlamb_phase1 (moments, raw update, sums of squares) then mxlamb_phase2
  (trust-ratio apply), for the options with inputs of their own (gradient statistics, device
  step counts, AMSGrad, EMA);
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

# Elements of a back-to-back batch of the two-phase paths when the whole step comes at once:
# the back-to-back batch of mxlamb_step (kBackToBackElements in lamb_cpu.h), whose arrays a
# server CPU's last-level cache keeps between the two passes.
BATCH_ELEMENTS = 1 << 20

__all__ = ["Path", "choose_path", "GroupCall", "batches", "gradient_statistics", "BATCH_ELEMENTS"]


class Path(enum.Enum):
    FUSED = "mxlamb_step"
    PHASES = "mxlamb_phase1 + mxlamb_phase2"
    BFLOAT16 = "float32 phases on the master copy, cast by MXNet"


def choose_path(dtype, options, has_stats):
    """The path of a group of weight dtype ``dtype`` (on any device: the five operators have
    CPU and GPU forwards alike)."""
    if dtype == BFLOAT16:
        return Path.BFLOAT16
    plain = not (has_stats or options.may_skip or options.amsgrad or options.use_ema)
    return Path.FUSED if plain else Path.PHASES


def kernel_grad(grad):
    """The gradient as the kernels take it: bfloat16 widened to float32 (see BFLOAT16)."""
    if numpy.dtype(grad.dtype) == BFLOAT16:
        return grad.astype(numpy.float32)
    return grad


def gradient_statistics(options, grads, grad_scale, step_state):
    """mxlamb_grad_stats over every gradient of the step: (grad_sumsq, control)."""
    attrs = options.grad_stats_attributes(len(grads), grad_scale)
    return ndarray.mxlamb_grad_stats(*[kernel_grad(g) for g in grads], step_state, **attrs)


class GroupCall:
    """The operator call(s) of one group on ``path``, its arrays put in order once: a step
    whose arrays are the same objects as the last one calls it again with new attributes.

    ``attrs`` are the group's attributes (Options.group_attributes), which say what optional
    arrays the operators take; ``weights`` are the model weights, ``slots`` each tensor's
    Slots (``master`` is the weight itself without multi-precision)."""

    def __init__(self, path, attrs, weights, grads, slots):
        self.path = path
        self.extra_attrs = {}
        if path is Path.FUSED:
            packed = ParameterStates.packed_moments(slots)
            with_model = "multi_precision" in attrs
            flat = flat_run(slots) if packed else None
            if flat is not None:
                # Contiguous parameters (mxlamb.make_contiguous): four arrays for the group.
                weight, grad, model, offset, sizes = flat
                self.inputs = [weight, grad, packed[0]] + ([model] if with_model else [])
                self.extra_attrs.update(moments_offset=packed[1], flat_offset=offset,
                                        flat_sizes=joined(sizes))
                return
            inputs = []
            for w, g, s in zip(weights, grads, slots):
                inputs += [s.master, g] if packed else [s.master, g, s.mean, s.var]
                if with_model:
                    inputs.append(w)  # the float16 model weight, rounded from the master
            if packed:
                inputs.append(packed[0])
                self.extra_attrs["moments_offset"] = packed[1]
            self.inputs = inputs
            return
        amsgrad, ema = "amsgrad" in attrs, "use_ema" in attrs
        phase1, phase2 = [], []
        for s, g in zip(slots, grads):
            phase1 += [s.master, g, s.mean, s.var] + ([s.var_max] if amsgrad else [])
            phase2 += [s.master, s.mean, s.var_max if amsgrad else s.var]
            phase2 += [s.average] if ema else []
        self.phase1, self.phase2 = phase1, phase2
        self.grad_positions = None
        masters = [s.master for s in slots]
        if path is Path.BFLOAT16:
            # The widened gradients are new arrays every step (see kernel_grad).
            per_tensor = 5 if amsgrad else 4
            self.grad_positions = [per_tensor * t + 1 for t in range(len(slots))]
            self.casts = list(zip(weights, masters))
            self.out = masters
        else:
            self.out = list(weights)

    def __call__(self, attrs, stats=None, counts=None):
        """Updates the group with the operators' ``attrs`` (Options.group_attributes and
        step_values, step counts); returns the phase-1 table (per tensor: sums of squares
        of the weight and of the raw update). ``stats`` (grad_sumsq, control) and ``counts``
        (the device step counts) are the optional inputs the attributes switched on."""
        if self.extra_attrs:
            attrs = dict(attrs, **self.extra_attrs)
        if self.path is Path.FUSED:
            return ndarray.mxlamb_step(*self.inputs, **attrs)
        phase1 = self.phase1
        if self.grad_positions is not None:
            phase1 = list(phase1)
            for position in self.grad_positions:
                phase1[position] = kernel_grad(phase1[position])
        extra1 = [] if stats is None else [stats[0], stats[1]]
        extra2 = [] if stats is None else [stats[1]]
        if counts is not None:
            extra1.append(counts)
            extra2.append(counts)
        table = ndarray.mxlamb_phase1(*phase1, *extra1, **attrs)
        ndarray.mxlamb_phase2(*self.phase2, table, *extra2, out=self.out, **attrs)
        if self.path is Path.BFLOAT16:
            for weight, master in self.casts:
                ndarray.cast(master, dtype=weight.dtype, out=weight)
        return table


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
    if path is Path.FUSED:
        return [members]
    groups, start, elements = [], 0, 0
    for end, size in enumerate(sizes):
        if end > start and elements + size > BATCH_ELEMENTS:
            groups.append(members[start:end])
            start, elements = end, 0
        elements += size
    groups.append(members[start:])
    return groups


def model_dtype(dtype, multi_precision, path):
    """The model weight's dtype name the operators write under multi-precision, else None
    (the BFLOAT16 path writes the float32 master, and MXNet casts)."""
    if multi_precision and dtype in LOW_PRECISION and path is not Path.BFLOAT16:
        return numpy.dtype(dtype).name
    return None
