"""mxlamb.contrib.ContiguousTrainer (MXNet 1.x Gluon; 2.0: tests/test_mxnet2.py): every run
here trains the same model twice, with gluon.Trainer and with a ContiguousTrainer, and the
weights, every optimizer state and every count must be bit-identical; where a parameter's
array is replaced behind its back, the trainer must notice (and never write into the buffer
the parameter left)."""
import numpy as np
import pytest

import mxnet as mx
from mxnet import autograd, gluon

import mxlamb
from mxlamb.contrib import ContiguousTrainer
from conftest import mxnet1_only

pytestmark = mxnet1_only

IN, HIDDEN, CLASSES, BATCH = 6, 24, 3, 8


def make_net(seed=0, deferred=False, layer_norm=True, ctx=None):
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Dense(HIDDEN, in_units=0 if deferred else IN, activation="tanh"))
        if layer_norm:
            net.add(gluon.nn.LayerNorm(in_channels=HIDDEN))
        net.add(gluon.nn.Dense(CLASSES, in_units=HIDDEN))
    mx.random.seed(seed)
    net.initialize(mx.init.Xavier(), ctx=ctx or mx.cpu())
    return net


def batches(steps, seed=1):
    rng = np.random.RandomState(seed)
    for _ in range(steps):
        yield (rng.randn(BATCH, IN).astype(np.float32),
               rng.randint(0, CLASSES, size=BATCH).astype(np.float32))


class HalfNet(gluon.HybridBlock):
    """Two dense layers with float16 parameters computed in float32 (MXNet's CPU
    FullyConnected has no float16)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.w0 = self.params.get("w0", shape=(HIDDEN, IN), dtype="float16")
            self.b0 = self.params.get("b0", shape=(HIDDEN,), dtype="float16")
            self.w1 = self.params.get("w1", shape=(CLASSES, HIDDEN), dtype="float16")
            self.b1 = self.params.get("b1", shape=(CLASSES,), dtype="float16")

    def hybrid_forward(self, F, x, w0, b0, w1, b1):
        f32 = lambda a: F.cast(a, "float32")  # noqa: E731
        h = F.tanh(F.FullyConnected(f32(x), f32(w0), f32(b0), num_hidden=HIDDEN))
        return F.FullyConnected(h, f32(w1), f32(b1), num_hidden=CLASSES)


def train(contiguous, steps=6, options=None, hybridize=None, grad_req="write", ctx=None,
          kvstore=None, update_on_kvstore=None, dtype="float32", at_step=None,
          zero_grad=True, layer_norm=True):
    """Trains make_net() for ``steps``; ``at_step(step, net, trainer)`` runs before each
    step's forward pass (the same in both runs)."""
    ctx = ctx or [mx.cpu()]
    if dtype == "float16":
        net = HalfNet(prefix="half_")
        mx.random.seed(0)
        net.initialize(mx.init.Uniform(0.4), ctx=ctx)
    else:
        net = make_net(layer_norm=layer_norm, ctx=ctx)
        if dtype != "float32":
            net.cast(dtype)
    if grad_req != "write":
        net.collect_params().setattr("grad_req", grad_req)
    if hybridize is not None:
        net.hybridize(**hybridize)
    options = dict({"learning_rate": 0.05, "wd": 0.01}, **(options or {}))
    trainer = (ContiguousTrainer if contiguous else gluon.Trainer)(
        net.collect_params(), mxlamb.LAMB(**options), kvstore=kvstore,
        update_on_kvstore=update_on_kvstore)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step, (x, y) in enumerate(batches(steps)):
        if at_step is not None:
            at_step(step, net, trainer)
        xs = gluon.utils.split_and_load(mx.nd.array(x, dtype=dtype), ctx)
        ys = gluon.utils.split_and_load(mx.nd.array(y), ctx)
        with autograd.record():
            losses = [loss_fn(net(a).astype("float32"), b) for a, b in zip(xs, ys)]
        autograd.backward(losses)
        trainer.step(BATCH)
        if grad_req == "add" and zero_grad:
            net.collect_params().zero_grad()
    mx.nd.waitall()
    return net, trainer


