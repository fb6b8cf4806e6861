"""AdamW (Keras semantics) on mxlamb's LAMB operators with the trust ratio off."""
import dataclasses

from .lamb import LAMB
from .options import flag, number

__all__ = ["AdamW"]


class AdamW(LAMB):
    """Adam with decoupled weight decay, as Keras' ``AdamW``::

        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        v' = max(v', v)                                   (amsgrad; then v' replaces v)
        alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t)
        w = w - lr wd w - alpha m / (sqrt(v) + epsilon)

    It runs on the same operators as :class:`LAMB` with layer adaptation off (trust ratio 1)
    and Keras' placement of epsilon (added to ``sqrt(v)`` before bias correction, the
    "epsilon hat" of Kingma & Ba), so the math is not a second copy.

    Parameters
    ----------
    learning_rate : float, default 0.001
    beta1, beta2 : float, default 0.9, 0.999
    epsilon : float, default 1e-7
        Keras' default (LAMB's is 1e-6); see above for where it is added.
    weight_decay : float, default 0.004
        Keras' name and default for MXNet's ``wd`` (``wd=`` is accepted too); decoupled, i.e.
        ``lr * wd * w`` is subtracted, not added to the gradient.
    amsgrad : bool, default False
    **kwargs
        Every other option of :class:`LAMB` (global_clipnorm, clipnorm, use_ema, ...,
        exclude_from_weight_decay) and of :class:`mxnet.optimizer.Optimizer`.
    """

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-7,
                 weight_decay=0.004, amsgrad=False, **kwargs):
        for refused in ("lower_bound", "upper_bound", "bias_correction",
                        "exclude_from_layer_adaptation"):
            if refused in kwargs:
                raise ValueError("AdamW: %s is a LAMB option (AdamW has no trust ratio), got %r"
                                 % (refused, kwargs[refused]))
        if "wd" in kwargs and weight_decay != 0.004:
            raise ValueError("AdamW: give weight_decay or wd, not both (got %r and %r)"
                             % (weight_decay, kwargs["wd"]))
        wd = kwargs.pop("wd", weight_decay)
        wd = number("weight_decay", wd, low=0.0)
        amsgrad = flag("amsgrad", amsgrad, owner="AdamW")
        super().__init__(learning_rate=learning_rate, beta1=beta1, beta2=beta2,
                         epsilon=epsilon, wd=wd, **kwargs)
        # AdamW is LAMB without the trust ratio, with Keras' epsilon and AMSGrad's option.
        self.options = dataclasses.replace(self.options, layer_adaptation=False,
                                           epsilon_hat=True, amsgrad=amsgrad)

    @property
    def amsgrad(self):
        return self.options.amsgrad
