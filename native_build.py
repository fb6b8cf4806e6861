"""The native builds' compiler flags, the nvcc build of the CUDA kernels (src/operators/
lamb_cuda.cu, C interface lamb_cuda.h) and a build of the CPU kernels without MXNet for the GPU
tests to compare with.

Its own module, not part of setup.py, because the GPU tests and benchmark run where setup.py
cannot be imported: the GPU machine has Python 3.12 and no MXNet, and setup.py stops any Python
outside 3.8-3.11 at import. setup.py takes its flags and CUDA build from here.
"""
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
OPERATOR_DIR = os.path.join(ROOT, "src", "operators")

# Flags that hold on every level. -ffp-contract=off keeps the compiler from fusing a*b+c into
# an FMA on some levels but not others, which would make results depend on the CPU.
# -fno-math-errno lets sqrt vectorise; it changes no value. -march=x86-64 makes the baseline
# the baseline whatever the compiler's default or CXXFLAGS say (RHEL 9's gcc defaults to
# x86-64-v2; -march=native would put AVX-512 into the baseline kernels).
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-march=x86-64", "-mtune=generic",
                "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wno-unused-function"]

ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mf16c",
               "-mprefer-vector-width=512"],
}

# sm_90 code plus PTX for newer GPUs (the driver compiles it at load).
NVCC_ARCH = ["-gencode", "arch=compute_90,code=sm_90",
             "-gencode", "arch=compute_90,code=compute_90"]

# No fused multiply-add contraction, as the CPU build (-ffp-contract=off): with IEEE division and
# square root (nvcc's defaults) every element-wise stage then rounds as the CPU's does, and only
# the norms' summation order differs. The kernels are memory-bound; FMA would buy nothing.
NVCC_FLAGS = ["-O3", "-std=c++17", "-fmad=false", "-Xcompiler", "-fPIC", "-shared"]


def compile_cuda_library(output, nvcc="nvcc", extra_flags=()):
    """Builds ``output`` (a shared library) from lamb_cuda.cu; returns its path."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    command = [nvcc] + NVCC_FLAGS + ["-I", OPERATOR_DIR, os.path.join(OPERATOR_DIR, "lamb_cuda.cu"),
                                     "-o", output] + NVCC_ARCH
    print(" ".join(command + list(extra_flags)))
    subprocess.check_call(command + list(extra_flags))
    return output


def compile_cpu_kernels(output, cxx="g++"):
    """The CPU operators' kernels (every ISA level, the multi-tensor engine, the run-time ISA
    choice) with tests/cpu_kernels.cc's C interface, without MXNet: what the GPU tests compare
    the CUDA kernels with, on a machine that has no MXNet. Returns ``output``."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    build = tempfile.mkdtemp()
    base = [cxx] + COMMON_FLAGS + ["-I", OPERATOR_DIR, "-DMXLAMB_MXNET_VERSION=0"]
    objects = []
    for isa, flags in ISA_FLAGS.items():
        objects.append(os.path.join(build, "lamb_kernels_%s.o" % isa))
        subprocess.check_call(base + flags + ["-DMXLAMB_ISA=" + isa, "-c",
                                              os.path.join(OPERATOR_DIR, "lamb_kernels.cc"),
                                              "-o", objects[-1]])
    for source in (os.path.join(OPERATOR_DIR, "lamb_cpu.cc"),
                   os.path.join(OPERATOR_DIR, "runtime.cc"),
                   os.path.join(ROOT, "tests", "cpu_kernels.cc")):
        objects.append(os.path.join(build, os.path.basename(source) + ".o"))
        subprocess.check_call(base + ["-c", source, "-o", objects[-1]])
    subprocess.check_call([cxx, "-shared", "-fopenmp", "-o", output] + objects)
    return output
