"""Several devices in one process train as one device does.

Two or three CPU contexts stand for GPUs: a Gluon model split over them (split_and_load), every
kvstore and update_on_kvstore choice, the Module API, every training option, fp16
multi-precision and resumed runs, compared with the same run on one context (float32
round-off apart: the kvstore sums the devices' gradients in another order) and with MXNet's own
LAMB in the same configuration. Regression tests for issue 18: the weights never moved with a
device kvstore (a refusal of cpu(1) against cpu_pinned(0) was dropped by the kvstore's ctypes
callback), step counts were shared by the devices (bias correction with t twice too large), and
whole-step options ran a step late on the kvstore.
"""
import os
import tempfile

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mxlamb
from conftest import BUILTIN_LAMB, mxnet1_only
from mxlamb.devices import same_memory

pytestmark = mxnet1_only  # Gluon 1.x prefixes, Module API; MXNet 2.0: tests/test_mxnet2.py

BATCH = 12
STEPS = 5
# The kvstore adds the devices' gradients in another order than one device's batch sum: the
# weights agree to float32 round-off (MXNet's own LAMB: 3e-8 here).
ATOL = 2e-6


def contexts(n):
    return [mx.cpu(k) for k in range(n)]


def batches(steps, inf_at=None, seed=1):
    """(x, y) per step; ``inf_at`` = (step, row): an inf in that row's input, i.e. in the
    gradient of the device that gets the row."""
    rng = np.random.RandomState(seed)
    out = []
    for step in range(steps):
        x = rng.randn(BATCH, 5).astype(np.float32)
        if inf_at is not None and step == inf_at[0]:
            x[inf_at[1], 0] = np.inf
        out.append((x, rng.randint(0, 3, BATCH).astype(np.float32)))
    return out


def make_net(ctxs):
    mx.random.seed(0)
    net = gluon.nn.HybridSequential(prefix="md_")
    with net.name_scope():
        net.add(gluon.nn.Dense(16, activation="tanh", in_units=5), gluon.nn.Dense(3, in_units=16))
    net.initialize(mx.init.Xavier(), ctx=ctxs)
    return net


def forward_backward(net, ctxs, x, y):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    xs = gluon.utils.split_and_load(mx.nd.array(x), ctxs)
    ys = gluon.utils.split_and_load(mx.nd.array(y), ctxs)
    with autograd.record():
        losses = [loss_fn(net(a), b) for a, b in zip(xs, ys)]
    for loss in losses:
        loss.backward()


def train(ctxs, optimizer, kvstore="device", update_on_kvstore=None, steps=STEPS, data=None,
          net=None):
    """Trains make_net on ``ctxs``; returns {name: weights on every context} and the Trainer."""
    net = net or make_net(ctxs)
    trainer = gluon.Trainer(net.collect_params(), optimizer, kvstore=kvstore,
                            update_on_kvstore=update_on_kvstore)
    for x, y in (data or batches(steps)):
        forward_backward(net, ctxs, x, y)
        trainer.step(BATCH)
    return weights_of(net), trainer


def weights_of(net):
    return {name: [d.asnumpy() for d in p.list_data()] for name, p in net.collect_params().items()}


def assert_same_as_one_device(multi, single, atol=ATOL):
    for name, copies in multi.items():
        for copy in copies:  # every device holds the one-device weights
            np.testing.assert_allclose(copy, single[name][0], rtol=0, atol=atol, err_msg=name)


def test_contexts_are_memories_not_names():
    assert same_memory(mx.cpu(1), mx.cpu_pinned(0))
    assert same_memory(mx.cpu(0), mx.Context("cpu_shared", 0))
    assert not same_memory(mx.gpu(0), mx.gpu(1)) and not same_memory(mx.cpu(0), mx.gpu(0))


KVSTORES = [("device", None, 2), ("device", True, 2), ("device", False, 2), ("local", True, 2),
            ("local", False, 2), ("device", None, 3), ("local", False, 3)]


