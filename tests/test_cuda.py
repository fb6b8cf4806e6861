"""The CUDA kernels (src/operators/lamb_cuda.cu) through their plain C interface (lamb_cuda.h).

CI has nvcc but no GPU: it compiles the kernels and the MXNet GPU binding, checks the ctypes
mirrors against the header and the interface's argument checks (host code, no GPU needed). On a
machine with a CUDA GPU and PyTorch or CuPy (no MXNet), the kernels run against the float64
reference of tests/reference.py, over the options of the CPU tests; without one those tests
skip. The GPU cannot be compared with the CPU operators directly (they live in the MXNet
extension library), so both are held to the same reference:

- float32 weights and master copies, moments, vmax and EMA: rtol 2e-5, atol 2e-6 after the
  test's steps (the CPU tests' float32 row); float64: rtol 1e-10, atol 1e-12;
- low-precision model weights: exactly the master copy rounded to nearest even;
- sums of squares (norms): within 1e-13 relative of NumPy's float64 sums of the same values,
  1e-12 for the 30522 x 768 embedding. The squares of float32 values are exact in double; the
  GPU adds a thread's values of a chunk in order (at most 64), then a fixed tree over the block,
  then each tensor's chunks in a warp (every 32nd chunk in order per lane, then a shuffle tree):
  at most 64 + 5 + 8 + 45 + 5 roundings of 1.1e-16 for the embedding's 1,431 chunks of 2^14,
  a worst case of 1.4e-14 (about 1e-15 in practice). The CPU adds in 16 lanes, so GPU
  and CPU norms agree to that bound and their trust ratios, step sizes and weights to float32
  rounding; the element-wise arithmetic rounds alike (no FMA contraction on either side).
"""
import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cuda_interface import (FLAGS, BFLOAT16, FLOAT32, FLOAT64, PP, GradStats, GradStatsParams,
                            Group, LambParams, bfloat16_bits, c_array, find_device, load,
                            storage)
from reference import ReferenceAdamW, ReferenceLAMB, ReferenceStep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from native_build import (NVCC_FLAGS, OPERATOR_DIR, compile_cpu_kernels,  # noqa: E402
                          compile_cuda_library)

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None and not os.environ.get("CI"),
                                reason="nvcc not found (CI requires it)")
ENTRY_POINTS = ("mxlamb_cuda_phase1", "mxlamb_cuda_phase2", "mxlamb_cuda_step",
                "mxlamb_cuda_trust_ratio", "mxlamb_cuda_grad_stats",
                "mxlamb_cuda_workspace_bytes", "mxlamb_cuda_grad_stats_workspace_bytes")


# --------------------------------------------------------------- no GPU needed (CI runs these)

@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    """The kernels, built here (or MXLAMB_CUDA_LIB, one built by benchmarks/gpu_session.sh)."""
    if os.environ.get("MXLAMB_CUDA_LIB"):
        return load(os.environ["MXLAMB_CUDA_LIB"])
    if NVCC is None and not os.environ.get("CI"):
        pytest.skip("nvcc not found (CI requires it)")
    return load(compile_cuda_library(str(tmp_path_factory.mktemp("cuda") / "libmxlamb_cuda.so")))


@needs_nvcc
def test_cuda_kernels_compile(cuda_lib):
    symbols = subprocess.run(["nm", "-D", cuda_lib._name], capture_output=True, text=True).stdout
    for name in ENTRY_POINTS:
        assert name in symbols


@needs_nvcc
def test_cuda_kernels_compile_without_warnings(tmp_path):
    """nvcc and ptxas say nothing (no warning, no register spill) for any kernel."""
    out = tmp_path / "lib.so"
    result = subprocess.run(
        [NVCC] + NVCC_FLAGS + ["-Xcompiler", "-Wall", "-Xptxas", "-v", "-I", OPERATOR_DIR,
                               os.path.join(OPERATOR_DIR, "lamb_cuda.cu"), "-o", str(out),
                               "-gencode", "arch=compute_90,code=sm_90"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    clean = "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    spills = [line for line in result.stderr.splitlines()
              if "spill" in line and line.strip() != clean]
    assert not spills, "\n".join(spills)


def mxnet_headers(python):
    """(include directory, version number as setup.py makes it: 1.9.1 -> 10901) of the mxnet
    that `python` would import, read without importing it; None where it has none."""
    code = ("import importlib.util, os, re; s = importlib.util.find_spec('mxnet'); "
            "d = list(s.submodule_search_locations)[0] if s else ''; "
            "v = re.search(r'__version__ = .(\\d+)\\.(\\d+)\\.(\\d+)', "
            "open(os.path.join(d, 'libinfo.py')).read()).groups() if d else (); "
            "print(os.path.join(d, 'include') if d else '', *v)")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    if len(out) != 4:
        return None
    major, minor, patch = (int(x) for x in out[1:])
    return out[0], major * 10000 + minor * 100 + patch


MXNET2_PYTHON = os.path.join(ROOT, ".venv-mxnet2", "bin", "python")


@needs_nvcc
@pytest.mark.parametrize("source", ["lamb_op.cc", "lamb_op_gpu.cc"])
@pytest.mark.parametrize("python", ["this interpreter", ".venv-mxnet2"])
def test_mxnet_gpu_binding_compiles(source, python):
    """The operators' GPU forwards (lamb_op_gpu.cc) and their registration (lamb_op.cc) as an
    MXLAMB_CUDA=1 build compiles them, against the lib_api.h of this interpreter's MXNet and
    of MXNet 2.0.0b1's environment where there is one (MXNet is never imported here)."""
    python = sys.executable if python == "this interpreter" else MXNET2_PYTHON
    found = mxnet_headers(python) if os.path.exists(python) else None
    if found is None:
        pytest.skip("no MXNet for %s" % python)
    include, version = found
    subprocess.check_call(["g++", "-std=c++17", "-Wall", "-fsyntax-only", "-DMXLAMB_WITH_CUDA",
                           "-DMXLAMB_MXNET_VERSION=%d" % version, "-I", include,
                           "-I", OPERATOR_DIR, os.path.join(OPERATOR_DIR, source)])


def test_ctypes_structs_match_the_header(tmp_path):
    """Every ctypes mirror lies in memory as lamb_cuda.h's and lamb_math.h's structs do (a host
    compile of the header: no nvcc or GPU needed)."""
    fields = {"MxlambCudaGroup": Group, "MxlambCudaGradStats": GradStats,
              "mxlamb::LambParams": LambParams, "mxlamb::GradStatsParams": GradStatsParams}
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


CUDA_ERROR_INVALID_VALUE = 1


def test_bfloat16_helper_rounds_to_nearest_even_and_keeps_nans():
    """The harness' float32 -> bfloat16: ties to even, overflow to inf, and every NaN (high
    payload bits and sign included) to the quiet NaN 0x7FC0, never to a number."""
    bits = np.array([0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF800000,
                     0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFFC00000], np.uint32)
    out = bfloat16_bits(bits.view(np.float32))
    assert out.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x7F80, 0xFF80,
                            0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0]


