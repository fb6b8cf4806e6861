"""mxlamb inside MXNet: registration, parity with MXNet's LAMB, Gluon Trainer, Module API,
save/load of trainer states, and the import-time checks of the operator library."""
import os
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mxlamb
from conftest import BUILTIN_LAMB, mxnet1_only, to_f64


def test_lamb_name_is_ours_and_mxnets_class_stays_reachable():
    assert isinstance(mx.optimizer.create("lamb"), mxlamb.LAMB)
    assert BUILTIN_LAMB is not mxlamb.LAMB
    assert BUILTIN_LAMB.__module__.startswith("mxnet.optimizer.")


def test_import_prints_no_warning():
    # mxnet's own import warns (np.bool, distutils): import it first, then make warnings errors.
    code = "import warnings, mxnet; warnings.simplefilter('error'); import mxlamb"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "overriding" not in out.stderr and "overriding" not in out.stdout


@pytest.mark.parametrize("options", [
    dict(),
    dict(wd=0.01, rescale_grad=0.5, clip_gradient=0.3),
    dict(wd=0.1, lower_bound=1.0, upper_bound=3.0, bias_correction=False),
])
@pytest.mark.parametrize("aggregate", [False, True])
def test_parity_with_mxnet_builtin_lamb_fp32(options, aggregate, monkeypatch):
    """MXNet's LAMB is right in fp32 on tensors small enough for its float32 norms."""
    monkeypatch.setenv("MXNET_OPTIMIZER_AGGREGATION_SIZE", "45" if aggregate else "1")
    rng = np.random.RandomState(7)
    shapes = [(7,), (300,), (20, 30), (1,)]
    ours = [mx.nd.array(rng.randn(*s)) for s in shapes]
    theirs = [w.copy() for w in ours]
    opt_ours = mxlamb.LAMB(learning_rate=0.01, aggregate_num=45 if aggregate else 1, **options)
    opt_theirs = BUILTIN_LAMB(learning_rate=0.01, **options)
    up_ours, up_theirs = mx.optimizer.get_updater(opt_ours), mx.optimizer.get_updater(opt_theirs)
    idx = list(range(len(shapes)))
    for _ in range(8):
        grads = [mx.nd.array(rng.randn(*s)) for s in shapes]
        up_ours(idx, grads, ours)
        up_theirs(idx, [g.copy() for g in grads], theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)
    for i in idx:
        for a, b in zip(up_ours.states[i], up_theirs.states[i]):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)


def rings_data(n=512, seed=0):
    """Two noisy concentric rings: needs the hidden layers, learnt in a few hundred steps."""
    rng = np.random.RandomState(seed)
    label = rng.randint(0, 2, n)
    radius = np.where(label == 1, 1.0, 0.45) + rng.randn(n) * 0.08
    angle = rng.rand(n) * 2 * np.pi
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    return x.astype(np.float32), label.astype(np.float32)


def make_net(seed=0):
    """A tanh MLP whose parameter names do not depend on how many nets were made before
    (Trainer orders parameters by name, and saved states are keyed by that order)."""
    mx.random.seed(seed)
    net = gluon.nn.HybridSequential(prefix="mlp_")
    with net.name_scope():
        net.add(gluon.nn.Dense(64, activation="tanh"), gluon.nn.Dense(64, activation="tanh"),
                gluon.nn.Dense(2))
    net.initialize(mx.init.Xavier())
    return net


def train(net, trainer, x, y, steps, batch=64):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    for step in range(steps):
        lo = (step * batch) % len(x)
        data, label = mx.nd.array(x[lo:lo + batch]), mx.nd.array(y[lo:lo + batch])
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        trainer.step(batch)
        losses.append(float(loss.mean().asscalar()))
    return losses


@mxnet1_only
def test_gluon_trainer_loss_falls():
    x, y = rings_data()
    net = make_net()
    trainer = gluon.Trainer(net.collect_params(), "lamb", {"learning_rate": 0.02, "wd": 1e-4})
    losses = train(net, trainer, x, y, steps=300)
    assert isinstance(trainer._optimizer, mxlamb.LAMB)
    assert np.mean(losses[:10]) > 0.6
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10])
    accuracy = (net(mx.nd.array(x)).argmax(axis=1).asnumpy() == y).mean()
    assert accuracy > 0.85


