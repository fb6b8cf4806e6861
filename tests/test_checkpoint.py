"""mxlamb.save_states / load_states: no pickle, exact round trip, refusal of files that do not
fit the Trainer."""
import os

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


# ------------------------------------------------------ models re-created, names that differ

def two_layer_net(prefix=None):
    """Two Dense layers added without the container's name scope: their names come from
    Gluon's global counters (dense9_, dense10_, ...), as in many Gluon 1.x scripts."""
    net = gluon.nn.HybridSequential(prefix=prefix)
    net.add(gluon.nn.Dense(5, in_units=3, activation="tanh"), gluon.nn.Dense(2, in_units=5))
    net.initialize(mx.init.Xavier())
    return net


def train_two(net, trainer, start, stop):
    rng = np.random.RandomState(7)
    x, y = rng.randn(40, 3).astype(np.float32), rng.randint(0, 2, 40).astype(np.float32)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(start, stop):
        lo = (step * 8) % 40
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x[lo:lo + 8])), mx.nd.array(y[lo:lo + 8]))
        loss.backward()
        trainer.step(8)


def test_a_model_recreated_in_the_same_process_loads_by_order_of_creation(tmp_path):
    """Regression: a model re-created in the same process is named dense11_/dense12_ where
    the saved one was dense9_/dense10_, and load_states refused it. By name the Trainer
    even orders them differently (dense10_ sorts before dense9_, dense11_ before dense12_):
    the states must follow the order of creation, not the Trainer's order."""
    options = {"learning_rate": 0.05, "wd": 0.01, "global_clipnorm": 1.0}
    with mx.name.NameManager():  # its own counters: the first layers are dense9_, dense10_
        for _ in range(9):
            gluon.nn.Dense(1, in_units=1)
        first = two_layer_net()
        assert [b.prefix for b in first] == ["dense9_", "dense10_"]
        straight = two_layer_net()
        resumed = two_layer_net()
    assert [b.prefix for b in resumed] == ["dense13_", "dense14_"]
    params = str(tmp_path / "init.params")  # the same initial weights for all three
    first.save_parameters(params)
    straight.load_parameters(params)
    train_two(straight, gluon.Trainer(straight.collect_params(), "lamb", options), 0, 6)

    trainer = gluon.Trainer(first.collect_params(), "lamb", options)
    train_two(first, trainer, 0, 3)
    first.save_parameters(params)
    mxlamb.save_states(trainer, str(tmp_path / "s"))
    resumed.load_parameters(params)  # Gluon matches by structure
    trainer = gluon.Trainer(resumed.collect_params(), "lamb", options)
    mxlamb.load_states(trainer, str(tmp_path / "s"))
    train_two(resumed, trainer, 3, 6)
    for a, b in zip(straight.collect_params().values(), resumed.collect_params().values()):
        np.testing.assert_array_equal(a.data().asnumpy(), b.data().asnumpy(), err_msg=b.name)


def test_other_names_load_by_order_only_when_asked_and_every_shape_is_checked(tmp_path):
    net = two_layer_net(prefix="old_")
    renamed = gluon.nn.HybridSequential(prefix="new_")
    with renamed.name_scope():  # names new_dense0_..., shapes as net's
        renamed.add(gluon.nn.Dense(5, in_units=3), gluon.nn.Dense(2, in_units=5))
    renamed.initialize()
    trainer = gluon.Trainer(net.collect_params(), "lamb", {"learning_rate": 0.05})
    train_two(net, trainer, 0, 2)
    path = str(tmp_path / "s")
    mxlamb.save_states(trainer, path)

    theirs = gluon.Trainer(renamed.collect_params(), "lamb", {"learning_rate": 0.05})
    with pytest.raises(ValueError, match=r"only in the file \['dense.*only in the Trainer "
                                         r"\['new_dense0_bias'.*by_order=True"):
        mxlamb.load_states(theirs, path)
    assert theirs._updaters[0].states == {}
    mxlamb.load_states(theirs, path, by_order=True)
    saved = trainer._updaters[0].states
    for index, state in theirs._updaters[0].states.items():
        assert theirs._params[index].shape == trainer._params[index].shape
        np.testing.assert_array_equal(state[0].asnumpy(), saved[index][0].asnumpy())

    swapped = gluon.nn.HybridSequential(prefix="swapped_")
    with swapped.name_scope():  # same number of parameters, other shapes in that order
        swapped.add(gluon.nn.Dense(3, in_units=5), gluon.nn.Dense(5, in_units=2))
    swapped.initialize()
    other = gluon.Trainer(swapped.collect_params(), "lamb", {"learning_rate": 0.05})
    with pytest.raises(ValueError, match=r"another shape.*swapped_dense0_weight \(3, 5\) <- "):
        mxlamb.load_states(other, path, by_order=True)
    assert other._updaters[0].states == {}


# -------------------------------------------------- MXNet's LAMB <-> mxlamb (convert_lamb)

