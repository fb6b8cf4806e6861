"""mxlamb: the LAMB optimizer for Apache MXNet on multi-tensor C++ operators.

``import mxlamb`` loads the operator library and makes ``'lamb'`` mean :class:`mxlamb.LAMB`
(and, on MXNet 1.x, ``'adamw'`` :class:`mxlamb.AdamW`) for ``mx.optimizer.create``,
``gluon.Trainer`` and the Module API. MXNet's own class stays at
``mxnet.optimizer.optimizer.LAMB``; MXNet 2.0's own ``'adamw'`` is left as it is.
"""
__version__ = "0.4.0.dev0"  # the one version number (setup.cfg reads it)

# mxlamb leaves MXNet to the user (a dependency would replace mxnet-cu112, mxnet-mkl or a 2.0
# beta with the CPU mxnet): say so where it is missing, and name the numpy that MXNet needs.
# (A kvstore server imports mxlamb while mxnet is half imported: then this is a no-op.)
try:
    import mxnet  # noqa: F401
except ImportError as _err:
    if getattr(_err, "name", None) != "mxnet":
        raise
    raise ImportError(
        "mxlamb needs Apache MXNet, which it does not install for you (any distribution: mxnet, "
        "mxnet-cu112, mxnet-mkl, 2.0 betas): install yours first, e.g. pip install mxnet==1.9.1 "
        "'numpy<1.24', then import mxlamb") from _err
except AttributeError as _err:
    if "numpy" not in str(_err):
        raise
    import numpy as _numpy
    raise ImportError(
        "MXNet cannot be imported with numpy %s (%s): MXNet 1.x and 2.0.0b1 use np.bool and "
        "friends, which numpy 1.24 removed. Install numpy < 1.24: pip install 'numpy<1.24'"
        % (_numpy.__version__, str(_err).splitlines()[0])) from _err

from mxnet.optimizer import Optimizer  # noqa: E402

from .adamw import AdamW
from .checkpoint import convert_lamb, load_states, save_states
from .lamb import LAMB, TrustRatios
from .loss_scaler import LossScaler
from . import contrib, keras
from .contrib import dist

__all__ = ["LAMB", "AdamW", "LossScaler", "TrustRatios", "save_states", "load_states",
           "convert_lamb", "ContiguousTrainer", "contrib", "dist", "keras"]

# Optimizer.register would warn about replacing MXNet's 'lamb'; replacing it is the point: the
# same arguments mean the same update. 'adamw' is mxlamb's only where MXNet has none (1.x).
# MXNet 2.0's own AdamW means other things under the same arguments (wd 0 by default and
# scaled by the bias-corrected rate, epsilon 1e-6, correct_bias), so it keeps its name there:
# mxlamb.AdamW is then asked for by class, never swapped in behind a name.
Optimizer.opt_registry["lamb"] = LAMB
if "adamw" not in Optimizer.opt_registry:
    Optimizer.opt_registry["adamw"] = AdamW


def __getattr__(name):
    if name == "ContiguousTrainer":  # (imported on first use: see mxlamb.contrib)
        return contrib.ContiguousTrainer
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