@mxnet1_only
def test_trainer_save_and_load_states_mid_run_continue_identically(tmp_path):
    x, y = rings_data()
    params = {"learning_rate": 0.01, "wd": 0.01, "lower_bound": 0.1}

    straight = make_net()
    trainer = gluon.Trainer(straight.collect_params(), "lamb", params)
    train(straight, trainer, x, y, steps=10)

    first = make_net()
    trainer = gluon.Trainer(first.collect_params(), "lamb", params)
    train(first, trainer, x, y, steps=5)
    first.save_parameters(str(tmp_path / "net.params"))
    trainer.save_states(str(tmp_path / "trainer.states"))

    resumed = make_net(seed=1)  # different initial weights: all must come from the files
    resumed.load_parameters(str(tmp_path / "net.params"))
    trainer = gluon.Trainer(resumed.collect_params(), "lamb", {"learning_rate": 0.5})
    trainer.load_states(str(tmp_path / "trainer.states"))
    assert isinstance(trainer._optimizer, mxlamb.LAMB) and trainer._optimizer.lower_bound == 0.1
    # The data continue where the first run stopped.
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(5, 10):
        lo = (step * 64) % len(x)
        with autograd.record():
            loss = loss_fn(resumed(mx.nd.array(x[lo:lo + 64])), mx.nd.array(y[lo:lo + 64]))
        loss.backward()
        trainer.step(64)
    for (name, a), b in zip(straight.collect_params().items(),
                            resumed.collect_params().values()):
        np.testing.assert_array_equal(a.data().asnumpy(), b.data().asnumpy(), err_msg=name)


class LinearRegression(gluon.HybridBlock):
    """y = x . w + b from elementwise operators (MXNet's CPU build has no fp16 FullyConnected)."""

    def __init__(self, features, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(1, features), init=mx.init.Zero())
            self.bias = self.params.get("bias", shape=(1,), init=mx.init.Zero())

    def hybrid_forward(self, F, x, weight, bias):
        return F.broadcast_add(F.sum(F.broadcast_mul(x, weight), axis=1), bias)


@mxnet1_only
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gluon_low_precision_weights_with_multi_precision(dtype):
    from conftest import DTYPES
    rng = np.random.RandomState(0)
    true_w = rng.randn(16).astype(np.float32)
    net = LinearRegression(16, prefix="linreg_")
    net.initialize()
    net.cast(DTYPES[dtype])
    trainer = gluon.Trainer(net.collect_params(), "lamb",
                            {"learning_rate": 0.05, "multi_precision": True})
    losses = []
    for _ in range(150):
        x = rng.randn(64, 16).astype(np.float32)
        data = mx.nd.array(x).astype(DTYPES[dtype])
        target = mx.nd.array(x @ true_w + 0.5)
        with autograd.record():
            loss = ((net(data).astype("float32") - target) ** 2).mean()
        loss.backward()
        trainer.step(1)
        losses.append(float(loss.asscalar()))
    assert losses[0] > 10 and np.mean(losses[-10:]) < 0.01 * losses[0]
    # The low-precision weights are exactly the rounded fp32 master copies.
    updater = trainer._updaters[0]
    for i, param in enumerate(trainer._params):
        master = updater.states[i][0]
        np.testing.assert_array_equal(to_f64(param.data()), to_f64(master.astype(DTYPES[dtype])))


@mxnet1_only
def test_module_api_trains_with_lamb():
    x, y = rings_data()
    data = mx.sym.Variable("data")
    net = mx.sym.FullyConnected(data, num_hidden=64, name="fc1")
    net = mx.sym.Activation(net, act_type="tanh")
    net = mx.sym.FullyConnected(net, num_hidden=64, name="fc2")
    net = mx.sym.Activation(net, act_type="tanh")
    net = mx.sym.FullyConnected(net, num_hidden=2, name="fc3")
    net = mx.sym.SoftmaxOutput(net, name="softmax")
    it = mx.io.NDArrayIter(x, y, batch_size=64, shuffle=False, label_name="softmax_label")
    mod = mx.mod.Module(net, data_names=["data"], label_names=["softmax_label"])
    mod.bind(data_shapes=it.provide_data, label_shapes=it.provide_label)
    mx.random.seed(0)
    mod.init_params(mx.init.Xavier())
    mod.init_optimizer(optimizer="lamb", optimizer_params={"learning_rate": 0.02, "wd": 1e-4})
    assert isinstance(mod._optimizer, mxlamb.LAMB)
    metric = mx.metric.Accuracy()
    before = mod.score(it, metric)[0][1]
    for _ in range(20):
        it.reset()
        for batch in it:
            mod.forward_backward(batch)
            mod.update()
    after = mod.score(it, mx.metric.Accuracy())[0][1]
    assert after > 0.9 and after > before + 0.2


def test_missing_library_is_an_import_error_saying_what_to_run(tmp_path):
    package = os.path.dirname(mxlamb.__file__)
    copy = tmp_path / "mxlamb"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = subprocess.run([sys.executable, "-c", "import mxlamb"], cwd=tmp_path,
                         capture_output=True, text=True,
                         env={k: v for k, v in dict(os.environ, PYTHONPATH="").items()
                              if k != "MXLAMB_LIBRARY"})
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "is missing" in out.stderr
    assert "pip install" in out.stderr


def test_library_for_another_mxnet_is_an_import_error(monkeypatch):
    from mxlamb import _library
    monkeypatch.setattr(_library, "_MXNET_VERSION", "1.8.0")
    built_for = _library.native.mxlamb_built_for_mxnet()
    with pytest.raises(ImportError, match="built for mxnet %d but mxnet 1.8.0" % built_for):
        _library._load()
