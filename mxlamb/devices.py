"""Where arrays live, and who calls the optimizer: the rules several devices in one process
need (cpu, cpu_pinned and cpu_shared are one memory; MXNet's kvstore calls the updater from a
ctypes callback)."""
import sys

__all__ = ["device_key", "same_memory", "in_kvstore_callback"]


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
