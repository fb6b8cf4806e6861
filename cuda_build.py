"""The nvcc build of the CUDA kernels (src/operators/lamb_cuda.cu) with their plain C interface
(lamb_cuda.h), usable without MXNet.

Its own module, not part of setup.py, because the GPU tests and benchmark run where setup.py
cannot be imported: the GPU machine has Python 3.12 and no MXNet, and setup.py stops any Python
outside 3.8-3.11 at import. setup.py builds the kernels with this for MXLAMB_CUDA=1.
"""
import os
import subprocess

OPERATOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "operators")

# sm_90 code plus PTX for newer GPUs (the driver compiles it at load).
NVCC_ARCH = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]

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
