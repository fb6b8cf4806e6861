"""Weight averages (EMA): the formula, overwrite frequency, finalize and swap for evaluation."""
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import mxlamb
from conftest import to_f64, mxnet1_only
from reference import ReferenceLAMB, ReferenceStep
from stepping import ATOL, LR, RTOL, WD, assert_close, problem, run_ref, run_updater


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
