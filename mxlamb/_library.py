"""Loading of the compiled operator library (``mxlamb/libmxlamb.so``), once, at import.

Nothing is compiled here. A missing library, one built for another mxnet, or an ISA level
forced through ``MXLAMB_ISA`` that this CPU lacks raises an ImportError saying what to do,
before any weight can be touched.
"""
import ctypes
import json
import os
import re
import shlex
import sys
from urllib.parse import unquote

# A kvstore server unpickles the optimizer (importing mxlamb) in the middle of mxnet's own
# import: mx.library and mx.__version__ are not there yet, so import what is used by name.
from mxnet import library
from mxnet.libinfo import __version__ as _MXNET_VERSION

__all__ = ["LIBRARY_PATH", "native", "mxnet_version_number", "rebuild_command"]

# MXLAMB_LIBRARY names another build of the library (make sanitize loads an ASan/UBSan one).
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_PATH = os.path.abspath(os.environ.get("MXLAMB_LIBRARY")
                               or os.path.join(PACKAGE_DIR, "libmxlamb.so"))


def _source_tree():
    """The source tree (a clone, an unpacked sdist) whose mxlamb/ this is, or None."""
    root = os.path.dirname(PACKAGE_DIR)
    if (os.path.exists(os.path.join(root, "setup.py"))
            and os.path.isdir(os.path.join(root, "src", "operators"))):
        return root
    return None


def _install_record():
    """The PEP 610 record (direct_url.json) of the installed mxlamb: {} for an install from an
    index, None where none is installed."""
    try:
        from importlib import metadata
        dist = metadata.distribution("mxlamb")
    except Exception:  # noqa: BLE001  (PackageNotFoundError, or no importlib.metadata)
        return None
    try:
        return json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return {}


def rebuild_command():
    """The one command that builds this mxlamb's library for the running Python's mxnet.

    pip's build finds that mxnet itself (setup.py), and --no-deps leaves every other package
    as it is. From a source tree, ``pip install`` also builds the tree in place."""
    python = shlex.quote(sys.executable) + " -m pip install --no-deps --force-reinstall "
    record = _install_record() or {}
    url = record.get("url", "")
    source = unquote(url[len("file://"):]) if url.startswith("file://") else url
    editable = "-e " if record.get("dir_info", {}).get("editable") else ""
    tree = _source_tree()
    if tree is not None:
        same = editable and os.path.realpath(source) == os.path.realpath(tree)
        return python + (editable if same else "") + shlex.quote(tree)
    if "dir_info" in record:
        return python + editable + shlex.quote(source)
    from . import __version__
    if source.endswith(".whl"):  # built for another mxnet: its sdist, where it lies beside it
        sdist = os.path.join(os.path.dirname(source), "mxlamb-%s.tar.gz" % __version__)
        source = sdist if os.path.exists(sdist) else ""
    if "archive_info" in record and source:
        return python + "--no-cache-dir " + shlex.quote(source)
    # From an index: its sdist, built here (--no-cache-dir: not a wheel pip built before).
    return python + "--no-cache-dir --no-binary mxlamb mxlamb==%s" % __version__


def mxnet_version_number(version=None):
    """'1.9.1' -> 10901, the number MXNet passes to an extension library's initialize()."""
    parts = ((version or _MXNET_VERSION).split(".") + ["0", "0"])[:3]
    # The leading digits of each part: '2.0.0beta1' -> 2, 0, 0 (as MXNet itself counts).
    major, minor, patch = (int(re.match(r"\d*", p).group() or 0) for p in parts)
    return major * 10000 + minor * 100 + patch


def _load():
    if not os.path.exists(LIBRARY_PATH):
        if os.environ.get("MXLAMB_LIBRARY"):
            raise ImportError("MXLAMB_LIBRARY=%s: no such file" % os.environ["MXLAMB_LIBRARY"])
        tree = _source_tree()
        if tree is not None:
            raise ImportError(
                "mxlamb: %s is mxlamb's source tree, whose operator library is not built (run "
                "from %s, Python imports ./mxlamb before an installed mxlamb). Build it in place "
                "for mxnet %s with: %s" % (PACKAGE_DIR, tree, _MXNET_VERSION, rebuild_command()))
        raise ImportError("mxlamb's operator library %s is missing (the package was not built); "
                          "build it for mxnet %s with: %s"
                          % (LIBRARY_PATH, _MXNET_VERSION, rebuild_command()))
    try:
        lib = ctypes.CDLL(LIBRARY_PATH)
    except OSError as err:
        raise ImportError("mxlamb's operator library %s cannot be loaded (%s); rebuild it with: %s"
                          % (LIBRARY_PATH, err, rebuild_command())) from err
    lib.mxlamb_built_for_mxnet.restype = ctypes.c_int
    lib.mxlamb_active_isa.restype = ctypes.c_char_p
    lib.mxlamb_isa_error.restype = ctypes.c_char_p
    lib.mxlamb_set_isa.argtypes = [ctypes.c_char_p]
    lib.mxlamb_num_threads.restype = ctypes.c_int
    lib.mxlamb_set_num_threads.argtypes = [ctypes.c_int]
    built_for, running = lib.mxlamb_built_for_mxnet(), mxnet_version_number()
    if built_for != running:
        raise ImportError("mxlamb's operator library %s was built for mxnet %d but mxnet %s (%d) "
                          "is installed; rebuild it for that mxnet with: %s"
                          % (LIBRARY_PATH, built_for, _MXNET_VERSION, running, rebuild_command()))
    isa_error = lib.mxlamb_isa_error().decode()
    if isa_error:
        raise ImportError("mxlamb: " + isa_error)
    before = len(getattr(library, "loaded_libs", ()))
    try:
        library.load(LIBRARY_PATH, verbose=False)
    finally:
        for holder in getattr(library, "loaded_libs", ())[before:]:
            holder.__class__ = _MXlibKeptOpen
    return lib


class _MXlibKeptOpen(getattr(library, "MXlib", object)):
    """MXNet 2.0's holder of mxlamb's library, whose __del__ leaves the library loaded.

    MXlib.__del__ runs ``ctypes.CDLL("libdl.so").dlclose(handle)`` at interpreter exit. Only
    libdl.so.2 exists (glibc 2.34+ ships no libdl.so, even with libc6-dev), so every script
    ended with "Exception ignored in: <function MXlib.__del__> ... OSError: libdl.so"
    (issue 25). The dlclose would not unload the library anyway (the ctypes.CDLL in _load
    holds it open until the process ends), and MXNet 1.x has no holder and never closes it.
    Only mxlamb's own holder gets this class; other libraries' are left as MXNet made them.
    """

    def __del__(self):
        pass


native = _load()
