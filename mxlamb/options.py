"""The hyper-parameters and training options, validated once, and their translation into
operator attributes: the only place where "None", "off" and dtypes become what the operators
read (src/operators/lamb_op.cc parses them).

:class:`Options` is frozen: LAMB's own hyper-parameters are fixed at construction (MXNet's
``Optimizer`` arguments, such as the learning rate, wd, rescale_grad and clip_gradient, stay
MXNet's mutable attributes and are read at every step).
"""
import dataclasses
import numbers
import re
import sys
import warnings

import numpy

from ._library import mxnet_version_number

__all__ = ["Options", "number", "flag", "positive_or_none", "count_or_none",
           "aggregation", "OPTIMIZER_KWARGS", "TRAINING_OPTIONS", "WHOLE_STEP"]

# Keyword arguments of mxnet.optimizer.Optimizer that LAMB passes on.
OPTIMIZER_KWARGS = ("rescale_grad", "param_idx2name", "wd", "clip_gradient", "lr_scheduler",
                    "sym", "begin_num_update", "multi_precision", "param_dict")
# mxlamb's training options (Keras' names), on LAMB and AdamW alike.
TRAINING_OPTIONS = ("global_clipnorm", "clipnorm", "use_ema", "ema_momentum",
                    "ema_overwrite_frequency", "gradient_accumulation_steps",
                    "loss_scale_factor", "loss_scaler", "skip_nonfinite",
                    "exclude_from_weight_decay", "exclude_from_layer_adaptation")
# What aggregate_num=numpy.inf (the whole step in one call) is kept as: MXNet 2.0's Updater
# sends the whole step in one call for numpy.inf itself (it tests `is not numpy.inf`); 1.x's
# Updater slices the step by aggregate_num, which must then be an integer.
WHOLE_STEP = numpy.inf if mxnet_version_number() >= 20000 else sys.maxsize


