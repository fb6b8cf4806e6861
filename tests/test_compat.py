"""Drop-in compatibility with MXNet's own LAMB (1.9.1 and 2.0.0b1): mxlamb.LAMB takes every
input MXNet's LAMB takes and means the same by it.

The option grid of MXNet's test_lamb and test_multilamb (tests/python/unittest/
test_optimizer.py: wd, bounds, bias correction, rescale_grad, clip_gradient, float16 with
multi_precision, float32, float64, aggregate_num 0 / 1 / 4) plus the values MXNet accepts that
those grids leave out (aggregate_num None and numpy.inf, bounds of 0, a negative or 0
clip_gradient, rescale_grad 0), sampled so that every pair of values of two options meets at
least once. Each combination runs a few steps through MXNet's Updater (what Trainer and Module
use) against the float64 reference and against MXNet's own LAMB."""
import itertools
import pickle
import random
import warnings

import mxnet as mx
import numpy as np
import pytest

import mxlamb
from conftest import BUILTIN_LAMB, MXNET2, TOLERANCE, mx_array, state_tolerance, to_f64
from reference import ReferenceLAMB, ReferenceStep

SHAPES = [(3, 4, 5), (10, 4), (7,), (1024, 1)]  # test_lamb's, and one of test_multilamb's
STEPS = 3
LR = 0.01

AXES = {
    "wd": [0.0, 0.03],
    "bounds": [(None, None), (1e-3, 10.0), (0.0, 0.0), (5.0, None), (None, 2.0)],
    "bias_correction": [True, False],
    "rescale_grad": [1.0, 0.14, 0.0],
    "clip_gradient": [None, 0.4, -1.0, 0.0],
    "dtype": ["float32", "float64", "float16"],
    "multi_precision": [False, True],  # float16 always: mxlamb refuses it without (README)
    "aggregate_num": [0, None, 1, 4, np.inf],
    "use_fused_step": [True, False],
}
# ||w|| of uniform [0, 1) weights is about 4.5 and 3.7 for the first two tensors: lower_bound
# 5 and upper_bound 2 clamp them; (1e-3, 10) is MXNet's grid and clamps nothing.


def pairwise(axes, seed=0, candidates=64):
    """A small list of combinations (dicts) in which every pair of values of two axes occurs
    at least once: greedily, the best of ``candidates`` random combinations each round."""
    names = list(axes)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in range(len(axes[a])) for vb in range(len(axes[b]))}
    rng = random.Random(seed)
    chosen = []
    while uncovered:
        def gain(combo):
            return sum((a, combo[a], b, combo[b]) in uncovered
                       for a, b in itertools.combinations(names, 2))
        # Start from an uncovered pair so that every round makes progress.
        a, va, b, vb = min(uncovered, key=repr)
        pool = []
        for _ in range(candidates):
            combo = {n: rng.randrange(len(axes[n])) for n in names}
            combo[a], combo[b] = va, vb
            pool.append(combo)
        best = max(pool, key=gain)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
        chosen.append(best)
    return [{n: axes[n][c[n]] for n in names} for c in chosen]


GRID = pairwise(AXES)
for combo in GRID:
    if combo["dtype"] == "float16":
        combo["multi_precision"] = True


def label(combo):
    b = combo["bounds"]
    return ("%(dtype)s-mp%(multi_precision)d-wd%(wd)g-rs%(rescale_grad)g-cg%(clip_gradient)s-"
            "bc%(bias_correction)d-agg%(aggregate_num)s-fused%(use_fused_step)d" % combo
            + "-b%s,%s" % b)


def lamb_options(combo):
    return dict(learning_rate=LR, wd=combo["wd"], lower_bound=combo["bounds"][0],
                upper_bound=combo["bounds"][1], bias_correction=combo["bias_correction"],
                rescale_grad=combo["rescale_grad"], clip_gradient=combo["clip_gradient"],
                multi_precision=combo["multi_precision"])


def problem(dtype, seed, shapes=SHAPES, steps=STEPS):
    """Uniform [0, 1) weights and gradients (as MXNet's tests draw them), of ``dtype``, and
    their float64 values (rounded to the dtype) for the reference."""
    rng = np.random.RandomState(seed)
    raw = [rng.uniform(size=s) for s in shapes]
    raw_grads = [[rng.uniform(size=s) for s in shapes] for _ in range(steps)]
    weights = [mx_array(w, dtype) for w in raw]
    grads = [[mx_array(g, dtype) for g in step] for step in raw_grads]
    return weights, grads


