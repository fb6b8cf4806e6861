"""Shared helpers: dtypes, one tolerance table per dtype, array conversion."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import mxnet as mx  # noqa: E402
except ImportError:  # the GPU machine has no MXNet: only the CUDA kernel tests run there
    mx = None
    collect_ignore = ["test_optimizer.py", "test_operators.py", "test_integration.py"]
else:
    import mxlamb  # noqa: E402,F401
    from mxlamb import _library  # noqa: E402
    from mxnet.ndarray.ndarray import _DTYPE_MX_TO_NP  # noqa: E402

    BFLOAT16 = np.dtype(_DTYPE_MX_TO_NP[12])

    DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
              "float16": np.dtype(np.float16), "bfloat16": BFLOAT16}

# MXNet 2.0 (make test-mxnet2): its Gluon has no prefix/name_scope, no Module API, and its
# own LAMB lives in mxnet.optimizer.lamb. It flushes denormals to zero on CPU by default;
# the reference is IEEE arithmetic, so the tests turn that off.
MXNET2 = mx is not None and int(mx.__version__.split(".")[0]) >= 2
if mx is not None:
    BUILTIN_LAMB = mx.optimizer.lamb.LAMB if MXNET2 else mx.optimizer.optimizer.LAMB
    if MXNET2:
        mx.util.set_flush_denorms(False)
mxnet1_only = pytest.mark.skipif(
    MXNET2, reason="MXNet 1.x API (Gluon prefix/name_scope, Module, ps-lite servers, GluonNLP "
                   "0.10, Horovod built for 1.9.1); MXNet 2.0 Gluon: tests/test_mxnet2.py")

# (rtol, atol) of the model weight against the float64 reference after the test's steps.
# Float32 values (fp32 weights, master copies, moments) always use the float32 row; low-precision
# weights may round to the neighbouring representable value of their own type. float64 weights
# and their moments are computed in float64: a few ulps from the reference.
TOLERANCE = {
    "float32": (2e-5, 2e-6),
    "float64": (1e-12, 1e-14),
    "float16": (2e-3, 1e-4),
    "bfloat16": (1.6e-2, 1e-3),
}


def mx_array(values, dtype="float32"):
    """An NDArray of ``dtype`` (a DTYPES key) from float values (float64 keeps every bit)."""
    if dtype == "float64":
        values = np.asarray(values, dtype=np.float64)
        return (mx.nd.array(values, dtype=np.float64) if values.size
                else mx.nd.empty(values.shape, dtype=np.float64))
    a = mx.nd.array(np.asarray(values, dtype=np.float32), dtype=np.float32)
    if dtype == "float32" or a.size == 0:
        return a if dtype == "float32" else mx.nd.empty(a.shape, dtype=DTYPES[dtype])
    return a.astype(DTYPES[dtype])


def state_tolerance(dtype):
    """(rtol, atol) of master copies and moments: float64 ones for float64 weights, float32
    ones for every other weight dtype."""
    return TOLERANCE["float64" if dtype == "float64" else "float32"]


def is_low_precision(dtype):
    """float16 and bfloat16 (DTYPES keys): the dtypes that need multi_precision."""
    return dtype in ("float16", "bfloat16")


def to_f64(array):
    """float64 NumPy copy of an NDArray of any supported dtype (exact)."""
    if array.size == 0:
        return np.zeros(array.shape, np.float64)
    if np.dtype(array.dtype) == BFLOAT16:
        array = array.astype(np.float32)
    return array.asnumpy().astype(np.float64)


def supported_isas():
    if mx is None:
        return []
    levels = []
    for isa in ("baseline", "avx2", "avx512"):
        before = _library.native.mxlamb_active_isa()
        if _library.native.mxlamb_set_isa(isa.encode()):
            levels.append(isa)
        _library.native.mxlamb_set_isa(before)
    return levels


@pytest.fixture(params=supported_isas())
def isa(request):
    """Runs the test once on every ISA level this CPU supports, restoring the default."""
    before = _library.native.mxlamb_active_isa()
    assert _library.native.mxlamb_set_isa(request.param.encode())
    yield request.param
    mx.nd.waitall()
    _library.native.mxlamb_set_isa(before)


# Each test file's tier (pytest.ini's markers): `pytest -m unit`, `-m integration`,
# `-m system`. A new file must be listed here (pytest_collection_modifyitems refuses it).
TIERS = {
    "unit": ["test_adamw.py", "test_cuda.py", "test_keras.py", "test_ema.py", "test_float64_options.py",
             "test_fuzz.py", "test_golden.py", "test_gradient_options.py", "test_grouping.py",
             "test_operators.py", "test_optimizer.py", "test_portability.py", "test_state_bits.py",
             "test_validation.py"],
    "integration": ["test_checkpoint.py", "test_checkpoint_safety.py", "test_compat.py", "test_contiguous.py",
                    "test_docs.py", "test_engine.py", "test_exclusions.py", "test_import_errors.py",
                    "test_integration.py", "test_multi_device.py", "test_mxnet2.py"],
    "system": ["test_bert_example.py", "test_dist.py", "test_horovod.py", "test_long_run.py",
               "test_packaging.py", "test_qemu_cpus.py"],
}
_TIER_OF = {name: tier for tier, names in TIERS.items() for name in names}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = os.path.basename(str(item.fspath))
        tier = _TIER_OF.get(name)
        if tier is None:
            raise pytest.UsageError("tests/%s has no tier: add it to TIERS in tests/conftest.py"
                                    % name)
        item.add_marker(getattr(pytest.mark, tier))
