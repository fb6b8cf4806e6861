"""mxlamb.save_states / load_states: no pickle, exact round trip, refusal of files that do not
fit the Trainer."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mxlamb
from conftest import mxnet1_only
from test_integration import make_net, rings_data

OPTIONS = {"learning_rate": 0.01, "wd": 0.01, "global_clipnorm": 1.0, "use_ema": True,
           "skip_nonfinite": True, "gradient_accumulation_steps": 2}

pytestmark = mxnet1_only


def train(net, trainer, x, y, start, stop, dtype="float32"):
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(start, stop):
        lo = (step * 64) % len(x)
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x[lo:lo + 64], dtype=dtype)),
                           mx.nd.array(y[lo:lo + 64], dtype=dtype))
        loss.backward()
        trainer.step(64)


def make_typed_net(dtype, seed=0):
    net = make_net(seed=seed)
    net.cast(dtype)
    return net


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_mid_run_continues_bit_identically(tmp_path, dtype):
    x, y = rings_data()
    straight = make_typed_net(dtype)
    train(straight, gluon.Trainer(straight.collect_params(), "lamb", OPTIONS), x, y, 0, 9, dtype)

    first = make_typed_net(dtype)
    trainer = gluon.Trainer(first.collect_params(), "lamb", OPTIONS)
    train(first, trainer, x, y, 0, 5, dtype)  # mid-accumulation: a gradient is in the sums
    first.save_parameters(str(tmp_path / "net.params"))
    mxlamb.save_states(trainer, str(tmp_path / "trainer.states"))
    # The file is an mx.nd.save file of arrays only: loadable without unpickling anything.
    loaded = mx.nd.load(str(tmp_path / "trainer.states"))
    assert all(isinstance(v, mx.nd.NDArray) for v in loaded.values())

    if dtype == "float64":  # moments, average and gradient sums are float64 in the file
        assert {v.dtype for k, v in loaded.items() if k.startswith("u")} == {np.float64}, \
            {k: v.dtype for k, v in loaded.items()}

    resumed = make_typed_net(dtype, seed=1)
    resumed.load_parameters(str(tmp_path / "net.params"))
    trainer = gluon.Trainer(resumed.collect_params(), "lamb", OPTIONS)
    mxlamb.load_states(trainer, str(tmp_path / "trainer.states"))
    assert trainer._optimizer.num_update == 5
    train(resumed, trainer, x, y, 5, 9, dtype)
    for (name, a), b in zip(straight.collect_params().items(),
                            resumed.collect_params().values()):
        assert a.data().dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a.data().asnumpy(), b.data().asnumpy(), err_msg=name)


def test_refuses_other_parameters_and_changes_nothing(tmp_path):
    x, y = rings_data()
    net = make_net()
    trainer = gluon.Trainer(net.collect_params(), "lamb", {"learning_rate": 0.01})
    train(net, trainer, x, y, 0, 2)
    path = str(tmp_path / "s")
    mxlamb.save_states(trainer, path)

    other = gluon.nn.HybridSequential(prefix="mlp_")  # same names, other shapes
    with other.name_scope():
        other.add(gluon.nn.Dense(7, in_units=2), gluon.nn.Dense(2, in_units=7),
                  gluon.nn.Dense(2, in_units=2))
    other.initialize()
    assert ([p.name for p in other.collect_params().values()]
            == [p.name for p in net.collect_params().values()])
    t2 = gluon.Trainer(other.collect_params(), "lamb", {"learning_rate": 0.01})
    with pytest.raises(ValueError, match="shape"):
        mxlamb.load_states(t2, path)
    assert t2._updaters[0].states == {}

    fewer = gluon.nn.Dense(2, in_units=2, prefix="solo_")
    fewer.initialize()
    t3 = gluon.Trainer(fewer.collect_params(), "lamb", {"learning_rate": 0.01})
    with pytest.raises(ValueError, match="parameters"):
        mxlamb.load_states(t3, path)
    assert t3._updaters[0].states == {}


def test_refuses_a_file_that_is_not_ours(tmp_path):
    net = gluon.nn.Dense(2, in_units=3, prefix="plain_")
    net.initialize()
    trainer = gluon.Trainer(net.collect_params(), "lamb", {"learning_rate": 0.01})
    path = str(tmp_path / "plain.params")
    mx.nd.save(path, {"w": mx.nd.ones((2,))})
    with pytest.raises(ValueError, match="not an mxlamb state file"):
        mxlamb.load_states(trainer, path)
    meta = np.frombuffer(b'{"format": "evil", "version": 9}', dtype=np.uint8)
    mx.nd.save(path, {"__mxlamb_meta__": mx.nd.array(meta, dtype=np.uint8)})
    with pytest.raises(ValueError, match="format 'evil'"):
        mxlamb.load_states(trainer, path)
    assert trainer._updaters[0].states == {}


def test_uninitialised_parameters_are_refused_clearly(tmp_path):
    trainer = gluon.Trainer(make_net().collect_params(), "lamb", {"learning_rate": 0.01})
    with pytest.raises(ValueError, match="forward pass"):
        mxlamb.save_states(trainer, str(tmp_path / "s"))