def run_updater(opt, weights, grads):
    weights = [w.copy() for w in weights]
    updater = mx.optimizer.get_updater(opt)
    indices = list(range(len(weights)))
    for step in grads:
        updater(indices, [g.copy() for g in step], weights)
    return weights, updater.states


def run_reference(combo, weights, grads, epsilon=1e-6):
    b = combo["bounds"]
    ref = ReferenceLAMB(epsilon=epsilon, lower_bound=b[0], upper_bound=b[1],
                        bias_correction=combo["bias_correction"],
                        rescale_grad=combo["rescale_grad"], clip_gradient=combo["clip_gradient"])
    for k, w in enumerate(weights):
        ref.init(k, to_f64(w))
    for step in grads:
        for k, g in enumerate(step):
            ref.step(k, to_f64(g), LR, combo["wd"])
    return ref


def builtin_lamb(options):
    """MXNet's own LAMB with the same options, on its multi-tensor path: 1.9.1's reads its
    aggregation from MXNET_OPTIMIZER_AGGREGATION_SIZE (45); 2.0's is given 4. (2.0's
    fused_step for aggregate_num <= 1 counts each update twice, t = 2, 4, 6, ..., and its
    float16 multi-precision master copies there end 0.019 from the reference after 3 steps of
    lr 0.01, where its step() and its aggregated fused_step agree with the reference: see the
    README's compatibility list.)"""
    if MXNET2:
        return BUILTIN_LAMB(aggregate_num=4, use_fused_step=True, **options)
    return BUILTIN_LAMB(**options)


def flat(state):
    return [a for s in state for a in (flat(s) if isinstance(s, (list, tuple)) else [s])]


def moments(state, multi_precision):
    return state[1] if multi_precision else state


# MXNet's LAMB against mxlamb after STEPS steps (MXNet's own test tolerances for float32 and
# float16: its norms are serial float32 sums, its float16 model weights round from its master;
# its float64 update takes its hyper-parameters as float32 (1 - 0.999f is 1.3e-5 relative
# off) and keeps u in a float32 buffer; mxlamb's float64 is within 1e-12 of the reference).
BUILTIN_TOLERANCE = {"float32": (1e-4, 1e-5), "float64": (5e-5, 1e-7), "float16": (1e-3, 1e-3)}


