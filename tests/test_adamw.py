"""mxlamb.AdamW against Keras' formula (float64 reference), defaults and registration."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import mxlamb
from conftest import MXNET2, TOLERANCE, mxnet1_only
from reference import ReferenceAdamW, ReferenceStep
from stepping import assert_close, problem, run_updater, train_alongside


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


def test_adamw_has_keras_defaults_and_its_name_only_where_mxnet_has_none():
    opt = mxlamb.AdamW()
    assert (opt.epsilon, opt.wd, opt.amsgrad) == (1e-7, 0.004, False)
    registered = mx.optimizer.create("adamw")
    if MXNET2:  # MXNet 2.0's AdamW (wd 0, epsilon 1e-6, correct_bias) keeps its name
        assert type(registered).__module__.startswith("mxnet.")
        assert not isinstance(registered, mxlamb.AdamW)
        assert (registered.epsilon, registered.wd) == (1e-6, 0.0)
    else:
        assert isinstance(registered, mxlamb.AdamW)
        assert (registered.epsilon, registered.wd) == (1e-7, 0.004)


@mxnet1_only
def test_adamw_with_exclusions_and_global_clip_through_trainer():
    mx.random.seed(2)
    net = gluon.nn.Dense(3, in_units=4, prefix="aw_")
    net.initialize(mx.init.Normal(1.0))
    params = net.collect_params()
    trainer = gluon.Trainer(params, "adamw", {"learning_rate": 0.01, "weight_decay": 0.1,
                                              "exclude_from_weight_decay": ["bias"],
                                              "global_clipnorm": 0.5})
    x = mx.nd.array(np.random.RandomState(0).randn(6, 4))
    ref = ReferenceStep(ReferenceAdamW(rescale_grad=1.0), global_clipnorm=0.5,
                        no_decay=["aw_bias"])
    train_alongside(net, trainer, ref, x, 1, 0.01, 0.1)
