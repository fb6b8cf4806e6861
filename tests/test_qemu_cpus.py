"""The ISA choice on CPUs this machine is not: qemu-user (Debian package qemu-user) runs
Python, MXNet and mxlamb on an emulated x86-64 CPU model.

Regression: on a CPU without AVX, ``import mxlamb`` died of SIGILL, because the AVX2 kernel
table was built (VEX instructions) when the library loaded, before the CPU check.
Emulating a whole MXNet import is slow (about 20 s), so each model gets one minimal run.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import mxlamb
from conftest import MXNET2
from mxlamb import _library

HERE = os.path.dirname(os.path.abspath(__file__))
QEMU = shutil.which("qemu-x86_64")

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (Debian: apt-get install "
                                            "qemu-user; .ci/run installs it where it can)"),
    pytest.mark.skipif(MXNET2, reason="runs once, in the MXNet 1.9.1 suite (emulation is slow)"),
]

# Loads the library alone (no MXNet: under a second of emulation) and reports the choice.
PROBE = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
lib.mxlamb_active_isa.restype = lib.mxlamb_isa_error.restype = ctypes.c_char_p
print(json.dumps({"isa": lib.mxlamb_active_isa().decode(), "error": lib.mxlamb_isa_error().decode(),
                  "avx2_settable": lib.mxlamb_set_isa(b"avx2")}))
"""


def emulate(cpu, argv, **env):
    environment = {k: v for k, v in os.environ.items() if k != "MXLAMB_ISA"}
    # The mxlamb under test (this tree), wherever the interpreter's own may be.
    environment["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(mxlamb.__file__)))
    environment.update(env)
    proc = subprocess.run([QEMU, "-cpu", cpu, sys.executable] + argv, env=environment,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=900)
    assert proc.returncode == 0, "under -cpu %s (rc %d): %s" % (cpu, proc.returncode,
                                                             proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_cpu_without_avx_imports_mxlamb_and_steps_on_the_baseline_kernels():
    report = emulate("Nehalem", [os.path.join(HERE, "smoke_step.py")])
    assert report["isa"] == "baseline"
    assert report["error_over_tolerance"] <= 1.0  # smoke_step.py also exits 1 otherwise


def test_a_forced_level_the_cpu_lacks_is_reported_not_executed():
    report = emulate("Nehalem", ["-c", PROBE, _library.LIBRARY_PATH], MXLAMB_ISA="avx2")
    assert report["isa"] == "baseline" and report["avx2_settable"] == 0
    assert "MXLAMB_ISA=avx2 is not available on this CPU" in report["error"]


def test_haswell_picks_avx2():
    report = emulate("Haswell", ["-c", PROBE, _library.LIBRARY_PATH])
    assert report == {"isa": "avx2", "error": "", "avx2_settable": 1}
