"""mxlamb: the LAMB optimizer for Apache MXNet on multi-tensor C++ operators.

``import mxlamb`` loads the operator library and makes ``'lamb'`` mean :class:`mxlamb.LAMB`
(and ``'adamw'`` :class:`mxlamb.AdamW`) for ``mx.optimizer.create``, ``gluon.Trainer`` and the
Module API. MXNet's own class stays at ``mxnet.optimizer.optimizer.LAMB``.
"""
from mxnet.optimizer import Optimizer

from .adamw import AdamW
from .checkpoint import load_states, save_states
from .lamb import LAMB, TrustRatios
from .loss_scaler import LossScaler
from . import dist  # noqa: F401  (mxlamb.dist: the launcher and prepare())

__all__ = ["LAMB", "AdamW", "LossScaler", "TrustRatios", "save_states", "load_states", "dist"]
__version__ = "0.2.0"

# Optimizer.register would warn about replacing MXNet's 'lamb'; replacing it is the point.
Optimizer.opt_registry["lamb"] = LAMB
Optimizer.opt_registry["adamw"] = AdamW