@pytest.mark.parametrize("kvstore,update_on_kvstore,n", KVSTORES)
def test_trainer_on_several_devices_equals_one_device(kvstore, update_on_kvstore, n):
    single, _ = train(contexts(1), mxlamb.LAMB(learning_rate=0.01, wd=0.01))
    multi, _ = train(contexts(n), mxlamb.LAMB(learning_rate=0.01, wd=0.01), kvstore,
                     update_on_kvstore)
    assert_same_as_one_device(multi, single)
    builtin, _ = train(contexts(n), BUILTIN_LAMB(learning_rate=0.01, wd=0.01), kvstore,
                       update_on_kvstore)
    assert_same_as_one_device(multi, builtin, atol=1e-6)
    moved = [np.abs(multi[k][0] - make_net(contexts(1)).collect_params()[k].data().asnumpy())
             for k in multi]
    assert min(m.max() for m in moved) > 1e-3  # the weights really moved


def test_without_a_kvstore_each_device_steps_its_own_gradients_as_mxnet_does():
    ours, _ = train(contexts(2), mxlamb.LAMB(learning_rate=0.01), kvstore=None)
    theirs, _ = train(contexts(2), BUILTIN_LAMB(learning_rate=0.01), kvstore=None)
    for name in ours:
        for a, b in zip(ours[name], theirs[name]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
    assert any(np.abs(c[0] - c[1]).max() > 1e-4 for c in ours.values())  # halves differ


def test_step_counts_are_per_device_as_in_mxnet():
    ours = mxlamb.LAMB(learning_rate=0.01)
    theirs = BUILTIN_LAMB(learning_rate=0.01)
    for opt in (ours, theirs):
        train(contexts(2), opt, "device", update_on_kvstore=False)
    assert ours._all_index_update_counts == theirs._all_index_update_counts
    assert {d: set(c.values()) for d, c in ours._all_index_update_counts.items()} == {
        0: {STEPS}, 1: {STEPS}}
    assert ours.num_update == theirs.num_update == STEPS


OPTIONS = {
    "global_clipnorm": dict(global_clipnorm=0.05),
    "clipnorm": dict(clipnorm=0.02),
    "skip_nonfinite": dict(skip_nonfinite=True),
    "ema": dict(use_ema=True, ema_momentum=0.7, ema_overwrite_frequency=3),
    "accumulation": dict(gradient_accumulation_steps=2),
    "exclusions": dict(wd=0.1, exclude_from_weight_decay=["bias"],
                       exclude_from_layer_adaptation=["dense1"]),
    "begin_num_update": dict(begin_num_update=10),
}


@pytest.mark.parametrize("update_on_kvstore", [False, True])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_on_two_devices_equals_one_device(option, update_on_kvstore):
    whole_step = option in ("global_clipnorm", "clipnorm", "skip_nonfinite")
    if whole_step and update_on_kvstore:
        pytest.skip("refused on the kvstore: test_whole_step_options_on_the_kvstore_are_refused")
    inf_at = (2, 9) if option == "skip_nonfinite" else None  # row 9: the second device's half
    data = batches(STEPS + 1, inf_at=inf_at)
    single, opt1 = train(contexts(1), mxlamb.LAMB(learning_rate=0.01, **OPTIONS[option]),
                         data=data)
    multi, opt2 = train(contexts(2), mxlamb.LAMB(learning_rate=0.01, **OPTIONS[option]),
                        "device", update_on_kvstore, data=data)
    assert_same_as_one_device(multi, single)
    if option == "skip_nonfinite":
        assert opt1.optimizer.skipped_steps == opt2.optimizer.skipped_steps == 1
        assert all(np.isfinite(c).all() for copies in multi.values() for c in copies)


def test_adamw_on_two_devices_equals_one_device():
    single, _ = train(contexts(1), mxlamb.AdamW(learning_rate=0.01))
    for update_on_kvstore in (False, True):
        multi, _ = train(contexts(2), mxlamb.AdamW(learning_rate=0.01), "device",
                         update_on_kvstore)
        assert_same_as_one_device(multi, single)


def test_ema_averages_reach_every_device_on_the_kvstore_too():
    for update_on_kvstore in (False, True):
        net = make_net(contexts(2))
        _, trainer = train(contexts(2), mxlamb.LAMB(learning_rate=0.01, use_ema=True,
                                                    ema_momentum=0.5),
                           "device", update_on_kvstore, net=net)
        single_net = make_net(contexts(1))
        _, single = train(contexts(1), mxlamb.LAMB(learning_rate=0.01, use_ema=True,
                                                   ema_momentum=0.5), net=single_net)
        single.optimizer.finalize_variable_values()
        trainer.optimizer.finalize_variable_values()
        assert_same_as_one_device(weights_of(net), weights_of(single_net))


def param_model(ctxs, dtype, seed=0):
    """Parameters of awkward sizes (no layer: MXNet 1.9 has no float16 FullyConnected on CPU);
    the loss of a device is sum_i sum(sin(w_i) * x_i)."""
    rng = np.random.RandomState(seed)
    params = []
    for i, shape in enumerate([(7,), (30, 11), (1,), (257,)]):
        p = gluon.Parameter("pm%d_weight" % i, shape=shape, dtype=dtype)
        p.initialize(ctx=ctxs)
        p.set_data(mx.nd.array(rng.randn(*shape), dtype=dtype))
        params.append(p)
    return params


def train_params(ctxs, optimizer, dtype, update_on_kvstore, scaler=None, inf_at=None):
    params = param_model(ctxs, dtype)
    trainer = gluon.Trainer(params, optimizer, kvstore="device",
                            update_on_kvstore=update_on_kvstore)
    rng = np.random.RandomState(3)
    for step in range(STEPS):
        xs = [rng.randn(2, *p.shape).astype(np.float32) for p in params]  # 2 halves
        if inf_at == step:
            xs[1][1].flat[0] = np.inf  # the second half: the second device's
        with autograd.record():
            losses = []
            for k, ctx in enumerate(ctxs):
                halves = range(2) if len(ctxs) == 1 else [k]
                loss = sum((mx.nd.sin(p.data(ctx)) * mx.nd.array(x[h], ctx, dtype=dtype)).sum()
                           for p, x in zip(params, xs) for h in halves)
                losses.append(scaler.scale_loss(loss) if scaler is not None else loss)
        for loss in losses:
            loss.backward()
        trainer.step(1)
    return {p.name: [d.astype("float32").asnumpy() for d in p.list_data()] for p in params}


@pytest.mark.parametrize("update_on_kvstore", [False, True])
def test_fp16_multi_precision_on_two_devices_equals_one_device(update_on_kvstore):
    make = lambda: mxlamb.LAMB(learning_rate=0.01, multi_precision=True)
    single = train_params(contexts(1), make(), "float16", None)
    multi = train_params(contexts(2), make(), "float16", update_on_kvstore)
    assert_same_as_one_device(multi, single, atol=2e-3)  # one float16 ulp at |w| < 4


def test_loss_scaler_with_an_inf_on_one_device_equals_one_device():
    def run(n):
        scaler = mxlamb.LossScaler(init_scale=2.0 ** 8, growth_interval=2)
        opt = mxlamb.LAMB(learning_rate=0.01, multi_precision=True, loss_scaler=scaler)
        weights = train_params(contexts(n), opt, "float16", False, scaler=scaler, inf_at=2)
        return weights, scaler
    (single, scaler1), (multi, scaler2) = run(1), run(2)
    assert_same_as_one_device(multi, single, atol=2e-3)
    assert scaler1.skipped_steps == scaler2.skipped_steps == 1
    assert scaler1.loss_scale == scaler2.loss_scale
    # each device kept its own copy of the scale, and they agree
    states = [s.asnumpy() for s in scaler2._states.values()]
    assert len(states) == 2 and (states[0] == states[1]).all()


@pytest.mark.parametrize("option", ["global_clipnorm", "skip_nonfinite", "loss_scaler"])
def test_whole_step_options_on_the_kvstore_are_refused(option):
    """They need every gradient before the first update, and the kvstore sends each
    parameter back as soon as it is updated: refused in the first Trainer.step, nothing
    applied, and the error is not lost in the kvstore's callback."""
    value = {"global_clipnorm": 1.0, "skip_nonfinite": True,
             "loss_scaler": mxlamb.LossScaler()}[option]
    net = make_net(contexts(2))
    before = weights_of(net)
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(**{option: value}),
                            kvstore="device", update_on_kvstore=True)
    x, y = batches(1)[0]
    for _ in range(2):  # and again: no step goes on silently
        forward_backward(net, contexts(2), x, y)
        with pytest.raises(ValueError, match=option + ".*update_on_kvstore=False"):
            trainer.step(BATCH)
        for name, copies in weights_of(net).items():
            for copy in copies:
                np.testing.assert_array_equal(copy, before[name][0])


