"""mxlamb.save_states / load_states never lose a run (issue 23): a save killed at any point
leaves the previous file loadable; a file that does not fit, is cut short or corrupted is
refused with nothing changed; t goes on right when skipping or loss scaling is switched on or
off at the resume (against the float64 reference, which switches the same option there)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import mxlamb
from mxlamb import checkpoint
from conftest import mxnet1_only
from reference import ReferenceLAMB, ReferenceStep
from stepping import ATOL, RTOL

pytestmark = mxnet1_only

LR, WD = 0.05, 0.01
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # (the child saves with the mxlamb of this tree)


def net_of(seed=0, units=7, in_units=5, dtype="float32", prefix="ck_"):
    mx.random.seed(seed)
    net = gluon.nn.Dense(units, in_units=in_units, prefix=prefix)
    net.initialize(mx.init.Normal(0.5))
    if dtype != "float32":
        net.cast(dtype)
    return net


def fixed_step(net, trainer, step, nonfinite=False):
    """A step on loss = sum(w * c), c from the step number: the gradient is c, whatever the
    weights (the reference gets the same). Returns {index: gradient as float64}."""
    params = list(trainer._params)
    rng = np.random.RandomState(100 + step)
    coefficients = [rng.randn(*p.shape).astype(np.float32) for p in params]
    if nonfinite:
        coefficients[0].flat[0] = np.inf
    with autograd.record():
        loss = sum((p.data().astype("float32") * mx.nd.array(c)).sum()
                   for p, c in zip(params, coefficients))
    loss.backward()
    trainer.step(1)
    return {k: c.astype(np.float64) for k, c in enumerate(coefficients)}


def snapshot(trainer):
    """Every state array and count of the Trainer, as NumPy (to show nothing changed)."""
    out = {}
    for k, updater in enumerate(trainer._updaters):
        for index, state in updater.states.items():
            flat = []
            stack = [state]
            while stack:
                s = stack.pop(0)
                if isinstance(s, (tuple, list)):
                    stack[:0] = list(s)
                else:
                    flat.append(s)
            for n, array in enumerate(flat):
                out["%d/%s/%d" % (k, index, n)] = array.asnumpy()
    opt = trainer._optimizer
    out["num_update"] = np.array(opt.num_update)
    out["counts"] = np.array(sorted(opt._index_update_count.items()))
    if isinstance(opt, mxlamb.LAMB):
        out["applied"] = np.array(sorted(opt.counters.applied.items()))
    return out


def assert_unchanged(before, after):
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


def saved_run(path, options, steps=3, nonfinite_at=None, dtype="float32", optimizer=None):
    net = net_of(dtype=dtype)
    trainer = gluon.Trainer(net.collect_params(),
                            (optimizer or mxlamb.LAMB)(learning_rate=LR, wd=WD, **options))
    for step in range(steps):
        fixed_step(net, trainer, step, nonfinite=step == nonfinite_at)
    mxlamb.save_states(trainer, path)
    return net, trainer


# ----------------------------------------------------------------------- atomic saves

CHILD = textwrap.dedent("""
    import sys
    import mxnet as mx
    from mxnet import autograd, gluon
    import mxlamb
    mx.random.seed(0)
    net = gluon.nn.Dense(2048, in_units=1024, prefix="big_")
    net.initialize(mx.init.Normal(0.1))
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(learning_rate=0.01))
    with autograd.record():
        loss = net(mx.nd.ones((2, 1024))).sum()
    loss.backward()
    trainer.step(1)
    path = sys.argv[1]
    mxlamb.save_states(trainer, path)
    print("ready", flush=True)
    while True:  # the same states, saved again and again until killed
        mxlamb.save_states(trainer, path)