@needs_nvcc
def test_interface_refuses_bad_arguments(cuda_lib):
    """What the kernels would otherwise trust is checked on the host, before anything is
    enqueued (so this runs without a GPU)."""
    ws = ctypes.create_string_buffer(1 << 16)  # never touched: every call below is refused
    sizes = c_array(ctypes.c_int64, [5])
    ptrs = c_array(ctypes.c_void_p, [16])
    doubles = c_array(ctypes.c_double, [1.0])

    def group(**changes):
        g = Group(num_tensors=1, math_dtype=FLOAT32, lowp_dtype=0, weights=ptrs, grads=ptrs,
                  grad_dtypes=c_array(ctypes.c_int, [FLOAT32]), means=ptrs, vars=ptrs,
                  sizes=sizes, lrs=doubles, wds=doubles, step_counts=doubles,
                  params=LambParams(), rescale_grad=1.0, clipnorm=-1.0)
        for key, value in changes.items():
            setattr(g, key, value)
        return g

    need = cuda_lib.mxlamb_cuda_workspace_bytes(ctypes.byref(group()))
    assert 0 < need <= len(ws)
    bad = {"a workspace too small": (group(), need - 1),
           "clipnorm without grad_sumsq": (group(clipnorm=1.0), need),
           "float16 math": (group(math_dtype=2), need),
           "an int32 gradient": (group(grad_dtypes=c_array(ctypes.c_int, [4])), need),
           "no step counts": (group(step_counts=None), need),
           "device counts without count_slots": (group(counts=16), need),
           "grad_sumsq without stat_rows": (group(grad_sumsq=16), need),
           "a bad low-precision type": (group(weights_lowp=ptrs, lowp_dtype=FLOAT32), need),
           "a negative tensor count": (group(num_tensors=-1), need),
           "a negative size": (group(sizes=c_array(ctypes.c_int64, [-5])), need),
           "a NULL weight": (group(weights=c_array(ctypes.c_void_p, [None])), need),
           "a NULL gradient": (group(grads=c_array(ctypes.c_void_p, [None])), need),
           "a NULL variance": (group(vars=c_array(ctypes.c_void_p, [None])), need),
           "a NULL EMA entry": (group(averages=c_array(ctypes.c_void_p, [None])), need),
           "a NULL low-precision entry": (group(weights_lowp=c_array(ctypes.c_void_p, [None]),
                                                lowp_dtype=2), need),
           "a float64 master with a float16 copy": (group(math_dtype=FLOAT64, weights_lowp=ptrs,
                                                          lowp_dtype=2), need)}
    for what, (g, nbytes) in bad.items():
        for fn in (cuda_lib.mxlamb_cuda_phase1, cuda_lib.mxlamb_cuda_step):
            assert fn(ctypes.byref(g), 16, ws, nbytes, None) == CUDA_ERROR_INVALID_VALUE, what
    for fn in (cuda_lib.mxlamb_cuda_phase1, cuda_lib.mxlamb_cuda_phase2,
               cuda_lib.mxlamb_cuda_step):
        assert fn(ctypes.byref(group()), None, ws, need, None) == CUDA_ERROR_INVALID_VALUE

    stats = GradStats(num_tensors=1, grads=ptrs, grad_dtypes=c_array(ctypes.c_int, [3]),
                      sizes=sizes, grad_sumsq=16, control=16, step_state=16)
    assert cuda_lib.mxlamb_cuda_grad_stats(ctypes.byref(stats), ws, len(ws), None) == \
        CUDA_ERROR_INVALID_VALUE
    empty = Group(num_tensors=0, math_dtype=FLOAT32)
    assert cuda_lib.mxlamb_cuda_workspace_bytes(ctypes.byref(empty)) == 0
    assert cuda_lib.mxlamb_cuda_step(ctypes.byref(empty), None, None, 0, None) == 0


# The configurations without gradient statistics or device counts: what tests/cpu_kernels.cc
# drives the CPU kernels with (the statistics' multiplier is summed in another order on each
# side, so with it the moments would not be comparable bit for bit).
CPU_CONFIGS = ["plain", "mxnet_options", "no_bias_correction", "amsgrad", "ema", "exclusions",
               "adamw", "keras_epsilon", "one_call_step", "decoupled"]


