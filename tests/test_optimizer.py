"""mxlamb.LAMB against the float64 reference over a grid of options, dtypes and group sizes."""
import itertools
import pickle

import mxnet as mx
import numpy as np
import pytest

import mxlamb
from conftest import DTYPES, TOLERANCE, is_low_precision, mx_array, state_tolerance, to_f64
from reference import ReferenceLAMB

STEPS = 7
# Awkward sizes: size 1, odd sizes, a zero-size tensor, 2-D shapes, and a zero-initialised
# weight (it must still move: its trust ratio is 1).
SHAPES = [(1,), (7,), (4097,), (18011,), (0,), (3, 5), (33, 17), (7,)]
ZERO_INIT = {len(SHAPES) - 1}
LR_MULT = {1: 0.5, 3: 2.0}
WD_MULT = {2: 0.0, 6: 3.0}


def make_problem(shapes, dtype, seed, steps=STEPS):
    rng = np.random.RandomState(seed)
    # float32 values, but for float64 weights, which get every bit of the draw
    values = np.float64 if dtype == "float64" else np.float32
    weights = [np.zeros(s, values) if i in ZERO_INIT and len(shapes) == len(SHAPES)
               else rng.randn(*s).astype(values) for i, s in enumerate(shapes)]
    grads = [[rng.randn(*s).astype(values) for s in shapes] for _ in range(steps)]
    return [mx_array(w, dtype) for w in weights], [[mx_array(g, dtype) for g in step]
                                                   for step in grads]


def run(opt, weights, grads, via="updater"):
    """Runs the steps through the MXNet 1.x Updater (what Trainer uses) or a 2.0 method."""
    indices = list(range(len(weights)))
    if via == "updater":
        updater = mx.optimizer.get_updater(opt)
        for step_grads in grads:
            updater(indices, step_grads, weights)
        return updater.states
    states = [opt.create_state_multi_precision(i, w) for i, w in zip(indices, weights)]
    for step_grads in grads:
        getattr(opt, via)(indices, weights, step_grads, states)
    return dict(zip(indices, states))


def run_reference(options, lr, wd, weights, grads, lr_mult=None, wd_mult=None):
    ref = ReferenceLAMB(**options)
    for i, w in enumerate(weights):
        ref.init(i, to_f64(w))
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            ref.step(i, to_f64(g), lr * (lr_mult or {}).get(i, 1.0),
                     wd * (wd_mult or {}).get(i, 1.0))
    return ref


def assert_matches_reference(ref, weights, states, dtype, multi_precision):
    rtol, atol = state_tolerance(dtype)
    for i, w in enumerate(weights):
        if multi_precision:
            master, (mean, var) = states[i]
            np.testing.assert_allclose(to_f64(master), ref.weight[i], rtol, atol,
                                       err_msg="master copy %d" % i)
            # The model weight is the master rounded to its type.
            np.testing.assert_array_equal(
                to_f64(w), to_f64(mx_array(to_f64(master), dtype)), err_msg="weight %d" % i)
        else:
            mean, var = states[i]
        assert (w.dtype, mean.dtype, var.dtype) == (w.dtype,) + (
            (np.float64,) * 2 if dtype == "float64" else (np.float32,) * 2)
        np.testing.assert_allclose(to_f64(w), ref.weight[i], *TOLERANCE[dtype],
                                   err_msg="weight %d" % i)
        np.testing.assert_allclose(to_f64(mean), ref.mean[i], rtol, atol, err_msg="mean %d" % i)
        np.testing.assert_allclose(to_f64(var), ref.var[i], rtol, atol, err_msg="var %d" % i)


OPTION_GRID = [
    dict(wd=wd, bounds=bounds, bias_correction=bc, rescale_grad=rs, clip_gradient=clip)
    for wd, bounds, bc, rs, clip in itertools.product(
        [0.0, 0.01], [(None, None), (2.0, 20.0)], [True, False], [1.0, 0.5], [None, 0.3])
]


def check(dtype, wd, bounds, bias_correction, rescale_grad, clip_gradient, aggregate_num=4,
          use_fused_step=True, via="updater", seed=0):
    lr = 0.02
    multi_precision = is_low_precision(dtype)
    opt = mx.optimizer.create(
        "lamb", learning_rate=lr, beta1=0.9, beta2=0.99, epsilon=1e-6, lower_bound=bounds[0],
        upper_bound=bounds[1], bias_correction=bias_correction, aggregate_num=aggregate_num,
        use_fused_step=use_fused_step, wd=wd, rescale_grad=rescale_grad,
        clip_gradient=clip_gradient, multi_precision=multi_precision)
    assert isinstance(opt, mxlamb.LAMB)
    opt.set_lr_mult(dict(LR_MULT))
    opt.set_wd_mult(dict(WD_MULT))
    weights, grads = make_problem(SHAPES, dtype, seed)
    grads_before = [[to_f64(g) for g in step] for step in grads]
    ref = run_reference(dict(beta1=0.9, beta2=0.99, epsilon=1e-6, lower_bound=bounds[0],
                             upper_bound=bounds[1], bias_correction=bias_correction,
                             rescale_grad=rescale_grad, clip_gradient=clip_gradient),
                        lr, wd, weights, grads, LR_MULT, WD_MULT)
    states = run(opt, weights, grads, via)
    assert_matches_reference(ref, weights, states, dtype, multi_precision)
    # The caller's gradients are never modified; every tensor counted once per step.
    for step, before in zip(grads, grads_before):
        for g, b in zip(step, before):
            np.testing.assert_array_equal(to_f64(g), b)
    assert all(opt._index_update_count[i] == STEPS for i in range(len(SHAPES)))
    return weights, states


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("options", OPTION_GRID,
                         ids=["wd%(wd)s-b%(bounds)s-bc%(bias_correction)s-rs%(rescale_grad)s-"
                              "clip%(clip_gradient)s" % o for o in OPTION_GRID])
