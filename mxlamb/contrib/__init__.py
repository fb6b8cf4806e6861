"""What stands apart from the optimizer: :class:`ContiguousTrainer` (many small parameters
stepped as one) and :mod:`mxlamb.contrib.dist` (the ps-lite launcher, ``prepare()``, and the
checks a kvstore server runs).

``ContiguousTrainer`` is imported on first use: it is a ``gluon.Trainer``, and a kvstore server
imports mxlamb (unpickling the optimizer) while mxnet, and so gluon, is half imported."""
from . import dist

__all__ = ["ContiguousTrainer", "MAX_ELEMENTS", "dist"]


def __getattr__(name):
    if name in ("ContiguousTrainer", "MAX_ELEMENTS"):
        from . import contiguous
        return getattr(contiguous, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
