"""The engine's ownership of a step, through gluon.Trainer (MXNet 1.x and 2.0): what it derived
from names and indices is derived again when they change, and a step that cannot be whole is
refused in that very step. Each test names the bug it guards against (issue 22)."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mxlamb
from conftest import MXNET2, mxnet1_only
from reference import ReferenceLAMB, ReferenceStep
from stepping import ATOL, RTOL

LR, WD = 0.05, 0.1


def dense(units, in_units, seed, prefix=None):
    mx.random.seed(seed)
    layer = (gluon.nn.Dense(units, in_units=in_units) if MXNET2 or prefix is None
             else gluon.nn.Dense(units, in_units=in_units, prefix=prefix))
    layer.initialize(mx.init.Uniform(0.5))
    return layer


def step(params, trainer, x, seed):
    """One step on the loss sum(net(x) * r) of a fixed random r: returns each parameter's
    gradient (float64) as the Trainer received it."""
    with autograd.record():
        out = params["net"](x)
        r = mx.nd.array(np.random.RandomState(seed).randn(*out.shape))
        if MXNET2:
            r = r.as_np_ndarray()
        loss = (out * r).sum()
    loss.backward()
    grads = [p.grad().asnumpy().astype(np.float64) for p in params["list"]]
    trainer.step(1)
    return grads


def input_of(shape):
    x = mx.nd.array(np.random.RandomState(7).randn(*shape))
    return x.as_np_ndarray() if MXNET2 else x


def weights(params):
    return [p.data().asnumpy().astype(np.float64) for p in params]


@pytest.mark.parametrize("option", [{"global_clipnorm": 1.0}, {"clipnorm": 0.5},
                                    {"skip_nonfinite": True}])
def test_a_frozen_parameter_is_refused_in_the_step_that_meets_it(option):
    """Regression (issue 22, bug 2): a parameter frozen mid-run (grad_req='null') with a
    whole-step option made Trainer.step return normally without applying anything (num_update
    unchanged), and the promised RuntimeError came one step late. Now the step that meets it
    raises, naming the parameter, with nothing applied."""
    net = dense(3, 4, seed=0)
    params = {"net": net, "list": list(net.collect_params().values())}
    opt = mxlamb.LAMB(learning_rate=LR, **option)
    trainer = gluon.Trainer(net.collect_params(), opt)
    x = input_of((2, 4))
    step(params, trainer, x, seed=1)
    net.bias.grad_req = "null"
    before, num_update = weights(params["list"]), opt.num_update
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"parameter\(s\) .*bias.*got none in this step.*"
                                           r"nothing of the step was applied"):
        trainer.step(1)
    for a, b in zip(weights(params["list"]), before):
        np.testing.assert_array_equal(a, b)
    assert opt.num_update == num_update


def test_a_second_trainer_on_the_same_optimizer_derives_its_exclusions_anew():
    """Regression (issue 22, bug 3): one optimizer object used for a second Trainer kept the
    exclusions by name it had derived for the first Trainer's indices (the new index 0 kept
    the old index 0's bias exclusion: 0.043 off), and with global_clipnorm its record of the
    first Trainer's parameters dropped the second Trainer's first step without an error.

    The second Trainer's parameters are another layer, listed weight first: index 0 is now a
    weight and decays. Each step is checked against the float64 reference (the step counts t
    go on by index, as MXNet's own counts do for an optimizer object that is reused)."""
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=10.0,
                      exclude_from_weight_decay=["bias"])
    first = dense(3, 4, seed=0)
    first_params = {"net": first, "list": [first.bias, first.weight]}  # index 0: the bias
    trainer = gluon.Trainer(first_params["list"], opt)
    ref = ReferenceStep(ReferenceLAMB(), global_clipnorm=10.0, no_decay={0})
    for k, w in enumerate(weights(first_params["list"])):
        ref.init(k, w)
    x = input_of((2, 4))
    for seed in (1, 2):
        grads = step(first_params, trainer, x, seed)
        ref.step(dict(enumerate(grads)), LR, WD)
    for k, w in enumerate(weights(first_params["list"])):
        np.testing.assert_allclose(w, ref.inner.weight[k], RTOL, ATOL)

    second = dense(2, 4, seed=3)
    second_params = {"net": second, "list": [second.weight, second.bias]}  # index 0: a weight
    trainer2 = gluon.Trainer(second_params["list"], opt)
    ref2 = ReferenceStep(ReferenceLAMB(), global_clipnorm=10.0, no_decay={1})
    for k, w in enumerate(weights(second_params["list"])):
        ref2.init(k, w)
        ref2.inner.t[k] = 2  # (both indices stepped twice with the first Trainer)
    # What the bug gave: index 0 still excluded from weight decay.
    stale = ReferenceStep(ReferenceLAMB(), global_clipnorm=10.0, no_decay={0, 1})
    for k, w in enumerate(weights(second_params["list"])):
        stale.init(k, w)
        stale.inner.t[k] = 2
    for seed in (4, 5):
        grads = step(second_params, trainer2, x, seed)
        ref2.step(dict(enumerate(grads)), LR, WD)
        stale.step(dict(enumerate(grads)), LR, WD)
        for k, w in enumerate(weights(second_params["list"])):
            np.testing.assert_allclose(w, ref2.inner.weight[k], RTOL, ATOL)
    assert np.abs(weights(second_params["list"])[0] - stale.inner.weight[0]).max() > 1e-4


