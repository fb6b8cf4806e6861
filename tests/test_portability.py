"""The operator library runs wherever MXNet's own wheel runs and exports only what is called.

It needs no shared library that libmxnet.so does not need, and from each (glibc, libstdc++,
libgcc, libgomp) no symbol version newer than libmxnet.so asks for: built on a new glibc and
GCC it used to need GLIBC_2.29 (pow) and GLIBCXX_3.4.29, against mxnet 1.9.1's GLIBC_2.14 and
GLIBCXX_3.4.19 (src/operators/portability.*, setup.py). It exported 275 symbols; now only
MXNet's library entry points (lib_api.h) and the functions mxlamb calls through ctypes.
"""
import os
import re
import shutil
import subprocess

import mxnet as mx
import pytest

from mxlamb import _library

OBJDUMP = shutil.which("objdump")
pytestmark = pytest.mark.skipif(OBJDUMP is None, reason="needs objdump (binutils)")

# What mxlamb/_library.py, mxlamb/contrib/contiguous.py, the tests, benchmarks/bench_step.py and
# benchmarks/bench_state_bits_phases.py call through ctypes.
CTYPES_FUNCTIONS = {"mxlamb_built_for_mxnet", "mxlamb_active_isa", "mxlamb_isa_error",
                    "mxlamb_set_isa", "mxlamb_num_threads", "mxlamb_set_num_threads",
                    "mxlamb_rmw_seconds", "mxlamb_fresh_grads", "mxlamb_first_written",
                    "mxlamb_encode_moment", "mxlamb_decode_moment",
                    "mxlamb_phase_arithmetic_seconds"}
# Version families whose newest version libmxnet.so does not bound usefully: OMP_2.0
# (omp_get_wtime) has been in libgomp since its first release (GCC 4.2).
FLOOR = {"OMP": (2, 0)}
# The one known exception, in the MXNet 2.0.0b1 build only: 2.0's own lib_api.cc keeps its
# error messages in a std::vector<std::stringstream>, whose growth moves streams, and that
# needs std::ios_base::_M_move (GLIBCXX_3.4.21, GCC 5's libstdc++). mxlamb's code does not.
EXCEPTIONS = {("_ZNSt8ios_base7_M_moveERS_", ("GLIBCXX", (3, 4, 21)))}


def dynamic_symbols(path):
    """[(name, defined, (family, version) or None)] from objdump -T."""
    out = subprocess.run([OBJDUMP, "-T", path], stdout=subprocess.PIPE, check=True,
                         universal_newlines=True).stdout
    symbols = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4 or not re.match(r"^[0-9a-f]{16}$", fields[0]):
            continue
        versioned = re.search(r"\(?\b([A-Z][A-Z_]*?)_(\d+(?:\.\d+)*)\)?\s+\S+$", line)
        version = (versioned.group(1), tuple(int(p) for p in versioned.group(2).split("."))
                   ) if versioned else None
        symbols.append((fields[-1], "*UND*" not in line, version))
    return symbols


def needed_libraries(path):
    out = subprocess.run([OBJDUMP, "-p", path], stdout=subprocess.PIPE, check=True,
                         universal_newlines=True).stdout
    return set(re.findall(r"^\s*NEEDED\s+(\S+)", out, re.M))


def newest_by_family(path):
    newest = {}
    for name, _, version in dynamic_symbols(path):
        if version is not None and (name, version) not in EXCEPTIONS:
            family, number = version
            newest[family] = max(newest.get(family, number), number)
    return newest


def libmxnet():
    return [p for p in mx.libinfo.find_lib_path() if p.endswith("libmxnet.so")][0]


def test_exports_only_mxnets_entry_points_and_the_ctypes_functions():
    include = mx.libinfo.find_include_path()
    include = include[0] if isinstance(include, (list, tuple)) else include
    with open(os.path.join(include, "mxnet", "lib_api.h")) as f:
        entry_points = set(re.findall(r'#define\s+MXLIB_\w+_STR\s+"(\w+)"', f.read()))
    assert "initialize" in entry_points and "_opRegSize" in entry_points
    exported = {name for name, defined, _ in dynamic_symbols(_library.LIBRARY_PATH) if defined}
    assert exported == entry_points | CTYPES_FUNCTIONS


def test_needs_nothing_newer_than_libmxnet():
    ours, theirs = _library.LIBRARY_PATH, libmxnet()
    assert needed_libraries(ours) <= needed_libraries(theirs), needed_libraries(ours)
    bound = newest_by_family(theirs)
    newer = {}
    for family, number in newest_by_family(ours).items():
        limit = max(bound.get(family, ()), FLOOR.get(family, ()))
        if number > limit:
            newer[family] = (number, limit)
    assert not newer, "newer than libmxnet.so (%s) needs: %s" % (theirs, newer)
    # And the versions the issue named, explicitly: no GLIBC_2.29, no GLIBCXX_3.4.2x.
    assert newest_by_family(ours)["GLIBC"] <= (2, 17)
    assert newest_by_family(ours).get("GLIBCXX", (3, 4)) <= (3, 4, 19)


def test_the_build_honours_cxxflags_and_ldflags_before_its_own(monkeypatch, tmp_path):
    """CXXFLAGS/LDFLAGS reach every compile and the link (setup.py ignored them), ahead of
    mxlamb's own flags: a -march=native there cannot put AVX-512 into the baseline kernels."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import setup
    finally:
        sys.path.pop(0)
    commands = []
    monkeypatch.setattr(setup.subprocess, "check_call", commands.append)
    monkeypatch.setenv("CXXFLAGS", "-march=native -DFROM_CXXFLAGS")
    monkeypatch.setenv("LDFLAGS", "-Wl,-O1")
    setup.compile_operator_library(str(tmp_path / "lib.so"), str(tmp_path / "obj"))
    *compiles, link = commands
    assert len(compiles) == 3 + len(setup.PORTABLE_SOURCES) + 1  # kernels, sources, lib_api
    for command in compiles:
        assert "-DFROM_CXXFLAGS" in command
        assert command.index("-march=native") < command.index("-march=x86-64")
        assert command.index("-march=x86-64") < command.index("-ffp-contract=off")
    assert "-Wl,-O1" in link and any(a.startswith("-Wl,--version-script=") for a in link)