def test_a_refusal_inside_the_kvstore_callback_reaches_the_user():
    """float16 weights without multi_precision are refused by create_state, which the
    kvstore's Updater calls inside the callback."""
    params = param_model(contexts(2), "float16")
    before = [p.data().asnumpy() for p in params]
    trainer = gluon.Trainer(params, mxlamb.LAMB(), kvstore="device", update_on_kvstore=True)
    for _ in range(2):
        with autograd.record():
            losses = [sum((mx.nd.sin(p.data(c)) * 1.0).sum() for p in params)
                      for c in contexts(2)]
        for loss in losses:
            loss.backward()
        with pytest.raises(ValueError, match="pm0_weight.*float16.*multi_precision"):
            trainer.step(1)
        for p, b in zip(params, before):
            for copy in p.list_data():
                np.testing.assert_array_equal(copy.asnumpy(), b)


def module_run(ctxs, optimizer, steps=STEPS):
    data = mx.sym.Variable("data")
    fc1 = mx.sym.FullyConnected(data, num_hidden=16, name="fc1")
    net = mx.sym.FullyConnected(mx.sym.Activation(fc1, act_type="tanh"), num_hidden=3,
                                name="fc2")
    net = mx.sym.SoftmaxOutput(net, name="softmax")
    mod = mx.mod.Module(net, context=ctxs)
    mod.bind(data_shapes=[("data", (BATCH, 5))], label_shapes=[("softmax_label", (BATCH,))])
    mx.random.seed(0)
    mod.init_params(mx.init.Xavier())
    mod.init_optimizer(kvstore="device", optimizer=optimizer)
    for x, y in batches(steps):
        mod.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
        mod.update()
    mod.forward(mx.io.DataBatch([mx.nd.array(batches(1)[0][0])], None), is_train=False)
    return mod