class CpuKernels:
    """The CPU operators' kernels (tests/cpu_kernels.cc, built without MXNet) behind the
    interface Trainer drives: each step is mxlamb_cpu_step, on host arrays."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.mxlamb_cpu_step.argtypes = [ctypes.POINTER(Group), ctypes.c_void_p]
        self.lib.mxlamb_cpu_step.restype = ctypes.c_int

    def mxlamb_cuda_workspace_bytes(self, group):
        return 0

    def mxlamb_cuda_grad_stats_workspace_bytes(self, stats):
        return 0

    def mxlamb_cuda_step(self, group, sumsq, workspace, nbytes, stream):
        return self.lib.mxlamb_cpu_step(group, sumsq)


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    return CpuKernels(compile_cpu_kernels(str(tmp_path_factory.mktemp("cpu") / "libcpu.so")))


def cpu_trainer(cpu_kernels, dtype, config, **kwargs):
    from cuda_model import NumpyDevice
    cfg = dict(CONFIGS[config], one_call=True)
    return Trainer(cpu_kernels, NumpyDevice(), dtype, cfg, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_cpu_kernels_without_mxnet_match_the_reference(cpu_kernels, dtype, config):
    """tests/cpu_kernels.cc drives the CPU kernels as the CPU forwards do (no GPU needed): held
    to the same reference as everything else, it is a fair stand-in for the CPU operators in
    test_cuda_equals_the_cpu_kernels."""
    trainer = cpu_trainer(cpu_kernels, dtype, config)
    for step in range(1, STEPS + 1):
        trainer.step(step)
    trainer.check_reference()


def test_gpu_tests_run_on_the_numpy_model():
    """The GPU tests below (their harness, reference set-up and checks) run, on a subset of
    options, against tests/cuda_model.py where there is no GPU: a broken test is found here
    rather than in the rare session that has a GPU."""
    env = dict(os.environ, MXLAMB_CUDA_MODEL="1")
    subprocess.check_call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.abspath(__file__), "-k",
                           "((plain or everything or adamw or dynamic or decoupled) and float or per_tensor "
                           "or trust_ratio or skipped or graph or bit_identical or grid) "
                           "and not without_mxnet"],
                          env=env, cwd=ROOT)


# ------------------------------------------------------------------------ on a CUDA GPU

# MXLAMB_CUDA_MODEL=1 runs the GPU tests on tests/cuda_model.py's NumPy model of the interface
# instead: a check of the tests themselves where there is no GPU.
MODEL = os.environ.get("MXLAMB_CUDA_MODEL") == "1"
if MODEL:
    from cuda_model import ModelLibrary, NumpyDevice
    DEVICE = NumpyDevice()
else:
    DEVICE = find_device()
needs_gpu = pytest.mark.skipif(DEVICE is None, reason="no CUDA GPU (with PyTorch or CuPy) here")


SIZES = [0, 1, 7, 4097, 65537, 300007]
ZERO_TENSOR = 2   # zero-initialised: it still moves (trust ratio 1)
TOLERANCE = {"float32": (2e-5, 2e-6), "float64": (1e-10, 1e-12)}
STEPS = 5

# Each configuration: the options of a step (the keys Trainer reads) .
CONFIGS = {
    "plain": {},
    "mxnet_options": dict(wd=0.01, bounds=(2.0, 20.0), clip_gradient=0.3, rescale_grad=0.5),
    "no_bias_correction": dict(wd=0.01, bias_correction=False, bounds=(2.0, None)),
    "amsgrad": dict(amsgrad=True, wd=0.01),
    "ema": dict(ema=0.9),
    "global_clipnorm": dict(global_clipnorm=1.0, rescale_grad=0.5),
    "clipnorm": dict(clipnorm=5.0, wd=0.01),
    "skip_nonfinite": dict(skip_nonfinite=True, nonfinite_step=2),
    "dynamic_loss_scale": dict(growth_interval=2, loss_scale=1024.0, nonfinite_step=3),
    "device_counts": dict(device_counts=True, skip_nonfinite=True, nonfinite_step=1),
    "exclusions": dict(wd=0.01, excluded=(1, 3)),
    "adamw": dict(adamw=True, wd=0.01),
    "keras_epsilon": dict(epsilon_hat=True, wd=0.01),
    "decoupled": dict(decoupled=True, wd=0.05, excluded=(1,), ema=0.9),
    "one_call_step": dict(one_call=True, wd=0.01, clip_gradient=0.3),
    "everything": dict(amsgrad=True, ema=0.9, global_clipnorm=50.0, clipnorm=5.0, wd=0.01,
                       growth_interval=2, loss_scale=8.0, nonfinite_step=2,
                       device_counts=True, excluded=(4,), epsilon_hat=True,
                       bounds=(None, 30.0)),
}


class Trainer:
    """One group of tensors on the device, stepped through the C interface with the options
    of `cfg`, next to the float64 reference stepped with the same options."""

    def __init__(self, lib, dev, dtype, cfg, sizes=SIZES, seed=0, misalign=False, lrs=None,
                 wds=None, t0=None):
        self.lib, self.dev, self.dtype, self.cfg, self.sizes = lib, dev, dtype, cfg, sizes
        n = self.n = len(sizes)
        self.math = np.float64 if dtype == "float64" else np.float32
        self.lowp = dtype in ("float16", "bfloat16")
        self.rng = np.random.RandomState(seed)
        self.misalign = misalign
        self.stats = any(cfg.get(k) for k in ("global_clipnorm", "clipnorm", "skip_nonfinite",
                                                "growth_interval"))
        self.lrs = lrs or [0.02] * n
        self.wds = wds or [cfg.get("wd", 0.0)] * n
        self.excluded = set(cfg.get("excluded", ()))
        self.wds = [0.0 if k in self.excluded else wd for k, wd in enumerate(self.wds)]
        # Keras' weight_decay: the same values as decays, and MXNet's wds 0.
        self.decays = self.wds if cfg.get("decoupled") else None
        if self.decays is not None:
            self.wds = [0.0] * n
        self.adapt = [0 if cfg.get("adamw") or k in self.excluded else 1 for k in range(n)]
        self.t0 = t0 or [0] * n

        w0 = [self.rng.randn(s).astype(np.float32) * 0.5 for s in sizes]
        if n > ZERO_TENSOR:
            w0[ZERO_TENSOR][:] = 0
        if self.lowp:
            pairs = [storage(w, dtype) for w in w0]
            self.weights_lowp = [self.array(p[0]) for p in pairs]
            exact = [p[1] for p in pairs]
        else:
            self.weights_lowp = None
            exact = [w.astype(self.math).astype(np.float64) for w in w0]
        self.weights = [self.array(w.astype(self.math)) for w in exact]
        self.means = [self.array(np.zeros(s, self.math)) for s in sizes]
        self.vars = [self.array(np.zeros(s, self.math)) for s in sizes]
        self.vmaxes = [self.array(np.zeros(s, self.math)) for s in sizes] \
            if cfg.get("amsgrad") or cfg.get("adamw") else None
        self.averages = [self.array(w.astype(self.math)) for w in exact] if cfg.get("ema") else None
        self.slots = list(reversed(range(n)))  # each tensor's row of counts: not the identity
        self.counts = dev.array(np.array([self.t0[self.slots.index(r)] for r in range(n)],
                                         np.float64)) if cfg.get("device_counts") else None
        self.step_state = dev.array(np.array([cfg.get("loss_scale", 1.0), 0.0, 0.0]))
        self.grad_sumsq = dev.array(np.zeros(n))
        self.control = dev.array(np.zeros(2))
        self.sumsq = dev.array(np.zeros(2 * n))
        self.grads = None

        self.ref = self.make_reference()
        for k in range(n):
            self.ref.init(k, exact[k])
            self.ref.inner.t[k] = self.t0[k]
        self.scale, self.clean = cfg.get("loss_scale", 1.0), 0  # the test's own loss scaler

    def array(self, host):
        """A device copy of `host`; misaligned by one element (so the kernels' scalar path
        runs) when asked."""
        if not self.misalign:
            return self.dev.array(host)
        padded = np.concatenate([np.zeros(1, host.dtype), host])
        return self.dev.array(padded)[1:]

    def make_reference(self):
        cfg = self.cfg
        if cfg.get("adamw"):
            inner = ReferenceAdamW(epsilon=1e-7, amsgrad=True,
                                   rescale_grad=cfg.get("rescale_grad", 1.0))
        else:
            lower, upper = cfg.get("bounds", (None, None))
            inner = ReferenceLAMB(amsgrad=cfg.get("amsgrad", False),
                                      epsilon_hat=cfg.get("epsilon_hat", False),
                                      lower_bound=lower, upper_bound=upper,
                                      bias_correction=cfg.get("bias_correction", True),
                                      rescale_grad=cfg.get("rescale_grad", 1.0),
                                      clip_gradient=cfg.get("clip_gradient"))
        skip = cfg.get("skip_nonfinite", False) or bool(cfg.get("growth_interval"))
        return ReferenceStep(inner, global_clipnorm=cfg.get("global_clipnorm"),
                             clipnorm=cfg.get("clipnorm"), loss_scale=cfg.get("loss_scale", 1.0),
                             skip_nonfinite=skip, ema_momentum=cfg.get("ema"),
                             decoupled=cfg.get("decoupled", False),
                             no_decay=self.excluded, no_adaptation=self.excluded)

    # ----------------------------------------------------------------------------- device

    def ptrs(self, arrays):
        return None if arrays is None else c_array(ctypes.c_void_p,
                                                   [self.dev.ptr(a) for a in arrays])

    def group(self):
        cfg, n = self.cfg, self.n
        lower, upper = cfg.get("bounds", (None, None))
        adamw = cfg.get("adamw", False)
        self._keep = g = Group(
            num_tensors=n, math_dtype=FLOAT64 if self.dtype == "float64" else FLOAT32,
            lowp_dtype=FLAGS[self.dtype] if self.lowp else 0,
            weights=self.ptrs(self.weights), grads=self.ptrs(self.grads),
            grad_dtypes=c_array(ctypes.c_int, [FLAGS[self.dtype]] * n),
            means=self.ptrs(self.means), vars=self.ptrs(self.vars),
            vmaxes=self.ptrs(self.vmaxes), averages=self.ptrs(self.averages),
            weights_lowp=self.ptrs(self.weights_lowp),
            sizes=c_array(ctypes.c_int64, self.sizes), lrs=c_array(ctypes.c_double, self.lrs),
            wds=c_array(ctypes.c_double, self.wds),
            decays=c_array(ctypes.c_double, self.decays),
            step_counts=c_array(ctypes.c_double,
                                [self.ref.inner.t[k] + 1 for k in range(n)]),
            count_slots=c_array(ctypes.c_int64, self.slots),
            stat_rows=c_array(ctypes.c_int64, range(n)),
            layer_adaptation=c_array(ctypes.c_ubyte, self.adapt),
            params=LambParams(epsilon=1e-7 if adamw else 1e-6,
                              clip_gradient=cfg.get("clip_gradient"), lower_bound=lower,
                              upper_bound=upper, bias_correction=cfg.get("bias_correction", True),
                              epsilon_hat=adamw or cfg.get("epsilon_hat", False),
                              ema_momentum=cfg.get("ema", 0.99),
                              ema_first_step=1.0 + (min(self.t0) if self.t0 else 0)),
            rescale_grad=cfg.get("rescale_grad", 1.0), clipnorm=cfg.get("clipnorm") or -1.0,
            control=self.dev.ptr(self.control) if self.stats else None,
            grad_sumsq=self.dev.ptr(self.grad_sumsq) if self.stats else None,
            counts=self.dev.ptr(self.counts) if self.counts is not None else None)
        return g

    def grad_stats(self):
        cfg, n = self.cfg, self.n
        self._keep_stats = s = GradStats(
            num_tensors=n, grads=self.ptrs(self.grads),
            grad_dtypes=c_array(ctypes.c_int, [FLAGS[self.dtype]] * n),
            sizes=c_array(ctypes.c_int64, self.sizes),
            params=GradStatsParams(cfg.get("rescale_grad", 1.0), cfg.get("global_clipnorm") or -1.0,
                                   cfg.get("growth_interval", 0), cfg.get("skip_nonfinite", False)),
            grad_sumsq=self.dev.ptr(self.grad_sumsq), control=self.dev.ptr(self.control),
            step_state=self.dev.ptr(self.step_state))
        return s

    def workspace(self):
        if getattr(self, "_ws", None) is None:
            g = self.group()
            nbytes = max(self.lib.mxlamb_cuda_workspace_bytes(ctypes.byref(g)),
                         self.lib.mxlamb_cuda_grad_stats_workspace_bytes(
                             ctypes.byref(self.grad_stats())))
            self._ws = (self.dev.workspace(nbytes), nbytes)
        return self._ws

    def launch(self):
        """One whole step on the device, from the gradients already there: nothing here waits
        for the device or allocates (test_cuda_graph_replays_a_whole_step captures it)."""
        ws, nbytes = self.workspace()
        wsp, stream = self.dev.ptr(ws), self.dev.stream()
        if self.stats:
            assert self.lib.mxlamb_cuda_grad_stats(ctypes.byref(self.grad_stats()), wsp, nbytes,
                                                   stream) == 0
        g = self.group()
        sumsq = self.dev.ptr(self.sumsq)
        if self.cfg.get("one_call"):
            assert self.lib.mxlamb_cuda_step(ctypes.byref(g), sumsq, wsp, nbytes, stream) == 0
        else:
            assert self.lib.mxlamb_cuda_phase1(ctypes.byref(g), sumsq, wsp, nbytes, stream) == 0
            assert self.lib.mxlamb_cuda_phase2(ctypes.byref(g), sumsq, wsp, nbytes, stream) == 0

    def make_grads(self, step):
        grads = [self.rng.randn(s).astype(np.float32) for s in self.sizes]
        if step == self.cfg.get("nonfinite_step") and self.n > 3 and self.sizes[3] > 5:
            grads[3][5] = np.inf
        pairs = [storage(g, self.dtype) for g in grads]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def step(self, step):
        stored, exact = self.make_grads(step)
        self.grads = [self.array(g) for g in stored]
        before = [self.dev.host(w).astype(np.float64) for w in self.weights]
        self.launch()
        self.reference_step(exact)
        return before

    def reference_step(self, exact):
        self.ref.loss_scale = self.scale
        if self.cfg.get("per_tensor"):
            for k in range(self.n):
                self.ref.step({k: exact[k]}, self.lrs[k], self.wds[k])
        else:
            self.ref.step(dict(enumerate(exact)), self.lrs[0], self.cfg.get("wd", 0.0))
        if self.cfg.get("growth_interval"):  # the loss scaler, from its definition
            if not all(np.all(np.isfinite(g)) for g in exact):
                self.scale, self.clean = max(self.scale / 2, 1.0), 0
            else:
                self.clean += 1
                if self.clean >= self.cfg["growth_interval"]:
                    self.scale, self.clean = self.scale * 2, 0

    # ---------------------------------------------------------------------------- checking

    def state(self):
        """Every device array, on the host (for bit comparisons)."""
        out = {}
        for name in ("weights", "means", "vars", "vmaxes", "averages", "weights_lowp"):
            arrays = getattr(self, name)
            if arrays is not None:
                for k, a in enumerate(arrays):
                    out["%s[%d]" % (name, k)] = self.dev.host(a)
        for name in ("counts", "step_state", "sumsq", "grad_sumsq", "control"):
            if getattr(self, name) is not None:
                out[name] = self.dev.host(getattr(self, name))
        return out

    def check_reference(self):
        self.dev.synchronize()
        rtol, atol = TOLERANCE["float64" if self.dtype == "float64" else "float32"]
        inner = self.ref.inner
        for k in range(self.n):
            w = self.dev.host(self.weights[k])
            np.testing.assert_allclose(w, inner.weight[k], rtol, atol, err_msg="weight %d" % k)
            np.testing.assert_allclose(self.dev.host(self.means[k]), inner.mean[k], rtol, atol)
            np.testing.assert_allclose(self.dev.host(self.vars[k]), inner.var[k], rtol, atol)
            if self.vmaxes is not None:
                np.testing.assert_allclose(self.dev.host(self.vmaxes[k]), inner.vmax[k], rtol, atol)
            if self.averages is not None:
                np.testing.assert_allclose(self.dev.host(self.averages[k]), self.ref.average[k],
                                           rtol, atol)
            if self.lowp:  # exactly the master copy rounded to nearest even
                np.testing.assert_array_equal(self.dev.host(self.weights_lowp[k]),
                                              storage(w, self.dtype)[0])
        if self.n > ZERO_TENSOR and self.sizes[ZERO_TENSOR] > 0:
            assert np.abs(self.dev.host(self.weights[ZERO_TENSOR])).max() > 0
        if self.counts is not None:
            counts = self.dev.host(self.counts)
            assert [counts[self.slots[k]] for k in range(self.n)] == \
                [inner.t[k] for k in range(self.n)]
        if self.stats:
            state = self.dev.host(self.step_state)
            assert state[0] == self.scale and state[2] == self.ref.skipped


GPU_DTYPES = ["float32", "float16", "bfloat16", "float64"]


@pytest.fixture(scope="module")
def gpu_lib(request):
    if DEVICE is None:
        pytest.skip("no CUDA GPU (with PyTorch or CuPy) here")
    return ModelLibrary(DEVICE) if MODEL else request.getfixturevalue("cuda_lib")


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_cuda_matches_the_reference(gpu_lib, dtype, config):
    """Every option, several steps (one of them non-finite where the option skips it), fp32,
    fp16 and bf16 with fp32 master copies, and float64, against the float64 reference; the
    last step's sum(w^2) against NumPy's."""
    trainer = Trainer(gpu_lib, DEVICE, dtype, CONFIGS[config])
    for step in range(1, STEPS + 1):
        before = trainer.step(step)
    trainer.check_reference()
    sumsq = DEVICE.host(trainer.sumsq).reshape(-1, 2)
    for k, w in enumerate(before):
        if trainer.decays is not None:  # the norm of the decayed weight (Keras' weight_decay),
            T = trainer.math            # which the kernels round to the math type
            w = w.astype(T)
            w = (w - w * T(trainer.decays[k]) * T(trainer.lrs[k])).astype(np.float64)
        np.testing.assert_allclose(sumsq[k, 0], np.sum(w * w), rtol=1e-13, atol=0)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("device_counts", [False, True])
def test_cuda_per_tensor_lr_wd_and_step_counts(gpu_lib, dtype, device_counts):
    """One group whose tensors have their own lr, wd and step count t."""
    n = len(SIZES)
    cfg = dict(per_tensor=True, device_counts=device_counts)
    trainer = Trainer(gpu_lib, DEVICE, dtype, cfg, lrs=[0.005 * (k + 1) for k in range(n)],
                      wds=[0.0, 0.1, 0.0, 0.01, 0.02, 0.001], t0=[0, 3, 10, 0, 100, 1])
    for step in range(1, STEPS + 1):
        trainer.step(step)
    trainer.check_reference()


@needs_gpu
def test_cuda_awkward_large_tensor(gpu_lib):
    """2^24 + 3 elements (not a multiple of the vector width or the chunk) next to empty and
    one-element tensors, fp16 gradients and model weights."""
    trainer = Trainer(gpu_lib, DEVICE, "float16", dict(wd=0.01), sizes=[0, (1 << 24) + 3, 1])
    for step in range(1, 3):
        trainer.step(step)
    trainer.check_reference()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_norm_of_the_bert_embedding(gpu_lib, dtype):
    """sum(g^2) of a 30522 x 768 gradient (mxlamb_cuda_grad_stats) and sum(w^2) of that
    weight (phase 1) within 1e-12 relative of NumPy's float64 sums (the bound: see the top)."""
    shape = 30522 * 768
    trainer = Trainer(gpu_lib, DEVICE, dtype, dict(global_clipnorm=1.0), sizes=[shape])
    before = trainer.step(1)
    DEVICE.synchronize()
    grad = DEVICE.host(trainer.grads[0])
    grad = storage(grad, "float32")[1] if dtype == "float32" else grad.astype(np.float64)
    np.testing.assert_allclose(DEVICE.host(trainer.grad_sumsq)[0], np.sum(grad * grad),
                               rtol=1e-12)
    np.testing.assert_allclose(DEVICE.host(trainer.sumsq)[0], np.sum(before[0] ** 2), rtol=1e-12)
    trainer.check_reference()