def _arrays(state, key, out):
    if isinstance(state, mx.nd.NDArray):
        out[key] = state.asnumpy()
    elif isinstance(state, (tuple, list)):
        for k, s in enumerate(state):
            _arrays(s, "%s/%d" % (key, k), out)


def snapshot(net, trainer):
    """Every weight (on every context), every optimizer state and every count, as NumPy."""
    out = {}
    for name, param in net.collect_params().items():
        for data in param.list_data():
            out["%s@%s" % (name, data.context)] = data.asnumpy()
    for k, updater in enumerate(trainer._updaters):
        for index, state in updater.states.items():
            _arrays(state, "state%d/%s" % (k, index), out)
    opt = trainer._optimizer
    out["num_update"] = np.array(opt.num_update)
    for device, counts in opt._all_index_update_counts.items():
        for index, count in counts.items():
            out["count/%s/%s" % (device, index)] = np.array(count)
    for device, counts in opt.counters.all_applied.items():
        for index, count in counts.items():
            out["applied/%s/%s" % (device, index)] = np.array(count)
    return out


def assert_identical(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def flat_members(trainer):
    """{(parameter name, context position)} of the trainer's parameters whose weight and
    gradient are still views of its flat buffers."""
    return {(param.name, j) for buffers in trainer._buffers
            for k, (param, j) in enumerate(zip(buffers.params, buffers.positions))
            if param._data[j] is buffers.weight_views[k]
            and param._grad[j] is buffers.grad_views[k]}


def contiguous_now(net, trainer):
    """Whether every parameter's weight and gradient are views of the trainer's buffers."""
    return flat_members(trainer) == {(p.name, j) for p in net.collect_params().values()
                                     for j in range(len(p._data))}


def both(steps=6, **kwargs):
    """(ordinary run, contiguous run), each (net, trainer), compared bit for bit."""
    ordinary = train(False, steps, **kwargs)
    contiguous = train(True, steps, **kwargs)
    assert_identical(snapshot(*ordinary), snapshot(*contiguous))
    return ordinary, contiguous


@pytest.mark.parametrize("hybridize", [None, {}, {"static_alloc": True, "static_shape": True}],
                         ids=["imperative", "hybridized", "static_shape"])
@pytest.mark.parametrize("grad_req", ["write", "add"])
def test_training_is_bit_identical_to_ordinary_storage(hybridize, grad_req):
    _, (net, trainer) = both(hybridize=hybridize, grad_req=grad_req)
    assert contiguous_now(net, trainer)
    # Every step its own: the first makes the states side by side.
    assert trainer.fast_steps == 6


def test_gradients_accumulated_over_steps_with_grad_req_add():
    """grad_req='add' without zero_grad: each step's gradient is the sum of all so far."""
    _, (_, trainer) = both(grad_req="add", zero_grad=False)
    assert trainer.fast_steps == 6


@pytest.mark.parametrize("aggregate_num", [1, 4, np.inf])
def test_any_aggregate_num_gives_the_same_bits(aggregate_num):
    _, (_, trainer) = both(options={"aggregate_num": aggregate_num})
    assert trainer.fast_steps == 6


def test_weights_and_gradients_are_views_of_one_buffer_each():
    net, trainer = train(True, steps=2)
    params = trainer._params  # (the Trainer's order: by name)
    (buffers,) = trainer._buffers
    assert buffers.params == list(params)
    total = sum(p.data().size for p in params)
    assert buffers.weight.shape == (total,) and buffers.grad.shape == (total,)
    # Writing into the flat buffer is writing into the parameters (and back).
    expected = np.concatenate([p.data().asnumpy().ravel() for p in params])
    np.testing.assert_array_equal(buffers.weight.asnumpy(), expected)
    # The moments of the states are views of one slab, laid out as the weights.
    states = trainer._updaters[0].states
    slab = states[0].packed[0]
    assert slab.shape == (2 * total,)
    for index, state in states.items():
        assert state.packed[0] is slab
        assert state.packed[1:] == (2 * buffers.offsets[index], params[index].data().size)


def test_one_flat_operator_call_per_step(monkeypatch):
    """Every step calls mxlamb_step once, with three arrays (flat weights, flat gradients,
    packed moments; no float16 model weights here)."""
    calls = []
    original = mx.nd.mxlamb_step

    def spy(*arrays, **attrs):
        calls.append((len(arrays), attrs.get("flat_sizes"), attrs.get("num_tensors")))
        return original(*arrays, **attrs)

    monkeypatch.setattr(mx.nd, "mxlamb_step", spy)
    net, trainer = train(True, steps=3, options={"aggregate_num": np.inf})
    sizes = ",".join(str(p.data().size) for p in trainer._params)
    assert calls == [(3, sizes, 6)] * 3


def test_float16_multi_precision_is_bit_identical_with_flat_masters():
    _, (net, trainer) = both(dtype="float16", options={"multi_precision": True})
    assert trainer.fast_steps == 6
    # fp16 weights flat, fp32 masters side by side in one buffer, laid out as the weights.
    states = trainer._updaters[0].states
    (buffers,) = trainer._buffers
    assert buffers.weight.dtype == np.float16
    masters = [states[i].master_at for i in range(len(trainer._params))]
    assert all(m[0] is masters[0][0] for m in masters)
    assert [m[1] for m in masters] == buffers.offsets


def test_float64_weights_are_bit_identical():
    _, (_, trainer) = both(dtype="float64")
    assert trainer.fast_steps == 6


def test_schedule_multipliers_and_exclusions_are_kept():
    def multipliers(step, net, trainer):
        if step == 0:
            params = net.collect_params()
            params["net_dense0_weight"].lr_mult = 0.5
            params["net_dense1_bias"].wd_mult = 0.0
        if step == 3:  # changed between steps: read at every step
            net.collect_params()["net_dense0_weight"].lr_mult = 2.0
    scheduler = lambda: mx.lr_scheduler.FactorScheduler(step=2, factor=0.5)  # noqa: E731
    ordinary = train(False, options={"lr_scheduler": scheduler(), "exclude_from_weight_decay":
                                     ["gamma", "beta"], "exclude_from_layer_adaptation":
                                     ["bias"]}, at_step=multipliers)
    contiguous = train(True, options={"lr_scheduler": scheduler(), "exclude_from_weight_decay":
                                      ["gamma", "beta"], "exclude_from_layer_adaptation":
                                      ["bias"]}, at_step=multipliers)
    assert_identical(snapshot(*ordinary), snapshot(*contiguous))
    assert contiguous[1].fast_steps == 6
    keys, values = contiguous[1]._optimizer.trust_ratios()
    keys0, values0 = ordinary[1]._optimizer.trust_ratios()
    assert keys == keys0
    np.testing.assert_array_equal(values.asnumpy(), values0.asnumpy())


@pytest.mark.parametrize("options", [{"global_clipnorm": 0.5}, {"clipnorm": 0.3},
                                     {"skip_nonfinite": True}, {"use_ema": True},
                                     {"gradient_accumulation_steps": 2},
                                     {"use_fused_step": False}])
def test_options_of_the_phase_path_go_the_ordinary_way_on_the_views(options):
    _, (net, trainer) = both(options=options)
    assert trainer.fast_steps == 0 and contiguous_now(net, trainer)


@pytest.mark.parametrize("amsgrad, fast", [(False, 4), (True, 0)])
def test_adamw_has_the_fast_step_and_its_amsgrad_goes_the_ordinary_way(amsgrad, fast):
    def run(contiguous):
        net = make_net()
        trainer = (ContiguousTrainer if contiguous else gluon.Trainer)(
            net.collect_params(), mxlamb.AdamW(learning_rate=0.05, amsgrad=amsgrad))
        for x, y in batches(4):
            with autograd.record():
                loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(mx.nd.array(x)), mx.nd.array(y))
            loss.backward()
            trainer.step(BATCH)
        return net, trainer
    contiguous = run(True)
    assert_identical(snapshot(*run(False)), snapshot(*contiguous))
    assert contiguous[1].fast_steps == fast


