"""Keras' ``Lamb`` and ``AdamW``, argument for argument, for Gluon and MXNet.

A recipe written for ``keras.optimizers.Lamb`` or ``keras.optimizers.AdamW`` (or R's
``optimizer_lamb``) gets the same numbers here from the same arguments::

    trainer = gluon.Trainer(net.collect_params(), mxlamb.keras.Lamb(
        learning_rate=1e-3, weight_decay=0.01, global_clipnorm=1.0, use_ema=True))

They run on mxlamb's operators (no second copy of the math) with Keras' meanings:

- ``weight_decay`` is decoupled: ``w <- w - w * weight_decay * lr`` before the update, outside
  the trust ratio (whose ``||w||`` is the decayed weight's); ``exclude_from_weight_decay``
  takes Gluon Parameters (``var_list``) and name fragments (``var_names``, searched as Keras
  does, as regular expressions);
- at most one of ``clipnorm``, ``clipvalue`` and ``global_clipnorm``; they act on the mean of
  the accumulated gradients, after ``loss_scale_factor`` divided them;
- ``gradient_accumulation_steps`` (>= 2): an update every N calls with the mean gradient; the
  bias correction counts updates, the schedule counts calls;
- ``use_ema``: the first update sets the average to the weights, every call moves it (also
  those that only accumulate), and ``ema_overwrite_frequency`` counts updates as Keras does;
- ``learning_rate`` is a number, an MXNet ``LRScheduler`` (read as MXNet's Optimizer reads it,
  at its update count), or a callable of the number of calls made so far (0 at the first call),
  as Keras evaluates its ``LearningRateSchedule`` objects.

``**kwargs`` are MXNet's Optimizer arguments (``rescale_grad``, ``multi_precision``,
``param_idx2name``, ``begin_num_update``, ...) and mxlamb's ``aggregate_num``,
``use_fused_step`` and ``state_bits`` (8-bit moments, docs/8bit.md). MXNet's ``wd``,
``clip_gradient`` and ``lr_scheduler`` have Keras' spellings here (``weight_decay``,
``clipvalue``, ``learning_rate``) and are refused, so that one value cannot mean two things. Checked against
Keras 3.15.1 itself (tests/test_keras.py, on trajectories recorded by
tests/keras_reference/record.py).
"""
import numbers

from mxnet import lr_scheduler as _lr_scheduler

from .adamw import AdamW as _AdamW
from .lamb import LAMB as _LAMB

__all__ = ["Lamb", "AdamW"]

# MXNet's arguments with a Keras spelling here.
_RESPELLED = {"wd": "weight_decay", "clip_gradient": "clipvalue", "lr_scheduler": "learning_rate",
              "beta1": "beta_1", "beta2": "beta_2"}
_MXNET_KWARGS = ("rescale_grad", "param_idx2name", "sym", "begin_num_update",
                 "multi_precision", "param_dict", "aggregate_num", "use_fused_step",
                 "state_bits")


