"""mxlamb's training options (global/per-tensor clipping, accumulation, EMA, loss scaling,
skipping non-finite steps, exclusions, trust-ratio read-out) and mxlamb.AdamW, each against the
float64 reference over several steps, through the MXNet Updater (what Trainer and Module use)
and the 2.0 methods."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mxlamb
from conftest import TOLERANCE, mx_array, to_f64, mxnet1_only
from reference import ReferenceAdamW, ReferenceLAMB, ReferenceStep

SHAPES = [(5,), (40000,), (3, 7), (1,), (129,)]
LR, WD = 0.01, 0.01
RTOL, ATOL = TOLERANCE["float32"]


def problem(seed=0, steps=4, scale=1.0, shapes=SHAPES):
    rng = np.random.RandomState(seed)
    weights = [rng.randn(*s).astype(np.float32) for s in shapes]
    grads = [[(scale * rng.randn(*s)).astype(np.float32) for s in shapes]
             for _ in range(steps)]
    return weights, grads


def run_updater(opt, weights, grads, dtype="float32", mixed=False, arrays_out=None):
    """Steps through mx.optimizer.get_updater (list calls, as Trainer makes them). ``mixed``
    makes every other parameter float32 (the Updater then calls once per dtype). The weight
    arrays stepped are appended to ``arrays_out`` if given."""
    dtypes = [("float32" if mixed and i % 2 else dtype) for i in range(len(weights))]
    arrays = [mx_array(w, d) for w, d in zip(weights, dtypes)]
    if arrays_out is not None:
        arrays_out += arrays
    updater = mx.optimizer.get_updater(opt)
    for step in grads:
        updater(list(range(len(arrays))), [mx_array(g, d) for g, d in zip(step, dtypes)], arrays)
    return [to_f64(a) for a in arrays], updater


def run_ref(ref, weights, grads, lr=LR, wd=WD):
    for k, w in enumerate(weights):
        ref.init(k, w)
    for step in grads:
        ref.step(dict(enumerate(step)), lr, wd)
    return [ref.inner.weight[k] for k in range(len(weights))]


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg="parameter %d" % i)


# ------------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("aggregate_num", [1, 2, 4])
@pytest.mark.parametrize("fused", [True, False])
def test_global_clipnorm_matches_clip_then_step(aggregate_num, fused):
    weights, grads = problem(scale=3.0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=2.5, rescale_grad=0.5,
                      aggregate_num=aggregate_num, use_fused_step=fused)
    actual, _ = run_updater(opt, weights, grads)
    expected = run_ref(ReferenceStep(ReferenceLAMB(rescale_grad=0.5), global_clipnorm=2.5),
                       weights, grads)
    assert_close(actual, expected)
    # The clip did act: the plain step differs.
    plain = run_ref(ReferenceStep(ReferenceLAMB(rescale_grad=0.5)), weights, grads)
    assert not np.allclose(plain[1], expected[1], rtol=1e-3)


def test_global_clipnorm_spans_every_dtype_group_of_the_step():
    """fp16 and fp32 parameters reach the optimizer in two Updater calls; the norm is over
    both, as gluon.utils.clip_global_norm's is."""
    weights, grads = problem(scale=3.0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=2.0, multi_precision=True)
    actual, _ = run_updater(opt, weights, grads, dtype="float16", mixed=True)
    # The reference sees the same fp16-rounded inputs.
    rounded = lambda xs: [x.astype(np.float16).astype(np.float64) if i % 2 == 0 else x
                          for i, x in enumerate(xs)]
    expected = run_ref(ReferenceStep(ReferenceLAMB(), global_clipnorm=2.0), rounded(weights),
                       [rounded(s) for s in grads])
    assert_close(actual, expected, *TOLERANCE["float16"])


