"""Where arrays live, and who calls the optimizer: the rules several devices in one process
need (cpu, cpu_pinned and cpu_shared are one memory; MXNet's kvstore calls the updater from a
ctypes callback, which drops exceptions)."""
import sys

__all__ = ["device_key", "same_memory", "in_kvstore_callback", "raise_after_callback"]


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


def _callback_frame(frame):
    """The frame of MXNet's kvstore updater callback that ``frame`` runs in, else None."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "updater_handle" and "kvstore" in code.co_filename:
            return frame
        frame = frame.f_back
    return None


def in_kvstore_callback():
    """Whether the caller runs inside the callback through which MXNet's kvstore calls its
    updater (update_on_kvstore=True): ctypes prints and drops an exception raised there."""
    return _callback_frame(sys._getframe(1)) is not None


def raise_after_callback(optimizer):
    """MXNet's kvstore calls the updater from a ctypes callback (update_on_kvstore=True),
    which prints an exception and drops it: training would go on with weights that never
    change. The optimizer applies nothing of the call and keeps the error in
    ``optimizer._callback_error``; this raises it in the Python code that called into the
    kvstore (its ``pushpull`` or ``push``, inside ``Trainer.step`` or ``Module.update``) as soon
    as the callback has returned: a trace function on that frame, for its next event only.
    (The next ``Trainer.step`` raises it too, if it is still kept: ``LAMB.rescale_grad``.)"""
    callback = _callback_frame(sys._getframe(1))
    caller = callback.f_back if callback is not None else None
    if caller is None or getattr(caller.f_trace, "mxlamb_carrier", False):
        return  # not in a callback, or already on its way
    thread_trace, frame_trace = sys.gettrace(), caller.f_trace

    def carry(frame, event, arg):
        sys.settrace(thread_trace)
        frame.f_trace = frame_trace
        error, optimizer._callback_error = optimizer._callback_error, None
        if error is not None:
            raise error
        return frame_trace

    carry.mxlamb_carrier = True
    caller.f_trace = carry
    if thread_trace is None:
        sys.settrace(lambda frame, event, arg: None)  # tracing on, for the frame's trace