def test_module_api_on_two_devices_equals_one_device():
    single = module_run(contexts(1), mxlamb.LAMB(learning_rate=0.01, rescale_grad=1 / BATCH))
    multi = module_run(contexts(2), mxlamb.LAMB(learning_rate=0.01, rescale_grad=1 / BATCH))
    builtin = module_run(contexts(2), BUILTIN_LAMB(learning_rate=0.01, rescale_grad=1 / BATCH))
    a, b, c = (m.get_params()[0] for m in (single, multi, builtin))
    for name in a:
        np.testing.assert_allclose(b[name].asnumpy(), a[name].asnumpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(b[name].asnumpy(), c[name].asnumpy(), rtol=0, atol=1e-6)


def test_module_api_sees_a_refusal_on_the_kvstore():
    with pytest.raises(ValueError, match="global_clipnorm.*MXNET_UPDATE_ON_KVSTORE=0"):
        module_run(contexts(2), mxlamb.LAMB(global_clipnorm=1.0), steps=1)  # in Module.update


@pytest.mark.parametrize("how", ["mxlamb", "trainer"])
def test_resumed_run_on_two_devices_equals_the_straight_run(how):
    options = dict(learning_rate=0.01, skip_nonfinite=True, use_ema=True,
                   gradient_accumulation_steps=2)
    data = batches(6, inf_at=(1, 9))
    straight, _ = train(contexts(2), mxlamb.LAMB(**options), "device", False, data=data)
    net = make_net(contexts(2))
    _, trainer = train(contexts(2), mxlamb.LAMB(**options), "device", False, data=data[:3],
                       net=net)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "states")
        (mxlamb.save_states if how == "mxlamb" else type(trainer).save_states)(trainer, path)
        params = net.collect_params()
        resumed_net = make_net(contexts(2))
        for name, p in resumed_net.collect_params().items():  # names are the same: md_...
            p.set_data(params[name].data())
        resumed = gluon.Trainer(resumed_net.collect_params(), mxlamb.LAMB(**options),
                                kvstore="device", update_on_kvstore=False)
        (mxlamb.load_states if how == "mxlamb" else type(resumed).load_states)(resumed, path)
    for x, y in data[3:]:
        forward_backward(resumed_net, contexts(2), x, y)
        resumed.step(BATCH)
    got = weights_of(resumed_net)
    for name, copies in straight.items():
        for a, b in zip(copies, got[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert resumed.optimizer.counters.all_applied.keys() == {0, 1}

