"""The default grouping (the whole step, cut as is fastest) and the plans a step of the same
arrays replays: both must give the bits of one tensor per call and of planning every step
anew, whatever changes between steps (schedule, lr_mult, wd_mult, rescale_grad,
clip_gradient, arrays replaced)."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

import mxlamb
from mxlamb import engine, ops
from mxlamb.options import WHOLE_STEP
from mxlamb.engine import CompiledStep
from conftest import BUILTIN_LAMB, MXNET2, mx_array, mxnet1_only, to_f64
from reference import ReferenceLAMB
from stepping import LR, WD, assert_close, problem


def count_calls(monkeypatch, *names):
    """Counts the calls of mxlamb operators (mxlamb.ops calls them through mx.nd)."""
    calls = {name: 0 for name in names}
    for name in names:
        original = getattr(mx.nd, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(mx.nd, name, spy)
    return calls


# ------------------------------------------------------------------------- the default

def test_the_default_is_the_whole_step_in_one_call(monkeypatch):
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD)
    assert opt.aggregate_num is WHOLE_STEP
    calls = count_calls(monkeypatch, "mxlamb_step")
    weights = [mx.nd.ones((768,)) * (1 + k) for k in range(200)]
    grads = [mx.nd.ones((768,)) * 0.1 for _ in range(200)]
    updater = mx.optimizer.get_updater(opt)
    for _ in range(3):
        updater(list(range(200)), grads, weights)
    assert calls["mxlamb_step"] == 3
    # The same as MXNet's LAMB in groups of 4, one step of t = 1, 2, 3 each.
    if MXNET2:
        builtin = BUILTIN_LAMB(learning_rate=LR, wd=WD, aggregate_num=4, use_fused_step=True)
    else:
        builtin = BUILTIN_LAMB(learning_rate=LR, wd=WD)
        builtin.aggregate_num = 4
    theirs = [mx.nd.ones((768,)) * (1 + k) for k in range(200)]
    updater = mx.optimizer.get_updater(builtin)
    for _ in range(3):
        updater(list(range(200)), grads, theirs)
    for ours, expected in zip(weights, theirs):
        np.testing.assert_allclose(ours.asnumpy(), expected.asnumpy(), rtol=2e-6, atol=1e-7)


def test_whole_step_batches():
    """engine.batches: aggregate_num's groups as asked; for the whole step one FUSED group,
    and consecutive tensors up to BATCH_ELEMENTS on the two-phase paths (a larger tensor is a
    batch of its own)."""
    big = engine.BATCH_ELEMENTS
    sizes = [big // 2, big // 2, 1, big + 1, 3, 5, big]
    members = list(range(len(sizes)))
    assert engine.batches(members, sizes, 3, ops.Path.PHASES) == [[0, 1, 2], [3, 4, 5], [6]]
    assert engine.batches(members, sizes, 1, ops.Path.FUSED) == [[m] for m in members]
    assert engine.batches(members, sizes, None, ops.Path.FUSED) == [members]
    assert engine.batches(members, sizes, None, ops.Path.PHASES) == [
        [0, 1], [2], [3], [4, 5], [6]]
    assert engine.batches([7], [1], None, ops.Path.BFLOAT16) == [[7]]


OPTION_SETS = [
    dict(),
    dict(global_clipnorm=0.5, clipnorm=0.3, use_ema=True, ema_momentum=0.7),
    dict(skip_nonfinite=True, exclude_from_weight_decay=["1"],
         exclude_from_layer_adaptation=["3"]),
    dict(gradient_accumulation_steps=2, loss_scale_factor=4.0),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "stats-ema", "skip-exclusions",
                                                      "accumulation"])
def test_whole_step_batches_give_the_bits_of_one_tensor_per_call(monkeypatch, options):
    """Batches of about 2 tensors (BATCH_ELEMENTS made small) on the two-phase paths, through
    a Trainer (the same arrays every step: the plans replay), against aggregate_num=1 and
    the float64 reference."""
    monkeypatch.setattr(engine, "BATCH_ELEMENTS", 45000)
    weights, grads = problem(seed=5, steps=4)
    names = {k: "p%d_weight" % k for k in range(len(weights))}  # MXNet: wd only on *_weight
    results = {}
    for agg in (1, np.inf):
        opt = mxlamb.LAMB(learning_rate=LR, wd=WD, aggregate_num=agg, param_idx2name=names,
                          **options)
        arrays = [mx_array(w) for w in weights]
        grad_arrays = [mx.nd.zeros(w.shape) for w in weights]
        updater = mx.optimizer.get_updater(opt)
        for step in grads:
            for array, g in zip(grad_arrays, step):
                array[:] = g
            updater(list(range(len(arrays))), grad_arrays, arrays)
        results[agg] = [to_f64(a) for a in arrays]
    for a, b in zip(results[1], results[np.inf]):
        np.testing.assert_array_equal(a, b)
    if not options:
        ref = ReferenceLAMB()
        for k, w in enumerate(weights):
            ref.init(k, w.astype(np.float64))
        for step in grads:
            for k, g in enumerate(step):
                ref.step(k, g, LR, WD)
        assert_close(results[np.inf], [ref.weight[k] for k in range(len(weights))])


# --------------------------------------------------------------------------- the plans

class Scale(gluon.HybridBlock):
    """x * weight + bias, elementwise (MXNet's CPU Dense has no float16 backward)."""

    def __init__(self):
        super().__init__(prefix="scale_")
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(5,))
            self.bias = self.params.get("bias", shape=(5,))

    def hybrid_forward(self, F, x, weight, bias):
        return F.broadcast_add(F.broadcast_mul(x, weight), bias)