def test_names_set_after_construction_are_the_ones_used():
    """idx2name given after the first step (the Module API sets it on a made optimizer):
    the exclusions follow the names the optimizer has now."""
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, exclude_from_weight_decay=["bias"])
    weight = mx.nd.array(np.ones((4,), np.float32))
    state = opt.create_state(0, weight)
    grad = mx.nd.array(np.full((4,), 0.5, np.float32))
    opt.update(0, weight, grad, state)
    after_one = weight.asnumpy().copy()
    opt.idx2name = {0: "fc_bias"}  # from now on index 0 is excluded from weight decay
    opt.update(0, weight, grad, state)
    ref = ReferenceLAMB()
    ref.init(0, np.ones(4))
    ref.step(0, np.full(4, 0.5), LR, WD)
    np.testing.assert_allclose(after_one, ref.weight[0], RTOL, ATOL)
    ref.step(0, np.full(4, 0.5), LR, 0.0)
    np.testing.assert_allclose(weight.asnumpy(), ref.weight[0], RTOL, ATOL)


@mxnet1_only  # (MXNet 2.0's Trainer names its parameters 'weight', 'bias', ...: no subset)
def test_the_refusal_of_a_frozen_parameter_says_how_to_train_on_and_that_works(tmp_path):
    """The way out the refusal names (found adversarially: 'make a new Trainer' alone lost
    the states, and load_states refused the smaller Trainer): save, a Trainer over the
    parameters that still train, load with subset=True. The steps after it match the float64
    reference, whose global norm then covers the parameters that train (t goes on)."""
    first, second = dense(4, 5, seed=0), dense(3, 4, seed=1)
    net = gluon.nn.Sequential() if MXNET2 else gluon.nn.Sequential(prefix="frz_")
    net.add(first, second)
    params = {"net": net, "list": None}
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD, global_clipnorm=0.5)
    trainer = gluon.Trainer(net.collect_params(), opt)
    params["list"] = list(trainer._params)
    ref = ReferenceStep(ReferenceLAMB(), global_clipnorm=0.5)
    for k, w in enumerate(weights(params["list"])):
        ref.init(k, w)
    x = input_of((2, 5))
    for seed in (1, 2):
        ref.step(dict(enumerate(step(params, trainer, x, seed))), LR, WD)
    for p in first.collect_params().values():
        p.grad_req = "null"
    with autograd.record():
        loss = net(x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"mxlamb.load_states\(new_trainer, path, "
                                           r"subset=True\)"):
        trainer.step(1)
    path = str(tmp_path / "states")
    mxlamb.save_states(trainer, path)
    training = [p for p in params["list"] if p.grad_req != "null"]
    kept = [params["list"].index(p) for p in training]
    trainer2 = gluon.Trainer(training, mxlamb.LAMB(learning_rate=LR, wd=WD,
                                                   global_clipnorm=0.5))
    mxlamb.load_states(trainer2, path, subset=True)
    params2 = {"net": net, "list": list(trainer2._params)}
    order = [kept[training.index(p)] for p in params2["list"]]  # (the new Trainer's order)
    for seed in (3, 4):
        grads = step(params2, trainer2, x, seed)
        ref.step({order[k]: g for k, g in enumerate(grads)}, LR, WD)
        for k, w in enumerate(weights(params2["list"])):
            np.testing.assert_allclose(w, ref.inner.weight[order[k]], RTOL, ATOL)


