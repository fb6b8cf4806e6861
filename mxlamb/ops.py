"""The operators, one typed wrapper each: the only Python code that makes their attributes.

src/operators/lamb_op.h is the contract (the arrays each operator takes, what each attribute
means). Here a hyper-parameter that is off is an attribute left out, per-tensor values become
the operators' lists, and a group's arrays are put in order once (:class:`GroupCall`), so that
a step only adds what changes (learning rates, weight decays, the gradient scale, step counts).

The paths of a group:

- ``FUSED``: the plain step, both phases in one ``mxlamb_step`` call (on the CPU back to back
  per cache-sized batch); moments passed as one slab where they lie side by side in one, and
  weights, gradients and float16 weights as one flat array each for contiguous parameters;
- ``PHASES``: ``mxlamb_phase1`` (moments, raw update, sums of squares) then ``mxlamb_phase2``
  (trust-ratio apply), for the options with inputs of their own (gradient statistics, device
  step counts, AMSGrad, EMA);
- ``BFLOAT16``: the two phases on the float32 master copy, the bfloat16 gradient widened and
  the model weight rounded by MXNet's own cast: MXNet's extension API cannot hand a bfloat16
  array to a library operator (lib_api.cc rejects dtype flag 12).
"""
import collections
import enum

import numpy

from mxnet import ndarray

from ._library import native  # noqa: F401  (loads the operators into mxnet.ndarray)
from .state import BFLOAT16, LOW_PRECISION, packed_run

__all__ = ["Path", "choose_path", "GroupCall", "FlatGroup", "grad_stats", "trust_ratios",
           "ema_towards"]


class Path(enum.Enum):
    FUSED = "mxlamb_step"
    PHASES = "mxlamb_phase1 + mxlamb_phase2"
    BFLOAT16 = "float32 phases on the master copy, cast by MXNet"


def choose_path(dtype, options, has_stats):
    """The path of a group of weight dtype ``dtype`` (on any device: the operators have CPU
    and GPU forwards alike)."""
    if dtype == BFLOAT16:
        return Path.BFLOAT16
    plain = not (has_stats or options.may_skip or options.amsgrad or options.use_ema)
    return Path.FUSED if plain else Path.PHASES


def _joined(values):
    """An operator's list attribute: one value when all are equal (the operator repeats it)."""
    first = values[0]
    if values.count(first) == len(values):
        return repr(first)
    return ",".join(map(repr, values))


def _kernel_grad(grad):
    """The gradient as the kernels take it: bfloat16 widened to float32 (see BFLOAT16)."""
    if numpy.dtype(grad.dtype) == BFLOAT16:
        return grad.astype(numpy.float32)
    return grad


def _hyper_attributes(options, num_tensors, model_dtype, layer_adaptation):
    """The attributes of mxlamb_phase1 / mxlamb_phase2 / mxlamb_step that stay the same from
    step to step for one group."""
    attrs = {"num_tensors": num_tensors, "beta1": options.beta1, "beta2": options.beta2,
             "epsilon": options.epsilon, "bias_correction": options.bias_correction}
    if options.lower_bound:
        attrs["lower_bound"] = options.lower_bound
    if options.upper_bound:
        attrs["upper_bound"] = options.upper_bound
    if layer_adaptation is not None:
        attrs["layer_adaptation"] = ",".join("1" if a else "0" for a in layer_adaptation)
    if options.epsilon_hat:
        attrs["epsilon_hat"] = True
    if options.amsgrad:
        attrs["amsgrad"] = True
    if options.use_ema:
        attrs["use_ema"] = True
        attrs["ema_momentum"] = options.ema_momentum
    if model_dtype is not None:
        attrs["multi_precision"] = True
        attrs["model_dtype"] = model_dtype
    return attrs


# Contiguous parameters (mxlamb.contrib): a run of tensors whose weights (or float32 masters),
# gradients and float16 model weights each lie side by side in one flat array from ``offset``,
# with ``sizes`` elements each, and whose moments lie side by side in a slab.
FlatGroup = collections.namedtuple("FlatGroup", ["weight", "grad", "model", "offset", "sizes"])


