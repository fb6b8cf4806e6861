"""mxlamb: the LAMB optimizer for Apache MXNet on multi-tensor C++ operators.

``import mxlamb`` loads the operator library and makes ``'lamb'`` mean :class:`mxlamb.LAMB`
for ``mx.optimizer.create``, ``gluon.Trainer`` and the Module API. MXNet's own class stays at
``mxnet.optimizer.optimizer.LAMB``.
"""
from mxnet.optimizer import Optimizer

from .lamb import LAMB

__all__ = ["LAMB"]
__version__ = "0.1.0"

# Optimizer.register would warn about replacing MXNet's 'lamb'; replacing it is the point.
Optimizer.opt_registry["lamb"] = LAMB