@mxnet1_only
def test_global_clipnorm_equals_gluon_clip_global_norm_then_step():
    def net_and_data():
        mx.random.seed(3)
        net = gluon.nn.HybridSequential(prefix="clip_")
        with net.name_scope():
            net.add(gluon.nn.Dense(16, activation="tanh", in_units=8), gluon.nn.Dense(2, in_units=16))
        net.initialize(mx.init.Xavier())
        return net

    x = mx.nd.array(np.random.RandomState(0).randn(32, 8))
    y = mx.nd.array(np.random.RandomState(1).randn(32, 2) * 50)
    ours, theirs = net_and_data(), net_and_data()
    t_ours = gluon.Trainer(ours.collect_params(), "lamb",
                           {"learning_rate": 0.05, "global_clipnorm": 0.1})
    t_theirs = gluon.Trainer(theirs.collect_params(), "lamb", {"learning_rate": 0.05})
    for _ in range(3):
        for net, trainer, clip in ((ours, t_ours, False), (theirs, t_theirs, True)):
            with autograd.record():
                loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            if clip:
                grads = [p.grad() for p in net.collect_params().values()]
                norm = gluon.utils.clip_global_norm(grads, 0.1)
                assert norm > 0.1  # the clip is active
            trainer.step(1)
    for a, b in zip(ours.collect_params().values(), theirs.collect_params().values()):
        np.testing.assert_allclose(a.data().asnumpy(), b.data().asnumpy(), rtol=1e-5, atol=1e-6)


def test_clipnorm_clips_each_gradient():
    weights, grads = problem(scale=2.0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, clipnorm=1.5, aggregate_num=2)
    actual, _ = run_updater(opt, weights, grads)
    expected = run_ref(ReferenceStep(ReferenceLAMB(), clipnorm=1.5), weights, grads)
    assert_close(actual, expected)


def test_global_then_per_tensor_clip_with_loss_scale_factor_and_clip_gradient():
    weights, grads = problem(scale=4.0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=30.0, clipnorm=1.0,
                      loss_scale_factor=8.0, clip_gradient=0.05, aggregate_num=3)
    actual, _ = run_updater(opt, weights, grads)
    ref = ReferenceStep(ReferenceLAMB(clip_gradient=0.05), global_clipnorm=30.0, clipnorm=1.0,
                        loss_scale=8.0)
    assert_close(actual, run_ref(ref, weights, grads))


def test_loss_scale_factor_divides_gradients():
    weights, grads = problem()
    scaled = [[g * 64 for g in step] for step in grads]
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, loss_scale_factor=64.0)
    actual, _ = run_updater(opt, weights, scaled)
    assert_close(actual, run_ref(ReferenceStep(ReferenceLAMB()), weights, grads))


def test_whole_step_options_refuse_a_step_missing_a_parameter():
    weights, grads = problem(steps=1)
    opt = mxlamb.LAMB(global_clipnorm=1.0)
    arrays = [mx_array(w) for w in weights]
    updater = mx.optimizer.get_updater(opt)
    updater([0, 1, 2, 3, 4], [mx_array(g) for g in grads[0]], arrays)
    before = to_f64(arrays[0])
    updater([0, 1], [mx_array(g) for g in grads[0][:2]], arrays[:2])  # pending: 2, 3, 4 missing
    with pytest.raises(RuntimeError, match=r"global_clipnorm.*\b2\b.*\b3\b.*\b4\b"):
        updater([0], [mx_array(grads[0][0])], arrays[:1])
    np.testing.assert_array_equal(to_f64(arrays[0]), before)


# ---------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_applies_the_mean_every_n_steps(fused):
    weights, micro = problem(steps=6)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, gradient_accumulation_steps=3,
                      rescale_grad=0.5, aggregate_num=2, use_fused_step=fused)
    arrays = [mx_array(w) for w in weights]
    updater = mx.optimizer.get_updater(opt)
    ref = ReferenceStep(ReferenceLAMB(rescale_grad=0.5))
    for k, w in enumerate(weights):
        ref.init(k, w)
    for n, step in enumerate(micro):
        before = [to_f64(a) for a in arrays]
        updater(list(range(len(arrays))), [mx_array(g) for g in step], arrays)
        if n % 3 == 2:
            mean = [np.mean([micro[m][i].astype(np.float64) for m in range(n - 2, n + 1)], axis=0)
                    for i in range(len(weights))]
            ref.step(dict(enumerate(mean)), LR, WD)
        else:  # between updates the weights stay
            assert_close([to_f64(a) for a in arrays], before, rtol=0, atol=0)
    assert_close([to_f64(a) for a in arrays], [ref.inner.weight[k] for k in range(len(weights))])
    assert opt.num_update == 6  # the schedule saw every call
    assert ref.inner.t[0] == 2   # t counted the two updates only (the reference agrees above)