def train(options, steps=6, dtype="float32", contexts=(mx.cpu(0),)):
    """A Gluon model on ``contexts`` through a Trainer whose lr, lr_mult, wd_mult, batch size
    and clip_gradient change between steps. Returns every weight and state array as float64."""
    mx.random.seed(3)
    net = Scale()
    net.initialize(mx.init.Normal(0.5), ctx=list(contexts))
    if dtype != "float32":
        net.cast(dtype)
    params = net.collect_params()
    schedule = mx.lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.05)
    trainer = gluon.Trainer(params, "lamb", dict(learning_rate=0.05, wd=0.01,
                                                 lr_scheduler=schedule,
                                                 multi_precision=dtype != "float32",
                                                 **options),
                            kvstore="device" if len(contexts) > 1 else None,
                            update_on_kvstore=False)
    rng = np.random.RandomState(0)
    bias = list(params.values())[1]
    for step in range(steps):
        if step == 2:
            bias.lr_mult = 3.0
        if step == 3:
            bias.wd_mult = 0.0
            trainer._optimizer.clip_gradient = 0.05
        xs = [mx.nd.array(rng.randn(4, 5), ctx=c).astype(dtype) for c in contexts]
        with mx.autograd.record():
            losses = [(net(x).astype("float32") ** 2).sum() for x in xs]
        for loss in losses:
            loss.backward()
        trainer.step(4 + step)  # rescale_grad changes every step
    mx.nd.waitall()
    arrays = [to_f64(p.data(c)) for p in params.values() for c in contexts]
    for states in trainer._updaters[0].states.values():
        for state in (states if isinstance(states, (list, tuple)) else [states]):
            for array in (state if isinstance(state, (list, tuple)) else [state]):
                arrays.append(to_f64(array))
    return arrays


def count_plans(monkeypatch):
    made = [0]
    original = CompiledStep.__init__

    def counting(self, *args):
        made[0] += 1
        original(self, *args)
    monkeypatch.setattr(CompiledStep, "__init__", counting)
    return made


@mxnet1_only
@pytest.mark.parametrize("options,dtype", [
    (dict(), "float32"),
    (dict(), "float16"),
    (dict(global_clipnorm=0.5, use_ema=True), "float32"),
    (dict(skip_nonfinite=True, exclude_from_layer_adaptation=["bias"]), "float32"),
    (dict(gradient_accumulation_steps=2), "float32"),
    (dict(aggregate_num=1), "float32"),
], ids=["plain", "fp16", "stats-ema", "device-counts", "accumulation", "per-tensor"])
def test_replayed_plans_give_the_bits_of_planning_every_step(monkeypatch, options, dtype):
    plans = count_plans(monkeypatch)
    replayed = train(options, dtype=dtype)
    # Planned in the first step (one plan per Updater call: per parameter for
    # aggregate_num=1), replayed in the 5 others.
    assert plans == [2 if options.get("aggregate_num") == 1 else 1]
    monkeypatch.setattr(CompiledStep, "replays", lambda self, *arrays: False)
    planned = train(options, dtype=dtype)
    assert len(replayed) == len(planned)
    for a, b in zip(replayed, planned):
        np.testing.assert_array_equal(a, b)


@mxnet1_only
def test_replayed_plans_on_two_devices(monkeypatch):
    contexts = (mx.cpu(0), mx.cpu(1))
    plans = count_plans(monkeypatch)
    replayed = train(dict(), contexts=contexts)
    assert plans == [2]  # one per device
    monkeypatch.setattr(CompiledStep, "replays", lambda self, *arrays: False)
    planned = train(dict(), contexts=contexts)
    for a, b in zip(replayed, planned):
        np.testing.assert_array_equal(a, b)