def number(name, value, low=None, high=None, low_open=False, high_open=False, owner="LAMB"):
    """``value`` as a float, or ValueError naming ``name`` and the value."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and numpy.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + repr(low)
        hi = "" if high is None else repr(high) + (")" if high_open else "]")
        where = " in %s, %s" % (lo or "(-inf", hi or "inf)") if (lo or hi) else ""
        raise ValueError("%s: %s must be a finite number%s, got %r" % (owner, name, where, value))
    return float(value)


def flag(name, value, owner="LAMB"):
    if not isinstance(value, (bool, numpy.bool_)):
        raise ValueError("%s: %s must be True or False, got %r" % (owner, name, value))
    return bool(value)


def positive_or_none(name, value):
    return None if value is None else number(name, value, low=0.0, low_open=True)


def bound_or_none(name, value):
    """A trust-ratio bound: None, or a number >= 0 where 0 means no bound (as in MXNet, which
    passes a bound to its kernels only when it is truthy)."""
    return None if value is None else number(name, value, low=0.0)


def count_or_none(name, value, owner="LAMB", low=1):
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError("%s: %s must be an integer >= %d or None, got %r"
                         % (owner, name, low, value))
    return int(value)


def aggregation(value):
    """aggregate_num as MXNet 2.0 reads it, as kept in ``optimizer.aggregate_num``: None (kept
    as 1, as MXNet 2.0's Optimizer does) and 0 are no aggregation, one tensor per call;
    numpy.inf (any +inf) is the whole step in one call (WHOLE_STEP); other positive integers
    are tensors per call. A negative, NaN, a bool, a fraction or a non-number is a ValueError."""
    if value is None:
        return 1
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == numpy.inf:
        return WHOLE_STEP
    raise ValueError("LAMB: aggregate_num must be an integer >= 0, None (no aggregation) or "
                     "numpy.inf (the whole step in one call), got %r" % (value,))


def warn_trap(message):
    # A plain UserWarning from one place: Python's default filter shows it once per process.
    warnings.warn(message, UserWarning, stacklevel=4)


def patterns(name, value):
    """A tuple of compiled regular expressions, or ValueError naming the option."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError("LAMB: %s must be a list of regular expressions, got %r" % (name, value))
    compiled = []
    for pattern in value:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ValueError("LAMB: %s has an invalid regular expression %r (%s)"
                             % (name, pattern, err)) from None
    return tuple(compiled)


def joined(values):
    """An operator's list attribute: one value when all are equal (the operator repeats it)."""
    first = values[0]
    if values.count(first) == len(values):
        return repr(first)
    return ",".join(map(repr, values))


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
    """LAMB's hyper-parameters and mxlamb's training options, validated (see LAMB's
    docstring for each). ``layer_adaptation``, ``epsilon_hat`` and ``amsgrad`` are what AdamW
    changes: no trust ratio, Keras' placement of epsilon, AMSGrad's max of the variance."""

    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-6
    lower_bound: float = None
    upper_bound: float = None
    bias_correction: bool = True
    global_clipnorm: float = None
    clipnorm: float = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int = None
    gradient_accumulation_steps: int = None
    loss_scale_factor: float = None
    loss_scaler: object = None
    skip_nonfinite: bool = False
    exclude_from_weight_decay: tuple = ()
    exclude_from_layer_adaptation: tuple = ()
    layer_adaptation: bool = True
    epsilon_hat: bool = False
    amsgrad: bool = False

    @classmethod
    def validated(cls, beta1, beta2, epsilon, lower_bound, upper_bound, bias_correction,
                  global_clipnorm, clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
                  gradient_accumulation_steps, loss_scale_factor, loss_scaler, skip_nonfinite,
                  exclude_from_weight_decay, exclude_from_layer_adaptation, **adamw):
        """Options from the user's arguments, or ValueError naming the argument and value."""
        from .loss_scaler import LossScaler

        epsilon = number("epsilon", epsilon, low=0.0)
        if epsilon == 0:
            warn_trap("LAMB: epsilon=0 (accepted, as in MXNet): a gradient element that has "
                      "been 0 at every step gives u = 0/0 = NaN, and its whole tensor becomes "
                      "NaN; a small positive epsilon (the default 1e-6) avoids it")
        lower_bound = bound_or_none("lower_bound", lower_bound)
        upper_bound = bound_or_none("upper_bound", upper_bound)
        if lower_bound and upper_bound and lower_bound > upper_bound:
            raise ValueError("LAMB: lower_bound=%r is greater than upper_bound=%r"
                             % (lower_bound, upper_bound))
        if loss_scaler is not None and not isinstance(loss_scaler, LossScaler):
            raise ValueError("LAMB: loss_scaler must be an mxlamb.LossScaler or None, got %r"
                             % (loss_scaler,))
        return cls(
            beta1=number("beta1", beta1, 0.0, 1.0, high_open=True),
            beta2=number("beta2", beta2, 0.0, 1.0, high_open=True),
            epsilon=epsilon, lower_bound=lower_bound, upper_bound=upper_bound,
            bias_correction=flag("bias_correction", bias_correction),
            global_clipnorm=positive_or_none("global_clipnorm", global_clipnorm),
            clipnorm=positive_or_none("clipnorm", clipnorm),
            use_ema=flag("use_ema", use_ema),
            ema_momentum=number("ema_momentum", ema_momentum, 0.0, 1.0, high_open=True),
            ema_overwrite_frequency=count_or_none("ema_overwrite_frequency",
                                                  ema_overwrite_frequency),
            gradient_accumulation_steps=count_or_none("gradient_accumulation_steps",
                                                      gradient_accumulation_steps),
            loss_scale_factor=positive_or_none("loss_scale_factor", loss_scale_factor),
            loss_scaler=loss_scaler,
            skip_nonfinite=flag("skip_nonfinite", skip_nonfinite),
            exclude_from_weight_decay=patterns("exclude_from_weight_decay",
                                               exclude_from_weight_decay),
            exclude_from_layer_adaptation=patterns("exclude_from_layer_adaptation",
                                                   exclude_from_layer_adaptation),
            **adamw)

    @property
    def needs_whole_step(self):
        """Whether a step needs every gradient before its first update."""
        return (self.global_clipnorm is not None or self.clipnorm is not None
                or self.skip_nonfinite or self.loss_scaler is not None)

    @property
    def may_skip(self):
        """Whether a step can be skipped on the device (then step counts live there)."""
        return self.skip_nonfinite or self.loss_scaler is not None

    @property
    def whole_step_reason(self):
        for name in ("global_clipnorm", "clipnorm", "loss_scaler"):
            if getattr(self, name) is not None:
                return name
        return "skip_nonfinite"

    @property
    def state_layout(self):
        """The names of a parameter's state arrays, in order."""
        names = ["mean", "var"]
        if self.amsgrad:
            names.append("var_max")
        if self.use_ema:
            names.append("average")
        if self.gradient_accumulation_steps is not None:
            names.append("accum")
        return names

    # ------------------------------------------------------------ operator attributes

    def group_attributes(self, num_tensors, model_dtype=None, layer_adaptation=None):
        """The attributes of mxlamb_phase1 / mxlamb_phase2 / mxlamb_step that stay the same
        from step to step for one group: the hyper-parameters, the model weight's dtype name
        under multi-precision (else None) and the per-tensor layer adaptation (None when every
        tensor adapts). :meth:`step_values` adds what changes."""
        # An option that is off is an attribute left out (the operators' default is off).
        attrs = {
            "num_tensors": num_tensors,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "epsilon": self.epsilon,
            "bias_correction": self.bias_correction,
        }
        if self.lower_bound:
            attrs["lower_bound"] = self.lower_bound
        if self.upper_bound:
            attrs["upper_bound"] = self.upper_bound
        if layer_adaptation is not None:
            attrs["layer_adaptation"] = ",".join("1" if a else "0" for a in layer_adaptation)
        if self.epsilon_hat:
            attrs["epsilon_hat"] = True
        if self.amsgrad:
            attrs["amsgrad"] = True
        if self.use_ema:
            attrs["use_ema"] = True
            attrs["ema_momentum"] = self.ema_momentum
        if model_dtype is not None:
            attrs["multi_precision"] = True
            attrs["model_dtype"] = model_dtype
        return attrs

    @staticmethod
    def step_values(lrs, wds, grad_scale, clip_gradient):
        """The attributes that may change every step: per-tensor ``lrs`` and ``wds`` (the
        schedule, lr_mult, wd_mult), the gradient scale and MXNet's clip_gradient (None, or
        <= 0, for no clipping)."""
        values = {"rescale_grad": grad_scale, "lrs": joined(lrs), "wds": joined(wds)}
        # None, 0 (MXNet's "not given") and a negative clip_gradient do not clip; MXNet passes
        # a bound only when it is truthy: 0 is no bound.
        if clip_gradient is not None and clip_gradient > 0:
            values["clip_gradient"] = clip_gradient
        return values

    def grad_stats_attributes(self, num_tensors, grad_scale):
        """Attributes of mxlamb_grad_stats (the whole step's gradient statistics)."""
        attrs = {"num_tensors": num_tensors, "rescale_grad": grad_scale}
        if self.global_clipnorm is not None:
            attrs["global_clipnorm"] = self.global_clipnorm
        if self.may_skip:
            attrs["skip_nonfinite"] = True
        if self.loss_scaler is not None:
            attrs["growth_interval"] = self.loss_scaler.growth_interval
        return attrs

    def stats_attributes(self, rows):
        """What phase 1 and phase 2 add when they read the step's gradient statistics."""
        attrs = {"has_stats": True, "stat_rows": ",".join(map(str, rows))}
        if self.clipnorm is not None:
            attrs["clipnorm"] = self.clipnorm
        return attrs

    @staticmethod
    def counts_attributes(host_counts=None, count_slots=None):
        """Step counts: on the host (``host_counts``, t - 1 of each tensor) or in a device
        array (``count_slots``, where skipped steps are not counted)."""
        if count_slots is not None:
            return {"device_counts": True, "count_slots": ",".join(map(str, count_slots))}
        return {"step_counts": joined([count + 1 for count in host_counts])}

    @staticmethod
    def trust_ratio_attributes(step_attrs):
        """Attributes of mxlamb_trust_ratio for a group stepped with ``step_attrs``."""
        return {key: step_attrs[key] for key in
                ("num_tensors", "lower_bound", "upper_bound", "layer_adaptation")
                if key in step_attrs}
