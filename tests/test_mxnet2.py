"""MXNet 2.0 (``make test-mxnet2``): Gluon 2.0 with ``mx.np`` arrays and the 2.0 optimizer API
(``step`` / ``fused_step`` called by the Trainer itself). Every other test module runs on 2.0
too, except those marked MXNet 1.x only."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mxnet as mx
from mxnet import autograd, gluon

import mxlamb
from conftest import BUILTIN_LAMB, MXNET2, TOLERANCE, to_f64
from reference import ReferenceLAMB

pytestmark = pytest.mark.skipif(not MXNET2, reason="MXNet 2.0 only (make test-mxnet2)")


def make_net(seed=0):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(32, in_units=2, activation="tanh"), gluon.nn.Dense(2, in_units=32))
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier())
    return net


def train(net, optimizer, steps=12, seed=1):
    trainer = gluon.Trainer(net.collect_params(), optimizer)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(seed)
    losses = []
    for _ in range(steps):
        x = mx.np.array(rng.randn(64, 2).astype(np.float32))
        y = mx.np.array((rng.rand(64) > 0.5).astype(np.float32))
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(64)
        losses.append(float(loss.mean()))
    return trainer, losses


@pytest.mark.parametrize("fused", [True, False])
def test_gluon2_trainer_matches_mxnets_own_lamb(fused):
    options = dict(learning_rate=0.05, wd=0.01, use_fused_step=fused)
    ours, theirs = make_net(), make_net()
    trainer, losses = train(ours, mxlamb.LAMB(**options))
    assert isinstance(trainer._optimizer, mxlamb.LAMB)
    assert isinstance(next(iter(ours.collect_params().values())).data(), mx.np.ndarray)
    train(theirs, BUILTIN_LAMB(**options))
    for (name, a), b in zip(ours.collect_params().items(), theirs.collect_params().values()):
        np.testing.assert_allclose(a.data().asnumpy(), b.data().asnumpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    assert losses[-1] < losses[0]


def test_gluon2_exclusion_by_name_equals_wd_mult_zero():
    # Gluon 2.0 Parameters are named 'weight' / 'bias' (the structure is in the dict keys).
    ours, theirs = make_net(), make_net()
    train(ours, mxlamb.LAMB(learning_rate=0.05, wd=0.1, exclude_from_weight_decay=["bias"]))
    for name, param in theirs.collect_params().items():
        if name.endswith("bias"):
            param.wd_mult = 0.0
    train(theirs, BUILTIN_LAMB(learning_rate=0.05, wd=0.1))
    for (name, a), b in zip(ours.collect_params().items(), theirs.collect_params().values()):
        np.testing.assert_allclose(a.data().asnumpy(), b.data().asnumpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("fused", [True, False])
def test_2_0_step_api_on_np_arrays_matches_the_reference(dtype, fused):
    rng = np.random.RandomState(3)
    sizes = [5, 300, 1]
    cast = np.float32 if dtype == "float32" else np.float16
    weights = [rng.randn(n).astype(cast).astype(np.float64) for n in sizes]
    opt = mxlamb.LAMB(learning_rate=0.01, wd=0.01, aggregate_num=2,
                      multi_precision=dtype == "float16")
    ref = ReferenceLAMB()
    arrays = [mx.np.array(w, dtype=cast) for w in weights]
    states = [opt.create_state_multi_precision(k, a) for k, a in enumerate(arrays)]
    for k, w in enumerate(weights):
        ref.init(k, w)
    indices = list(range(len(sizes)))
    for _ in range(4):
        grads = [rng.randn(n).astype(cast).astype(np.float64) for n in sizes]
        (opt.fused_step if fused else opt.step)(
            indices, arrays, [mx.np.array(g, dtype=cast) for g in grads], states)
        for k, g in enumerate(grads):
            ref.step(k, g, 0.01, 0.01)
    rtol, atol = TOLERANCE[dtype]
    for k, array in enumerate(arrays):
        assert isinstance(array, mx.np.ndarray)
        np.testing.assert_allclose(to_f64(array), ref.weight[k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("update_on_kvstore", [True, False, None])
def test_gluon2_two_devices_equal_one_device(update_on_kvstore):
    """Issue 18 on Gluon 2.0: counts per device (2.0's Updater calls _set_current_device),
    cpu(1) gradients against the kvstore's pinned weights. (2.0's Trainer updates on the
    kvstore only with aggregate_num 1; there MXNet 2.0.0b1's own LAMB counts every step twice,
    10 after 5 steps, and is 2.7e-3 off the one-device run: it is compared elsewhere only.)"""
    group = {"aggregate_num": 1} if update_on_kvstore else {}
    def run(n, optimizer):
        contexts = [mx.cpu(k) for k in range(n)]
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Dense(16, in_units=5, activation="tanh"),
                gluon.nn.Dense(3, in_units=16))
        mx.random.seed(0)
        net.initialize(mx.init.Xavier(), ctx=contexts)
        trainer = gluon.Trainer(net.collect_params(), optimizer, kvstore="device",
                                update_on_kvstore=update_on_kvstore if n > 1 else None)
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        rng = np.random.RandomState(1)
        for _ in range(5):
            x = rng.randn(12, 5).astype(np.float32)
            y = rng.randint(0, 3, 12).astype(np.float32)
            xs = gluon.utils.split_and_load(mx.np.array(x), contexts)
            ys = gluon.utils.split_and_load(mx.np.array(y), contexts)
            with autograd.record():
                losses = [loss_fn(net(a), b) for a, b in zip(xs, ys)]
            for loss in losses:
                loss.backward()
            trainer.step(12)
        return {k: [d.asnumpy() for d in p.list_data()] for k, p in net.collect_params().items()}
    single = run(1, mxlamb.LAMB(learning_rate=0.01))
    ours = run(2, mxlamb.LAMB(learning_rate=0.01, **group))
    theirs = run(2, BUILTIN_LAMB(learning_rate=0.01, **group))
    for name, copies in ours.items():
        for copy, builtin in zip(copies, theirs[name]):
            np.testing.assert_allclose(copy, single[name][0], rtol=0, atol=2e-6, err_msg=name)
            if not update_on_kvstore:
                np.testing.assert_allclose(copy, builtin, rtol=0, atol=1e-6, err_msg=name)


# ------------------------------------------------------------ contiguous parameters on 2.0

class HalfNet2(gluon.HybridBlock):
    """float16 parameters computed in float32 (CPU FullyConnected has no float16)."""

    def __init__(self):
        super().__init__()
        self.w0 = gluon.Parameter("w0", shape=(16, 2), dtype="float16")
        self.b0 = gluon.Parameter("b0", shape=(16,), dtype="float16")
        self.w1 = gluon.Parameter("w1", shape=(2, 16), dtype="float16")

    def forward(self, x):
        f32 = lambda a: a.data().astype("float32")  # noqa: E731
        h = mx.np.tanh(mx.np.dot(x, f32(self.w0).T) + f32(self.b0))
        return mx.np.dot(h, f32(self.w1).T)


def train_contiguous(contiguous, steps=6, hybridize=False, grad_req="write", half=False,
                     at_step=None, **options):
    """Trains make_net() (HalfNet2 with ``half``) and returns (net, trainer, snapshot): every
    weight, optimizer state and count as NumPy."""
    if half:
        net = HalfNet2()
        mx.random.seed(0)
        net.initialize(mx.init.Uniform(0.4))
        options["multi_precision"] = True
    else:
        net = make_net()
    if grad_req != "write":
        net.setattr("grad_req", grad_req)
    if hybridize:
        net.hybridize()
    trainer = (mxlamb.contrib.ContiguousTrainer if contiguous else gluon.Trainer)(
        net.collect_params(), mxlamb.LAMB(**dict({"learning_rate": 0.05, "wd": 0.01},
                                                 **options)))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(1)
    for step in range(steps):
        if at_step is not None:
            at_step(step, net, trainer)
        x = mx.np.array(rng.randn(16, 2).astype(np.float32))
        y = mx.np.array((rng.rand(16) > 0.5).astype(np.float32))
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(16)
        if grad_req == "add":
            net.zero_grad()
    return net, trainer, snapshot(net, trainer, half)


def snapshot(net, trainer, half=False):
    """Every weight, optimizer state (the master copy first under ``half``) and count, as
    NumPy."""
    out = {name: p.data().asnumpy() for name, p in net.collect_params().items()}
    for index, state in trainer._updaters[0].states.items():
        arrays = [state[0], *state[1]] if half else list(state)
        for k, array in enumerate(arrays):
            out["state/%s/%d" % (index, k)] = array.asnumpy()
    optimizer = trainer._optimizer
    out["counts"] = np.array([optimizer.num_update] + sorted(
        optimizer._index_update_count.values()) + sorted(optimizer.counters.applied.values()))
    return out


def assert_identical(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def flat_members(trainer):
    """Names of the trainer's parameters whose weight and gradient are still views of its
    flat buffers (mx.np views: what Gluon 2.0 hands out; the names repeat)."""
    return sorted(param.name for buffers in trainer._buffers
            for k, (param, j) in enumerate(zip(buffers.params, buffers.positions))
            if param._data[j] is buffers.weight_views[k]
            and param._grad[j] is buffers.grad_views[k])


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("grad_req", ["write", "add"])
@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_gluon2_contiguous_parameters_train_bit_identically(hybridize, grad_req, half):
    *_, ordinary = train_contiguous(False, hybridize=hybridize, grad_req=grad_req, half=half)
    net, trainer, contiguous = train_contiguous(True, hybridize=hybridize, grad_req=grad_req,
                                                half=half)
    assert_identical(ordinary, contiguous)
    assert trainer.fast_steps == 6
    assert len(flat_members(trainer)) == len(net.collect_params())
    for param in net.collect_params().values():
        assert isinstance(param.data(), mx.np.ndarray) and isinstance(param.grad(), mx.np.ndarray)
    if half:
        states = trainer._updaters[0].states
        assert all(s.master_at[0] is states[0].master_at[0] for s in states.values())


@pytest.mark.parametrize("how", ["save_parameters", "trainer_states", "mxlamb_states", "cast",
                                 "reset_device", "force_reinit"])
def test_gluon2_contiguous_files_and_replacements(tmp_path, how):
    """Parameter and state files mid-run, and arrays replaced behind the trainer's back (that
    parameter is then stepped through its new arrays), against the same run with
    gluon.Trainer."""
    path = str(tmp_path / "file")

    def at_step(step, net, trainer):
        param = list(net.collect_params().values())[0]
        if how == "save_parameters":
            if step == 2:
                net.save_parameters(path)
            if step == 4:
                net.load_parameters(path)
        elif how == "trainer_states":
            if step == 2:
                trainer.save_states(path)
            if step == 4:
                trainer.load_states(path)
        elif how == "mxlamb_states":
            if step == 2:
                mxlamb.save_states(trainer, path)
            if step == 4:
                mxlamb.load_states(trainer, path)
        elif step == 3:
            if how == "cast":
                param.cast("float32")  # astype copies: new arrays
            elif how == "reset_device":
                param.reset_device(mx.cpu(0))
            elif how == "force_reinit":
                param.initialize(mx.init.Constant(0.25), device=param.list_device(),
                                 force_reinit=True)

    steps = 7 if "states" in how else 6
    *_, ordinary = train_contiguous(False, steps=steps, at_step=at_step)
    net, trainer, contiguous = train_contiguous(True, steps=steps, at_step=at_step)
    assert_identical(ordinary, contiguous)
    assert trainer.fast_steps == steps
    replaced = how in ("cast", "reset_device", "force_reinit")
    assert len(flat_members(trainer)) == len(net.collect_params()) - replaced


def test_gluon2_deferred_initialisation_is_refused_naming_the_parameter():
    net = gluon.nn.Dense(4)
    net.initialize()
    with pytest.raises(ValueError, match="parameter 'weight' is not initialised yet"):
        mxlamb.contrib.ContiguousTrainer(net.collect_params(), "lamb")
    net(mx.np.ones((2, 3)))
    trainer = mxlamb.contrib.ContiguousTrainer(net.collect_params(), "lamb")
    assert flat_members(trainer) == ["bias", "weight"]


def test_gluon2_mxlamb_save_states_restores_states_and_counts(tmp_path):
    """mxlamb.save_states / load_states on Gluon 2.0: the states and every count come back as
    saved, and training on from them repeats the steps taken after the save bit for bit."""
    path = str(tmp_path / "states")
    net = make_net()
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(learning_rate=0.05, wd=0.01))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.RandomState(2)
    batches = [(mx.np.array(rng.randn(16, 2).astype(np.float32)),
                mx.np.array((rng.rand(16) > 0.5).astype(np.float32))) for _ in range(5)]

    def step(x, y):
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(16)

    for x, y in batches[:3]:
        step(x, y)
    mxlamb.save_states(trainer, path)
    net.save_parameters(path + ".params")
    saved = snapshot(net, trainer)
    for x, y in batches[3:]:
        step(x, y)
    after = snapshot(net, trainer)
    net.load_parameters(path + ".params")
    mxlamb.load_states(trainer, path)
    assert_identical(saved, snapshot(net, trainer))
    for x, y in batches[3:]:
        step(x, y)
    assert_identical(after, snapshot(net, trainer))


def test_gluon2_adamw_is_mxnets_and_refuses_a_file_of_mxlambs_adamw(tmp_path):
    """'adamw' is MXNet 2.0's own AdamW here (mxlamb registers the name only where MXNet has
    none). Regression: a file of mxlamb.AdamW, whose states have the same structure, loaded
    into it as if it were the same optimizer (classes were compared by name)."""
    assert type(mx.optimizer.create("adamw")).__module__.startswith("mxnet.")
    path = str(tmp_path / "states")
    trainer, _ = train(make_net(), mxlamb.AdamW(learning_rate=0.01), steps=2)
    mxlamb.save_states(trainer, path)
    net = make_net(seed=1)
    trainer, _ = train(net, mx.optimizer.create("adamw", learning_rate=0.01), steps=2)
    before = [[a.asnumpy() for a in state] for state in trainer._updaters[0].states.values()]
    with pytest.raises(ValueError, match=r"saved by mxlamb\.adamw\.AdamW, this optimizer is "
                                         r"mxnet\..*AdamW.*nothing was loaded"):
        mxlamb.load_states(trainer, path)
    after = [[a.asnumpy() for a in state] for state in trainer._updaters[0].states.values()]
    assert len(before) == len(after)
    for old, new in zip(before, after):
        for a, b in zip(old, new):
            np.testing.assert_array_equal(a, b)


def test_import_leaves_no_libdl_noise_at_exit():
    """Issue 25: MXNet 2.0's MXlib.__del__ opened "libdl.so" at exit, which glibc 2.34+ does
    not ship, and every script that imported mxlamb ended with "Exception ignored in:
    <function MXlib.__del__> ... OSError: libdl.so". mxlamb's holder now keeps the library
    loaded (it stayed loaded anyway); holders of other libraries are left as MXNet made them."""
    from mxlamb import _library
    from mxnet import library
    ours = [h for h in library.loaded_libs if isinstance(h, _library._MXlibKeptOpen)]
    assert len(ours) == 1
    assert all(type(h) is library.MXlib for h in library.loaded_libs if h not in ours)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mxlamb.__file__)))
    env = dict(os.environ, MXLAMB_LIBRARY=_library.LIBRARY_PATH,
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", "import mxlamb"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "libdl" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