def test_a_replaced_array_is_planned_anew():
    """A weight or gradient array replaced between steps (same index) is the one updated;
    the array the last plan held is left alone."""
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD)
    weights = [mx.nd.ones((4,)) * (k + 1) for k in range(3)]
    grads = [mx.nd.ones((4,)) * 0.5 for _ in range(3)]
    states = [opt.create_state(k, w) for k, w in enumerate(weights)]
    opt.fused_step([0, 1, 2], weights, grads, states)
    old = weights[1]
    before = old.asnumpy().copy()
    weights[1] = old.copy()
    grads[2] = mx.nd.ones((4,)) * -0.5
    opt.fused_step([0, 1, 2], weights, grads, states)
    np.testing.assert_array_equal(old.asnumpy(), before)
    assert not np.array_equal(weights[1].asnumpy(), before)

    # The same two steps with a fresh optimizer and fresh arrays (no plan to replay).
    fresh = mxlamb.LAMB(learning_rate=LR, wd=WD)
    expected = [mx.nd.ones((4,)) * (k + 1) for k in range(3)]
    fresh_states = [fresh.create_state(k, w) for k, w in enumerate(expected)]
    fresh.fused_step([0, 1, 2], expected, [mx.nd.ones((4,)) * 0.5 for _ in range(3)],
                     fresh_states)
    fresh.fused_step([0, 1, 2], expected,
                     [mx.nd.ones((4,)) * 0.5, mx.nd.ones((4,)) * 0.5, mx.nd.ones((4,)) * -0.5],
                     fresh_states)
    for ours, theirs in zip(weights[1:], expected[1:]):
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy())


# ------------------------------------------------- MXNet's bookkeeping, in bulk

def optimizers_for_bookkeeping():
    """LAMBs whose learning rates, weight decays and counts come from each place MXNet reads
    them: nothing, Gluon Parameters (param_dict), lr_mult/wd_mult by index and by name
    (param_idx2name, which makes wd_mult 0 for names not ending in _weight), a schedule."""
    plain = mxlamb.LAMB(learning_rate=0.1, wd=0.01)
    by_index = mxlamb.LAMB(learning_rate=0.1, wd=0.01)
    by_index.set_lr_mult({1: 2.0})
    by_index.set_wd_mult({2: 0.5})
    by_name = mxlamb.LAMB(learning_rate=0.1, wd=0.01,
                          param_idx2name={0: "a_weight", 1: "b_bias", 2: "c_gamma"})
    by_name.set_lr_mult({"a_weight": 3.0})
    scheduled = mxlamb.LAMB(learning_rate=0.1, wd=0.01,
                            lr_scheduler=mx.lr_scheduler.FactorScheduler(step=1, factor=0.5))
    params = [gluon.Parameter("p%d" % k, shape=(2,), lr_mult=1.0 + k, wd_mult=2.0 - k)
              for k in range(3)] if not MXNET2 else []
    with_params = mxlamb.LAMB(learning_rate=0.1, wd=0.01,
                              param_dict=dict(enumerate(params)))
    return [plain, by_index, by_name, scheduled] + ([with_params] if params else [])


def test_bulk_bookkeeping_is_mxnets():
    """Engine.count_updates, learning_rates and weight_decays give what MXNet's
    _update_count, _get_lrs and _get_wds give (they replace them in a step), also where the
    counts differ between parameters."""
    import copy
    for opt in optimizers_for_bookkeeping():
        twin = copy.deepcopy(opt)
        for indices in ([0, 1, 2], [0, 1, 2], [1], [0, 1, 2], [2, 0]):
            opt.engine.count_updates(indices)
            twin._update_count(list(indices))
            assert opt._index_update_count == twin._index_update_count
            assert opt.num_update == twin.num_update
            assert opt.engine.learning_rates(indices) == twin._get_lrs(indices)
            assert opt.engine.weight_decays(indices) == twin._get_wds(indices)


def test_an_overridden_get_lrs_is_called():
    class Halved(mxlamb.LAMB):
        def _get_lrs(self, indices):
            return [lr / 2 for lr in super()._get_lrs(indices)]
    opt = Halved(learning_rate=0.1)
    assert opt.engine.learning_rates([0, 1]) == [0.05, 0.05]


def test_trust_ratio_tables_stay_bounded_when_groups_change():
    """Direct calls with changing subsets of parameters: what the engine keeps for
    trust_ratios() stays bounded (one entry per parameter), and every parameter reads the
    ratio of its own last step (as read right after that step)."""
    rng = np.random.RandomState(0)
    opt = mxlamb.LAMB(learning_rate=LR, wd=WD)
    weights = [mx.nd.array(rng.randn(6).astype(np.float32)) for _ in range(10)]
    states = [opt.create_state(k, w) for k, w in enumerate(weights)]
    last = {}
    for _ in range(300):
        subset = sorted(rng.choice(10, 5, replace=False))
        grads = [mx.nd.array(rng.randn(6).astype(np.float32)) for _ in subset]
        opt.fused_step(subset, [weights[k] for k in subset], grads, [states[k] for k in subset])
        now = opt.trust_ratios()
        now = dict(zip(now.keys, now.values.asnumpy()))
        last.update({k: now[k] for k in subset})
    assert len(opt.engine.latest) == 10 and len(opt.engine.compiled) <= 10
    ours = opt.trust_ratios()
    assert sorted(ours.keys) == list(range(10))
    assert dict(zip(ours.keys, ours.values.asnumpy())) == last
