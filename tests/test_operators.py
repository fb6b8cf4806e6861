"""The operators directly: every ISA level, thread counts, norms of large tensors."""
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from conftest import TOLERANCE, supported_isas, to_f64
from mxlamb import _library
from reference import ReferenceLAMB

ATTRS = dict(beta1=0.9, beta2=0.999, epsilon=1e-6, rescale_grad=0.5, clip_gradient=0.8,
             bias_correction=True, lower_bound=-1.0, upper_bound=-1.0)


def phases(weights, grads, means, variances, lrs, wds, counts, **options):
    attrs = dict(ATTRS, num_tensors=len(weights), lrs=",".join(map(repr, lrs)),
                 wds=",".join(map(repr, wds)), step_counts=",".join(map(str, counts)))
    attrs.update(options)
    inputs = [x for t in zip(weights, grads, means, variances) for x in t]
    sumsq = mx.nd.mxlamb_phase1(*inputs, **attrs)
    inputs = [x for t in zip(weights, means, variances) for x in t]
    mx.nd.mxlamb_phase2(*inputs, sumsq, out=weights, **attrs)
    return sumsq


def random_group(sizes, seed, dtype=np.float32):
    """Weights, gradients, means and variances of ``dtype`` (float32, or float64: the
    operators' two math types)."""
    rng = np.random.RandomState(seed)
    array = lambda x: mx.nd.array(x.astype(dtype), dtype=dtype)  # noqa: E731
    # float32 values are rounded first (as they always were); float64 ones keep every bit.
    value = (lambda x: x) if dtype == np.float64 else (lambda x: x.astype(np.float32))  # noqa
    weights = [array(value(rng.randn(n))) for n in sizes]
    grads = [array(value(rng.randn(n))) for n in sizes]
    means = [array(value(rng.randn(n)) * 0.1) for n in sizes]
    variances = [array(value(rng.rand(n)) * 0.01) for n in sizes]
    return weights, grads, means, variances


# Sizes around the chunk (32768) and SIMD-lane (16) boundaries, and one above the size where
# the engine starts threads.
SIZES = [1, 15, 16, 17, 4097, 18011, 32767, 32768, 32769, 200003]