@needs_gpu
@pytest.mark.parametrize("config", ["plain", "everything"])
def test_cuda_runs_are_bit_identical(gpu_lib, config):
    """Two runs from the same state give the same bits, and so do arrays that are not 16-byte
    aligned (the scalar path) and aligned ones (the vector path): the same order either way."""
    runs = []
    for misalign in (False, False, True):
        trainer = Trainer(gpu_lib, DEVICE, "float32", CONFIGS[config], misalign=misalign)
        for step in range(1, STEPS + 1):
            trainer.step(step)
        DEVICE.synchronize()
        runs.append(trainer.state())
    for run in runs[1:]:
        assert run.keys() == runs[0].keys()
        for name in run:
            np.testing.assert_array_equal(run[name].view(np.uint8), runs[0][name].view(np.uint8),
                                          err_msg=name)


@needs_gpu
def test_cuda_results_do_not_depend_on_the_grid(gpu_lib, monkeypatch):
    """1 block, 7 blocks and the device-sized grid give the same bits (every chunk's sum is
    the same tree, every tensor's sum the same tree over its chunks)."""
    runs = []
    for blocks in ("1", "7", None):
        if blocks is None:
            monkeypatch.delenv("MXLAMB_CUDA_MAX_BLOCKS", raising=False)
        else:
            monkeypatch.setenv("MXLAMB_CUDA_MAX_BLOCKS", blocks)
        trainer = Trainer(gpu_lib, DEVICE, "float16", CONFIGS["everything"])
        for step in range(1, 4):  # step 2 is skipped (non-finite), step 3 applies
            trainer.step(step)
        DEVICE.synchronize()
        runs.append(trainer.state())
    for run in runs[1:]:
        for name in run:
            np.testing.assert_array_equal(run[name].view(np.uint8), runs[0][name].view(np.uint8),
                                          err_msg=name)


