"""The names that pickles of mxlamb 0.3 optimizers (``Trainer.save_states`` files) refer to:
they unpickle, and ``LAMB.__setstate__`` drops what is now derived."""
from .counts import StepCounters  # noqa: F401

__all__ = ["StepCounters", "StepCollector"]


class StepCollector:
    """mxlamb 0.3's collector of whole steps (its record of stepped parameters is the
    Updater's states now)."""