def test_accumulation_with_fp16_multi_precision_and_global_clip():
    weights, micro = problem(steps=4, scale=3.0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, gradient_accumulation_steps=2,
                      global_clipnorm=1.0, multi_precision=True)
    actual, _ = run_updater(opt, weights, micro, dtype="float16")
    r = lambda x: x.astype(np.float16).astype(np.float64)
    means = [[(r(micro[n][i]) + r(micro[n + 1][i])) / 2 for i in range(len(weights))]
             for n in (0, 2)]
    expected = run_ref(ReferenceStep(ReferenceLAMB(), global_clipnorm=1.0),
                       [r(w) for w in weights], means)
    assert_close(actual, expected, *TOLERANCE["float16"])


# ------------------------------------------------------------------------------------ EMA

def test_ema_follows_the_formula_and_finalize_copies_it():
    weights, grads = problem(steps=5)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, use_ema=True, ema_momentum=0.8, aggregate_num=2)
    weights_now = []
    actual, updater = run_updater(opt, weights, grads, arrays_out=weights_now)
    ref = ReferenceStep(ReferenceLAMB(), ema_momentum=0.8)
    assert_close(actual, run_ref(ref, weights, grads))
    for k in range(len(weights)):
        mean, var, average = updater.states[k]
        np.testing.assert_allclose(to_f64(average), ref.average[k], rtol=RTOL, atol=ATOL)
    opt.finalize_variable_values()
    for k, w in enumerate(weights_now):
        np.testing.assert_allclose(to_f64(w), ref.average[k], rtol=RTOL, atol=ATOL)


def test_ema_overwrite_frequency_replaces_weights_by_the_average():
    weights, grads = problem(steps=4)
    opt = mxlamb.LAMB(learning_rate=LR, use_ema=True, ema_momentum=0.5,
                      ema_overwrite_frequency=2)
    actual, _ = run_updater(opt, weights, grads)
    ref = ReferenceStep(ReferenceLAMB(), ema_momentum=0.5)
    for k, w in enumerate(weights):
        ref.init(k, w)
    for n, step in enumerate(grads):
        ref.step(dict(enumerate(step)), LR, 0.0)
        if n % 2 == 1:
            for k in ref.inner.weight:
                ref.inner.weight[k] = ref.average[k].copy()
    assert_close(actual, [ref.inner.weight[k] for k in range(len(weights))])


@mxnet1_only
def test_averaged_weights_swaps_in_for_evaluation_and_back():
    mx.random.seed(0)
    net = gluon.nn.Dense(3, in_units=4, prefix="ema_")
    net.initialize()
    trainer = gluon.Trainer(net.collect_params(), "lamb",
                            {"learning_rate": 0.1, "use_ema": True, "ema_momentum": 0.9})
    x = mx.nd.array(np.random.RandomState(0).randn(8, 4))
    for _ in range(3):
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        trainer.step(8)
    opt = trainer._optimizer
    trained = {n: p.data().asnumpy() for n, p in net.collect_params().items()}
    states = trainer._updaters[0].states
    with opt.averaged_weights(net.collect_params()):
        for i, p in enumerate(trainer._params):
            np.testing.assert_array_equal(p.data().asnumpy(), states[i][2].asnumpy())
            assert not np.array_equal(p.data().asnumpy(), trained[p.name])
    for n, p in net.collect_params().items():
        np.testing.assert_array_equal(p.data().asnumpy(), trained[n])


# ---------------------------------------------------------------- non-finite and loss scale