""")


def big_trainer():
    net = gluon.nn.Dense(2048, in_units=1024, prefix="big_")
    net.initialize()
    return gluon.Trainer(net.collect_params(), mxlamb.LAMB(learning_rate=0.01))


def test_a_save_killed_at_any_point_leaves_the_previous_file_loadable(tmp_path):
    """A child process saves the same 16 MiB of states over and over; it is killed (SIGKILL)
    at random points, 12 times. After each kill the file at the path loads and holds the
    states, and the temporary file the killed save left is removed by the next save."""
    path = str(tmp_path / "big.states")
    rng = np.random.RandomState(0)
    expected = None
    for attempt in range(12):
        child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                                 cwd=HERE, env=dict(os.environ, PYTHONPATH=ROOT))
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        trainer = big_trainer()
        mxlamb.load_states(trainer, path)  # raises if the file were cut
        loaded = snapshot(trainer)
        if expected is None:
            expected = loaded
            assert any(np.abs(v).sum() > 0 for k, v in loaded.items() if k.startswith("0/"))
        assert_unchanged(expected, loaded)
    mxlamb.save_states(trainer, path)
    assert [n for n in os.listdir(str(tmp_path)) if n != "big.states"] == []


def test_an_unwritable_target_leaves_no_temporary_file(tmp_path):
    _, trainer = saved_run(str(tmp_path / "s"), {})
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(OSError):
        mxlamb.save_states(trainer, str(folder))  # os.replace onto a directory fails
    assert sorted(os.listdir(str(tmp_path))) == ["a_folder", "s"]


# ------------------------------------------------- files that do not fit, cut, corrupted

@pytest.mark.parametrize("saved, loading, match", [
    ({"gradient_accumulation_steps": 2}, {"use_ema": True},
     r"saved with gradient_accumulation_steps=2, this optimizer has "
     r"gradient_accumulation_steps=None, and gradients are pending"),
    ({"use_ema": True}, {}, r"saved with use_ema=True, this optimizer has use_ema=False "
                            r"\(its weight averages would be lost"),
    ({}, {"optimizer": mxlamb.AdamW},
     r"it was saved by mxlamb.lamb.LAMB, this optimizer is mxlamb.adamw.AdamW"),
])
def test_a_file_saved_with_other_options_is_refused_with_nothing_changed(tmp_path, saved,
                                                                          loading, match):
    """Regression (issue 23, bug 2): a file saved with gradient_accumulation_steps loaded into
    a use_ema Trainer, whose averages then held the accumulated sums (0.50 off); an EMA file
    into a plain Trainer 'succeeded' and only the next step raised."""
    path = str(tmp_path / "s")
    saved_run(path, saved, steps=3)
    loading = dict(loading)
    optimizer = loading.pop("optimizer", mxlamb.LAMB)
    net = net_of(seed=3)
    trainer = gluon.Trainer(net.collect_params(), optimizer(learning_rate=LR, **loading))
    fixed_step(net, trainer, 0)
    before = snapshot(trainer)
    with pytest.raises(ValueError, match=r"mxlamb.load_states\('.*'\): " + match +
                       r".*nothing was loaded"):
        mxlamb.load_states(trainer, path)
    assert_unchanged(before, snapshot(trainer))


class AdamW(mx.optimizer.Adam):
    """Another optimizer of mxlamb.AdamW's name and state structure ((mean, var)), as MXNet
    2.0's own AdamW is."""


def test_a_file_of_mxlambs_adamw_into_another_adamw_is_refused(tmp_path):
    """Regression: classes were compared by name only, so a file of mxlamb.AdamW loaded into
    MXNet 2.0's AdamW (what 'adamw' names there), whose states have the same structure, and
    that run went on under the other update."""
    path = str(tmp_path / "s")
    saved_run(path, {}, optimizer=mxlamb.AdamW)
    others = [AdamW(learning_rate=LR)]
    if "adamw" in mx.optimizer.Optimizer.opt_registry and not isinstance(
            mx.optimizer.create("adamw"), mxlamb.AdamW):  # MXNet 2.0
        others.append(mx.optimizer.create("adamw", learning_rate=LR))
    for other in others:
        net = net_of(seed=3)
        trainer = gluon.Trainer(net.collect_params(), other)
        fixed_step(net, trainer, 0)
        before = snapshot(trainer)
        with pytest.raises(ValueError, match=r"saved by mxlamb.adamw.AdamW, this optimizer is "
                                             + type(other).__module__.replace(".", r"\.")
                                             + r"\.AdamW"):
            mxlamb.load_states(trainer, path)
        assert_unchanged(before, snapshot(trainer))