def test_option_grid(dtype, options):
    check(dtype, **options)


ACTIVE = dict(wd=0.01, bounds=(2.0, 20.0), bias_correction=True, rescale_grad=0.5,
              clip_gradient=0.3)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("aggregate_num", [1, 3, 4, 45, 100])
@pytest.mark.parametrize("use_fused_step", [True, False])
def test_aggregation_grid(dtype, aggregate_num, use_fused_step):
    check(dtype, aggregate_num=aggregate_num, use_fused_step=use_fused_step, **ACTIVE)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("via", ["step", "fused_step", "update"])
def test_api_entry_points(dtype, via):
    check(dtype, via=via, **ACTIVE)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_step_and_fused_step_are_bit_identical(dtype):
    results = []
    for via in ("step", "fused_step"):
        weights, states = check(dtype, via=via, aggregate_num=3, **ACTIVE)
        results.append([to_f64(w) for w in weights] + [to_f64(a) for s in states.values()
                                                      for a in mx.base._as_list(s)
                                                      if isinstance(a, mx.nd.NDArray)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("aggregate_num", [45, 100])
def test_many_mixed_tensors_in_one_group(aggregate_num):
    rng = np.random.RandomState(5)
    shapes = [(int(n),) for n in rng.randint(1, 3000, size=120)]
    weights, grads = make_problem(shapes, "float32", seed=3, steps=3)
    opt = mxlamb.LAMB(learning_rate=0.01, wd=0.01, aggregate_num=aggregate_num)
    ref = run_reference({}, 0.01, 0.01, weights, grads)
    run(opt, weights, grads)
    for i, w in enumerate(weights):
        np.testing.assert_allclose(to_f64(w), ref.weight[i], *TOLERANCE["float32"])


def test_mixed_fp32_and_fp16_in_one_fused_step():
    rng = np.random.RandomState(2)
    dtypes = ["float32", "float16", "float32", "bfloat16", "float16"]
    weights = [mx_array(rng.randn(50), d) for d in dtypes]
    grads = [[mx_array(rng.randn(50), d) for d in dtypes] for _ in range(3)]
    opt = mxlamb.LAMB(learning_rate=0.01, multi_precision=True, aggregate_num=2)
    ref = run_reference({}, 0.01, 0.0, weights, grads)
    run(opt, weights, grads, via="fused_step")
    for i, (w, d) in enumerate(zip(weights, dtypes)):
        np.testing.assert_allclose(to_f64(w), ref.weight[i], *TOLERANCE[d])


def test_zero_initialised_weight_moves_by_an_adam_step():
    """||w|| = 0 gives trust ratio 1: the first step is -lr * u exactly."""
    w = mx.nd.zeros((10,))
    g = mx.nd.array(np.linspace(-1, 1, 10))
    opt = mxlamb.LAMB(learning_rate=0.1, epsilon=1e-6)
    mx.optimizer.get_updater(opt)(0, g, w)
    g64 = np.linspace(-1, 1, 10)
    u = g64 / (np.abs(g64) + 1e-6)  # bias-corrected first step: m_hat = g, v_hat = g^2
    np.testing.assert_allclose(w.asnumpy(), -0.1 * u, rtol=1e-6, atol=1e-7)
    assert np.abs(w.asnumpy()).max() > 0.09


def test_zero_gradient_and_zero_weight_leave_weight_unchanged():
    """||u|| = 0 (and ||w|| = 0) gives ratio 1 and a zero step: no NaN from 0/0."""
    w, g = mx.nd.zeros((5,)), mx.nd.zeros((5,))
    mx.optimizer.get_updater(mxlamb.LAMB())(0, g, w)
    np.testing.assert_array_equal(w.asnumpy(), np.zeros(5))


def test_optimizer_pickles_with_its_state():
    opt = mxlamb.LAMB(learning_rate=0.01, beta1=0.8, lower_bound=0.5, aggregate_num=7, wd=0.1)
    updater = mx.optimizer.get_updater(opt)
    w = mx.nd.array(np.arange(6, dtype=np.float32))
    updater(0, mx.nd.ones((6,)), w)
    clone = pickle.loads(pickle.dumps(opt))
    assert isinstance(clone, mxlamb.LAMB)
    assert (clone.beta1, clone.lower_bound, clone.aggregate_num, clone.wd) == (0.8, 0.5, 7, 0.1)
    assert clone._index_update_count == {0: 1}


def test_single_ndarray_update_is_the_1x_non_aggregated_call():
    w1, w2 = mx.nd.array(np.arange(1, 5, dtype=np.float32)), None
    w2 = w1.copy()
    g = mx.nd.array([0.5, -1.0, 2.0, 0.1])
    a, b = mxlamb.LAMB(learning_rate=0.1), mxlamb.LAMB(learning_rate=0.1)
    a.update(0, w1, g, a.create_state(0, w1))
    b.update([0], [w2], [g], [b.create_state(0, w2)])
    np.testing.assert_array_equal(w1.asnumpy(), w2.asnumpy())
    assert a._index_update_count == b._index_update_count == {0: 1}


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("slab_elements", [None, 9000])
def test_packed_moments_are_bit_identical_to_per_tensor_moments(monkeypatch, dtype,
                                                                 slab_elements):
    """The moments of small parameters live side by side in a slab and a group whose moments
    are contiguous there passes the slab once (mxlamb_step's moments_offset). Against the same
    steps with packing off: every bit equal. fused_step's groups of 3 mix packed, unpacked (the
    70000-element one) and zero-size tensors; in one slab, the 2nd and 3rd group are packed;
    with 9000-element slabs the 2nd straddles two slabs and goes per tensor."""
    shapes = [(7,), (33, 17), (70000,), (0,), (1,), (4097,), (3, 5), (2000,), (18,)]
    calls = []
    step_op = mx.nd.mxlamb_step

    def recording_step(*inputs, **attrs):
        calls.append(("moments_offset" in attrs, attrs["num_tensors"], len(inputs)))
        return step_op(*inputs, **attrs)

    monkeypatch.setattr(mx.nd, "mxlamb_step", recording_step)
    if slab_elements is not None:
        monkeypatch.setattr(mxlamb.state, "SLAB_ELEMENTS", slab_elements)
    results = []
    for packing in (True, False):
        monkeypatch.setattr(mxlamb.state, "PACKED_MAX_ELEMENTS", 1 << 16 if packing else 0)
        calls.clear()
        weights, grads = make_problem(shapes, dtype, seed=8, steps=3)
        opt = mxlamb.LAMB(learning_rate=0.01, wd=0.01, aggregate_num=3,
                          multi_precision=is_low_precision(dtype))
        states = run(opt, weights, grads, via="fused_step")  # not the 2.0 Updater's groups
        results.append([to_f64(w) for w in weights] + [
            to_f64(a) for i in range(len(shapes)) for a in mx.base._as_list(states[i])
            if isinstance(a, mx.nd.NDArray)] + [to_f64(a) for i in range(len(shapes))
                                                 if is_low_precision(dtype)
                                                 for a in states[i][1]])
        packed_calls = [c for c in calls if c[0]]
        if packing:
            assert packed_calls, calls
            per_tensor = 3 if is_low_precision(dtype) else 2
            assert all(inputs == per_tensor * n + 1 for _, n, inputs in packed_calls)
            assert len(calls) == 3 * 3
            assert len(packed_calls) == (2 if slab_elements is None else 1) * 3
        else:
            assert not packed_calls
    for i, (a, b) in enumerate(zip(*results)):
        np.testing.assert_array_equal(a, b, err_msg="array %d" % i)


def test_packed_states_are_ordinary_arrays_to_their_users():
    """States in a slab are views of the parameter's shape: writing one changes only it, and
    it pickles (Trainer.save_states) as its own values."""
    opt = mxlamb.LAMB()
    states = [opt.create_state(i, mx.nd.ones(shape)) for i, shape in enumerate([(5,), (2, 3)])]
    mean1, var1 = states[1]
    assert mean1.shape == (2, 3) and var1.shape == (2, 3)
    var1[:] = 7.0
    assert to_f64(mean1).sum() == 0 and to_f64(states[0][1]).sum() == 0
    clone = pickle.loads(pickle.dumps(var1))
    np.testing.assert_array_equal(clone.asnumpy(), np.full((2, 3), 7.0, np.float32))
    slab, offset, size = states[1].packed  # the state says where its moments lie
    assert (offset, size) == (10, 6) and to_f64(slab)[16:22].tolist() == [7.0] * 6
    # A pickled (or copied) state is a plain tuple of its own arrays: it says nothing.
    clone = pickle.loads(pickle.dumps(states[1]))
    assert type(clone) is tuple and not hasattr(clone, "packed")
    np.testing.assert_array_equal(clone[1].asnumpy(), np.full((2, 3), 7.0, np.float32))