@pytest.mark.parametrize("fused", [True, False])
def test_skip_nonfinite_leaves_everything_untouched_and_counts(fused):
    weights, grads = problem(steps=4)
    grads[1][3] = np.array([np.inf], np.float32)
    grads[2][1][17] = np.nan
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, skip_nonfinite=True, aggregate_num=2,
                      use_fused_step=fused)
    actual, updater = run_updater(opt, weights[:2] + weights[2:], grads)
    ref = ReferenceStep(ReferenceLAMB(), skip_nonfinite=True)
    assert_close(actual, run_ref(ref, weights, grads))
    assert ref.skipped == 2 and opt.skipped_steps == 2
    for k in range(len(weights)):  # moments too (the step counts are checked by the weights)
        np.testing.assert_allclose(to_f64(updater.states[k][0]), ref.inner.mean[k],
                                   rtol=RTOL, atol=ATOL)
    ratios = opt.trust_ratios()
    assert np.all(np.isfinite(ratios.values.asnumpy()))  # the last step was applied


def test_nonfinite_gradients_propagate_by_default_as_in_mxnet():
    weights, grads = problem(steps=1)
    grads[0][0][2] = np.nan
    actual, _ = run_updater(mxlamb.LAMB(), weights, grads)
    assert np.isnan(actual[0]).all()  # the trust ratio of that tensor is NaN
    assert np.all(np.isfinite(actual[1]))


def test_dynamic_loss_scaler_skips_overflows_halves_and_grows():
    weights, grads = problem(steps=6, shapes=[(9,), (300,)])
    scaler = mxlamb.LossScaler(init_scale=1024.0, growth_interval=2)
    # Steps 1, 2 clean at 1024 -> 2048; step 3 overflows at 2048: skipped, 1024; steps 4, 5
    # clean -> 2048; step 6 clean at 2048 (one clean step towards the next doubling).
    factors = [1024.0, 1024.0, 2048.0, 1024.0, 1024.0, 2048.0]
    scaled = [[g * f for g in step] for step, f in zip(grads, factors)]
    scaled[2][1][5] = np.inf
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, loss_scaler=scaler, multi_precision=True)
    actual, _ = run_updater(opt, weights, scaled, dtype="float16")
    r = lambda x: x.astype(np.float16).astype(np.float64)
    unscaled = [[r(g * f) / f for g in step] for n, (step, f) in enumerate(zip(grads, factors))
                if n != 2]
    expected = run_ref(ReferenceStep(ReferenceLAMB()), [r(w) for w in weights], unscaled)
    assert_close(actual, expected, *TOLERANCE["float16"])
    assert scaler.skipped_steps == 1 and opt.skipped_steps == 1
    assert scaler.loss_scale == 2048.0
    np.testing.assert_array_equal(scaler.state.asnumpy(), [2048.0, 1.0, 1.0])


def test_loss_scaler_scales_the_loss_on_device():
    scaler = mxlamb.LossScaler(init_scale=256.0)
    loss = mx.nd.array([0.5, 2.0], dtype="float16")
    np.testing.assert_array_equal(scaler.scale_loss(loss).asnumpy(), [128.0, 512.0])


# ---------------------------------------------------------------------------- exclusions

@mxnet1_only
def test_exclusions_by_gluon_parameter_names():
    mx.random.seed(1)
    net = gluon.nn.HybridSequential(prefix="bert_")
    with net.name_scope():
        net.add(gluon.nn.Dense(6, in_units=5), gluon.nn.LayerNorm(in_channels=6),
                gluon.nn.Dense(2, in_units=6))
    net.initialize(mx.init.Normal(0.5))
    params = net.collect_params()
    names = list(params.keys())
    initial = {n: p.data().asnumpy().astype(np.float64) for n, p in params.items()}
    trainer = gluon.Trainer(params, "lamb", {
        "learning_rate": 0.02, "wd": 0.1,
        "exclude_from_weight_decay": ["bias", "gamma", "beta", "LayerNorm"],
        "exclude_from_layer_adaptation": ["bias", "layernorm"]})
    x = mx.nd.array(np.random.RandomState(0).randn(4, 5))
    ref = ReferenceStep(ReferenceLAMB(rescale_grad=1 / 4.0),
                        no_decay=[n for n in names if any(k in n for k in
                                                          ("bias", "gamma", "beta"))],
                        no_adaptation=[n for n in names if "bias" in n or "layernorm" in n])
    assert len(ref.no_decay) == 4 and len(ref.no_adaptation) == 4  # 2 biases, gamma, beta
    for n in names:
        ref.init(n, initial[n])
    for _ in range(3):
        with autograd.record():
            loss = (net(x) ** 2).sum()
        loss.backward()
        grads = {n: p.grad().asnumpy() for n, p in params.items()}
        trainer.step(4)
        ref.step(grads, 0.02, 0.1)
    for n, p in params.items():
        np.testing.assert_allclose(p.data().asnumpy(), ref.inner.weight[n], rtol=RTOL,
                                   atol=ATOL, err_msg=n)
    ratios = trainer._optimizer.trust_ratios()
    assert sorted(ratios.keys) == sorted(names)
    for key, value in zip(ratios.keys, ratios.values.asnumpy()):
        if key in ref.no_adaptation:
            assert value == 1.0
        else:
            assert value != 1.0 and np.isfinite(value)