@needs_gpu
@pytest.mark.parametrize("one_call", [False, True])
def test_cuda_graph_replays_a_whole_step(gpu_lib, one_call):
    """A whole step (gradient statistics, phase 1, phase 2; device counts, dynamic loss scale,
    AMSGrad, EMA, float16 model weights) captured in a CUDA graph and replayed equals the same
    step run eagerly from the same state, bit for bit: a step neither waits for the device nor
    allocates (either would break the capture), and its tables travel with the graph."""
    cfg = dict(CONFIGS["everything"], one_call=one_call, nonfinite_step=None)
    eager = Trainer(gpu_lib, DEVICE, "float16", cfg)
    graphed = Trainer(gpu_lib, DEVICE, "float16", cfg)
    stored, _ = eager.make_grads(1)
    graphed.make_grads(1)  # the same random stream in both
    eager.grads = [eager.array(g) for g in stored]
    graphed.grads = [graphed.array(g) for g in stored]
    graphed.workspace()
    warm = Trainer(gpu_lib, DEVICE, "float16", cfg)  # kernels loaded before the capture
    warm.grads = [warm.array(g) for g in stored]
    warm.launch()
    DEVICE.synchronize()
    replay = DEVICE.capture(graphed.launch)
    for _ in range(4):
        eager.launch()
        replay()
    DEVICE.synchronize()
    a, b = eager.state(), graphed.state()
    assert a["counts"].tolist() == [4.0] * len(SIZES)
    for name in a:
        np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8),
                                      err_msg=name)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_cuda_equals_the_cpu_kernels(gpu_lib, cpu_kernels, dtype, config):
    """The GPU and the CPU kernels on the same inputs, several steps: the moments (and vmax),
    which do not depend on the norms, bit for bit; the weights, the EMA and the last step's
    sums of squares to float32 rounding (rtol 1e-6: each step's trust ratio comes from sums
    added in another order), float64 to 1e-13 (sums 1e-12)."""
    gpu = Trainer(gpu_lib, DEVICE, dtype, CONFIGS[config])
    cpu = cpu_trainer(cpu_kernels, dtype, config)
    for step in range(1, STEPS + 1):
        gpu.step(step)
        cpu.step(step)
    DEVICE.synchronize()
    a, b = gpu.state(), cpu.state()
    rtol = 1e-13 if dtype == "float64" else 1e-6
    for name in b:
        if name.startswith(("means", "vars", "vmaxes")):
            np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8),
                                          err_msg=name)
        elif name.startswith(("weights[", "averages")):
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=rtol * 1e-2,
                                       err_msg=name)
        elif name == "sumsq":
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6 if dtype != "float64" else 1e-12,
                                       err_msg=name)