def test_amsgrad_on_one_side_only_is_refused(tmp_path):
    path = str(tmp_path / "s")
    saved_run(path, {"amsgrad": True}, optimizer=mxlamb.AdamW)
    trainer = gluon.Trainer(net_of().collect_params(), mxlamb.AdamW(learning_rate=LR))
    with pytest.raises(ValueError, match="saved with amsgrad=True, this optimizer has "
                                         "amsgrad=False"):
        mxlamb.load_states(trainer, path)
    assert trainer._updaters[0].states == {}


def test_float64_states_into_float32_weights_are_refused(tmp_path):
    path = str(tmp_path / "s")
    saved_run(path, {}, dtype="float64")
    trainer = gluon.Trainer(net_of().collect_params(), mxlamb.LAMB(learning_rate=LR))
    with pytest.raises(ValueError, match="state mean of parameter ck_bias is float64 in the "
                                         "file, this optimizer keeps float32"):
        mxlamb.load_states(trainer, path)
    assert trainer._updaters[0].states == {}


def test_ema_switched_on_at_the_resume_starts_from_the_loaded_weights(tmp_path):
    """The one difference carried over: EMA on the loading side only. Each average starts from
    the weight as loaded, then follows avg = mu avg + (1 - mu) w."""
    path = str(tmp_path / "s")
    net, _ = saved_run(path, {})
    net.save_parameters(path + ".params")
    resumed = net_of(seed=9)
    resumed.load_parameters(path + ".params")
    trainer = gluon.Trainer(resumed.collect_params(), mxlamb.LAMB(
        learning_rate=LR, wd=WD, use_ema=True, ema_momentum=0.5))
    mxlamb.load_states(trainer, path)
    weights = [p.data().asnumpy() for p in trainer._params]
    for index, state in trainer._updaters[0].states.items():
        np.testing.assert_array_equal(state[2].asnumpy(), weights[index])
    fixed_step(resumed, trainer, 3)
    for index, state in trainer._updaters[0].states.items():
        expected = 0.5 * weights[index] + 0.5 * trainer._params[index].data().asnumpy()
        np.testing.assert_allclose(state[2].asnumpy(), expected, RTOL, ATOL)


def test_accumulation_switched_at_an_update_is_carried_over(tmp_path):
    """Saved right after an update (nothing pending), loaded with another accumulation: the
    sums start at zero and the next update is the mean of the next N gradients."""
    path = str(tmp_path / "s")
    net, _ = saved_run(path, {"gradient_accumulation_steps": 2}, steps=2)
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(learning_rate=LR, wd=WD))
    mxlamb.load_states(trainer, path)
    assert trainer._optimizer.counters.applied == {0: 1, 1: 1}


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.99])
def test_a_file_cut_short_is_refused_naming_the_path(tmp_path, cut):
    path = str(tmp_path / "s")
    saved_run(path, {"use_ema": True})
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * cut)])
    net = net_of()
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(learning_rate=LR, use_ema=True))
    fixed_step(net, trainer, 0)
    before = snapshot(trainer)
    with pytest.raises(ValueError, match=r"mxlamb.load_states\('%s'\): it cannot be read as an "
                                         r"MXNet array file \(truncated" % path):
        mxlamb.load_states(trainer, path)
    assert_unchanged(before, snapshot(trainer))


def test_a_corrupted_payload_is_refused(tmp_path):
    """Regression (issue 23, bug 4): a corrupted payload loaded, and the states became NaN."""
    path = str(tmp_path / "s")
    saved_run(path, {})
    data = bytearray(open(path, "rb").read())
    for offset in (len(data) // 3, len(data) // 2):  # inside the arrays' data
        data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))
    trainer = gluon.Trainer(net_of().collect_params(), mxlamb.LAMB(learning_rate=LR))
    with pytest.raises(ValueError, match="do not match their digest: the file is corrupted"):
        mxlamb.load_states(trainer, path)
    assert trainer._updaters[0].states == {}