LR, WD, STEPS = 0.05, 0.01, 4


def fixed_gradient_run(trainer, net, first, last, seed=11):
    """Steps first..last-1 with gradients that do not depend on the weights (loss = sum(w * c)
    on each device, the kvstore's sum over devices divided by their number), so that the
    float64 reference sees the very same gradients."""
    params = list(net.collect_params().values())
    devices = params[0].list_ctx()
    for step in range(first, last):
        rng = np.random.RandomState(seed + step)
        coefficients = [rng.randn(*p.shape).astype(np.float32) for p in params]
        with autograd.record():
            losses = [sum((p.data(ctx).astype("float32") * mx.nd.array(c, ctx=ctx)).sum()
                          for p, c in zip(params, coefficients)) for ctx in devices]
        autograd.backward(losses)
        trainer.step(len(devices))
    return params


def reference_weights(net, steps, seed=11):
    from reference import ReferenceLAMB
    params = list(net.collect_params().values())
    ref = ReferenceLAMB()
    for k, p in enumerate(params):
        ref.init(k, p.data().asnumpy().astype(np.float64))
    for step in range(steps):
        rng = np.random.RandomState(seed + step)
        for k, p in enumerate(params):
            ref.step(k, rng.randn(*p.shape).astype(np.float32).astype(np.float64), LR, WD)
    return [ref.weight[k] for k in range(len(params))]


def dense(dtype, devices=1):
    mx.random.seed(5)
    net = gluon.nn.Dense(7, in_units=5, prefix="fc_")
    net.initialize(mx.init.Normal(0.5), ctx=[mx.cpu(k) for k in range(devices)])
    net.cast(dtype)
    return net


@pytest.mark.parametrize("dtype, devices", [("float32", 1), ("float16", 1), ("float32", 2)])
@pytest.mark.parametrize("start", ["mxnet", "mxlamb"])
def test_a_run_moves_between_mxnets_lamb_and_mxlamb_with_moments_and_step_counts(
        tmp_path, dtype, devices, start):
    from conftest import BUILTIN_LAMB, TOLERANCE

    options = {"learning_rate": LR, "wd": WD, "multi_precision": dtype == "float16"}
    make = {"mxnet": lambda: BUILTIN_LAMB(**options), "mxlamb": lambda: mxlamb.LAMB(**options)}
    # Several devices: each device's Updater steps (and counts) its own copy.
    kvstore = {"update_on_kvstore": False} if devices > 1 else {}
    end = "mxlamb" if start == "mxnet" else "mxnet"
    net = dense(dtype, devices)
    expected = reference_weights(net, 2 * STEPS)
    throughout = dense(dtype, devices)
    fixed_gradient_run(gluon.Trainer(throughout.collect_params(), make[end](), **kvstore),
                       throughout, 0, 2 * STEPS)

    trainer = gluon.Trainer(net.collect_params(), make[start](), **kvstore)
    fixed_gradient_run(trainer, net, 0, STEPS)
    trainer.save_states(str(tmp_path / "pickled.states"))
    resumed = gluon.Trainer(net.collect_params(), "lamb", options, **kvstore)  # mxlamb's 'lamb'
    resumed.load_states(str(tmp_path / "pickled.states"))
    # The pickle holds the optimizer object: the file resumes with the class that wrote it.
    assert type(resumed._optimizer) is type(trainer._optimizer)
    optimizer = mxlamb.convert_lamb(resumed, to=end)
    assert resumed._optimizer is optimizer and resumed._updaters[0].optimizer is optimizer
    assert isinstance(optimizer, mxlamb.LAMB if end == "mxlamb" else BUILTIN_LAMB)
    assert optimizer.num_update == STEPS
    assert optimizer._index_update_count == {0: STEPS, 1: STEPS}
    assert mxlamb.convert_lamb(resumed, to=end) is optimizer  # already there: no change
    fixed_gradient_run(resumed, net, STEPS, 2 * STEPS)

    rtol, atol = TOLERANCE[dtype]
    for p, want, other in zip(net.collect_params().values(), expected,
                              throughout.collect_params().values()):
        for ctx in p.list_ctx():
            got = p.data(ctx).asnumpy().astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=p.name)
            np.testing.assert_allclose(got, other.data(ctx).asnumpy(), rtol=rtol, atol=atol,
                                       err_msg=p.name)
    if end == "mxlamb":
        assert optimizer.counters.applied == {0: 2 * STEPS, 1: 2 * STEPS}