def test_trust_ratios_match_the_reference():
    weights, grads = problem(steps=2)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, aggregate_num=2, lower_bound=0.5,
                      param_idx2name={i: "p%d_weight" % i for i in range(len(weights))})
    run_updater(opt, weights, grads)
    ref = ReferenceLAMB(lower_bound=0.5)
    for k, w in enumerate(weights):
        ref.init(k, w)
    ratios = {}
    for step in grads:
        for k, g in enumerate(step):
            w = ref.weight[k]
            u = ref.raw_update(k, g, WD)
            ratios[k] = ref.trust_ratio(w, u)
            ref.weight[k] = w - LR * ratios[k] * u
    got = opt.trust_ratios()
    assert got.keys == ["p%d_weight" % i for i in range(len(weights))]
    np.testing.assert_allclose(got.values.asnumpy(), [ratios[k] for k in range(len(weights))],
                               rtol=1e-5)


# ---------------------------------------------------------------------------------- AdamW

@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype,aggregate_num", [("float32", 1), ("float32", 3),
                                                 ("float16", 2)])
def test_adamw_matches_the_keras_formula(amsgrad, dtype, aggregate_num):
    weights, grads = problem(steps=6)
    # Shrinking gradients make AMSGrad's max differ from v.
    grads = [[g * 0.5 ** n for g in step] for n, step in enumerate(grads)]
    opt = mxlamb.AdamW(learning_rate=0.01, weight_decay=0.05, amsgrad=amsgrad,
                       aggregate_num=aggregate_num, multi_precision=dtype != "float32")
    actual, _ = run_updater(opt, weights, grads, dtype=dtype)
    r = (lambda x: x.astype(np.float16).astype(np.float64)) if dtype == "float16" else \
        (lambda x: x.astype(np.float64))
    ref = ReferenceAdamW(amsgrad=amsgrad)
    for k, w in enumerate(weights):
        ref.init(k, r(w))
    for step in grads:
        for k, g in enumerate(step):
            ref.step(k, r(g), 0.01, 0.05)
    assert_close(actual, [ref.weight[k] for k in range(len(weights))], *TOLERANCE[dtype])
    if amsgrad:  # the max matters in this problem
        plain = ReferenceAdamW()
        plain.init(1, r(weights[1]))
        for step in grads:
            plain.step(1, r(step[1]), 0.01, 0.05)
        assert not np.allclose(plain.weight[1], ref.weight[1], rtol=1e-4)


def test_adamw_is_registered_and_has_keras_defaults():
    opt = mx.optimizer.create("adamw")
    assert isinstance(opt, mxlamb.AdamW)
    assert (opt.epsilon, opt.wd, opt.amsgrad) == (1e-7, 0.004, False)


