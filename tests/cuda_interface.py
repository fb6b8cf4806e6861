"""lamb_cuda.h through ctypes, and the device arrays the tests and benchmarks/bench_gpu.py pass
it: PyTorch where it imports with a CUDA device, else CuPy. No MXNet.

The ctypes structs mirror lamb_cuda.h and lamb_math.h field by field;
tests/test_cuda.py::test_ctypes_structs_match_the_header checks every offset against a host
compile of the header.
"""
import ctypes
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOAT32, FLOAT64, FLOAT16, BFLOAT16 = 0, 1, 2, 12
FLAGS = {"float32": FLOAT32, "float64": FLOAT64, "float16": FLOAT16, "bfloat16": BFLOAT16}


class LambParams(ctypes.Structure):
    """lamb_math.h's LambParams (defaults as there)."""
    _fields_ = [("beta1", ctypes.c_double), ("beta2", ctypes.c_double),
                ("epsilon", ctypes.c_double), ("clip_gradient", ctypes.c_double),
                ("lower_bound", ctypes.c_double), ("upper_bound", ctypes.c_double),
                ("bias_correction", ctypes.c_bool), ("epsilon_hat", ctypes.c_bool),
                ("ema_momentum", ctypes.c_double), ("ema_first_step", ctypes.c_double)]

    def __init__(self, beta1=0.9, beta2=0.999, epsilon=1e-6, clip_gradient=None,
                 lower_bound=None, upper_bound=None, bias_correction=True, epsilon_hat=False,
                 ema_momentum=0.99, ema_first_step=1.0):
        super().__init__(beta1, beta2, epsilon, clip_gradient or -1.0, lower_bound or -1.0,
                         upper_bound or -1.0, bias_correction, epsilon_hat, ema_momentum,
                         ema_first_step)


class GradStatsParams(ctypes.Structure):
    """lamb_math.h's GradStatsParams."""
    _fields_ = [("rescale_grad", ctypes.c_double), ("global_clipnorm", ctypes.c_double),
                ("growth_interval", ctypes.c_double), ("skip_nonfinite", ctypes.c_bool)]


P = ctypes.c_void_p
PP = ctypes.POINTER(ctypes.c_void_p)
DOUBLES = ctypes.POINTER(ctypes.c_double)
INT64S = ctypes.POINTER(ctypes.c_int64)


class Group(ctypes.Structure):
    """lamb_cuda.h's MxlambCudaGroup."""
    _fields_ = [("num_tensors", ctypes.c_int), ("math_dtype", ctypes.c_int),
                ("lowp_dtype", ctypes.c_int),
                ("weights", PP), ("weights_out", PP), ("grads", PP),
                ("grad_dtypes", ctypes.POINTER(ctypes.c_int)),
                ("means", PP), ("vars", PP), ("vmaxes", PP), ("averages", PP),
                ("weights_lowp", PP), ("sizes", INT64S),
                ("lrs", DOUBLES), ("wds", DOUBLES), ("decays", DOUBLES),
                ("step_counts", DOUBLES),
                ("count_slots", INT64S), ("stat_rows", INT64S),
                ("layer_adaptation", ctypes.POINTER(ctypes.c_ubyte)),
                ("params", LambParams), ("rescale_grad", ctypes.c_double),
                ("clipnorm", ctypes.c_double),
                ("control", P), ("grad_sumsq", P), ("counts", P),
                ("mean_scales", PP), ("var_scales", PP), ("vmax_scales", PP)]


class GradStats(ctypes.Structure):
    """lamb_cuda.h's MxlambCudaGradStats."""
    _fields_ = [("num_tensors", ctypes.c_int), ("grads", PP),
                ("grad_dtypes", ctypes.POINTER(ctypes.c_int)), ("sizes", INT64S),
                ("params", GradStatsParams),
                ("grad_sumsq", P), ("control", P), ("step_state", P)]


def c_array(ctype, values):
    """A ctypes array of `values`, or None (NULL) for None."""
    if values is None:
        return None
    values = list(values)
    return (ctype * max(len(values), 1))(*values)


