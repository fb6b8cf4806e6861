"""Where arrays live, and who calls the optimizer: the rules several devices in one process
need (cpu, cpu_pinned and cpu_shared are one memory; MXNet's kvstore calls the updater from a
ctypes callback, which drops exceptions)."""
import sys

__all__ = ["device_key", "same_memory", "in_kvstore_callback", "fail_in_callback"]


def device_key(context):
    """The device whose step counts and step state an update on ``context`` uses:
    ``cpu_pinned(k)`` and ``cpu_shared(k)`` are ``cpu(k)`` (MXNet's kvstore keeps its copy of
    the weights in pinned memory), a GPU is itself."""
    kind = context.device_type
    return ("cpu", context.device_id) if kind.startswith("cpu") else (kind, context.device_id)


def same_memory(a, b):
    """Whether arrays on contexts ``a`` and ``b`` can meet in one operator: every CPU context
    is the one host memory (MXNet's operators take them together), a GPU only itself."""
    return a == b or (a.device_type.startswith("cpu") and b.device_type.startswith("cpu"))


def in_kvstore_callback():
    """Whether this update runs inside the callback through which MXNet's kvstore calls its
    updater (update_on_kvstore=True): ctypes prints and drops an exception raised there."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "updater_handle" and "kvstore" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def fail_in_callback(error, items):
    """MXNet's kvstore calls the updater from a ctypes callback (update_on_kvstore=True),
    which prints an exception and drops it: training would go on with weights that never
    change. The optimizer applies nothing of the call and keeps the error for the next
    gluon.Trainer.step (see LAMB.rescale_grad); here each weight of the call gets an
    mxlamb_error operator that fails with the message, so the kvstore's pull and whatever
    reads the weights next raises it (the Module API included). ``items`` are (index, weight,
    grad, state)."""
    from mxnet import ndarray

    from .state import legacy  # (state imports this module)

    message = ("%s: %s [raised in MXNet's kvstore updater: the update was not applied]"
               % (type(error).__name__, error))
    for item in items:
        weight = legacy(item[1])
        if weight.size:
            ndarray.mxlamb_error(weight, message=message, out=weight)