@pytest.mark.parametrize("combo", GRID, ids=[label(c) for c in GRID])
def test_mxnet_option_grid(combo):
    dtype, mp = combo["dtype"], combo["multi_precision"]
    weights, grads = problem(dtype, seed=len(label(combo)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip_gradient=0 warns; tested below
        opt = mxlamb.LAMB(aggregate_num=combo["aggregate_num"],
                          use_fused_step=combo["use_fused_step"], **lamb_options(combo))
    ours, states = run_updater(opt, weights, grads)
    ref = run_reference(combo, weights, grads)
    rtol, atol = state_tolerance(dtype)
    for k, w in enumerate(ours):
        assert w.dtype == np.dtype(dtype)
        np.testing.assert_allclose(to_f64(w), ref.weight[k], *TOLERANCE[dtype],
                                   err_msg="weight %d" % k)
        mean, var = moments(states[k], mp and dtype == "float16")
        assert mean.dtype == (np.float64 if dtype == "float64" else np.float32)
        np.testing.assert_allclose(to_f64(mean), ref.mean[k], rtol, atol, err_msg="mean %d" % k)
        np.testing.assert_allclose(to_f64(var), ref.var[k], rtol, atol, err_msg="var %d" % k)

    if dtype == "float64" and MXNET2:
        return  # MXNet 2.0's LAMB cannot update float64 weights (float32 moments): README
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MXNet's float16 warning
        theirs, their_states = run_updater(
            builtin_lamb(lamb_options(combo)), weights, grads)
    rtol, atol = BUILTIN_TOLERANCE[dtype]
    for k, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(to_f64(a), to_f64(b), rtol, atol, err_msg="weight %d" % k)
        ours_flat, theirs_flat = flat(states[k]), flat(their_states[k])
        assert len(ours_flat) == len(theirs_flat)  # (master,) mean, var
        for x, y in zip(ours_flat, theirs_flat):
            np.testing.assert_allclose(to_f64(x), to_f64(y), rtol, atol, err_msg="state %d" % k)


def test_grid_covers_every_value_and_stays_small():
    for name, values in AXES.items():
        seen = {repr(c[name]) for c in GRID}
        assert seen == {repr(v) for v in values}, name
    assert len(GRID) <= 60


# ------------------------------------------------------------------------------ aggregate_num

@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_every_aggregate_num_gives_the_same_bits(dtype):
    """0, None, 1, 4 and numpy.inf, through MXNet's Updater and through direct
    update_multi_precision calls with lists (how MXNet 2.0's test calls the optimizer)."""
    weights, grads = problem(dtype, seed=3)
    options = dict(learning_rate=LR, wd=0.03, multi_precision=dtype == "float16")
    results = {}
    for agg in (0, None, 1, 4, np.inf):
        for via in ("updater", "direct"):
            opt = mxlamb.LAMB(aggregate_num=agg, **options)
            if via == "updater":
                ours, states = run_updater(opt, weights, grads)
            else:
                ours = [w.copy() for w in weights]
                states = [opt.create_state_multi_precision(k, w) for k, w in enumerate(ours)]
                for step in grads:
                    opt.update_multi_precision(list(range(len(ours))), ours, step, states)
            results[(agg, via)] = [to_f64(w) for w in ours]
    first = results[(0, "updater")]
    for key, arrays in results.items():
        for a, b in zip(first, arrays):
            np.testing.assert_array_equal(a, b, err_msg=repr(key))


def test_aggregate_num_as_each_updater_sends_it(monkeypatch):
    """What each MXNet's Updater makes of the value kept in aggregate_num: one tensor per call
    for None and 0, the whole step (one call per dtype on 1.x) for numpy.inf."""
    calls = []
    original = mxlamb.LAMB.update_multi_precision

    def spy(self, index, weight, grad, state):
        calls.append(len(index) if isinstance(index, (list, tuple)) else 1)
        return original(self, index, weight, grad, state)

    monkeypatch.setattr(mxlamb.LAMB, "update_multi_precision", spy)
    weights = [mx.nd.ones((3,)) for _ in range(5)] + [mx.nd.ones((2,), dtype="float64")]
    grads = [w.copy() for w in weights]
    expected = {0: [1] * 6, None: [1] * 6, 2: [2, 2, 1, 1], np.inf: [6] if MXNET2 else [5, 1]}
    for agg, sizes in expected.items():
        calls.clear()
        opt = mxlamb.LAMB(aggregate_num=agg)
        mx.optimizer.get_updater(opt)(list(range(6)), grads, [w.copy() for w in weights])
        assert calls == sizes, agg
    assert mxlamb.LAMB(aggregate_num=None).aggregate_num == 1  # as MXNet 2.0's Optimizer
    assert mxlamb.LAMB(aggregate_num=np.inf).aggregate_num is (
        np.inf if MXNET2 else mxlamb.lamb.sys.maxsize)


def test_whole_step_aggregation_survives_a_pickle():
    """numpy.inf comes back from a pickle as another float object, and MXNet 2.0's Updater
    tests `aggregate_num is not numpy.inf` (a kvstore server, Updater.set_states)."""
    clone = pickle.loads(pickle.dumps(mxlamb.LAMB(aggregate_num=np.inf)))
    assert clone.aggregate_num is mxlamb.LAMB(aggregate_num=np.inf).aggregate_num
    weights = [mx.nd.ones((3,)) for _ in range(3)]
    mx.optimizer.get_updater(clone)([0, 1, 2], [w.copy() for w in weights], weights)
    assert clone.num_update == 1


# ------------------------------------------------------- MXNet's readings of other arguments

def four_steps(opt, seed=7, shapes=((20, 5), (9,)), zero_rows=False, sym=False):
    weights, grads = problem("float32", seed, shapes=shapes, steps=4)
    if zero_rows:  # an element whose gradient is always 0
        for step in grads:
            step[0][0, 0] = 0.0
    updater = mx.optimizer.get_updater(opt)
    weights = [w.copy() for w in weights]
    for step in grads:
        updater(list(range(len(weights))), step, weights)
    return [w.asnumpy() for w in weights]


TABLE = {  # the rows of issue 17's table and MXNet's Optimizer kwargs
    "begin_num_update 100": dict(begin_num_update=100),
    "begin_num_update 3, MultiFactorScheduler": dict(
        begin_num_update=3,
        lr_scheduler=mx.lr_scheduler.MultiFactorScheduler(step=[4, 6], factor=0.5)),
    "bounds 0": dict(lower_bound=0, upper_bound=0),
    "clip_gradient -1": dict(clip_gradient=-1.0),
    "clip_gradient 0": dict(clip_gradient=0),
    "rescale_grad 0": dict(rescale_grad=0.0),
    "epsilon 0": dict(epsilon=0.0),
    "beta1 0": dict(beta1=0.0),
    "lr/wd mult by name": dict(wd=0.1, param_idx2name={0: "fc_weight", 1: "fc_bias"}),
    "lr_scheduler": dict(lr_scheduler=mx.lr_scheduler.FactorScheduler(step=2, factor=0.5)),
    "learning_rate None": dict(learning_rate=None),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_arguments_mean_what_they_mean_in_mxnet(case):
    def make(cls):
        options = dict(TABLE[case])
        if "begin_num_update" in options and "lr_scheduler" in options:
            options["lr_scheduler"] = mx.lr_scheduler.MultiFactorScheduler(
                step=[4, 6], factor=0.5, base_lr=0.05)
        elif "lr_scheduler" in options:  # one scheduler each: it keeps state
            options["lr_scheduler"] = mx.lr_scheduler.FactorScheduler(step=2, factor=0.5,
                                                                      base_lr=0.05)
        opt = cls(**options)
        if "param_idx2name" in options:
            opt.set_lr_mult({"fc_bias": 0.5})
            opt.set_wd_mult({"fc_bias": 0.0})
        return opt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = four_steps(make(mxlamb.LAMB), zero_rows=case == "epsilon 0")
        theirs = four_steps(make(lambda **kw: builtin_lamb(kw)), zero_rows=case == "epsilon 0")
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # NaN where both are NaN
    if case == "epsilon 0":  # MXNet's meaning, the trap: the tensor with a 0/0 is NaN
        assert np.isnan(ours[0]).all() and np.isfinite(ours[1]).all()


@pytest.mark.parametrize("kwargs", [dict(clip_gradient=0), dict(epsilon=0.0),
                                    dict(epsilon=0)])
def test_traps_are_accepted_with_a_warning(kwargs):
    with pytest.warns(UserWarning, match=list(kwargs)[0] + "=0"):
        mxlamb.LAMB(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(clip_gradient=-1.0), dict(lower_bound=0),
                                    dict(upper_bound=0.0), dict(rescale_grad=0.0),
                                    dict(aggregate_num=0), dict(aggregate_num=None),
                                    dict(aggregate_num=np.inf), dict(clip_gradient=None)])
def test_other_mxnet_values_are_accepted_silently(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mxlamb.LAMB(**kwargs)


@pytest.mark.parametrize("options", [dict(), dict(use_fused_step=False),
                                     dict(skip_nonfinite=True), dict(gradient_accumulation_steps=2),
                                     dict(global_clipnorm=0.5)], ids=str)
def test_begin_num_update_continues_every_step_count(options):
    """Bias correction continues from begin_num_update (t = begin + 1 at the first applied
    update) on every path: host counts, device counts (skip_nonfinite: a skipped step does
    not count), accumulation (t counts updates, not micro-steps)."""
    begin, shapes = 20, ((20, 5), (9,))
    weights, grads = problem("float32", 11, shapes=shapes, steps=6)
    if "skip_nonfinite" in options:
        grads[2][1][0] = np.inf
    opt = mxlamb.LAMB(learning_rate=0.05, wd=0.01, begin_num_update=begin, **options)
    ours, _ = run_updater(opt, weights, grads)
    inner = ReferenceLAMB()
    ref = ReferenceStep(inner, global_clipnorm=options.get("global_clipnorm"),
                        skip_nonfinite="skip_nonfinite" in options)
    for k, w in enumerate(weights):
        ref.init(k, to_f64(w))
        inner.t[k] = begin
    every = options.get("gradient_accumulation_steps", 1)
    for start in range(0, len(grads), every):
        chunk = grads[start:start + every]
        ref.step({k: sum(to_f64(step[k]) for step in chunk) / every for k in range(len(shapes))},
                 0.05, 0.01)
    assert inner.t[0] == begin + (6 // every) - ("skip_nonfinite" in options)
    for k, w in enumerate(ours):
        np.testing.assert_allclose(to_f64(w), inner.weight[k], rtol=2e-5, atol=2e-6)