# float64 weights are computed in float64 end to end: a few ulps from the reference.
MATH_TOLERANCE = {np.float32: TOLERANCE["float32"], np.float64: (1e-12, 1e-14)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_every_isa_level_matches_the_reference(isa, dtype):
    """Per-tensor lr, wd and step count differ inside the group."""
    weights, grads, means, variances = random_group(SIZES, seed=1, dtype=dtype)
    lrs = [0.01 * (1 + i % 3) for i in range(len(SIZES))]
    wds = [0.0 if i % 2 else 0.02 for i in range(len(SIZES))]
    counts = [1 + i for i in range(len(SIZES))]
    ref = ReferenceLAMB(beta1=0.9, beta2=0.999, epsilon=1e-6, rescale_grad=0.5, clip_gradient=0.8)
    for i, (w, m, v) in enumerate(zip(weights, means, variances)):
        ref.init(i, to_f64(w))
        ref.mean[i], ref.var[i], ref.t[i] = to_f64(m), to_f64(v), counts[i] - 1
    expected = [ref.step(i, to_f64(g), lrs[i], wds[i]) for i, g in enumerate(grads)]
    phases(weights, grads, means, variances, lrs, wds, counts)
    for i, w in enumerate(weights):
        assert w.dtype == dtype and means[i].dtype == dtype
        np.testing.assert_allclose(to_f64(w), expected[i], *MATH_TOLERANCE[dtype])
        np.testing.assert_allclose(to_f64(means[i]), ref.mean[i], *MATH_TOLERANCE[dtype])
        np.testing.assert_allclose(to_f64(variances[i]), ref.var[i], *MATH_TOLERANCE[dtype])


def run_group(sizes, seed, steps=3, dtype=np.float32):
    weights, grads, means, variances = random_group(sizes, seed, dtype)
    n = len(sizes)
    for t in range(1, steps + 1):
        sumsq = phases(weights, grads, means, variances, [0.01] * n, [0.01] * n, [t] * n)
    return [a.asnumpy() for a in weights + means + variances + [sumsq]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_results_are_bit_identical_on_every_isa_level(dtype):
    """No FMA contraction and a fixed lane order: the CPU's ISA never changes a bit."""
    before = _library.native.mxlamb_active_isa()
    results = {}
    try:
        for isa in supported_isas():
            _library.native.mxlamb_set_isa(isa.encode())
            results[isa] = run_group(SIZES, seed=2, dtype=dtype)
            mx.nd.waitall()
    finally:
        _library.native.mxlamb_set_isa(before)
    first = next(iter(results.values()))
    for isa, arrays in results.items():
        for a, b in zip(first, arrays):
            np.testing.assert_array_equal(a, b, err_msg=isa)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_results_are_bit_identical_for_any_thread_count(dtype):
    threads_before = _library.native.mxlamb_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 8):
            _library.native.mxlamb_set_num_threads(threads)
            results.append(run_group([300007, 70001, 5, 131072], seed=4, dtype=dtype))
            mx.nd.waitall()
    finally:
        _library.native.mxlamb_set_num_threads(threads_before)
    for arrays in results[1:]:
        for a, b in zip(results[0], arrays):
            np.testing.assert_array_equal(a, b)


def fused(weights, grads, means, variances, lrs, wds, counts, lowp=None, **options):
    attrs = dict(ATTRS, num_tensors=len(weights), lrs=",".join(map(repr, lrs)),
                 wds=",".join(map(repr, wds)), step_counts=",".join(map(str, counts)))
    attrs.update(options)
    rows = zip(weights, grads, means, variances, *([lowp] if lowp is not None else []))
    return mx.nd.mxlamb_step(*[x for row in rows for x in row], **attrs)


# Consecutive tensors batched back to back up to 2^20 elements: [700K], [500K, 1, 4097],
# [2.1M] (alone: larger than a batch), [3].
FUSED_SIZES = [700000, 500000, 1, 4097, 2100000, 3]


@pytest.mark.parametrize("multi_precision", [False, True, "float64"])
def test_fused_step_is_bit_identical_to_the_two_phases(isa, multi_precision):
    """mxlamb_step (phase 1 and 2 back to back per cache-sized batch) against mxlamb_phase1
    then mxlamb_phase2 over the whole group: weights, moments and the sums-of-squares table."""
    n = len(FUSED_SIZES)
    lrs = [0.01 * (1 + i % 3) for i in range(n)]
    wds = [0.0 if i % 2 else 0.02 for i in range(n)]
    counts = [1 + i for i in range(n)]
    options = dict(lower_bound=0.1, upper_bound=5.0, layer_adaptation="1,0,1,1,1,1")
    results = []
    dtype = np.float64 if multi_precision == "float64" else np.float32
    multi_precision = multi_precision is True
    for run in ("phases", "fused"):
        weights, grads, means, variances = random_group(FUSED_SIZES, seed=5, dtype=dtype)
        lowp = None
        if multi_precision:
            lowp = [w.astype(np.float16) for w in weights]
            weights = [w.astype(np.float16).astype(np.float32) for w in weights]  # masters
            grads = [g.astype(np.float16) for g in grads]
            options.update(multi_precision=True, model_dtype="float16")
        if run == "phases":
            attrs = dict(ATTRS, num_tensors=n, lrs=",".join(map(repr, lrs)),
                         wds=",".join(map(repr, wds)), step_counts=",".join(map(str, counts)),
                         **options)
            table = mx.nd.mxlamb_phase1(*[x for t in zip(weights, grads, means, variances)
                                          for x in t], **attrs)
            mx.nd.mxlamb_phase2(*[x for t in zip(weights, means, variances) for x in t], table,
                                out=lowp if multi_precision else weights, **attrs)
        else:
            table = fused(weights, grads, means, variances, lrs, wds, counts, lowp, **options)
        arrays = [table] + weights + means + variances + (lowp or [])
        results.append([a.asnumpy() for a in arrays])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def float16_edge_group(seed):
    """A multi-precision group whose float16 conversions hit every special case, both ways:
    gradients that are signalling/quiet NaNs, infinities, subnormals, +-0 and the largest
    half; masters that round to infinity (65520), stay below it (65519.99), fall exactly
    halfway between two halves, or are float32 denormals and half subnormals. The NaN and
    infinity gradients sit in their own tensors (they make that tensor's trust ratio NaN)."""
    rng = np.random.RandomState(seed)
    sizes = [4099, 37, 53, 16]
    weights = [rng.randn(n).astype(np.float32) for n in sizes]
    grads = [(rng.randn(n) * 0.1).astype(np.float16) for n in sizes]
    half_ulp_ties = (np.arange(1, 40, dtype=np.float32) + 0.5) * np.float32(2.0 ** -10)
    edges = np.array([65520.0, 65519.99, -65520.0, 1e5, 6.1e-5, 6e-8, 2.9e-8, 1e-40, -1e-40,
                      0.0, -0.0, 2.0 ** -24 * 1.5, 2.0 ** -24 * 2.5], np.float32)
    weights[0][:edges.size] = edges
    weights[0][100:100 + half_ulp_ties.size] = 1.0 + half_ulp_ties
    grad_bits = grads[0].view(np.uint16)
    grad_bits[:6] = [0x0001, 0x8001, 0x03ff, 0x7bff, 0x0000, 0x8000]  # subnormal, max, +-0
    grads[1].view(np.uint16)[:4] = [0x7d00, 0xfd01, 0x7e00, 0x7fff]  # signalling, quiet NaNs
    grads[2].view(np.uint16)[:2] = [0x7c00, 0xfc00]  # +-inf
    weights[3][:3] = [np.nan, -np.nan, np.inf]
    return ([mx.nd.array(w) for w in weights], [mx.nd.array(g, dtype=np.float16) for g in grads],
            [mx.nd.zeros((n,)) for n in sizes], [mx.nd.zeros((n,)) for n in sizes])


@pytest.mark.parametrize("operators", ["phases", "fused"])
def test_float16_results_are_bit_identical_on_every_isa_level(operators):
    """The AVX2 and AVX-512 levels convert float16 with F16C instructions, the baseline with
    integer code: every bit the same, compared as integers. A float32/float64 NaN is compared
    as NaN: which of two NaNs an operation keeps (sign and payload) depends on how the compiler
    ordered the operands, so every float16 NaN is the one NaN 0x7e00 on every level."""
    def bits(array):
        a = array.asnumpy()
        if a.dtype == np.float16:
            return a.view(np.uint16)
        unsigned = np.uint64 if a.dtype == np.float64 else np.uint32
        return np.where(np.isnan(a), np.iinfo(unsigned).max, a.view(unsigned))  # all NaNs: ~0

    before = _library.native.mxlamb_active_isa()
    results = {}
    try:
        for isa in supported_isas():
            _library.native.mxlamb_set_isa(isa.encode())
            masters, grads, means, variances = float16_edge_group(seed=6)
            lowp = [w.astype(np.float16) for w in masters]
            n = len(masters)
            attrs = dict(ATTRS, num_tensors=n, lrs="1e-12", wds="0.01", step_counts="1",
                         multi_precision=True, model_dtype="float16", clip_gradient=-1.0)
            rows = [masters, grads, means, variances]
            if operators == "fused":
                table = mx.nd.mxlamb_step(*[x for r in zip(*rows, lowp) for x in r], **attrs)
            else:
                table = mx.nd.mxlamb_phase1(*[x for r in zip(*rows) for x in r], **attrs)
                mx.nd.mxlamb_phase2(*[x for r in zip(masters, means, variances) for x in r],
                                    table, out=lowp, **attrs)
            arrays = [table] + masters + means + variances + lowp
            results[isa] = [bits(a) for a in arrays]
    finally:
        _library.native.mxlamb_set_isa(before)
    assert len(results) >= 1
    half = results[next(iter(results))][-4]
    assert half[0] == 0x7c00 and half[2] == 0xfc00 and half[1] == 0x7bff  # 65520 -> inf
    nan_halves = np.concatenate([h[(h & 0x7fff) > 0x7c00] for h in results["baseline"][-4:]])
    assert nan_halves.size >= 6 and (nan_halves == 0x7e00).all()
    baseline = results.pop("baseline")
    for isa, arrays in results.items():
        for i, (a, b) in enumerate(zip(baseline, arrays)):
            np.testing.assert_array_equal(a, b, err_msg="%s, array %d" % (isa, i))


@pytest.mark.parametrize("multi_precision", [False, True, "float64"])
def test_packed_moments_are_bit_identical_to_per_tensor_moments(isa, multi_precision):
    """mxlamb_step with moments_offset: tensor t's mean and var side by side in one array from
    the offset on, against the same step with m and v per tensor."""
    sizes = [700000, 1, 4097, 17]
    n = len(sizes)
    attrs = dict(ATTRS, num_tensors=n, lrs="0.01,0.02,0.03,0.01", wds="0.02,0,0.02,0",
                 step_counts="1,2,3,4")
    dtype = np.float64 if multi_precision == "float64" else np.float32
    multi_precision = multi_precision is True
    if multi_precision:
        attrs.update(multi_precision=True, model_dtype="float16")
    results = []
    for packed in (False, True):
        weights, grads, means, variances = random_group(sizes, seed=9, dtype=dtype)
        lowp = [w.astype(np.float16) for w in weights] if multi_precision else None
        if multi_precision:
            grads = [g.astype(np.float16) for g in grads]
        if not packed:
            rows = zip(weights, grads, means, variances, *([lowp] if multi_precision else []))
            table = mx.nd.mxlamb_step(*[x for row in rows for x in row], **attrs)
        else:
            offset = 5  # and room to spare after the last var
            moments = np.zeros(offset + 2 * sum(sizes) + 3, dtype)
            at = offset
            for m, v, size in zip(means, variances, sizes):
                moments[at:at + size], moments[at + size:at + 2 * size] = m.asnumpy(), v.asnumpy()
                at += 2 * size
            moments = mx.nd.array(moments, dtype=dtype)
            rows = zip(weights, grads, *([lowp] if multi_precision else []))
            table = mx.nd.mxlamb_step(*[x for row in rows for x in row], moments,
                                      moments_offset=offset, **attrs)
            flat, at = moments.asnumpy(), offset
            means, variances = [], []
            for size in sizes:
                means.append(flat[at:at + size])
                variances.append(flat[at + size:at + 2 * size])
                at += 2 * size
            assert (flat[:offset] == 0).all() and (flat[at:] == 0).all()  # nothing else
        arrays = [table] + weights + (lowp or [])
        results.append([a.asnumpy() for a in arrays] + [np.asarray(
            a.asnumpy() if isinstance(a, mx.nd.NDArray) else a) for a in means + variances])
    for i, (a, b) in enumerate(zip(*results)):
        np.testing.assert_array_equal(a, b, err_msg="array %d" % i)


def test_packed_moments_are_refused_with_the_reason():
    w, g = mx.nd.ones((4,)), mx.nd.ones((4,))
    attrs = dict(num_tensors=1, lrs="0.1", wds="0", step_counts="1")
    with pytest.raises(mx.base.MXNetError, match="at least 10 elements .moments_offset 2"):
        mx.nd.mxlamb_step(w, g, mx.nd.zeros((9,)), moments_offset=2, **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="packed moments are float16"):
        mx.nd.mxlamb_step(w, g, mx.nd.zeros((8,), dtype=np.float16), moments_offset=0,
                          **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="moments_offset must be an integer >= 0"):
        mx.nd.mxlamb_step(w, g, mx.nd.zeros((8,)), moments_offset=-1, **attrs).wait_to_read()


@pytest.mark.parametrize("multi_precision", [False, True, "float64"])
def test_flat_arrays_are_bit_identical_to_per_tensor_arrays(isa, multi_precision):
    """mxlamb_step with flat_sizes: every tensor's weight, gradient (and float16 model weight)
    side by side in one array each from flat_offset, the moments packed, against the same
    step with per-tensor arrays; the spans of the flat arrays outside the group untouched."""
    sizes = [700000, 1, 4097, 17, 33]
    n = len(sizes)
    attrs = dict(ATTRS, num_tensors=n, lrs="0.01,0.02,0.03,0.01,0.05",
                 wds="0.02,0,0.02,0,0.3", step_counts="1,2,3,4,6")
    dtype = np.float64 if multi_precision == "float64" else np.float32
    multi_precision = multi_precision is True
    if multi_precision:
        attrs.update(multi_precision=True, model_dtype="float16")
    gtype = np.float16 if multi_precision else dtype
    results = []
    for flat in (False, True):
        weights, grads, means, variances = random_group(sizes, seed=12, dtype=dtype)
        lowp = [w.astype(np.float16) for w in weights] if multi_precision else None
        grads = [g.astype(gtype) for g in grads]
        if not flat:
            rows = zip(weights, grads, means, variances, *([lowp] if multi_precision else []))
            table = mx.nd.mxlamb_step(*[x for row in rows for x in row], **attrs)
        else:
            offset, spare = 3, 2  # spans before and after the group stay as they are

            def joined(arrays, kind):
                pad = np.full(offset, 7, kind), np.full(spare, 7, kind)
                return mx.nd.array(np.concatenate([pad[0]] + [a.asnumpy() for a in arrays]
                                                  + [pad[1]]), dtype=kind)

            flat_w, flat_g = joined(weights, dtype), joined(grads, gtype)
            moments = mx.nd.array(np.concatenate(
                [np.full(2 * offset, 7, dtype)] + [x.asnumpy() for m, v in zip(means, variances)
                                                   for x in (m, v)]), dtype=dtype)
            inputs = [flat_w, flat_g, moments] + ([joined(lowp, np.float16)]
                                                  if multi_precision else [])
            table = mx.nd.mxlamb_step(*inputs, flat_sizes=",".join(map(str, sizes)),
                                      flat_offset=offset, moments_offset=2 * offset, **attrs)
            flats = [a.asnumpy() for a in inputs]
            assert all((a[:offset] == 7).all() for a in flats[:2] + flats[3:])
            assert all((a[offset + sum(sizes):] == 7).all() for a in flats[:2] + flats[3:])
            assert (flats[2][:2 * offset] == 7).all()
            np.testing.assert_array_equal(flats[1][offset:-spare],
                                          np.concatenate([g.asnumpy() for g in grads]))

            def split(array, at):
                parts = []
                for size in sizes:
                    parts.append(array[at:at + size])
                    at += size
                return parts

            weights = split(flats[0], offset)
            lowp = split(flats[3], offset) if multi_precision else None
            means, variances, at = [], [], 2 * offset
            for size in sizes:
                means.append(flats[2][at:at + size])
                variances.append(flats[2][at + size:at + 2 * size])
                at += 2 * size
        as_numpy = lambda a: a.asnumpy() if isinstance(a, mx.nd.NDArray) else a  # noqa: E731
        results.append([as_numpy(a) for a in [table] + list(weights) + list(lowp or [])
                        + list(means) + list(variances)])
    assert len(results[0]) == len(results[1])
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        np.testing.assert_array_equal(a, b, err_msg="array %d" % i)


def test_flat_arrays_are_refused_with_the_reason():
    w, g, moments = mx.nd.ones((8,)), mx.nd.ones((8,)), mx.nd.zeros((16,))
    attrs = dict(num_tensors=2, lrs="0.1", wds="0", step_counts="1", moments_offset=0)
    with pytest.raises(mx.base.MXNetError,
                       match="flat weight must be one-dimensional with at least 9 elements "
                             r"\(flat_offset 0 plus the 2 tensors' flat_sizes, which add up "
                             r"to 9\), got 8"):
        mx.nd.mxlamb_step(w, g, moments, flat_sizes="4,5", **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="flat grad must be one-dimensional with at "
                                                 "least 9 elements .flat_offset 2"):
        mx.nd.mxlamb_step(mx.nd.ones((10,)), g, moments, flat_sizes="3,4", flat_offset=2,
                          **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="flat_sizes has 2.5, not a whole number"):
        mx.nd.mxlamb_step(w, g, moments, flat_sizes="2.5,4", **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="flat_sizes has 3 values for num_tensors=2"):
        mx.nd.mxlamb_step(w, g, moments, flat_sizes="2,2,4", **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="flat_sizes has -1, must be >= 0"):
        mx.nd.mxlamb_step(w, g, moments, flat_sizes="-1,4", **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="flat grad is float64, expected float32"):
        mx.nd.mxlamb_step(w, g.astype(np.float64), moments, flat_sizes="4",
                          **attrs).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="flat_sizes needs moments_offset"):
        del attrs["moments_offset"]
        mx.nd.mxlamb_step(w, g, flat_sizes="4", **attrs).wait_to_read()