def test_a_schedule_read_where_counts_differ_is_mxnets_lambs():
    """Regression (found adversarially): gradual unfreezing with an lr_scheduler. MXNet's LAMB
    reads the schedule for each parameter as it counts it (1.x always; 2.0 in step); mxlamb
    counted the whole call first, and a layer unfrozen late got a later learning rate (50% off
    on a bias). Side by side with MXNet's own LAMB, to float32 rounding."""
    from conftest import BUILTIN_LAMB

    def run(make):  # (fixed names: the Trainer's order, which the schedule follows, too)
        first, second = dense(4, 5, seed=0, prefix="a_"), dense(3, 4, seed=1, prefix="b_")
        net = gluon.nn.Sequential() if MXNET2 else gluon.nn.Sequential(prefix="sch_")
        net.add(first, second)
        for p in first.collect_params().values():
            p.grad_req = "null"  # frozen at first
        trainer = gluon.Trainer(net.collect_params(), make())
        x = input_of((2, 5))
        for s in range(5):
            if s == 3:
                for p in first.collect_params().values():
                    p.grad_req = "write"
            with autograd.record():
                loss = (net(x) * float(s + 1)).sum()
            loss.backward()
            trainer.step(1)
        return [p.data().asnumpy() for p in trainer._params]

    def schedule():
        return mx.lr_scheduler.FactorScheduler(step=1, factor=0.5, base_lr=0.1)
    fused = [True] if not MXNET2 else [False]  # (2.0's fused_step counts the call first)
    for use_fused_step in fused:
        ours = run(lambda: mxlamb.LAMB(learning_rate=0.1, lr_scheduler=schedule(),
                                       use_fused_step=use_fused_step))
        theirs = run(lambda: BUILTIN_LAMB(learning_rate=0.1, lr_scheduler=schedule(),
                                          use_fused_step=use_fused_step)
                     if MXNET2 else BUILTIN_LAMB(learning_rate=0.1, lr_scheduler=schedule()))
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, 1e-5, 1e-6)


@mxnet1_only
@pytest.mark.parametrize("contexts", [[mx.cpu(0), mx.cpu(1)], [mx.cpu(0), mx.cpu(0)]])
def test_the_module_api_with_a_whole_step_option_on_two_devices(tmp_path, contexts):
    """Regression (found adversarially): the Module API keeps every device's states in one
    Updater; with global_clipnorm the check for a missing parameter counted the other
    device's states as this one's (after load_optimizer_states, or with one context twice)
    and refused every step. The run equals MXNet's LAMB (the clip norm never binds)."""
    import os
    from conftest import BUILTIN_LAMB

    data = mx.sym.Variable("data")
    symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(data, num_hidden=3, name="fc"),
                                  name="softmax")

    def run(optimizer):
        mx.random.seed(0)
        mod = mx.mod.Module(symbol, context=contexts)
        mod.bind(data_shapes=[("data", (8, 6))], label_shapes=[("softmax_label", (8,))])
        mod.init_params(mx.init.Xavier())
        mod.init_optimizer(kvstore=None, optimizer=optimizer)
        rng = np.random.RandomState(0)
        for s in range(4):
            batch = mx.io.DataBatch([mx.nd.array(rng.randn(8, 6))],
                                    [mx.nd.array(np.arange(8) % 3)])
            mod.forward_backward(batch)
            mod.update()
            if s == 1:
                path = str(tmp_path / ("opt%d" % id(optimizer)))
                mod.save_optimizer_states(path)
                mod.load_optimizer_states(path)
        return mod.get_params()[0]["fc_weight"].asnumpy()

    os.environ["MXNET_UPDATE_ON_KVSTORE"] = "0"
    try:
        ours = run(mxlamb.LAMB(learning_rate=0.01, global_clipnorm=1e9))
        theirs = run(BUILTIN_LAMB(learning_rate=0.01))
    finally:
        del os.environ["MXNET_UPDATE_ON_KVSTORE"]
    np.testing.assert_allclose(ours, theirs, RTOL, ATOL)
