"""Build of mxlamb: the operator library is compiled against the installed MXNet wheel.

``pip install .`` (or ``pip install -e .``) compiles ``src/operators`` with g++ into
``mxlamb/libmxlamb.so``, a plain shared library that ``mxlamb`` loads with
``mx.library.load``. The headers and ``src/lib_api.cc`` come from the mxnet package that the
build sees (``mx.libinfo.find_include_path()``); the library records that mxnet's version and
refuses any other at load time.

The kernels are compiled once per instruction-set level (baseline x86-64, AVX2, AVX-512) and
chosen at run time, so a wheel built on one machine runs at full speed, or at all, on another.

Environment variables:
  CXX             the C++ compiler (default g++)
  MXLAMB_CXXFLAGS extra flags for every file (e.g. -fsanitize=address,undefined)
  MXLAMB_CUDA=1   also compile the CUDA kernels with nvcc (see src/operators/*.cu)
"""
import os
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPERATOR_DIR = os.path.join("src", "operators")

# Flags that hold on every level. -ffp-contract=off keeps the compiler from fusing a*b+c into
# an FMA on some levels but not others, which would make results depend on the CPU.
# -fno-math-errno lets sqrt vectorise; it changes no value.
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-ffp-contract=off",
                "-fno-math-errno", "-Wall", "-Wno-unused-function"]

ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mf16c",
               "-mprefer-vector-width=512"],
}

PORTABLE_SOURCES = ["lamb_op.cc", "lamb_cpu.cc", "runtime.cc"]

# sm_90 code plus PTX for newer GPUs (the driver compiles it at load).
NVCC_ARCH = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]


def compile_cuda_library(output, nvcc="nvcc", extra_flags=()):
    """The CUDA kernels with their plain C interface (lamb_cuda.h), usable without MXNet."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    command = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", "-I", OPERATOR_DIR,
               os.path.join(OPERATOR_DIR, "lamb_cuda.cu"), "-o", output] + NVCC_ARCH
    print(" ".join(command + list(extra_flags)))
    subprocess.check_call(command + list(extra_flags))
    return output


def mxnet_build_info():
    """Include path, lib_api.cc and version number (1.9.1 -> 10901) of the importable mxnet."""
    import mxnet as mx

    include = mx.libinfo.find_include_path()
    if isinstance(include, (list, tuple)):
        include = include[0]
    lib_api = os.path.join(os.path.dirname(mx.__file__), "src", "lib_api.cc")
    if not os.path.exists(lib_api):
        raise RuntimeError("mxnet %s ships no src/lib_api.cc; mxlamb needs mxnet>=1.7"
                           % mx.__version__)
    # The leading digits of each part: '2.0.0beta1' -> 2, 0, 0 (as MXNet itself counts).
    major, minor, patch = (int(re.match(r"\d*", p).group() or 0)
                           for p in (mx.__version__.split(".") + ["0", "0"])[:3])
    return include, lib_api, major * 10000 + minor * 100 + patch


def compile_operator_library(output, build_temp, cxx=None, extra_flags=()):
    """Compile every operator source and link ``output``; returns the output path."""
    cxx = cxx or os.environ.get("CXX", "g++")
    extra = list(extra_flags) + shlex.split(os.environ.get("MXLAMB_CXXFLAGS", ""))
    include, lib_api, version = mxnet_build_info()
    os.makedirs(build_temp, exist_ok=True)
    base = [cxx] + COMMON_FLAGS + ["-I", include, "-I", OPERATOR_DIR,
                                   "-DMXLAMB_MXNET_VERSION=%d" % version] + extra

    jobs = []  # (command, object file)
    for isa, flags in ISA_FLAGS.items():
        obj = os.path.join(build_temp, "lamb_kernels_%s.o" % isa)
        jobs.append((base + flags + ["-DMXLAMB_ISA=" + isa, "-c",
                                     os.path.join(OPERATOR_DIR, "lamb_kernels.cc"), "-o", obj], obj))
    for source in PORTABLE_SOURCES:
        obj = os.path.join(build_temp, source.replace(".cc", ".o"))
        jobs.append((base + ["-c", os.path.join(OPERATOR_DIR, source), "-o", obj], obj))
    obj = os.path.join(build_temp, "lib_api.o")
    jobs.append((base + ["-w", "-c", lib_api, "-o", obj], obj))

    def run(job):
        print(" ".join(job[0]))
        subprocess.check_call(job[0])
        return job[1]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(run, jobs))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    link = [cxx, "-shared", "-fopenmp", "-o", output] + objects + extra
    print(" ".join(link))
    subprocess.check_call(link)
    return output


class BuildOperators(build_ext):
    """Builds the operator library (a plain .so for mx.library.load, not a Python module)."""

    def get_ext_filename(self, ext_name):
        # "libmxlamb.so", without the Python ABI tag: the file is not a Python module.
        return ext_name.replace(".", os.sep) + ".so"

    def build_extension(self, ext):
        output = self.get_ext_fullpath(ext.name)
        extra = []
        if os.environ.get("MXLAMB_CUDA") == "1":
            # The kernels as their own library, and the MXNet operators' GPU forward linked to it.
            cuda_lib = compile_cuda_library(
                os.path.join(os.path.dirname(output), "libmxlamb_cuda.so"))
            extra = ["-DMXLAMB_WITH_CUDA", "-L" + os.path.dirname(os.path.abspath(cuda_lib)),
                     "-lmxlamb_cuda", "-Wl,-rpath,$ORIGIN"]
        compile_operator_library(output, self.build_temp, extra_flags=extra)


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    setup(
        ext_modules=[Extension("mxlamb.libmxlamb", sources=[])],
        cmdclass={"build_ext": BuildOperators},
    )