def rewrite(path, change):
    """The file with its metadata changed by ``change(meta)`` and a digest that fits."""
    arrays = mx.nd.load(path)
    meta = json.loads(arrays.pop("__mxlamb_meta__").asnumpy().tobytes().decode())
    arrays.pop("__mxlamb_digest__")
    change(meta)
    blob = json.dumps(meta).encode()
    arrays["__mxlamb_meta__"] = mx.nd.array(np.frombuffer(blob, np.uint8), dtype=np.uint8)
    digest = checkpoint._digest(blob, arrays).encode()
    arrays["__mxlamb_digest__"] = mx.nd.array(np.frombuffer(digest, np.uint8), dtype=np.uint8)
    mx.nd.save(path, arrays)


def test_a_file_missing_a_key_is_refused_before_anything_changes(tmp_path):
    """Regression (issue 23, bug 4): a file without num_update assigned the new states, then
    raised a bare KeyError, leaving new states with old counts."""
    path = str(tmp_path / "s")
    saved_run(path, {})
    rewrite(path, lambda meta: meta.pop("num_update"))
    net = net_of()
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(learning_rate=LR))
    fixed_step(net, trainer, 0)
    before = snapshot(trainer)
    with pytest.raises(ValueError, match="its metadata has no 'num_update' entry"):
        mxlamb.load_states(trainer, path)
    assert_unchanged(before, snapshot(trainer))
    rewrite(path, lambda meta: meta.update(num_update=3, update_counts={"0": {"7": 1}}))
    with pytest.raises(ValueError, match="parameter index '7' in the file, which holds 2"):
        mxlamb.load_states(trainer, path)
    assert_unchanged(before, snapshot(trainer))


def test_a_file_without_its_digest_is_refused(tmp_path):
    path = str(tmp_path / "s")
    saved_run(path, {})
    arrays = mx.nd.load(path)
    arrays.pop("__mxlamb_digest__")
    mx.nd.save(path, arrays)
    trainer = gluon.Trainer(net_of().collect_params(), mxlamb.LAMB(learning_rate=LR))
    with pytest.raises(ValueError, match="its digest is missing"):
        mxlamb.load_states(trainer, path)


# ---------------------------------------------------------- t across other options

SKIPPING = {"plain": {}, "skip": {"skip_nonfinite": True},
            "scaler": {"loss_scaler": "scaler"}}


def options_of(name):
    options = dict(SKIPPING[name])
    if options.get("loss_scaler"):  # scale 1 throughout: it skips, and the gradients stay
        options["loss_scaler"] = mxlamb.LossScaler(init_scale=1.0, growth_interval=1000)
    return options


@pytest.mark.parametrize("saved", sorted(SKIPPING))
@pytest.mark.parametrize("loading", sorted(SKIPPING))
def test_step_counts_go_on_right_whatever_skips_at_save_and_at_load(tmp_path, saved, loading):
    """Regression (issue 23, bug 3): a plain run resumed with skip_nonfinite or a LossScaler
    restarted t at 1 (2.9e-4 off after one step); a run with a skipped step resumed without
    skipping used t + skipped (6.0e-5 off). t counts applied updates only: checked against the
    float64 reference, whose skipping switches at the resume as the options do."""
    path = str(tmp_path / "s")
    skips = saved != "plain"
    net, trainer = saved_run(path, options_of(saved), steps=4,
                             nonfinite_at=1 if skips else None)
    net.save_parameters(path + ".params")
    expected_skipped = trainer._optimizer.skipped_steps

    ref = ReferenceStep(ReferenceLAMB(), skip_nonfinite=skips)
    fresh = gluon.Trainer(net_of().collect_params(), "sgd")._params  # (the Trainer's order)
    for k, p in enumerate(fresh):
        ref.init(k, p.data().asnumpy())
    for step in range(4):
        rng = np.random.RandomState(100 + step)
        grads = {k: rng.randn(*p.shape).astype(np.float32).astype(np.float64)
                 for k, p in enumerate(fresh)}
        if skips and step == 1:
            grads[0].flat[0] = np.inf
        ref.step(grads, LR, WD)

    resumed = net_of(seed=4)
    resumed.load_parameters(path + ".params")
    trainer = gluon.Trainer(resumed.collect_params(), mxlamb.LAMB(
        learning_rate=LR, wd=WD, **options_of(loading)))
    mxlamb.load_states(trainer, path)
    ref.skip_nonfinite = loading != "plain"
    for step in range(4, 6):
        grads = fixed_step(resumed, trainer, step)
        ref.step(grads, LR, WD)
        for k, p in enumerate(trainer._params):
            np.testing.assert_allclose(p.data().asnumpy(), ref.inner.weight[k], RTOL, ATOL,
                                       err_msg="%s -> %s, step %d" % (saved, loading, step))
    if loading != "plain":  # the skipped step is still counted
        assert trainer._optimizer.skipped_steps == expected_skipped