@needs_gpu
def test_cuda_trust_ratio_read_out(gpu_lib):
    """mxlamb_cuda_trust_ratio: lamb_math.h's trust_ratio of each tensor's sums, 1 where layer
    adaptation is off, NaN where the step was skipped."""
    sumsq = np.array([4.0, 1.0, 0.0, 2.0, 9.0, 0.0, 400.0, 1.0, np.nan, np.nan, 16.0, 4.0])
    adapt = [1, 1, 1, 1, 1, 0]
    group = Group(num_tensors=6, math_dtype=FLOAT32,
                  layer_adaptation=c_array(ctypes.c_ubyte, adapt),
                  params=LambParams(lower_bound=None, upper_bound=10.0))
    ratios = DEVICE.array(np.zeros(6))
    d_sumsq = DEVICE.array(sumsq)
    nbytes = gpu_lib.mxlamb_cuda_workspace_bytes(ctypes.byref(group))
    ws = DEVICE.workspace(nbytes)
    assert gpu_lib.mxlamb_cuda_trust_ratio(ctypes.byref(group), DEVICE.ptr(d_sumsq),
                                           DEVICE.ptr(ratios), DEVICE.ptr(ws), nbytes,
                                           DEVICE.stream()) == 0
    DEVICE.synchronize()
    out = DEVICE.host(ratios)
    np.testing.assert_array_equal(out[:4], [2.0, 1.0, 1.0, 10.0])
    assert np.isnan(out[4]) and out[5] == 1.0