def test_fused_step_refuses_the_optional_inputs_by_name():
    weights, grads, means, variances = random_group([5], seed=0)
    with pytest.raises(mx.base.MXNetError, match="use_ema is not supported by mxlamb_step"):
        fused(weights, grads, means, variances, [0.1], [0.0], [1], use_ema=1).wait_to_read()


def test_one_list_value_stands_for_every_tensor():
    """lrs="0.01" with num_tensors=3 means 0.01 for each (what the optimizer sends when all are
    equal); any other count than 1 or num_tensors is refused."""
    runs = []
    for lrs, wds, counts in [("0.01", "0.02", "3"), ("0.01,0.01,0.01", "0.02,0.02,0.02", "3,3,3")]:
        weights, grads, means, variances = random_group([7, 40, 3], seed=4)
        attrs = dict(ATTRS, num_tensors=3, lrs=lrs, wds=wds, step_counts=counts)
        mx.nd.mxlamb_step(*[x for t in zip(weights, grads, means, variances) for x in t], **attrs)
        runs.append([w.asnumpy() for w in weights])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_embedding_sized_norms_agree_with_float64():
    """A 30522 x 768 BERT embedding: MXNet's float32 serial norm is ~5% low here; ours is
    accumulated in float64 and agrees with NumPy's float64 norm to 1e-6 (in fact ~1e-12)."""
    rng = np.random.RandomState(0)
    w = rng.randn(30522, 768).astype(np.float32) * 0.02 + 0.01
    g = rng.randn(30522, 768).astype(np.float32)
    weights, grads = [mx.nd.array(w)], [mx.nd.array(g)]
    means, variances = [mx.nd.zeros(w.shape)], [mx.nd.zeros(w.shape)]
    attrs = dict(ATTRS, num_tensors=1, lrs="0.01", wds="0.01", step_counts="1",
                 rescale_grad=1.0, clip_gradient=-1.0)
    sumsq = mx.nd.mxlamb_phase1(weights[0], grads[0], means[0], variances[0], **attrs).asnumpy()
    w64, g64 = w.astype(np.float64), g.astype(np.float64)
    u64 = (0.1 * g64 / 0.1) / (np.sqrt(0.001 * g64 * g64 / 0.001) + 1e-6) + 0.01 * w64
    np.testing.assert_allclose(sumsq[0, 0], np.sum(w64 * w64), rtol=1e-9)
    np.testing.assert_allclose(sumsq[0, 1], np.sum(u64 * u64), rtol=1e-6)
    ratio = np.sqrt(sumsq[0, 0]) / np.sqrt(sumsq[0, 1])
    np.testing.assert_allclose(ratio, np.linalg.norm(w64) / np.linalg.norm(u64), rtol=1e-6)