def test_stale_gradients_warn_or_are_skipped_as_the_trainer_does():
    class TwoHeads(gluon.Block):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.body = gluon.nn.Dense(HIDDEN, in_units=IN, activation="tanh")
                self.a = gluon.nn.Dense(CLASSES, in_units=HIDDEN)
                self.b = gluon.nn.Dense(CLASSES, in_units=HIDDEN)

        def forward(self, x, head):
            return (self.a if head == "a" else self.b)(self.body(x))

    def run(contiguous):
        mx.random.seed(3)
        net = TwoHeads(prefix="heads_")
        net.initialize(mx.init.Xavier())
        trainer = (ContiguousTrainer if contiguous else gluon.Trainer)(
            net.collect_params(), mxlamb.LAMB(learning_rate=0.05, wd=0.01))
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        heads = "ababba"
        for step, (x, y) in enumerate(batches(len(heads))):
            with autograd.record():
                loss = loss_fn(net(mx.nd.array(x), heads[step]), mx.nd.array(y))
            loss.backward()
            trainer.step(BATCH, ignore_stale_grad=True)
        # Without ignore_stale_grad: the Trainer's own warning, naming the parameter.
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x), "a"), mx.nd.array(y))
        loss.backward()
        with pytest.raises(UserWarning, match="Parameter `heads_dense2_bias` on context "
                                              "cpu.0. has not been updated"):
            trainer.step(BATCH)
        return net, trainer

    ordinary, contiguous = run(False), run(True)
    assert_identical(snapshot(*ordinary), snapshot(*contiguous))


