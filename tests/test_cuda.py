"""The CUDA kernels (src/operators/lamb_cuda.cu) through their plain C interface.

CI has nvcc but no GPU: it compiles the sources (a broken kernel fails CI). On a machine with a
GPU and CuPy, the kernels run on device arrays against the same float64 reference and grid as
the CPU tests; without a GPU those tests skip.
"""
import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from reference import ReferenceLAMB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from setup import compile_cuda_library  # noqa: E402

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None and not os.environ.get("CI"),
                                reason="nvcc not found (CI requires it)")


@needs_nvcc
def test_cuda_kernels_compile(tmp_path):
    lib = compile_cuda_library(str(tmp_path / "libmxlamb_cuda.so"))
    symbols = subprocess.run(["nm", "-D", lib], capture_output=True, text=True).stdout
    for name in ("mxlamb_cuda_phase1", "mxlamb_cuda_phase2", "mxlamb_cuda_workspace_bytes"):
        assert name in symbols


@needs_nvcc
@pytest.mark.parametrize("source", ["lamb_op.cc", "lamb_op_gpu.cc"])
def test_mxnet_gpu_binding_compiles(source):
    """The operators' GPU forwards (lamb_op_gpu.cc) and their registration (lamb_op.cc) as an
    MXLAMB_CUDA=1 build compiles them."""
    mxnet = pytest.importorskip("mxnet")
    include = mxnet.libinfo.find_include_path()
    subprocess.check_call(["g++", "-std=c++17", "-Wall", "-fsyntax-only", "-DMXLAMB_WITH_CUDA",
                           "-DMXLAMB_MXNET_VERSION=10901", "-I", include,
                           "-I", os.path.join(ROOT, "src", "operators"),
                           os.path.join(ROOT, "src", "operators", source)])


class StepCoeffs(ctypes.Structure):
    """lamb_math.h's StepCoeffs<float>."""
    _fields_ = [("beta1", ctypes.c_float), ("beta2", ctypes.c_float),
                ("one_minus_beta1", ctypes.c_float), ("one_minus_beta2", ctypes.c_float),
                ("clip_gradient", ctypes.c_float),
                ("lower_bound", ctypes.c_double), ("upper_bound", ctypes.c_double)]


class TensorCoeffs(ctypes.Structure):
    """lamb_math.h's TensorCoeffs<float>."""
    _fields_ = [("inv_bias1", ctypes.c_float), ("inv_bias2", ctypes.c_float),
                ("epsilon", ctypes.c_float), ("grad_scale", ctypes.c_float),
                ("wd", ctypes.c_float), ("lr", ctypes.c_double)]


class Group(ctypes.Structure):
    """lamb_cuda.h's MxlambCudaGroup."""
    _fields_ = [("num_tensors", ctypes.c_int),
                ("weights", ctypes.POINTER(ctypes.c_void_p)),
                ("grads", ctypes.POINTER(ctypes.c_void_p)),
                ("means", ctypes.POINTER(ctypes.c_void_p)),
                ("vars", ctypes.POINTER(ctypes.c_void_p)),
                ("weights_lowp", ctypes.POINTER(ctypes.c_void_p)),
                ("sizes", ctypes.POINTER(ctypes.c_int64)),
                ("grad_dtype", ctypes.c_int), ("lowp_dtype", ctypes.c_int),
                ("step", StepCoeffs),
                ("coeffs", ctypes.POINTER(TensorCoeffs))]


def step_coeffs(beta1=0.9, beta2=0.999, clip_gradient=None, lower_bound=None, upper_bound=None):
    """lamb_math.h's step_coeffs<float>: from float64 values, each rounded once to float."""
    return StepCoeffs(beta1, beta2, 1.0 - beta1, 1.0 - beta2,
                      -1.0 if clip_gradient is None else clip_gradient,
                      lower_bound or -1.0, upper_bound or -1.0)


def tensor_coeffs(step_count, lr, wd, beta1=0.9, beta2=0.999, epsilon=1e-6, grad_scale=1.0,
                  bias_correction=True):
    """lamb_math.h's tensor_coeffs<float> (without Keras' epsilon hat)."""
    inverse_bias = lambda beta: 1.0 / (1.0 - beta ** step_count) if bias_correction else 1.0  # noqa
    return TensorCoeffs(inverse_bias(beta1), inverse_bias(beta2), epsilon, grad_scale, wd, lr)


def test_ctypes_structs_match_the_header(tmp_path):
    """Group, StepCoeffs and TensorCoeffs lie in memory as lamb_cuda.h's structs do (a host
    compile of the header: no nvcc or GPU needed)."""
    fields = {"MxlambCudaGroup": Group, "mxlamb::StepCoeffs<float>": StepCoeffs,
              "mxlamb::TensorCoeffs<float>": TensorCoeffs}
    lines = []
    for struct, mirror in fields.items():
        lines.append('  std::printf("%%s %%zu\\n", "%s", sizeof(%s));' % (struct, struct))
        for name, _ in mirror._fields_:
            lines.append('  std::printf("%%s.%s %%zu\\n", "%s", offsetof(%s, %s));'
                         % (name, struct, struct, name))
    program = tmp_path / "layout.cc"
    program.write_text('#include <cstddef>\n#include <cstdio>\n#include "lamb_cuda.h"\n'
                       "int main() {\n%s\n}\n" % "\n".join(lines))
    subprocess.check_call(["g++", "-std=c++17", "-I", os.path.join(ROOT, "src", "operators"),
                           str(program), "-o", str(tmp_path / "layout")])
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                         check=True).stdout
    measured = dict(line.rsplit(" ", 1) for line in out.splitlines())
    for struct, mirror in fields.items():
        assert int(measured[struct]) == ctypes.sizeof(mirror), struct
        for name, _ in mirror._fields_:
            assert int(measured["%s.%s" % (struct, name)]) == getattr(mirror, name).offset, name


def gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device
        return False


needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU (and CuPy) here")


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    path = compile_cuda_library(str(tmp_path_factory.mktemp("cuda") / "libmxlamb_cuda.so"))
    lib = ctypes.CDLL(path)
    lib.mxlamb_cuda_workspace_bytes.restype = ctypes.c_size_t
    lib.mxlamb_cuda_workspace_bytes.argtypes = [ctypes.POINTER(Group)]
    for fn in (lib.mxlamb_cuda_phase1, lib.mxlamb_cuda_phase2):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(Group), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_void_p]
    return lib


def pointers(arrays):
    return (ctypes.c_void_p * len(arrays))(*[a.data.ptr for a in arrays])


SIZES = [1, 7, 255, 256, 4097, 18011, 65535, 65536, 65537, 300007]
GRID = [dict(wd=wd, bounds=b, bias_correction=bc, rescale_grad=rs, clip_gradient=clip)
        for wd, b, bc, rs, clip in [(0.0, (None, None), True, 1.0, None),
                                    (0.01, (2.0, 20.0), True, 0.5, 0.3),
                                    (0.01, (None, None), False, 1.0, 0.3),
                                    (0.1, (2.0, None), True, 2.0, None)]]
TOLERANCE = {"float32": (2e-5, 2e-6), "float16": (2e-3, 1e-4), "bfloat16": (1.6e-2, 1e-3)}
FLAGS = {"float32": 0, "float16": 2, "bfloat16": 12}


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("options", GRID)
def test_cuda_kernels_match_the_reference(cuda_lib, dtype, options):
    import cupy as cp
    rng = np.random.RandomState(0)
    n = len(SIZES)
    lr, steps = 0.02, 7
    w0 = [rng.randn(s).astype(np.float32) for s in SIZES]
    w0[1][:] = 0  # a zero-initialised weight still moves
    grads = [[rng.randn(s).astype(np.float32) for s in SIZES] for _ in range(steps)]

    def to_storage(x):  # float32 host values -> device array of `dtype`, and their exact values
        if dtype == "float32":
            return cp.asarray(x), x.astype(np.float64)
        if dtype == "float16":
            h = x.astype(np.float16)
            return cp.asarray(h), h.astype(np.float64)
        bits = (x.view(np.uint32) + 0x7fff + ((x.view(np.uint32) >> 16) & 1)) >> 16
        bits = bits.astype(np.uint16)
        return cp.asarray(bits), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)

    lowp = [to_storage(w) for w in w0] if dtype != "float32" else None
    master = [cp.asarray(l[1].astype(np.float32)) for l in lowp] if lowp else [cp.asarray(w) for w in w0]
    means = [cp.zeros(s, cp.float32) for s in SIZES]
    variances = [cp.zeros(s, cp.float32) for s in SIZES]
    ref = ReferenceLAMB(beta1=0.9, beta2=0.999, epsilon=1e-6, lower_bound=options["bounds"][0],
                        upper_bound=options["bounds"][1], bias_correction=options["bias_correction"],
                        rescale_grad=options["rescale_grad"], clip_gradient=options["clip_gradient"])
    for i, m in enumerate(master):
        ref.init(i, cp.asnumpy(m))
    sumsq = cp.zeros((n, 2), cp.float64)
    for t in range(1, steps + 1):
        step_grads = [to_storage(g) for g in grads[t - 1]]
        for i in range(n):
            ref.step(i, step_grads[i][1], lr, options["wd"])
        coeffs = tensor_coeffs(t, lr, options["wd"], grad_scale=options["rescale_grad"],
                               bias_correction=options["bias_correction"])
        group = Group(
            num_tensors=n, weights=pointers(master), grads=pointers([g[0] for g in step_grads]),
            means=pointers(means), vars=pointers(variances),
            weights_lowp=pointers([l[0] for l in lowp]) if lowp else None,
            sizes=(ctypes.c_int64 * n)(*SIZES), grad_dtype=FLAGS[dtype], lowp_dtype=FLAGS[dtype],
            step=step_coeffs(clip_gradient=options["clip_gradient"],
                             lower_bound=options["bounds"][0], upper_bound=options["bounds"][1]),
            coeffs=(TensorCoeffs * n)(*[coeffs] * n))
        bytes_ = cuda_lib.mxlamb_cuda_workspace_bytes(ctypes.byref(group))
        workspace = cp.empty(bytes_, cp.uint8)
        stream = cp.cuda.get_current_stream().ptr
        assert cuda_lib.mxlamb_cuda_phase1(ctypes.byref(group), sumsq.data.ptr,
                                           workspace.data.ptr, bytes_, stream) == 0
        assert cuda_lib.mxlamb_cuda_phase2(ctypes.byref(group), sumsq.data.ptr,
                                           workspace.data.ptr, bytes_, stream) == 0
    cp.cuda.get_current_stream().synchronize()
    for i in range(n):
        np.testing.assert_allclose(cp.asnumpy(master[i]), ref.weight[i], *TOLERANCE["float32"])
        np.testing.assert_allclose(cp.asnumpy(means[i]), ref.mean[i], *TOLERANCE["float32"])
        np.testing.assert_allclose(cp.asnumpy(variances[i]), ref.var[i], *TOLERANCE["float32"])
        if lowp:
            expected = to_storage(cp.asnumpy(master[i]))[0]
            np.testing.assert_array_equal(cp.asnumpy(lowp[i][0]), cp.asnumpy(expected))
    assert np.abs(cp.asnumpy(master[1])).max() > 0  # zero-initialised weight moved