@needs_gpu
def test_cuda_skipped_step_touches_nothing(gpu_lib):
    """A non-finite step under skip_nonfinite: weights, moments and counts keep their bits,
    sumsq reads NaN, step_state counts the skip."""
    cfg = dict(skip_nonfinite=True, device_counts=True, amsgrad=True, ema=0.9, nonfinite_step=2)
    trainer = Trainer(gpu_lib, DEVICE, "float16", cfg)
    trainer.step(1)
    DEVICE.synchronize()
    before = trainer.state()
    trainer.step(2)
    DEVICE.synchronize()
    after = trainer.state()
    for name in before:
        if name.startswith(("weights", "means", "vars", "vmaxes", "averages", "counts")):
            np.testing.assert_array_equal(after[name].view(np.uint8), before[name].view(np.uint8),
                                          err_msg=name)
    assert np.isnan(after["sumsq"]).all()
    assert after["control"][1] == 0.0 and after["step_state"][2] == 1.0


# ---------------------------------------------------------------- 8-bit moments (state_bits=8)

Q8_SIZES = [90000, 70001, 16389, 4096]  # several chunks, a partial last block, one block only


@needs_gpu
@pytest.mark.parametrize("config", ["lamb", "adamw amsgrad", "float16 decoupled"])
def test_cuda_8_bit_moments_equal_the_judge(gpu_lib, config, monkeypatch):
    """The GPU's 8-bit moments against tests/quantized_reference.py over several steps: codes
    and scales bit for bit, weights to float32 rounding; and the same bits with 1 block as
    with the device's grid."""
    if MODEL:
        pytest.skip("cuda_model.py models float moments only; the kernels face the judge here")
    from quantized_reference import QuantizedLAMB
    adamw = config.startswith("adamw")
    half = config.startswith("float16")
    decay = 0.01 if "decoupled" in config else 0.0
    rng = np.random.RandomState(3)
    weights = [(rng.randn(n) * 0.1).astype(np.float32) for n in Q8_SIZES]
    scales = [np.exp(rng.randn(n)).astype(np.float32) * 0.01 for n in Q8_SIZES]
    grads = [[(rng.randn(n) * sc).astype(np.float16 if half else np.float32)
              for n, sc in zip(Q8_SIZES, scales)] for _ in range(4)]
    judge = QuantizedLAMB(epsilon=1e-7 if adamw else 1e-6, layer_adaptation=not adamw,
                          epsilon_hat=adamw, amsgrad=adamw)
    states = [judge.moments(n) for n in Q8_SIZES]
    expected = [w.copy() for w in weights]
    for t, step_grads in enumerate(grads, start=1):
        for k in range(len(Q8_SIZES)):
            expected[k] = judge.step(expected[k], step_grads[k].astype(np.float32), states[k],
                                     t, 0.01, wd=0.0 if decay else 0.01, decay=decay)
    runs = []
    for blocks in ("1", None):
        if blocks is None:
            monkeypatch.delenv("MXLAMB_CUDA_MAX_BLOCKS", raising=False)
        else:
            monkeypatch.setenv("MXLAMB_CUDA_MAX_BLOCKS", blocks)
        runs.append(_run_8_bit(gpu_lib, weights, grads, adamw, half, decay))
    for name in runs[0]:
        for k, (one_block, grid) in enumerate(zip(runs[0][name], runs[1][name])):
            np.testing.assert_array_equal(one_block, grid, err_msg="%d %s" % (Q8_SIZES[k], name))
    for k in range(len(Q8_SIZES)):
        got = {name: runs[1][name][k] for name in runs[1]}
        for name in ("mean", "mean_scale", "var", "var_scale") + (
                ("var_max", "var_max_scale") if adamw else ()):
            np.testing.assert_array_equal(got[name], getattr(states[k], name),
                                          err_msg="%d %s" % (Q8_SIZES[k], name))
        np.testing.assert_allclose(got["weight"], expected[k], rtol=2e-6, atol=1e-7)
        if half:
            np.testing.assert_array_equal(got["lowp"], got["weight"].astype(np.float16))