def test_operator_refuses_mismatched_shapes_with_a_named_tensor():
    w, g = mx.nd.ones((4,)), mx.nd.ones((5,))
    m, v = mx.nd.zeros((4,)), mx.nd.zeros((4,))
    with pytest.raises(mx.base.MXNetError, match="grad of tensor 0 has another shape"):
        mx.nd.mxlamb_phase1(w, g, m, v, num_tensors=1, lrs="0.1", wds="0", step_counts="1")


def test_operator_refuses_mixed_math_types_with_a_named_tensor():
    """One call has one math type, its first weight's: float32 or float64 (float32 under
    multi_precision)."""
    weights, grads, means, variances = random_group([4, 5], seed=0, dtype=np.float64)
    means[1] = means[1].astype(np.float32)
    with pytest.raises(mx.base.MXNetError, match="mean of tensor 1 is float32, expected float64"):
        phases(weights, grads, means, variances, [0.1] * 2, [0.0] * 2, [1] * 2).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="weight of tensor 0 is float16, expected "
                                                 "float32 or float64"):
        w16 = [w.astype(np.float16) for w in weights]
        fused(w16, grads, means, variances, [0.1] * 2, [0.0] * 2, [1] * 2).wait_to_read()
    with pytest.raises(mx.base.MXNetError, match="weight of tensor 0 is float64, expected "
                                                 "float32 .the master copy"):
        fused(weights, grads, means, variances, [0.1] * 2, [0.0] * 2, [1] * 2,
              lowp=[w.astype(np.float16) for w in weights], multi_precision=True,
              model_dtype="float16").wait_to_read()