def load(path=None):
    """Builds src/operators/lamb_cuda.cu (nvcc, setup.py's flags) unless `path` is given, and
    declares its entry points."""
    if path is None:
        import tempfile
        sys.path.insert(0, ROOT)
        from native_build import compile_cuda_library
        path = compile_cuda_library(os.path.join(tempfile.mkdtemp(), "libmxlamb_cuda.so"))
    lib = ctypes.CDLL(path)
    group = ctypes.POINTER(Group)
    for name, args in [("mxlamb_cuda_phase1", [group, P, P, ctypes.c_size_t, P]),
                       ("mxlamb_cuda_phase2", [group, P, P, ctypes.c_size_t, P]),
                       ("mxlamb_cuda_step", [group, P, P, ctypes.c_size_t, P]),
                       ("mxlamb_cuda_trust_ratio", [group, P, P, P, ctypes.c_size_t, P]),
                       ("mxlamb_cuda_grad_stats",
                        [ctypes.POINTER(GradStats), P, ctypes.c_size_t, P])]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.mxlamb_cuda_workspace_bytes.argtypes = [group]
    lib.mxlamb_cuda_workspace_bytes.restype = ctypes.c_size_t
    lib.mxlamb_cuda_grad_stats_workspace_bytes.argtypes = [ctypes.POINTER(GradStats)]
    lib.mxlamb_cuda_grad_stats_workspace_bytes.restype = ctypes.c_size_t
    return lib


# ------------------------------------------------------------------------ device arrays

def bfloat16_bits(x):
    """float32 values -> bfloat16 bits (uint16), rounded to nearest even as the kernels do."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    # Rounding would carry a NaN's payload into its exponent (0x7FFFFFFF -> 0x8000, -0.0):
    # every NaN becomes the kernels' quiet NaN instead.
    return np.where(np.isnan(f), np.uint16(0x7FC0), rounded).astype(np.uint16)


def bfloat16_values(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def storage(x, dtype):
    """float host values -> (the numpy array stored on the device, its exact float64 values).
    bfloat16 is stored as its bits (uint16)."""
    x = np.asarray(x)
    if dtype == "bfloat16":
        bits = bfloat16_bits(x)
        return bits, bfloat16_values(bits).astype(np.float64)
    stored = x.astype(dtype)
    return stored, stored.astype(np.float64)


class TorchDevice:
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch

    def array(self, host):
        host = np.ascontiguousarray(host)
        if host.dtype == np.uint16:  # bfloat16 bits: torch's uint16 support is recent
            host = host.view(np.int16)
        return self.torch.from_numpy(host.copy()).cuda()

    def host(self, a):
        out = a.cpu().numpy()
        return out.view(np.uint16) if out.dtype == np.int16 else out

    def ptr(self, a):
        return a.data_ptr() if a.numel() > 0 else None

    def workspace(self, nbytes):
        return self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def synchronize(self):
        self.torch.cuda.synchronize()

    def capture(self, fn):
        """fn captured in a CUDA graph; returns its replay."""
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph):
            fn()
        return graph.replay


class CuPyDevice:
    name = "cupy"

    def __init__(self):
        import cupy
        self.cp = cupy

    def array(self, host):
        return self.cp.asarray(np.ascontiguousarray(host))

    def host(self, a):
        return self.cp.asnumpy(a)

    def ptr(self, a):
        return a.data.ptr if a.size > 0 else None

    def workspace(self, nbytes):
        return self.cp.empty(max(int(nbytes), 1), self.cp.uint8)

    def stream(self):
        return self.cp.cuda.get_current_stream().ptr

    def synchronize(self):
        self.cp.cuda.get_current_stream().synchronize()

    def capture(self, fn):
        stream = self.cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            fn()
            graph = stream.end_capture()
        return lambda: graph.launch()


def find_device():
    """A device adapter, or None where neither PyTorch nor CuPy sees a CUDA GPU."""
    try:
        import torch
        if torch.cuda.is_available():
            return TorchDevice()
    except Exception:  # noqa: BLE001 (no torch, or a broken CUDA install)
        pass
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return CuPyDevice()
    except Exception:  # noqa: BLE001
        pass
    return None