def test_weight_averages_are_read_out_after_a_load(tmp_path):
    """Regression (found adversarially): after mxlamb.load_states the EMA read-outs looked for
    the averages where only a step would have put them, and silently changed nothing. Now
    finalize_variable_values copies the loaded averages; after Trainer.load_states (the
    pickled optimizer, which has not stepped here) they refuse, saying so."""
    path = str(tmp_path / "s")
    net, trainer = saved_run(path, {"use_ema": True, "ema_momentum": 0.5})
    saved = {i: s[2].asnumpy() for i, s in trainer._updaters[0].states.items()}
    resumed = net_of(seed=8)
    trainer = gluon.Trainer(resumed.collect_params(), mxlamb.LAMB(
        learning_rate=LR, wd=WD, use_ema=True, ema_momentum=0.5))
    mxlamb.load_states(trainer, path)
    trainer._optimizer.finalize_variable_values()
    for index, param in enumerate(trainer._params):
        np.testing.assert_array_equal(param.data().asnumpy(), saved[index])
    trainer.save_states(path + ".pickle")
    trainer.load_states(path + ".pickle")
    with pytest.raises(ValueError, match="knows no weight averages yet.*mxlamb.load_states"):
        trainer._optimizer.finalize_variable_values()


def test_a_loss_scaler_stays_the_users_through_trainer_states(tmp_path):
    """Regression (found adversarially): Trainer.save_states/load_states gave the optimizer an
    unpickled copy of the LossScaler, while the user went on scaling the loss with the
    original (8 against 64: 14.6% off). In its own process the scaler unpickles as the very
    object, with the saved values; elsewhere beside another scaler, a warning says which one
    the optimizer uses."""
    scaler = mxlamb.LossScaler(init_scale=8.0, growth_interval=2)
    net = net_of()
    trainer = gluon.Trainer(net.collect_params(), mxlamb.LAMB(learning_rate=LR,
                                                              loss_scaler=scaler))
    fixed_step(net, trainer, 0)
    trainer.save_states(str(tmp_path / "p"))
    fixed_step(net, trainer, 1)  # the scale grows to 16 after two clean steps
    assert scaler.loss_scale == 16.0
    trainer.load_states(str(tmp_path / "p"))
    assert trainer._optimizer.loss_scaler is scaler and scaler.loss_scale == 8.0
    import pickle
    blob = pickle.dumps(trainer._optimizer)
    del trainer
    # As if the file were loaded in a new process, where the user made a new scaler:
    mxlamb.loss_scaler._LIVE.pop(scaler._token)
    scaler._register()
    with pytest.warns(UserWarning, match="a pickled LossScaler was loaded .*beside one made in "
                                         "this process.*trainer._optimizer.loss_scaler"):
        optimizer = pickle.loads(blob)
    assert optimizer.loss_scaler is not scaler and optimizer.loss_scaler.loss_scale == 8.0
