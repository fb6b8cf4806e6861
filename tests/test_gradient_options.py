"""Options on the step's gradients (global and per-tensor clipping, static and dynamic loss
scaling, skipping non-finite steps, accumulation), each against the float64 reference over
several steps, through MXNet's Updater (what Trainer and Module use) and the 2.0 methods."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mxlamb
from conftest import TOLERANCE, mx_array, to_f64, mxnet1_only
from reference import ReferenceLAMB, ReferenceStep
from stepping import ATOL, LR, RTOL, WD, assert_close, problem, run_ref, run_updater


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
            net.add(gluon.nn.Dense(16, activation="tanh", in_units=8),
                    gluon.nn.Dense(2, in_units=16))
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
    """A step that leaves out parameters that stepped before is refused in that very step,
    naming them, with nothing applied and nothing counted; the next whole step applies as if
    the refused one had never been tried (the reference takes two steps)."""
    weights, grads = problem(steps=2)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=1.0)
    arrays = [mx_array(w) for w in weights]
    updater = mx.optimizer.get_updater(opt)
    updater([0, 1, 2, 3, 4], [mx_array(g) for g in grads[0]], arrays)
    before, num_update = [to_f64(a) for a in arrays], opt.num_update
    with pytest.raises(RuntimeError, match=r"global_clipnorm.*\b2\b.*\b3\b.*\b4\b.*nothing"):
        updater([0, 1], [mx_array(g) for g in grads[1][:2]], arrays[:2])
    assert_close([to_f64(a) for a in arrays], before, rtol=0, atol=0)
    assert opt.num_update == num_update
    updater([0, 1, 2, 3, 4], [mx_array(g) for g in grads[1]], arrays)
    expected = run_ref(ReferenceStep(ReferenceLAMB(), global_clipnorm=1.0), weights, grads)
    assert_close([to_f64(a) for a in arrays], expected)


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