def test_convert_lamb_refuses_what_the_other_class_cannot_continue():
    from conftest import BUILTIN_LAMB

    net = dense("float32")
    trainer = gluon.Trainer(net.collect_params(), "lamb",
                            {"learning_rate": LR, "global_clipnorm": 1.0, "use_ema": True})
    fixed_gradient_run(trainer, net, 0, 1)
    before = trainer._optimizer
    with pytest.raises(ValueError, match="MXNet's LAMB has no global_clipnorm, use_ema; "
                                         "nothing was changed"):
        mxlamb.convert_lamb(trainer, to="mxnet")
    assert trainer._optimizer is before
    with pytest.raises(ValueError, match="to must be 'mxlamb' or 'mxnet'"):
        mxlamb.convert_lamb(trainer, to="adam")
    adam = gluon.Trainer(dense("float32").collect_params(), "adam")
    with pytest.raises(ValueError, match="the optimizer is .*Adam, not"):
        mxlamb.convert_lamb(adam, to="mxlamb")
    half = dense("float16")  # MXNet's LAMB keeps float16 moments without multi_precision
    trainer = gluon.Trainer(half.collect_params(), BUILTIN_LAMB(learning_rate=LR))
    with pytest.warns(UserWarning, match="Accumulating with float16"):
        fixed_gradient_run(trainer, half, 0, 1)
    with pytest.raises(ValueError, match="not float32 .*multi_precision=True"):
        mxlamb.convert_lamb(trainer, to="mxlamb")
    assert isinstance(trainer._optimizer, BUILTIN_LAMB)


@mxnet1_only
def test_a_trainer_state_pickled_by_mxlamb_0_2_resumes_bit_identically():
    """tests/data/mxlamb-0.2-trainer.*: Trainer.save_states and save_parameters of mxlamb
    0.2 (main before the per-device counts and the Python restructure) after 3 steps with
    skip_nonfinite, EMA and accumulation, and the weights that 0.2 reached 3 steps later.
    Today's mxlamb unpickles it (one count per parameter becomes every device's) and reaches
    the same bits."""
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    mx.random.seed(0)
    net = gluon.nn.HybridSequential(prefix="pk_")
    with net.name_scope():
        net.add(gluon.nn.Dense(8, in_units=4, activation="tanh"), gluon.nn.Dense(2, in_units=8))
    net.initialize(mx.init.Xavier())
    net.load_parameters(os.path.join(data, "mxlamb-0.2-trainer.params"))
    options = dict(learning_rate=0.01, skip_nonfinite=True, use_ema=True,
                   gradient_accumulation_steps=2, wd=0.01)
    trainer = gluon.Trainer(net.collect_params(), "lamb", options, kvstore=None)
    trainer.load_states(os.path.join(data, "mxlamb-0.2-trainer.states"))
    assert isinstance(trainer._optimizer, mxlamb.LAMB)
    rng = np.random.RandomState(0)
    batches = [(mx.nd.array(rng.randn(6, 4)), mx.nd.array(rng.randn(6, 2))) for _ in range(6)]
    for x, y in batches[3:]:
        with autograd.record():
            loss = ((net(x) - y) ** 2).sum()
        loss.backward()
        trainer.step(6)
    got = np.concatenate([p.data().asnumpy().ravel() for p in net.collect_params().values()])
    np.testing.assert_array_equal(got, np.load(os.path.join(data, "mxlamb-0.2-trainer-after.npy")))


def _v03_net_and_batches():
    """The model and batches of tests/data/mxlamb-0.3-*: written by mxlamb 0.3 (main before
    the engine rebuild) after 3 steps with skip_nonfinite and EMA; the .npy holds the weights
    0.3 reached 2 steps later."""
    mx.random.seed(0)
    net = gluon.nn.HybridSequential(prefix="v03_")
    with net.name_scope():
        net.add(gluon.nn.Dense(8, in_units=4, activation="tanh"), gluon.nn.Dense(3, in_units=8))
    net.initialize(mx.init.Xavier())
    rng = np.random.RandomState(0)
    x = mx.nd.array(rng.randn(5, 4))
    y = mx.nd.array(rng.randint(0, 3, 5))
    return net, x, y


@mxnet1_only
@pytest.mark.parametrize("how", ["trainer", "mxlamb"])
def test_files_written_by_mxlamb_0_3_resume_bit_identically(how):
    """A Trainer.save_states pickle of mxlamb 0.3 (it names 0.3's modules: mxlamb.steps'
    StepCounters and StepCollector) and an mxlamb.save_states file of 0.3 both resume here
    and reach 0.3's own weights two steps later, bit for bit."""
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    net, x, y = _v03_net_and_batches()
    net.load_parameters(os.path.join(data, "mxlamb-0.3-trainer.params"))
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(
        learning_rate=0.05, wd=0.01, skip_nonfinite=True, use_ema=True))
    if how == "trainer":
        trainer.load_states(os.path.join(data, "mxlamb-0.3-trainer.states"))
    else:
        mxlamb.load_states(trainer, os.path.join(data, "mxlamb-0.3-format2.states"))
    assert isinstance(trainer._optimizer, mxlamb.LAMB) and trainer._optimizer.num_update == 3
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(2):
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(5)
    got = np.concatenate([p.data().asnumpy().ravel() for p in net.collect_params().values()])
    np.testing.assert_array_equal(got, np.load(os.path.join(data, "mxlamb-0.3-trainer-after.npy")))