def test_save_and_load_parameters_keep_the_views(tmp_path):
    def reload(step, net, trainer):
        if step == 2:
            net.save_parameters(str(tmp_path / "p.params"))
        if step == 4:
            net.load_parameters(str(tmp_path / "p.params"))  # set_data: in place
    _, (net, trainer) = both(at_step=reload)
    assert contiguous_now(net, trainer) and trainer.fast_steps == 6


@pytest.mark.parametrize("how", ["trainer", "mxlamb"])
def test_states_round_trip_back_into_the_layout(tmp_path, how):
    """States loaded with Trainer.load_states (new arrays) are moved into the layout at the
    next step, values kept; mxlamb.load_states loads them in place."""
    path = str(tmp_path / "states")

    def round_trip(step, net, trainer):
        if step == 2:
            trainer.save_states(path) if how == "trainer" else mxlamb.save_states(trainer, path)
        if step == 4:  # back two steps: the states and counts of step 2
            trainer.load_states(path) if how == "trainer" else mxlamb.load_states(trainer, path)

    _, (net, trainer) = both(steps=7, at_step=round_trip)
    assert trainer.fast_steps == 7
    states = trainer._updaters[0].states
    assert all(s.packed[0] is states[0].packed[0] for s in states.values())


def _replace(how):
    def replace(step, net, trainer):
        if step != 3:
            return
        param = net.collect_params()["net_dense0_weight"]
        if how == "cast":
            param.cast("float32")  # astype copies: new arrays
        elif how == "reset_ctx":
            param.reset_ctx(mx.cpu(0))
        elif how == "force_reinit":
            param.initialize(mx.init.Constant(0.25), ctx=param.list_ctx(), force_reinit=True)
        elif how == "set_data":
            param.set_data(param.data() * 0.5)  # in place: the view stays
    return replace