class CallSchedule(_lr_scheduler.LRScheduler):
    """A Keras-style schedule (a callable of the calls made so far, 0 at the first) as an MXNet
    LRScheduler, which MXNet calls with its update count (1 at the first)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def __call__(self, num_update):
        return float(self.schedule(num_update - 1))


def _keras_arguments(owner, learning_rate, clipnorm, clipvalue, global_clipnorm, use_ema,
                     ema_momentum, ema_overwrite_frequency, loss_scale_factor,
                     gradient_accumulation_steps, name, kwargs):
    """Keras' own checks, as ValueErrors naming the argument and the value; returns the
    keyword arguments of mxlamb's optimizer that the Keras arguments and the MXNet kwargs
    mean (all but the betas, epsilon and weight decay)."""
    for key in kwargs:
        if key in _RESPELLED:
            raise ValueError("%s: %s is spelled %s here (Keras' name), got %s=%r"
                             % (owner, key, _RESPELLED[key], key, kwargs[key]))
        if key not in _MXNET_KWARGS:
            raise ValueError("%s: argument(s) not recognized: {%r: %r}" % (owner, key, kwargs[key]))
    given = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
    if sum(v is not None for v in given.values()) > 1:
        raise ValueError("%s: only one of clipnorm, clipvalue and global_clipnorm can be set, "
                         "got %s" % (owner, ", ".join("%s=%r" % kv for kv in given.items())))
    if gradient_accumulation_steps is not None and not (
            isinstance(gradient_accumulation_steps, numbers.Integral)
            and not isinstance(gradient_accumulation_steps, bool)
            and gradient_accumulation_steps >= 2):
        raise ValueError("%s: gradient_accumulation_steps must be an integer >= 2 or None, got %r"
                         % (owner, gradient_accumulation_steps))
    if use_ema and (not isinstance(ema_momentum, numbers.Real) or isinstance(ema_momentum, bool)
                    or not 0.0 <= ema_momentum <= 1.0):
        raise ValueError("%s: ema_momentum must be in the range [0, 1], got %r"
                         % (owner, ema_momentum))
    if not isinstance(name, str):
        raise ValueError("%s: name must be a string, got %r" % (owner, name))
    if isinstance(learning_rate, _lr_scheduler.LRScheduler):
        lr, scheduler = None, learning_rate
    elif callable(learning_rate):
        lr, scheduler = None, CallSchedule(learning_rate)
    elif not isinstance(learning_rate, numbers.Real) or isinstance(learning_rate, bool):
        raise ValueError("%s: learning_rate must be a number, an MXNet LRScheduler or a callable "
                         "of the number of calls so far, got %r" % (owner, learning_rate))
    else:
        lr, scheduler = learning_rate, None
    return dict(kwargs, learning_rate=lr, lr_scheduler=scheduler,
                clip_gradient=_off_at_zero(clipvalue), clipnorm=_off_at_zero(clipnorm),
                global_clipnorm=_off_at_zero(global_clipnorm), use_ema=use_ema,
                ema_momentum=ema_momentum, ema_overwrite_frequency=ema_overwrite_frequency,
                loss_scale_factor=loss_scale_factor,
                gradient_accumulation_steps=gradient_accumulation_steps)


class _KerasMixin:
    """What Keras' optimizers add to mxlamb's: weight decay decoupled, an EMA momentum in
    [0, 1], exclude_from_weight_decay, a name."""

    _ema_momentum_closed = True  # (Keras takes 1: the average then stays at the first update)

    def _keras_options(self, name):
        import dataclasses
        self.options = dataclasses.replace(self.options, decoupled_weight_decay=True)
        self.name = name

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay, as Keras does: ``var_list``, Gluon Parameters
        (by identity); ``var_names``, fragments searched in the parameters' names (Keras joins
        them into one regular expression). Replaces what an earlier call excluded."""
        import dataclasses

        from mxnet.gluon import Parameter

        from .options import patterns
        params = tuple(var_list or ())
        for param in params:
            if not isinstance(param, Parameter):
                raise ValueError("%s.exclude_from_weight_decay: var_list takes Gluon "
                                 "Parameters, got %r" % (type(self).__name__, param))
        names = [] if var_names is None else var_names
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ValueError("%s.exclude_from_weight_decay: var_names must be a list of "
                             "strings, got %r" % (type(self).__name__, var_names))
        joined = ["|".join(sorted(set(names)))] if names else None
        self.options = dataclasses.replace(
            self.options, exclude_from_weight_decay=patterns("var_names", joined),
            exclude_parameters=params)
        self.engine.reset()  # (it derived the exclusions from the old ones)


def _off_at_zero(value):
    """Keras' clipping arguments: 0 (or None) is no clipping."""
    return None if value is None or (isinstance(value, numbers.Real) and value == 0) else value


class Lamb(_KerasMixin, _LAMB):
    """``keras.optimizers.Lamb`` (Keras 3) on mxlamb's operators: the same arguments, defaults
    and meanings (see the module documentation); ``**kwargs`` are MXNet's Optimizer
    arguments. Keras' Lamb has no trust-ratio bounds and always corrects the bias."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None,
                 loss_scale_factor=None, gradient_accumulation_steps=None, name="lamb",
                 **kwargs):
        options = _keras_arguments(
            "Lamb", learning_rate, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
            ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name,
            kwargs)
        super().__init__(beta1=beta_1, beta2=beta_2, epsilon=epsilon,
                         wd=0.0 if weight_decay is None else weight_decay, **options)
        self._keras_options(name)
        self.weight_decay = weight_decay


class AdamW(_KerasMixin, _AdamW):
    """``keras.optimizers.AdamW`` (Keras 3) on mxlamb's operators: the same arguments, defaults
    and meanings (see the module documentation); ``**kwargs`` are MXNet's Optimizer
    arguments."""

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, name="adamw", **kwargs):
        if weight_decay is None or isinstance(weight_decay, bool) or not isinstance(
                weight_decay, numbers.Real):
            raise ValueError("AdamW: weight_decay must be a float, got %r" % (weight_decay,))
        options = _keras_arguments(
            "AdamW", learning_rate, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
            ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name,
            kwargs)
        super().__init__(beta1=beta_1, beta2=beta_2, epsilon=epsilon,
                         weight_decay=weight_decay, amsgrad=amsgrad, **options)
        self._keras_options(name)
        self.weight_decay = weight_decay
