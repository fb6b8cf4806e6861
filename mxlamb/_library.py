"""Loading of the compiled operator library (``mxlamb/libmxlamb.so``), once, at import.

Nothing is compiled here. A missing library, one built for another mxnet, or an ISA level
forced through ``MXLAMB_ISA`` that this CPU lacks raises an ImportError saying what to do,
before any weight can be touched.
"""
import ctypes
import os
import re

# A kvstore server unpickles the optimizer (importing mxlamb) in the middle of mxnet's own
# import: mx.library and mx.__version__ are not there yet, so import what is used by name.
from mxnet import library
from mxnet.libinfo import __version__ as _MXNET_VERSION

__all__ = ["LIBRARY_PATH", "native", "mxnet_version_number"]

# MXLAMB_LIBRARY names another build of the library (make sanitize loads an ASan/UBSan one).
LIBRARY_PATH = os.path.abspath(os.environ.get("MXLAMB_LIBRARY") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "libmxlamb.so"))
_REBUILD = ("rebuild it against the installed mxnet with: "
            "pip install --no-build-isolation --force-reinstall .  (from the mxlamb source tree)")


def mxnet_version_number(version=None):
    """'1.9.1' -> 10901, the number MXNet passes to an extension library's initialize()."""
    parts = ((version or _MXNET_VERSION).split(".") + ["0", "0"])[:3]
    # The leading digits of each part: '2.0.0beta1' -> 2, 0, 0 (as MXNet itself counts).
    major, minor, patch = (int(re.match(r"\d*", p).group() or 0) for p in parts)
    return major * 10000 + minor * 100 + patch


def _load():
    if not os.path.exists(LIBRARY_PATH):
        raise ImportError("mxlamb's operator library %s is missing (the package was not built); %s"
                          % (LIBRARY_PATH, _REBUILD))
    try:
        lib = ctypes.CDLL(LIBRARY_PATH)
    except OSError as err:
        raise ImportError("mxlamb's operator library %s cannot be loaded (%s); %s"
                          % (LIBRARY_PATH, err, _REBUILD)) from err
    lib.mxlamb_built_for_mxnet.restype = ctypes.c_int
    lib.mxlamb_active_isa.restype = ctypes.c_char_p
    lib.mxlamb_isa_error.restype = ctypes.c_char_p
    lib.mxlamb_set_isa.argtypes = [ctypes.c_char_p]
    lib.mxlamb_num_threads.restype = ctypes.c_int
    lib.mxlamb_set_num_threads.argtypes = [ctypes.c_int]
    built_for, running = lib.mxlamb_built_for_mxnet(), mxnet_version_number()
    if built_for != running:
        raise ImportError("mxlamb's operator library was built for mxnet %d but mxnet %s (%d) is "
                          "installed; %s" % (built_for, _MXNET_VERSION, running, _REBUILD))
    isa_error = lib.mxlamb_isa_error().decode()
    if isa_error:
        raise ImportError("mxlamb: " + isa_error)
    library.load(LIBRARY_PATH, verbose=False)
    return lib


native = _load()
