"""mxlamb.keras against Keras 3 itself (issue 24).

tests/data/keras_trajectories.npz holds what keras.optimizers.Lamb and AdamW (Keras 3.15.1, JAX
backend) did with recorded gradients: every option alone and in combinations, three tensors,
nine steps, some all-zero gradients (tests/keras_reference/record.py wrote it; Keras is never
imported here). Each case is replayed through a Gluon Trainer with mxlamb.keras' class of the
same name and arguments, and the weights (and EMA averages) must equal Keras' at every step to
float32 rounding. Keras' own lamb_test.py and adamw_test.py cases follow, with their expected
values, and its refusals of bad arguments."""
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import mxlamb
import mxlamb.keras
from conftest import MXNET2
from reference import ReferenceLAMB, ReferenceStep

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "keras_trajectories.npz")
RECORDED = np.load(DATA)
META = json.loads(bytes(RECORDED["__meta__"]).decode())
CASES = {case["name"]: case for case in META["cases"]}
# Keras computes in float32 in another order of operations (m + (g - m)(1 - b1), its own norms),
# nine steps: the float32 tolerance of the other tests, a little wider for the rounding that
# nine steps gather.
RTOL, ATOL = 5e-5, 5e-6


def array(values):
    a = mx.nd.array(np.asarray(values, dtype=np.float32))
    return a.as_np_ndarray() if MXNET2 else a


def parameters(names, values):
    params = []
    for name, value in zip(names, values):
        param = gluon.Parameter(name=name, shape=value.shape)
        param.initialize(ctx=mx.cpu())
        param.set_data(array(value))
        params.append(param)
    return params


def learning_rate(kwargs):
    lr = kwargs.get("learning_rate", 0.001)
    if isinstance(lr, dict):  # Keras' ExponentialDecay, as a callable of the calls so far
        assert lr["schedule"] == "ExponentialDecay"
        return lambda step: lr["initial_learning_rate"] * lr["decay_rate"] ** (
            step / lr["decay_steps"])
    return lr


def replay(case):
    """The case through mxlamb.keras and a Gluon Trainer: per step, the weights and (with EMA)
    the averages."""
    k = range(len(case["names"]))
    params = parameters(case["names"], [RECORDED["%s/init/%d" % (case["name"], i)] for i in k])
    kwargs = dict(case["kwargs"], learning_rate=learning_rate(case["kwargs"]))
    optimizer = getattr(mxlamb.keras, case["optimizer"])(**kwargs)
    exclude = case.get("exclude") or {}
    if "var_names" in exclude:
        optimizer.exclude_from_weight_decay(var_names=exclude["var_names"])
    if "var_list" in exclude:
        optimizer.exclude_from_weight_decay(var_list=[params[i] for i in exclude["var_list"]])
    trainer = gluon.Trainer(params, optimizer, kvstore=None)
    layout = optimizer.options.state_layout
    steps = []
    for s in range(case["steps"]):
        for i, param in zip(k, params):
            param.grad()[:] = array(RECORDED["%s/grad/%d/%d" % (case["name"], s, i)])
            param.data()._fresh_grad = True
        trainer.step(1)
        weights = [p.data().asnumpy() for p in params]
        averages = None
        if case["use_ema"]:
            states = trainer._updaters[0].states
            averages = [states[i][layout.index("average")].asnumpy() for i in k]
        steps.append((weights, averages))
    return steps


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_step_equals_keras(name):
    case = CASES[name]
    for s, (weights, averages) in enumerate(replay(case)):
        for i, weight in enumerate(weights):
            np.testing.assert_allclose(weight, RECORDED["%s/weight/%d/%d" % (name, s, i)],
                                       RTOL, ATOL, err_msg="%s step %d weight %d" % (name, s, i))
        for i, average in enumerate(averages or ()):
            np.testing.assert_allclose(average, RECORDED["%s/average/%d/%d" % (name, s, i)],
                                       RTOL, ATOL, err_msg="%s step %d average %d" % (name, s, i))


def test_the_recording_is_keras_3():
    assert META["keras"] == "3.15.1" and META["backend"] == "jax"
    assert {c["optimizer"] for c in META["cases"]} == {"Lamb", "AdamW"}


def test_lamb_weight_decay_is_decoupled_and_outside_the_trust_ratio():
    """The issue's example: with zero gradients, lr 1 and weight_decay 0.004 a weight of 2
    becomes 1.992 (Keras); MXNet's wd, inside u and scaled by the trust ratio, sends it to 0."""
    weights = [w[1] for w, _ in replay(CASES["lamb_wd_lr1_zero_grads"])]
    np.testing.assert_allclose([w[0] for w in weights], [1.992, 1.984032, 1.976096], rtol=1e-6)
    (param,) = parameters(["w"], [np.full((1,), 2.0, np.float32)])
    trainer = gluon.Trainer([param], mxlamb.LAMB(learning_rate=1.0, wd=0.004), kvstore=None)
    param.grad()[:] = array([0.0])
    param.data()._fresh_grad = True
    trainer.step(1)
    assert abs(float(param.data().asnumpy()[0])) < 1e-6