def _run_8_bit(lib, weights, grads, adamw, half, decay):
    """Four one-call steps of the GPU kernels with 8-bit moments; the arrays, on the host."""
    dev, n = DEVICE, len(weights)
    blocks = [-(-w.size // 256) for w in weights]
    arrays = {"weight": [dev.array(w) for w in weights],
              "mean": [dev.array(np.zeros(w.size, np.uint8)) for w in weights],
              "var": [dev.array(np.zeros(w.size, np.uint8)) for w in weights],
              "mean_scale": [dev.array(np.zeros(b, np.float32)) for b in blocks],
              "var_scale": [dev.array(np.zeros(b, np.float32)) for b in blocks]}
    if adamw:
        arrays["var_max"] = [dev.array(np.zeros(w.size, np.uint8)) for w in weights]
        arrays["var_max_scale"] = [dev.array(np.zeros(b, np.float32)) for b in blocks]
    if half:
        arrays["lowp"] = [dev.array(w.astype(np.float16)) for w in weights]
    ptrs = lambda name: c_array(ctypes.c_void_p, [dev.ptr(a) for a in arrays[name]])  # noqa
    keep = {}
    for step, step_grads in enumerate(grads, start=1):
        device_grads = [dev.array(g) for g in step_grads]
        keep = dict(
            grads=c_array(ctypes.c_void_p, [dev.ptr(g) for g in device_grads]),
            dtypes=c_array(ctypes.c_int, [FLAGS["float16" if half else "float32"]] * n),
            sizes=c_array(ctypes.c_int64, [w.size for w in weights]),
            lrs=c_array(ctypes.c_double, [0.01] * n),
            wds=c_array(ctypes.c_double, [0.0 if decay else 0.01] * n),
            decays=c_array(ctypes.c_double, [decay] * n) if decay else None,
            counts=c_array(ctypes.c_double, [float(step)] * n),
            adapt=c_array(ctypes.c_ubyte, [0 if adamw else 1] * n),
            **{name: ptrs(name) for name in arrays})
        g = Group(num_tensors=n, math_dtype=FLOAT32, lowp_dtype=FLAGS["float16"],
                  weights=keep["weight"], grads=keep["grads"], grad_dtypes=keep["dtypes"],
                  means=keep["mean"], vars=keep["var"], vmaxes=keep.get("var_max"),
                  weights_lowp=keep.get("lowp"), sizes=keep["sizes"], lrs=keep["lrs"],
                  wds=keep["wds"], decays=keep["decays"], step_counts=keep["counts"],
                  layer_adaptation=keep["adapt"],
                  params=LambParams(epsilon=1e-7 if adamw else 1e-6, epsilon_hat=adamw),
                  rescale_grad=1.0, clipnorm=-1.0,
                  mean_scales=ctypes.cast(keep["mean_scale"], PP),
                  var_scales=ctypes.cast(keep["var_scale"], PP),
                  vmax_scales=ctypes.cast(keep["var_max_scale"], PP) if adamw else None)
        nbytes = lib.mxlamb_cuda_workspace_bytes(ctypes.byref(g))
        ws = dev.workspace(nbytes)
        sumsq = dev.array(np.zeros((n, 2)))
        assert lib.mxlamb_cuda_step(ctypes.byref(g), dev.ptr(sumsq), dev.ptr(ws), nbytes,
                                    dev.stream()) == 0
        dev.synchronize()
    return {name: [dev.host(a) for a in values] for name, values in arrays.items()}