class GroupCall:
    """The operator call(s) of one group of tensors, its arrays put in order once.

    ``weights`` are the model weights, ``slots`` each tensor's state.Slots (``master`` is the
    weight itself without multi-precision); ``layer_adaptation`` per tensor, or None where
    every tensor adapts; ``stat_rows``, each tensor's row of the step's gradient statistics,
    or None where the step has none; ``flat``, a :class:`FlatGroup` for contiguous
    parameters. Calling it runs one step of the group and returns the phase-1 table (per
    tensor: sums of squares of the weight and of the raw update)."""

    def __init__(self, path, options, dtype, multi_precision, weights, grads, slots,
                 layer_adaptation=None, stat_rows=None, flat=None, first_step=1):
        self.path = path
        self.device_counts = options.may_skip
        self.decoupled = options.decoupled_weight_decay
        model_dtype = None
        if multi_precision and dtype in LOW_PRECISION and path is not Path.BFLOAT16:
            model_dtype = numpy.dtype(dtype).name
        attrs = _hyper_attributes(options, len(slots), model_dtype, layer_adaptation)
        # 8-bit moments (state_bits=8): a group's tensors all have them or none (the engine
        # groups them so); each moment's block scales follow it.
        self.quantized = bool(slots) and slots[0].mean_scale is not None
        if self.quantized:
            attrs["state_bits"] = 8
        self.ratio_attrs = {key: attrs[key] for key in
                            ("num_tensors", "lower_bound", "upper_bound", "layer_adaptation")
                            if key in attrs}
        if stat_rows is not None:
            attrs.update(has_stats=True, stat_rows=",".join(map(str, stat_rows)))
            if options.clipnorm is not None:
                attrs["clipnorm"] = options.clipnorm
        if self.device_counts:
            attrs["device_counts"] = True
        if options.use_ema:  # (the step count of a tensor's first update: see lamb_math.h)
            attrs["ema_first_step"] = first_step
        self.attrs = attrs
        self._lists = {}  # attribute -> (values, string) of the last step: reused while equal
        if path is Path.FUSED:
            self._fused_inputs(attrs, weights, grads, slots, model_dtype is not None, flat)
        else:
            self._phase_inputs(attrs, weights, grads, slots)

    def _fused_inputs(self, attrs, weights, grads, slots, with_model, flat):
        packed = packed_run(slots)
        if flat is not None:
            # Four arrays for the group, however many tensors it has.
            self.inputs = [flat.weight, flat.grad, packed[0]] + ([flat.model] if with_model
                                                                 else [])
            attrs.update(moments_offset=packed[1], flat_offset=flat.offset,
                         flat_sizes=_joined(list(flat.sizes)))
            return
        inputs = []
        for w, g, s in zip(weights, grads, slots):
            inputs += [s.master, g] if packed else [s.master, g, s.mean, s.var]
            if with_model:
                inputs.append(w)  # the float16 model weight, rounded from the master
            if self.quantized:
                inputs += [s.mean_scale, s.var_scale]
        if packed:
            inputs.append(packed[0])
            attrs["moments_offset"] = packed[1]
        self.inputs = inputs

    def _phase_inputs(self, attrs, weights, grads, slots):
        amsgrad, ema = "amsgrad" in attrs, "use_ema" in attrs
        phase1, phase2 = [], []
        for s, g in zip(slots, grads):
            phase1 += [s.master, g, s.mean, s.var] + ([s.var_max] if amsgrad else [])
            phase2 += [s.master, s.mean, s.var_max if amsgrad else s.var]
            phase2 += [s.average] if ema else []
            if self.quantized:
                phase1 += [s.mean_scale, s.var_scale] + ([s.var_max_scale] if amsgrad else [])
                phase2 += [s.mean_scale, s.var_max_scale if amsgrad else s.var_scale]
        self.phase1, self.phase2 = phase1, phase2
        self.grad_positions = None
        masters = [s.master for s in slots]
        if self.path is Path.BFLOAT16:
            # The widened gradients are new arrays every step (see _kernel_grad).
            per_tensor = len(phase1) // len(slots)
            self.grad_positions = [per_tensor * t + 1 for t in range(len(slots))]
            self.casts = list(zip(weights, masters))
            self.out = masters
        else:
            self.out = list(weights)

    def _list(self, name, values):
        last = self._lists.get(name)
        if last is not None and last[0] == values:
            return last[1]
        text = _joined(values)
        self._lists[name] = (list(values), text)  # (a copy: the caller's list may change)
        return text

    def __call__(self, lrs, wds, grad_scale, clip_gradient, step_counts=None, counts=None,
                 count_slots=None, stats=None):
        """One step: per-tensor ``lrs`` and ``wds`` (decoupled, Keras', where the options say
        so: then they go to attribute decays, and MXNet's wds are 0); the gradient multiplier
        ``grad_scale``;
        MXNet's ``clip_gradient`` (None, 0 or negative: no clipping, as MXNet passes it only
        when truthy); the step counts t per tensor (``step_counts``), or the device's
        ``counts`` array and each tensor's row in it (``count_slots``); ``stats``, the step's
        (grad_sumsq, control) from :func:`grad_stats`."""
        if self.decoupled:
            attrs = dict(self.attrs, rescale_grad=grad_scale, lrs=self._list("lrs", lrs),
                         wds="0.0", decays=self._list("decays", wds))
        else:
            attrs = dict(self.attrs, rescale_grad=grad_scale, lrs=self._list("lrs", lrs),
                         wds=self._list("wds", wds))
        if clip_gradient is not None and clip_gradient > 0:
            attrs["clip_gradient"] = clip_gradient
        if counts is not None:
            attrs["count_slots"] = self._list("count_slots", count_slots)
        else:
            attrs["step_counts"] = _joined(step_counts)
        if self.path is Path.FUSED:
            return ndarray.mxlamb_step(*self.inputs, **attrs)
        phase1 = self.phase1
        if self.grad_positions is not None:
            phase1 = list(phase1)
            for position in self.grad_positions:
                phase1[position] = _kernel_grad(phase1[position])
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


def grad_stats(options, grads, grad_scale, step_state):
    """mxlamb_grad_stats over every gradient of a step: (grad_sumsq, control), and the step
    state [loss scale, clean steps, skipped steps] updated on the device."""
    attrs = {"num_tensors": len(grads), "rescale_grad": grad_scale}
    if options.global_clipnorm is not None:
        attrs["global_clipnorm"] = options.global_clipnorm
    if options.may_skip:
        attrs["skip_nonfinite"] = True
    if options.loss_scaler is not None:
        attrs["growth_interval"] = options.loss_scaler.growth_interval
    return ndarray.mxlamb_grad_stats(*[_kernel_grad(g) for g in grads], step_state, **attrs)


def trust_ratios(table, ratio_attrs):
    """mxlamb_trust_ratio: the ratios a group's phase 2 multiplied lr by, from its table."""
    return ndarray.mxlamb_trust_ratio(table, **ratio_attrs)



def ema_towards(average, weight, momentum):
    """An average's step towards the weight without an update (Keras moves the averages at
    every call, also those that only accumulate a gradient): avg = mu avg + (1 - mu) w."""
    ndarray.elemwise_add(average * momentum, weight * (1.0 - momentum), out=average)