# ------------------------------------------------- Keras' own lamb_test.py / adamw_test.py

def keras_step(optimizer, values, grads_per_step):
    params = parameters(["p%d" % i for i in range(len(values))],
                        [np.asarray(v, np.float32) for v in values])
    trainer = gluon.Trainer(params, optimizer, kvstore=None)
    for grads in grads_per_step:
        for param, grad in zip(params, grads):
            param.grad()[:] = array(grad)
            param.data()._fresh_grad = True
        trainer.step(1)
    return params


@pytest.mark.parametrize("cls, expected", [
    ("Lamb", [-0.3693, 0.6306, 1.6306, 2.6306]),
    ("AdamW", [0.4980, 1.4960, 2.494, 3.492])])
def test_keras_single_step(cls, expected):
    (param,) = keras_step(getattr(mxlamb.keras, cls)(learning_rate=0.5),
                          [[1.0, 2.0, 3.0, 4.0]], [[[1.0, 6.0, 7.0, 2.0]]])
    np.testing.assert_allclose(param.data().asnumpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", ["Lamb", "AdamW"])
def test_keras_weight_decay_with_exclusions(cls):
    """Keras' test_weight_decay: one weight decayed by three optimizers in turn (2 -> 1.9760959),
    one excluded by name, one by identity (both stay 2)."""
    make = lambda: getattr(mxlamb.keras, cls)(learning_rate=1.0, weight_decay=0.004)  # noqa
    params = parameters(["var1", "exclude", "var3"], [np.full((1,), 2.0, np.float32)] * 3)
    zero = array([0.0])

    def step(optimizer, chosen):
        trainer = gluon.Trainer(chosen, optimizer, kvstore=None)
        for param in chosen:
            param.grad()[:] = zero
            param.data()._fresh_grad = True
        trainer.step(1)

    step(make(), [params[0]])
    second = make()
    second.exclude_from_weight_decay(var_names=["exclude"])
    step(second, [params[0], params[1]])
    third = make()
    third.exclude_from_weight_decay(var_list=[params[2]])
    step(third, [params[0], params[2]])
    np.testing.assert_allclose(params[0].data().asnumpy(), [1.9760959], rtol=0, atol=1e-6)
    np.testing.assert_allclose(params[1].data().asnumpy(), [2.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(params[2].data().asnumpy(), [2.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls, kwargs, golden", [
    ("Lamb", {}, np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10))),
    ("AdamW", dict(learning_rate=1.0, weight_decay=0.5, epsilon=2), np.array([
        [0.4998] * 10,
        [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
        [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
        [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
        [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159]]))])
def test_keras_golden_tables(cls, kwargs, golden):
    """Keras' test_correctness_with_golden: one step of 0.01, then steps of 0.1 ... 1.0."""
    grads = np.arange(0.1, 1.1, 0.1)[:10]
    optimizer = getattr(mxlamb.keras, cls)(**kwargs)
    params = parameters(["x"], [np.ones(10, np.float32)])
    trainer = gluon.Trainer(params, optimizer, kvstore=None)
    for step, expected in enumerate([None] + list(golden)):
        if expected is not None:
            np.testing.assert_allclose(params[0].data().asnumpy(), expected, rtol=5e-4,
                                       atol=5e-4, err_msg="after step %d" % step)
        params[0].grad()[:] = array(np.full(10, 0.01) if step == 0 else grads)
        params[0].data()._fresh_grad = True
        trainer.step(1)


@pytest.mark.parametrize("cls", ["Lamb", "AdamW"])
@pytest.mark.parametrize("clip, clipped", [("clipnorm", [2 ** 0.5 / 2] * 2),
                                           ("clipvalue", [1.0, 1.0])])
def test_keras_clipping(cls, clip, clipped):
    """Keras' test_clip_norm / test_clip_value, through a step: the step equals the float64
    reference's on the clipped gradient."""
    lr = 0.1
    optimizer = getattr(mxlamb.keras, cls)(learning_rate=lr, weight_decay=0.0, **{clip: 1})
    (param,) = keras_step(optimizer, [[1.0, 3.0]], [[[100.0, 100.0]]])
    if cls == "Lamb":
        ref = ReferenceLAMB(epsilon=1e-7)
        ref.init(0, np.array([1.0, 3.0]))
        ref.step(0, np.array(clipped), lr, 0.0)
        expected = ref.weight[0]
    else:
        from reference import ReferenceAdamW
        ref = ReferenceAdamW()
        ref.init(0, np.array([1.0, 3.0]))
        expected = ref.step(0, np.array(clipped), lr, 0.0)
    np.testing.assert_allclose(param.data().asnumpy(), expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("make, match", [
    (lambda: mxlamb.keras.Lamb(clipnorm=1, clipvalue=1),
     r"Lamb: only one of clipnorm, clipvalue and global_clipnorm can be set, got clipnorm=1, "
     r"clipvalue=1, global_clipnorm=None"),
    (lambda: mxlamb.keras.Lamb(gradient_accumulation_steps=1),
     r"Lamb: gradient_accumulation_steps must be an integer >= 2 or None, got 1"),
    (lambda: mxlamb.keras.Lamb(use_ema=True, ema_momentum=1.5),
     r"Lamb: ema_momentum must be in the range \[0, 1\], got 1.5"),
    (lambda: mxlamb.keras.Lamb(use_ema=True, ema_overwrite_frequency=0),
     r"ema_overwrite_frequency must be an integer >= 1 or None, got 0"),
    (lambda: mxlamb.keras.AdamW(weight_decay=None),
     r"AdamW: weight_decay must be a float, got None"),
    (lambda: mxlamb.keras.Lamb(learning_rate="x"),
     r"Lamb: learning_rate must be a number, an MXNet LRScheduler or a callable .*got 'x'"),
    (lambda: mxlamb.keras.Lamb(foo=1), r"Lamb: argument\(s\) not recognized: \{'foo': 1\}"),
    (lambda: mxlamb.keras.Lamb(wd=0.1), r"Lamb: wd is spelled weight_decay here"),
    (lambda: mxlamb.keras.AdamW(clip_gradient=1.0), r"AdamW: clip_gradient is spelled clipvalue"),
])
def test_bad_arguments_are_refused_as_keras_does(make, match):
    """Keras' refusals (tests/data's "errors" hold its own messages), in MXNet's style:
    ValueError naming the argument and the value. Keras lets ema_overwrite_frequency=0 through
    (and then overwrites the weights at every step): refused here."""
    with pytest.raises(ValueError, match=match):
        make()


def test_keras_refused_the_same_calls():
    """The recorded refusals of Keras itself, for the calls above that Keras refuses."""
    refused = {e["call"]: e for e in META["errors"] if e["type"]}
    for call in ("Lamb(clipnorm=1, clipvalue=1)", "Lamb(gradient_accumulation_steps=1)",
                 "Lamb(use_ema=True, ema_momentum=1.5)", "AdamW(weight_decay=None)",
                 'Lamb(learning_rate="x")', "Lamb(foo=1)"):
        assert refused[call]["type"] == "ValueError", call


def test_keras_options_of_mxlambs_lamb_mean_what_keras_means():
    """mxlamb.LAMB's options named after Keras (EMA, its overwrite, accumulation, clipping,
    loss scaling) give Keras' Lamb's numbers where the two share every argument: no weight
    decay, Keras' epsilon, no bounds."""
    for name in ("lamb_ema_overwrite", "lamb_accum_ema_overwrite", "lamb_global_clipnorm"):
        case = dict(CASES[name])
        kwargs = dict(case["kwargs"])
        kwargs = {{"beta_1": "beta1", "beta_2": "beta2"}.get(k, k): v for k, v in kwargs.items()}
        lamb = mxlamb.LAMB(epsilon=1e-7, **kwargs)
        params = parameters(case["names"], [RECORDED["%s/init/%d" % (name, i)]
                                            for i in range(len(case["names"]))])
        trainer = gluon.Trainer(params, lamb, kvstore=None)
        for s in range(case["steps"]):
            for i, param in enumerate(params):
                param.grad()[:] = array(RECORDED["%s/grad/%d/%d" % (name, s, i)])
                param.data()._fresh_grad = True
            trainer.step(1)
            for i, param in enumerate(params):
                np.testing.assert_allclose(param.data().asnumpy(),
                                           RECORDED["%s/weight/%d/%d" % (name, s, i)], RTOL, ATOL,
                                           err_msg="%s step %d weight %d" % (name, s, i))


def test_a_reference_of_the_same_semantics_agrees():
    """The float64 reference with Keras' decoupled decay and EMA gives Keras' numbers too (a
    check of the reference the other tests use)."""
    case = CASES["lamb_wd_exclude_names"]
    ref = ReferenceStep(ReferenceLAMB(epsilon=1e-7), decoupled=True, no_decay={1})
    for i in range(3):
        ref.init(i, RECORDED["%s/init/%d" % (case["name"], i)])
    for s in range(case["steps"]):
        ref.step({i: RECORDED["%s/grad/%d/%d" % (case["name"], s, i)] for i in range(3)},
                 case["kwargs"]["learning_rate"], case["kwargs"]["weight_decay"])
        for i in range(3):
            np.testing.assert_allclose(ref.inner.weight[i],
                                       RECORDED["%s/weight/%d/%d" % (case["name"], s, i)],
                                       RTOL, ATOL)