@mxnet1_only
def test_adamw_with_exclusions_and_global_clip_through_trainer():
    mx.random.seed(2)
    net = gluon.nn.Dense(3, in_units=4, prefix="aw_")
    net.initialize(mx.init.Normal(1.0))
    params = net.collect_params()
    initial = {n: p.data().asnumpy() for n, p in params.items()}
    trainer = gluon.Trainer(params, "adamw", {"learning_rate": 0.01, "weight_decay": 0.1,
                                              "exclude_from_weight_decay": ["bias"],
                                              "global_clipnorm": 0.5})
    x = mx.nd.array(np.random.RandomState(0).randn(6, 4))
    ref = ReferenceStep(ReferenceAdamW(rescale_grad=1.0), global_clipnorm=0.5,
                        no_decay=["aw_bias"])
    for n in initial:
        ref.init(n, initial[n])
    for _ in range(3):
        with autograd.record():
            loss = (net(x) ** 2).sum()
        loss.backward()
        grads = {n: p.grad().asnumpy() for n, p in params.items()}
        trainer.step(1)
        ref.step(grads, 0.01, 0.1)
    for n, p in params.items():
        np.testing.assert_allclose(p.data().asnumpy(), ref.inner.weight[n], rtol=RTOL,
                                   atol=ATOL, err_msg=n)


# -------------------------------------------------------------------------- float64 weights

F64_RTOL, F64_ATOL = TOLERANCE["float64"]
F64_NAMES = {0: "a_weight", 1: "a_bias", 2: "b_weight", 3: "b_bias", 4: "c_weight"}
# option set -> (LAMB options, ReferenceStep options); the problem's step 2 has an inf in
# parameter 3 and its steps are scaled by 8 where a loss scale is on.
F64_CASES = {
    "global_clipnorm": (dict(global_clipnorm=2.5), dict(global_clipnorm=2.5)),
    "clipnorm": (dict(clipnorm=1.5, clip_gradient=0.4), dict(clipnorm=1.5)),
    "ema": (dict(use_ema=True, ema_momentum=0.8), dict(ema_momentum=0.8)),
    "accumulation": (dict(gradient_accumulation_steps=2), {}),
    "loss_scale_factor": (dict(loss_scale_factor=8.0), dict(loss_scale=8.0)),
    "loss_scaler": (dict(multi_precision=True), dict(skip_nonfinite=True)),
    "skip_nonfinite": (dict(skip_nonfinite=True), dict(skip_nonfinite=True)),
    "exclusions": (dict(param_idx2name=F64_NAMES, exclude_from_weight_decay=["bias"],
                        exclude_from_layer_adaptation=["bias", "c_"]),
                   dict(no_decay=[1, 3], no_adaptation=[1, 3, 4])),
}


def run_float64_case(case, fused):
    options, ref_options = F64_CASES[case]
    weights, grads = problem(steps=4, scale=2.0)
    weights = [w.astype(np.float64) * 1.1 for w in weights]  # bits float32 cannot hold
    grads = [[g.astype(np.float64) * 1.1 for g in step] for step in grads]
    if case in ("loss_scaler", "skip_nonfinite"):
        grads[2][3] = np.array([np.inf])
    feed = grads
    if case in ("loss_scale_factor", "loss_scaler"):
        feed = [[g * 8.0 for g in step] for step in grads]
        if case == "loss_scaler":  # the scale halves after the skipped step 2: 8, 8, 8, 4
            feed[3] = [g * 4.0 for g in grads[3]]
            options = dict(options, loss_scaler=mxlamb.LossScaler(init_scale=8.0,
                                                                  growth_interval=100))
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, aggregate_num=2, use_fused_step=fused,
                      **options)
    actual, updater = run_updater(opt, weights, feed, dtype="float64")
    ref = ReferenceStep(ReferenceLAMB(clip_gradient=options.get("clip_gradient")),
                        **ref_options)
    if case == "accumulation":
        grads = [[(a + b) / 2 for a, b in zip(grads[n], grads[n + 1])] for n in (0, 2)]
    expected = run_ref(ref, weights, feed if case == "loss_scale_factor" else grads)
    return opt, updater, actual, expected, ref