@pytest.mark.parametrize("how", ["cast", "reset_ctx", "force_reinit"])
def test_a_replaced_view_is_stepped_through_its_new_arrays_and_the_buffer_left_alone(how):
    kept = {}

    def replace_and_remember(step, net, trainer):
        param = net.collect_params()["net_dense0_weight"]
        if step == 3 and isinstance(trainer, ContiguousTrainer):
            kept["view"], kept["values"] = param.data(), param.data().asnumpy()
        _replace(how)(step, net, trainer)

    _, (net, trainer) = both(at_step=replace_and_remember)
    assert ("net_dense0_weight", 0) not in flat_members(trainer)  # no view any more
    assert len(flat_members(trainer)) == 5
    assert trainer.fast_steps == 6  # the others still flat, it through its own arrays
    np.testing.assert_array_equal(kept["view"].asnumpy(), kept["values"])


def test_set_data_writes_into_the_view_and_keeps_the_fast_step():
    _, (net, trainer) = both(at_step=_replace("set_data"))
    assert contiguous_now(net, trainer) and trainer.fast_steps == 6


def test_a_parameter_frozen_between_steps_is_left_alone():
    frozen = {}

    def freeze(step, net, trainer):
        if step == 3:
            param = net.collect_params()["net_dense1_weight"]
            param.grad_req = "null"  # (its data becomes a detached copy: no view)
            frozen[len(frozen)] = param.data().asnumpy()
    (net0, _), (net1, trainer) = both(at_step=freeze)
    # The others, still views, are stepped as two runs around the gap.
    assert trainer.fast_steps == 6
    for net, values in zip((net0, net1), frozen.values()):
        np.testing.assert_array_equal(net.collect_params()["net_dense1_weight"].data().asnumpy(),
                                      values)


@pytest.mark.parametrize("kvstore, update_on_kvstore, fast", [
    ("local", False, 6), ("device", False, 6), ("local", True, 0)])
def test_several_contexts_with_a_kvstore(kvstore, update_on_kvstore, fast):
    ctx = [mx.cpu(0), mx.cpu(1)]
    _, (net, trainer) = both(ctx=ctx, kvstore=kvstore, update_on_kvstore=update_on_kvstore)
    assert contiguous_now(net, trainer) and trainer.fast_steps == fast
    for param in net.collect_params().values():  # the contexts agree
        np.testing.assert_array_equal(param.data(ctx[0]).asnumpy(), param.data(ctx[1]).asnumpy())


def test_deferred_initialisation_is_refused_naming_the_parameter():
    net = make_net(deferred=True)
    with pytest.raises(ValueError, match="parameter 'net_dense0_weight' is not initialised yet "
                                         r"\(deferred initialisation"):
        ContiguousTrainer(net.collect_params(), "lamb")
    net(mx.nd.ones((2, IN)))  # shapes known (a forward pass, no backward): now it works
    trainer = ContiguousTrainer(net.collect_params(), "lamb")
    assert contiguous_now(net, trainer)


@pytest.mark.parametrize("hybridize", [None, {"static_alloc": True, "static_shape": True}],
                         ids=["imperative", "static_shape"])
def test_made_after_a_backward_pass_is_refused(hybridize):
    """Regression (issue 22, bug 1): mxlamb.make_contiguous after a backward under
    hybridize(static_alloc=True, static_shape=True) moved the gradients away from the arrays
    the CachedOp had bound, and every later step trained on the stale gradient (0.36 off
    after one step, no error). The layout is now made once, before any backward, and
    refused after one, saying why."""
    net = make_net()
    if hybridize is not None:
        net.hybridize(**hybridize)
    x, y = next(batches(1))
    with autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(mx.nd.array(x)), mx.nd.array(y))
    loss.backward()
    arrays = [(p._data[0], p._grad[0]) for p in net.collect_params().values()]
    with pytest.raises(ValueError, match="a backward pass has already written the gradient of "
                                         "parameter 'net_dense0_bias'.*static_shape"):
        ContiguousTrainer(net.collect_params(), mxlamb.LAMB(learning_rate=0.05))
    # Refused before anything moved: every parameter keeps its arrays.
    assert all(p._data[0] is data and p._grad[0] is grad
               for p, (data, grad) in zip(net.collect_params().values(), arrays))