def test_the_model_weight_type_travels_by_name():
    """Phase 2 writes the model weight under multi_precision: model_dtype names its type."""
    w, w16 = mx.nd.ones((4,)), mx.nd.ones((4,), dtype=np.float16)
    sumsq = mx.nd.ones((1, 2), dtype=np.float64)
    for model_dtype in (None, "bfloat16", "2"):
        named = {} if model_dtype is None else {"model_dtype": model_dtype}
        with pytest.raises(mx.base.MXNetError, match="model_dtype must be float16"):
            mx.nd.mxlamb_phase2(w, w.copy(), w.copy(), sumsq, out=[w16], num_tensors=1,
                                lrs="0.1", wds="0", step_counts="1", multi_precision=True,
                                **named).wait_to_read()


def test_operator_refuses_a_wrong_length_list():
    w = mx.nd.ones((4,))
    with pytest.raises(mx.base.MXNetError, match="lrs has 2 values for num_tensors=1"):
        mx.nd.mxlamb_phase1(w, w, w.copy(), w.copy(), num_tensors=1, lrs="0.1,0.2", wds="0",
                            step_counts="1").wait_to_read()


def import_in_subprocess(env_extra, code="import mxlamb"):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("isa", supported_isas())
def test_mxlamb_isa_environment_variable_forces_a_level(isa):
    out = import_in_subprocess(
        {"MXLAMB_ISA": isa},
        "import mxlamb; from mxlamb import _library; print(_library.native.mxlamb_active_isa().decode())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == isa


def test_unknown_isa_level_is_an_import_error():
    out = import_in_subprocess({"MXLAMB_ISA": "sse9"})
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "MXLAMB_ISA=sse9" in out.stderr