@pytest.mark.parametrize("case", list(F64_CASES))
def test_every_option_on_float64_weights(case):
    """float64 weights are updated in float64 (moments, raw update, norms) with each training
    option: weights and every state float64 and within a few ulps of the reference;
    step and fused_step bit-identical."""
    results = []
    for fused in (True, False):
        opt, updater, actual, expected, ref = run_float64_case(case, fused)
        assert_close(actual, expected, F64_RTOL, F64_ATOL)
        for k in range(len(actual)):
            state = updater.states[k]
            assert all(np.dtype(a.dtype) == np.float64 for a in state), case
            np.testing.assert_allclose(to_f64(state[0]), ref.inner.mean[k], F64_RTOL, F64_ATOL)
            np.testing.assert_allclose(to_f64(state[1]), ref.inner.var[k], F64_RTOL, F64_ATOL)
            if case == "ema":
                np.testing.assert_allclose(to_f64(state[2]), ref.average[k], F64_RTOL,
                                           F64_ATOL)
        if case in ("loss_scaler", "skip_nonfinite"):
            assert opt.skipped_steps == ref.skipped == 1
        results.append(actual + [to_f64(a) for k in sorted(updater.states)
                                 for a in updater.states[k]])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_on_float64_weights(amsgrad):
    weights, grads = problem(steps=5)
    weights = [w.astype(np.float64) * 1.1 for w in weights]
    grads = [[g.astype(np.float64) * 0.5 ** n for g in step] for n, step in enumerate(grads)]
    opt = mxlamb.AdamW(learning_rate=0.01, weight_decay=0.05, amsgrad=amsgrad, aggregate_num=3)
    actual, updater = run_updater(opt, weights, grads, dtype="float64")
    ref = ReferenceAdamW(amsgrad=amsgrad)
    for k, w in enumerate(weights):
        ref.init(k, w)
    for step in grads:
        for k, g in enumerate(step):
            ref.step(k, g, 0.01, 0.05)
    assert_close(actual, [ref.weight[k] for k in range(len(weights))], F64_RTOL, F64_ATOL)
    assert all(np.dtype(a.dtype) == np.float64 for k in updater.states
               for a in updater.states[k])


def test_global_clipnorm_spans_float32_and_float64_groups():
    """float32 and float64 parameters reach the optimizer in two Updater calls (and two
    operator calls, one per math type); the global norm is over both."""
    weights, grads = problem(scale=3.0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=2.0)
    actual, updater = run_updater(opt, weights, grads, dtype="float64", mixed=True)
    assert [np.dtype(updater.states[k][0].dtype).name for k in range(len(weights))] == [
        "float64", "float32", "float64", "float32", "float64"]
    expected = run_ref(ReferenceStep(ReferenceLAMB(), global_clipnorm=2.0), weights, grads)
    assert_close(actual, expected)


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("option,value", [
    ("global_clipnorm", -1.0), ("global_clipnorm", 0.0), ("clipnorm", -0.5),
    ("clipnorm", float("nan")), ("ema_momentum", 1.0), ("ema_momentum", -0.1),
    ("ema_overwrite_frequency", 0), ("ema_overwrite_frequency", 2.5),
    ("gradient_accumulation_steps", 2.0), ("gradient_accumulation_steps", 0),
    ("loss_scale_factor", 0.0), ("use_ema", 1), ("skip_nonfinite", "yes"),
    ("exclude_from_weight_decay", ["bias", "(unclosed"]),
    ("exclude_from_layer_adaptation", "bias"), ("loss_scaler", 128.0),
])
def test_bad_option_values_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        mxlamb.LAMB(**{option: value})
    with pytest.raises(ValueError, match=option):
        mx.optimizer.create("adamw", **{option: value})


@pytest.mark.parametrize("kwargs,name", [
    ({"weight_decay": -1.0}, "weight_decay"), ({"amsgrad": 1}, "amsgrad"),
    ({"lower_bound": 1.0}, "lower_bound"), ({"epsilon": -1e-7}, "epsilon")])
def test_adamw_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mxlamb.AdamW(**kwargs)


@pytest.mark.parametrize("kwargs,name", [({"init_scale": 0.5}, "init_scale"),
                                         ({"growth_interval": 0}, "growth_interval")])
def test_loss_scaler_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mxlamb.LossScaler(**kwargs)


@mxnet1_only
def test_demo_plots_trust_ratios(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    png = tmp_path / "ratios.png"
    subprocess.check_call([sys.executable, os.path.join(root, "examples", "train_mlp.py"),
                           "--epochs", "2", "--trust-ratios", str(png)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