def test_a_non_lamb_optimizer_goes_gluons_way_on_the_views():
    net = make_net()
    before = {n: p.data().asnumpy() for n, p in net.collect_params().items()}
    trainer = ContiguousTrainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    for name, p in net.collect_params().items():
        np.testing.assert_array_equal(p.data().asnumpy(), before[name])
    reference = make_net()
    sgd = gluon.Trainer(reference.collect_params(), "sgd", {"learning_rate": 0.1})
    for (x, y) in batches(2):
        for n, t in ((net, trainer), (reference, sgd)):
            with autograd.record():
                loss = gluon.loss.SoftmaxCrossEntropyLoss()(n(mx.nd.array(x)), mx.nd.array(y))
            loss.backward()
            t.step(BATCH)
    assert trainer.fast_steps == 0
    for a, b in zip(net.collect_params().values(), reference.collect_params().values()):
        np.testing.assert_array_equal(a.data().asnumpy(), b.data().asnumpy())


def test_a_schedule_with_explicit_groups_goes_the_ordinary_way():
    """With an lr_scheduler, MXNet's grouping moves the learning rate where counts differ: the
    trainer's own step (the whole step at once) is taken only for the whole-step grouping."""
    for aggregate_num, fast in ((4, 0), (np.inf, 6)):
        runs = [train(contiguous, options={
            "aggregate_num": aggregate_num,  # a schedule is stateful: one for each run
            "lr_scheduler": mx.lr_scheduler.FactorScheduler(step=2, factor=0.5, base_lr=0.05)})
            for contiguous in (False, True)]
        assert_identical(snapshot(*runs[0]), snapshot(*runs[1]))
        assert runs[1][1].fast_steps == fast


def test_multi_precision_on_float32_weights():
    """multi_precision=True on float32 weights: their states are (mean, var), no master."""
    _, (_, trainer) = both(options={"multi_precision": True})
    assert trainer.fast_steps == 6


def test_large_parameters_keep_their_own_arrays(monkeypatch):
    """Parameters above MAX_ELEMENTS stay as they are (the per-array costs are small beside
    their update), stepped by the same trainer step, bit-identical."""
    monkeypatch.setattr(mxlamb.contrib.contiguous, "MAX_ELEMENTS", 100)
    _, (net, trainer) = both()
    flat = {name for name, _ in flat_members(trainer)}
    sizes = {n: p.data().size for n, p in net.collect_params().items()}
    assert flat == {n for n, size in sizes.items() if size <= 100} != set(sizes)
    assert trainer.fast_steps == 6


def test_a_static_shape_block_bound_before_the_trainer_is_caught_at_the_step():
    """Regression (found adversarially): a block hybridized with static_shape=True stepped
    once by another trainer, its gradients then zeroed, so that nothing showed the backward
    when the ContiguousTrainer was made; the block kept writing into its old gradient arrays
    and the flat views stayed 0 (0.07 off after 3 steps). Now every step that meets such a
    write raises, naming the parameter, with nothing applied."""
    net = make_net()
    net.hybridize(static_alloc=True, static_shape=True)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    data = list(batches(3))

    def backward(x, y):
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x)), mx.nd.array(y))
        loss.backward()

    warmup = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    backward(*data[0])
    warmup.step(BATCH)
    net.collect_params().zero_grad()
    trainer = ContiguousTrainer(net.collect_params(), mxlamb.LAMB(learning_rate=0.05))
    for x, y in data[1:]:
        backward(x, y)
        before = snapshot(net, trainer)
        with pytest.raises(RuntimeError, match="gradient of parameter 'net_dense0_bias' was "
                                               "written into the array it had before.*Nothing "
                                               "of this step was applied"):
            trainer.step(BATCH)
        assert_identical(before, snapshot(net, trainer))
    assert trainer.fast_steps == 0
