"""The hyper-parameters and training options, validated once (every bad value is a ValueError
naming the argument and the value). :mod:`mxlamb.ops` turns them into operator attributes.

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


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
    """LAMB's hyper-parameters and mxlamb's training options, validated (see LAMB's
    docstring for each). ``layer_adaptation``, ``epsilon_hat`` and ``amsgrad`` are what AdamW
    changes: no trust ratio, Keras' placement of epsilon, AMSGrad's max of the variance;
    ``decoupled_weight_decay`` and ``exclude_parameters`` what mxlamb.keras adds."""

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
    # Keras' weight_decay: MXNet's wd (with wd_mult and the exclusions) applied decoupled,
    # w <- w - w * wd * lr before the step, outside the trust ratio (mxlamb.keras).
    decoupled_weight_decay: bool = False
    # Gluon Parameters excluded from weight decay by identity (Keras' var_list).
    exclude_parameters: tuple = ()
    # 8: the moments of large tensors in 8 bits with a scale per block (lamb_math.h); 32: float.
    state_bits: int = 32

    @classmethod
    def validated(cls, beta1, beta2, epsilon, lower_bound, upper_bound, bias_correction,
                  global_clipnorm, clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
                  gradient_accumulation_steps, loss_scale_factor, loss_scaler, skip_nonfinite,
                  exclude_from_weight_decay, exclude_from_layer_adaptation,
                  ema_momentum_closed=False, state_bits=32, **adamw):
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
        if not isinstance(state_bits, numbers.Integral) or isinstance(state_bits, bool) \
                or state_bits not in (8, 32):
            raise ValueError("LAMB: state_bits must be 32 (float32 moments) or 8 (8-bit moments "
                             "for tensors of 4,096 elements or more), got %r" % (state_bits,))
        return cls(
            state_bits=int(state_bits),
            beta1=number("beta1", beta1, 0.0, 1.0, high_open=True),
            beta2=number("beta2", beta2, 0.0, 1.0, high_open=True),
            epsilon=epsilon, lower_bound=lower_bound, upper_bound=upper_bound,
            bias_correction=flag("bias_correction", bias_correction),
            global_clipnorm=positive_or_none("global_clipnorm", global_clipnorm),
            clipnorm=positive_or_none("clipnorm", clipnorm),
            use_ema=flag("use_ema", use_ema),
            ema_momentum=number("ema_momentum", ema_momentum, 0.0, 1.0,
                                high_open=not ema_momentum_closed),
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
        """The names of a parameter's state arrays, in order, where its moments are float."""
        names = ["mean", "var"]
        if self.amsgrad:
            names.append("var_max")
        if self.use_ema:
            names.append("average")
        if self.gradient_accumulation_steps is not None:
            names.append("accum")
        return names

    def layout(self, quantized):
        """The names of a parameter's state arrays, in order: with 8-bit moments
        (``quantized``), see :func:`with_scales`."""
        return with_scales(self.state_layout) if quantized else self.state_layout


# The moments of a state; with 8-bit moments each is uint8 codes followed by its block scales.
MOMENTS = ("mean", "var", "var_max")


def with_scales(names):
    """A state's array names where its moments are 8-bit: each moment's codes followed by its
    block scales (``mean, mean_scale, var, var_scale, ...``)."""
    out = []
    for name in names:
        out.append(name)
        if name in MOMENTS:
            out.append(name + "_scale")
    return out
