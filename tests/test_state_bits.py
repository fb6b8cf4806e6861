"""8-bit moments (state_bits=8) against their NumPy judge (tests/quantized_reference.py).

- the codes round to the nearest value of their definition (a float64 search over every code);
- through the optimizer (MXNet's Updater, both operator paths: the one-call mxlamb_step and the
  phase operators), the kernels' codes and scales equal the judge's bit for bit after several
  steps, and the weights agree to float32 rounding; on every ISA level and with 1 and 2
  threads, bit-identical to each other;
- small tensors keep float32 moments; the states' memory; the refusals.
"""
import mxnet as mx
import numpy as np
import pytest

import mxlamb
from conftest import MXNET2, mx_array, supported_isas
from mxlamb import _library
from quantized_reference import BLOCK, MEAN, VAR, QuantizedLAMB, decode_mean, decode_var
from quantized_reference import encode_mean, encode_var, block_max

# Two 8-bit tensors (a partial last block, several 32768-element chunks) and a small one.
SHAPES = [(300, 300), (70001,), (7,)]
STEPS = 4


def _awkward_block(rng):
    """A block whose largest magnitude is 1 (so its scale is 1 and x is the value itself):
    exact ties between neighbouring codes of both codes, values above the smallest code's
    half and below it, random magnitudes over 12 decades, subnormals, zeros."""
    ties = []
    for code in (MEAN, VAR):
        table = code.value(np.arange(code.one + 1))
        ties += list((table[:-1] + table[1:]) / 2)
    base = np.concatenate([[1.0], ties, [MEAN.value(1) / 2, VAR.value(1) / 2, 1e-40, 0.0],
                           np.exp(rng.uniform(np.log(1e-12), 0, 4096))]).astype(np.float32)
    return base


@pytest.mark.parametrize("name", ["mean", "var"])
def test_the_library_codes_equal_the_definition(name):
    """lamb_math.h's encoding (through mxlamb_encode_moment, the functions the kernels call)
    against the judge's float64 nearest-value search: ties, the smallest codes, subnormals,
    signs; and decoding against the code table."""
    from mxlamb.state import decode_moment, encode_moment
    rng = np.random.RandomState(0)
    x = _awkward_block(rng)
    if name == "mean":
        x = x * np.where(rng.rand(x.size) < 0.5, -1, 1).astype(np.float32)
        x[0] = 1.0
    codes, scales = encode_moment(mx.nd.array(x), name)
    expected_scales = block_max(x)
    encode, decode = (encode_mean, decode_mean) if name == "mean" else (encode_var, decode_var)
    np.testing.assert_array_equal(scales.asnumpy(), expected_scales)
    np.testing.assert_array_equal(codes.asnumpy(), encode(x, expected_scales))
    np.testing.assert_array_equal(decode_moment(codes, scales, name).asnumpy(),
                                  decode(codes.asnumpy(), scales.asnumpy()))
    if name == "var":  # a positive v is never stored as 0
        assert (codes.asnumpy()[x > 0] > 0).all() and (codes.asnumpy()[x == 0] == 0).all()


def test_the_code_tables():
    for code in (MEAN, VAR):
        codes = np.arange(code.one + 1)
        table = code.value(codes)
        assert table[0] == 0 and table[-1] == 1 and (np.diff(table) > 0).all()
        np.testing.assert_array_equal(code.decode(codes).astype(np.float64), table)
        np.testing.assert_array_equal(code.encode(code.decode(codes), codes > 0), codes)
    assert MEAN.one == 120 and VAR.one == 248
    assert MEAN.value(1) == 1.125 * 2.0 ** -15 and VAR.value(1) == 1.125 * 2.0 ** -31


def test_a_v_that_overflows_float32_leaves_no_nan():
    """A finite gradient so large that (1 - beta2) g^2 overflows float32 makes its block's v
    scale infinite: the block's zero codes stay 0 (not 0 * inf), so no NaN reaches u or the
    weights; as with float32 moments, that element stops moving."""
    results = {}
    for bits in (8, 32):
        opt = mxlamb.LAMB(learning_rate=0.01, state_bits=bits, skip_nonfinite=True)
        updater = mx.optimizer.get_updater(opt)
        weight = mx.nd.array(np.linspace(-1, 1, 4096, dtype=np.float32))
        grad = np.full(4096, 1e-3, np.float32)
        grad[0], grad[1:10] = 1e21, 0.0
        updater(0, mx.nd.array(grad), weight)
        results[bits] = weight.asnumpy()
    assert np.isfinite(results[32]).all()
    assert np.isfinite(results[8]).all()


def _inputs(seed=1):
    rng = np.random.RandomState(seed)
    weights = [(rng.randn(*s) * 0.1).astype(np.float32) for s in SHAPES]
    # per-element gradient scales over several decades, as in real models
    scales = [np.exp(rng.randn(*s)).astype(np.float32) * 0.01 for s in SHAPES]
    grads = [[(rng.randn(*s) * sc).astype(np.float32) for s, sc in zip(SHAPES, scales)]
             for _ in range(STEPS)]
    return weights, grads


def _run(make, dtype="float32", aggregate_num=np.inf):
    """The weights (master copies under multi_precision) and states after STEPS Updater
    steps of ``make()``."""
    weights, grads = _inputs()
    opt = make()
    opt.aggregate_num = mxlamb.options.aggregation(aggregate_num)
    updater = mx.optimizer.get_updater(opt)
    ws = [mx_array(w, dtype) for w in weights]
    for step_grads in grads:
        updater(list(range(len(ws))), [mx_array(g, dtype) for g in step_grads], ws)
    mx.nd.waitall()
    return ws, updater.states


CASES = {
    "lamb": (lambda: mxlamb.LAMB(learning_rate=0.01, wd=0.01, state_bits=8),
             lambda: QuantizedLAMB(), {"wd": 0.01}),
    # the phase operators: clip_gradient and global_clipnorm need the gradient statistics
    "lamb phases": (lambda: mxlamb.LAMB(learning_rate=0.01, wd=0.01, clip_gradient=0.02,
                                        skip_nonfinite=True, state_bits=8),
                    lambda: QuantizedLAMB(clip_gradient=0.02), {"wd": 0.01}),
    "adamw amsgrad": (lambda: mxlamb.AdamW(learning_rate=0.01, weight_decay=0.0, amsgrad=True,
                                           state_bits=8),
                      lambda: QuantizedLAMB(epsilon=1e-7, layer_adaptation=False,
                                            epsilon_hat=True, amsgrad=True), {}),
    "keras lamb decoupled": (lambda: mxlamb.keras.Lamb(learning_rate=0.01, weight_decay=0.01,
                                                       state_bits=8),
                             lambda: QuantizedLAMB(epsilon=1e-7), {"decay": 0.01}),
}


def _rounded(x, dtype):
    """float32 values as MXNet casts them into the model's dtype (float16: to nearest even;
    MXNet 1.9.1's bfloat16 cast truncates), read back as float32."""
    if dtype == "float32":
        return x
    return mx_array(x, dtype).astype(np.float32).asnumpy()


def _judge(case, dtype="float32"):
    _, make_judge, kwargs = CASES[case]
    weights, grads = _inputs()
    judge = make_judge()
    masters = [_rounded(w, dtype) for w in weights]
    states = [judge.moments(w.size) for w in masters]
    out = []
    for k, (w, state) in enumerate(zip(masters, states)):
        w = w.ravel()
        for t, step_grads in enumerate(grads, start=1):
            g = _rounded(step_grads[k], dtype).ravel()
            w = judge.step(w, g, state, t, 0.01, **kwargs)
        out.append(w)
    return out, states


def _codes(state, name):
    return state[name].asnumpy().ravel()


def _moments(states, index, dtype):
    state = states[index]
    if dtype != "float32":
        state = state[1]
    return state


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_equal_the_judge(case, dtype):
    make = CASES[case][0]
    if dtype != "float32":
        base = make
        make = lambda: _multi_precision(base())  # noqa: E731
    weights, states = _run(make, dtype)
    expected_weights, expected_states = _judge(case, dtype)
    for k, shape in enumerate(SHAPES):
        moments = _moments(states, k, dtype)
        master = weights[k] if dtype == "float32" else states[k][0]
        if np.prod(shape) < 4096:  # small: float32 moments, as without state_bits
            assert all(a.dtype == np.float32 for a in moments)
            continue
        expected = expected_states[k]
        names = ["mean", "mean_scale", "var", "var_scale"]
        if expected.amsgrad:
            names += ["var_max", "var_max_scale"]
        for position, name in enumerate(names):
            np.testing.assert_array_equal(moments[position].asnumpy().ravel(),
                                          getattr(expected, name), err_msg="%s %s" % (shape, name))
        np.testing.assert_allclose(master.asnumpy().ravel(), expected_weights[k], rtol=2e-6,
                                   atol=1e-7, err_msg=str(shape))
        if dtype != "float32":  # the model weight: the master rounded
            model = weights[k].astype(np.float32).asnumpy()
            np.testing.assert_array_equal(model, _rounded(master.asnumpy(), dtype))


def _multi_precision(opt):
    opt.multi_precision = True
    return opt


def _digest(weights, states):
    arrays = [w.asnumpy() for w in weights]
    for state in states.values():
        flat = []
        stack = [state]
        while stack:
            item = stack.pop()
            if isinstance(item, (tuple, list)):
                stack.extend(item)
            else:
                flat.append(item.asnumpy())
        arrays += flat
    return [a.tobytes() for a in arrays]


def _on_every_isa_level_and_thread_count(run):
    """{(isa, threads): run()} for every ISA level this CPU has and 1 and 2 threads; the
    library's level and thread count restored after."""
    before_isa = _library.native.mxlamb_active_isa()
    before_threads = _library.native.mxlamb_num_threads()
    results = {}
    try:
        for isa in supported_isas():
            for threads in (1, 2):
                assert _library.native.mxlamb_set_isa(isa.encode())
                _library.native.mxlamb_set_num_threads(threads)
                results[(isa, threads)] = run()
    finally:
        _library.native.mxlamb_set_isa(before_isa)
        _library.native.mxlamb_set_num_threads(before_threads)
    return results


ISA_CASES = {  # (make, weight dtype): every kernel path of both phases with 8-bit moments
    **{case: (CASES[case][0], "float32") for case in CASES},
    "lamb float16 master": (lambda: _multi_precision(CASES["lamb"][0]()), "float16"),
    "lamb ema": (lambda: mxlamb.LAMB(learning_rate=0.01, wd=0.01, use_ema=True,
                                     ema_momentum=0.9, state_bits=8), "float32"),
}


@pytest.mark.parametrize("case", sorted(ISA_CASES))
def test_same_bits_on_every_isa_level_thread_count_and_grouping(case):
    make, dtype = ISA_CASES[case]
    runs = _on_every_isa_level_and_thread_count(lambda: _digest(*_run(make, dtype)))
    runs["one tensor per call"] = _digest(*_run(make, dtype, aggregate_num=1))
    first = next(iter(runs.values()))
    for key, digest in runs.items():
        assert digest == first, key


@pytest.mark.parametrize("grad_dtype", ["float32", "float16"])
def test_phase1_sums_codes_and_scales_are_the_same_bits_on_every_isa_level(grad_dtype):
    """mxlamb_phase1 with 8-bit moments, called directly: its float64 sums of squares (which
    the weights see only through a float32 step size), codes and scales, bit for bit on every
    ISA level and thread count, on sizes that end inside a block and inside a group of lanes."""
    rng = np.random.RandomState(3)
    attrs = dict(num_tensors=1, lrs="0.01", wds="0.01", step_counts="2", state_bits=8,
                 multi_precision=grad_dtype == "float16")  # (float16 gradients of a master)
    for n in (4096 + 7, 70001, 300 * 300):
        w = (rng.randn(n) * 0.1).astype(np.float32)
        g = (rng.randn(n) * 0.01).astype(grad_dtype)
        codes = rng.randint(0, 256, size=(2, n)).astype(np.uint8)
        scales = rng.uniform(1e-6, 1e-3, size=(2, (n + BLOCK - 1) // BLOCK)).astype(np.float32)

        def run():
            state = [mx.nd.array(x, dtype=x.dtype) for x in (*codes, *scales)]
            table = mx.nd.mxlamb_phase1(mx.nd.array(w), mx.nd.array(g, dtype=grad_dtype),
                                        *state, **attrs)
            return [x.asnumpy().tobytes() for x in [table] + state]

        runs = _on_every_isa_level_and_thread_count(run)
        first = next(iter(runs.values()))
        for key, result in runs.items():
            assert result == first, (n, key)
        assert np.frombuffer(first[0], np.float64)[:2].all()  # (sums that are not 0)


def test_a_short_last_block_keeps_its_padding_out_with_an_infinite_gradient_scale():
    """rescale_grad beyond float32 makes the gradient scale inf; clip_gradient brings every
    gradient back to 0.02. The zeros that pad the last block (300 = 256 + 44) would be
    0 * inf = NaN: they must stay out of its scales, codes and sums, so that both blocks of
    this uniform tensor store the same, and the sums are 300 equal squares."""
    attrs = dict(num_tensors=1, lrs="0.01", wds="0.01", step_counts="2", state_bits=8,
                 rescale_grad=1e39, clip_gradient=0.02)

    def run(n=300):
        blocks = (n + BLOCK - 1) // BLOCK
        state = [mx.nd.zeros(n, dtype=np.uint8), mx.nd.zeros(n, dtype=np.uint8),
                 mx.nd.zeros(blocks), mx.nd.zeros(blocks)]
        table = mx.nd.mxlamb_phase1(mx.nd.full(n, 0.1), mx.nd.full(n, 0.01), *state, **attrs)
        return [x.asnumpy() for x in [table] + state]

    n = 300
    one_block_update_sumsq = run(256)[0][0][1]  # (a whole block: no padding)
    for key, (table, mean, var, mean_scale, var_scale) in \
            _on_every_isa_level_and_thread_count(run).items():
        assert (mean == mean[0]).all() and (var == var[0]).all() and mean[0] != 0, key
        assert mean_scale[0] == mean_scale[1], key
        assert mean_scale[0] == pytest.approx(0.1 * 0.02, rel=1e-6), key  # (1 - beta1) g
        assert var_scale[0] == var_scale[1], key
        weight_sumsq, update_sumsq = table[0][:2]
        assert weight_sumsq == pytest.approx(n * float(np.float32(0.1)) ** 2, rel=1e-12), key
        assert update_sumsq == pytest.approx(one_block_update_sumsq * n / 256, rel=1e-12), key


def test_step_and_fused_step_give_the_same_bits():
    weights, grads = _inputs()
    results = []
    for entry in ("step", "fused_step"):
        opt = mxlamb.LAMB(learning_rate=0.01, state_bits=8)
        ws = [mx.nd.array(w) for w in weights]
        states = [opt.create_state(i, w) for i, w in enumerate(ws)]
        for step_grads in grads:
            getattr(opt, entry)(list(range(len(ws))), ws, [mx.nd.array(g) for g in step_grads],
                                states)
        results.append(_digest(ws, dict(enumerate(states))))
    assert results[0] == results[1]


def test_state_memory_and_layout():
    opt = mxlamb.LAMB(state_bits=8)
    big = opt.create_state(0, mx.nd.zeros((1000, 1000)))
    small = opt.create_state(1, mx.nd.zeros((4095,)))  # under 4,096 elements: float32
    smallest = opt.create_state(2, mx.nd.zeros((64, 64)))  # 4,096: 8-bit
    assert [a.dtype for a in smallest] == [np.uint8, np.float32, np.uint8, np.float32]
    assert [a.dtype for a in big] == [np.uint8, np.float32, np.uint8, np.float32]
    assert [a.shape for a in big] == [(1000, 1000), (3907,), (1000, 1000), (3907,)]
    assert sum(a.size * np.dtype(a.dtype).itemsize for a in big) / 1e6 == pytest.approx(
        2 + 8 / BLOCK, rel=1e-3)  # bytes per parameter: 2.03, against 8 in float32
    assert [a.dtype for a in small] == [np.float32, np.float32]


def test_refusals_name_the_argument_and_the_parameter():
    with pytest.raises(ValueError, match="state_bits must be 32 .* or 8 .* got 16"):
        mxlamb.LAMB(state_bits=16)
    with pytest.raises(ValueError, match="state_bits must be"):
        mxlamb.LAMB(state_bits=True)
    opt = mxlamb.LAMB(state_bits=8, param_idx2name={0: "dense0_weight"})
    with pytest.raises(ValueError, match="dense0_weight.*float64.*state_bits=8"):
        opt.create_state(0, mx.nd.zeros((300, 300), dtype="float64"))
    # a float32 state handed to an 8-bit optimizer is refused before anything is written
    fp32 = mxlamb.LAMB().create_state(0, mx.nd.zeros((300, 300)))
    weight = mx.nd.ones((300, 300))
    with pytest.raises(ValueError, match="state .*state_bits=8"):
        opt.update(0, weight, mx.nd.ones((300, 300)), fp32)
    assert (weight.asnumpy() == 1).all()


# ---------------------------------------------------------------------- Gluon, checkpoints

def _trainer(bits, contexts=(mx.cpu(),), seed=0, kvstore="device", update_on_kvstore=None):
    mx.random.seed(seed)
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(300, in_units=300, activation="relu"),
            mx.gluon.nn.Dense(10, in_units=300))
    net.initialize(mx.init.Xavier(), ctx=list(contexts))
    # (MXNet 2.0's Trainer takes update_on_kvstore=True with aggregate_num 1 only)
    aggregate_num = 1 if MXNET2 and update_on_kvstore else np.inf
    trainer = mx.gluon.Trainer(net.collect_params(), mxlamb.LAMB(
        learning_rate=0.01, state_bits=bits, aggregate_num=aggregate_num), kvstore=kvstore,
        update_on_kvstore=update_on_kvstore)
    return net, trainer


def _train(net, trainer, steps, seed=1, rows=16):
    """``steps`` steps of a batch of ``rows`` split over the net's devices."""
    rng = np.random.RandomState(seed)
    weight = net[0].weight
    contexts = weight.list_device() if MXNET2 else weight.list_ctx()
    array = mx.np.array if MXNET2 else mx.nd.array  # (2.0's Gluon takes mx.np arrays)
    for _ in range(steps):
        x = rng.randn(rows, 300).astype(np.float32)
        with mx.autograd.record():
            losses = [(net(array(part, **{"device" if MXNET2 else "ctx": c})) ** 2).sum()
                      for part, c in zip(np.split(x, len(contexts)), contexts)]
        mx.autograd.backward(losses)
        trainer.step(rows)


def _weights(net, context=mx.cpu()):
    return [p.data(context).asnumpy() for p in net.collect_params().values()]


def _index_of(trainer, shape):
    return next(i for i, p in enumerate(trainer._params) if p.shape == shape)


def test_resumed_run_is_the_uninterrupted_one(tmp_path):
    net, trainer = _trainer(8)
    _train(net, trainer, 3)
    mxlamb.save_states(trainer, str(tmp_path / "run.states"))
    net.save_parameters(str(tmp_path / "run.params"))
    _train(net, trainer, 2, seed=5)
    resumed, resumed_trainer = _trainer(8, seed=3)
    resumed.load_parameters(str(tmp_path / "run.params"))
    mxlamb.load_states(resumed_trainer, str(tmp_path / "run.states"))
    _train(resumed, resumed_trainer, 2, seed=5)
    for a, b in zip(_weights(net), _weights(resumed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("saved, loaded", [(32, 8), (8, 32)])
def test_a_file_of_the_other_format_loads_converted_and_says_so(tmp_path, saved, loaded):
    net, trainer = _trainer(saved)
    _train(net, trainer, 3)
    path = str(tmp_path / "run.states")
    mxlamb.save_states(trainer, path)
    before = dict(trainer._updaters[0].states)
    other, other_trainer = _trainer(loaded)
    with pytest.warns(UserWarning, match="1 parameter state.*state_bits=%d.*state_bits=%d"
                      % (saved, loaded)):
        mxlamb.load_states(other_trainer, path)
    after = other_trainer._updaters[0].states
    # the 300 x 300 weight; the others have at most 3,000 elements: float32 always
    big = _index_of(other_trainer, (300, 300))
    if saved == 32:  # encoded as phase 1 stores them
        for position, name in ((0, "mean"), (1, "var")):
            x = before[big][position].asnumpy().ravel()
            scales = block_max(x)
            codes = (encode_mean if name == "mean" else encode_var)(x, scales)
            np.testing.assert_array_equal(after[big][2 * position].asnumpy().ravel(), codes)
            np.testing.assert_array_equal(after[big][2 * position + 1].asnumpy(), scales)
    else:  # the stored values, exactly
        for position, decode in ((0, decode_mean), (1, decode_var)):
            codes = before[big][2 * position].asnumpy().ravel()
            scales = before[big][2 * position + 1].asnumpy()
            np.testing.assert_array_equal(after[big][position].asnumpy().ravel(),
                                          decode(codes, scales))
    for small in set(after) - {big}:  # float32 moments on both sides, as saved
        for a, b in zip(before[small], after[small]):
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_eight_bit_states_survive_a_round_trip_through_float32(tmp_path):
    net, trainer = _trainer(8)
    _train(net, trainer, 3)
    mxlamb.save_states(trainer, str(tmp_path / "a.states"))
    float32_net, float32_trainer = _trainer(32)
    with pytest.warns(UserWarning):
        mxlamb.load_states(float32_trainer, str(tmp_path / "a.states"))
    mxlamb.save_states(float32_trainer, str(tmp_path / "b.states"))
    back_net, back_trainer = _trainer(8)
    with pytest.warns(UserWarning):
        mxlamb.load_states(back_trainer, str(tmp_path / "b.states"))
    big = _index_of(trainer, (300, 300))
    assert trainer._updaters[0].states[big][0].dtype == np.uint8
    for a, b in zip(trainer._updaters[0].states[big], back_trainer._updaters[0].states[big]):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


@pytest.mark.parametrize("update_on_kvstore", [False, True])
def test_two_devices_train_as_one_with_8_bit_states(update_on_kvstore):
    """The kvstore adds the devices' gradients in another order than one device's batch sum,
    so a code may round the other way: the weights agree closely, not bit for bit. The two
    devices' copies are the same bits."""
    single, single_trainer = _trainer(8)
    _train(single, single_trainer, 3)
    contexts = (mx.cpu(0), mx.cpu(1))
    net, trainer = _trainer(8, contexts, kvstore="device",
                            update_on_kvstore=update_on_kvstore)
    _train(net, trainer, 3)
    for a, b, c in zip(_weights(net, contexts[0]), _weights(net, contexts[1]),
                       _weights(single)):
        np.testing.assert_array_equal(a, b)
        # A code that rounds the other way moves its element by a fraction of one update
        # (lr 0.01): rare, and never more than that.
        off = np.abs(a - c)
        assert off.max() < 2e-3 and np.mean(off > 1e-5) < 1e-3, (off.max(), np.mean(off > 1e-5))
    updater = trainer._kvstore._updater if update_on_kvstore else trainer._updaters[0]
    assert updater.states[_index_of(trainer, (300, 300))][0].dtype == np.uint8


def test_convert_lamb_refuses_8_bit_states():
    net, trainer = _trainer(8)
    _train(net, trainer, 1)
    with pytest.raises(ValueError, match="state_bits"):
        mxlamb.convert_lamb(trainer, to="mxnet")


def test_contiguous_trainer_gives_gluons_bits_with_8_bit_states():
    from mxlamb.contrib import ContiguousTrainer
    results = []
    for trainer_class in (mx.gluon.Trainer, ContiguousTrainer):
        mx.random.seed(0)
        net = mx.gluon.nn.HybridSequential()
        net.add(mx.gluon.nn.Dense(300, in_units=300, activation="relu"),  # 8-bit
                mx.gluon.nn.Dense(64, in_units=64, activation="relu"),    # 4,096: 8-bit
                mx.gluon.nn.Dense(10, in_units=64))                       # float32, flat
        net.initialize(mx.init.Xavier())
        trainer = trainer_class(net.collect_params(), mxlamb.LAMB(learning_rate=0.01,
                                                                  state_bits=8))
        rng = np.random.RandomState(1)
        array = mx.np.array if MXNET2 else mx.nd.array
        for _ in range(3):
            x = array(rng.randn(16, 300).astype(np.float32))
            with mx.autograd.record():
                loss = (net[2](net[1](net[0](x)[:, :64])) ** 2).sum()
            loss.backward()
            trainer.step(16)
        if trainer_class is ContiguousTrainer:
            assert trainer.fast_steps == 3
        results.append(_weights(net))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- training options with 8-bit moments

def _global_scale(step_grads, clipnorm):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in step_grads))
    return min(1.0, clipnorm / norm)


@pytest.mark.parametrize("option", ["global_clipnorm", "loss_scale_factor", "accumulation",
                                    "ema"])
def test_training_options_with_8_bit_moments_equal_the_judge(option):
    """Each option through the Updater, against the judge fed what the option does: the
    gradient scale of global clipping or a static loss scale, the sum of the accumulated
    gradients with 1/N, the average of the weights after each update."""
    weights, grads = _inputs()
    kwargs = {"global_clipnorm": dict(global_clipnorm=0.5),
              "loss_scale_factor": dict(loss_scale_factor=4.0),
              "accumulation": dict(gradient_accumulation_steps=2),
              "ema": dict(use_ema=True, ema_momentum=0.9)}[option]
    opt = mxlamb.LAMB(learning_rate=0.01, state_bits=8, **kwargs)
    updater = mx.optimizer.get_updater(opt)
    ws = [mx.nd.array(w) for w in weights]
    for step_grads in grads:
        updater(list(range(len(ws))), [mx.nd.array(g) for g in step_grads], ws)
    judge = QuantizedLAMB()
    expected = [w.ravel() for w in weights]
    states = [judge.moments(w.size) for w in weights]
    averages = [None] * len(weights)
    updates = grads if option != "accumulation" else [
        [a + b for a, b in zip(grads[k], grads[k + 1])] for k in range(0, len(grads), 2)]
    for t, step_grads in enumerate(updates, start=1):
        scale = {"global_clipnorm": _global_scale(step_grads, 0.5), "loss_scale_factor": 0.25,
                 "accumulation": 0.5, "ema": 1.0}[option]
        for k in range(len(weights)):
            expected[k] = judge.step(expected[k], step_grads[k].ravel(), states[k], t, 0.01,
                                     grad_scale=scale)
            if option == "ema":
                averages[k] = expected[k].copy() if t == 1 else (
                    np.float32(0.9) * averages[k] + np.float32(1.0 - 0.9) * expected[k])
    for k, shape in enumerate(SHAPES):
        if np.prod(shape) < 4096:
            continue  # (float32 moments: the judge is of 8-bit ones)
        np.testing.assert_allclose(ws[k].asnumpy().ravel(), expected[k], rtol=2e-6, atol=1e-7,
                                   err_msg="%s %s" % (option, shape))
        state = updater.states[k]
        np.testing.assert_array_equal(state[0].asnumpy().ravel(), states[k].mean)
        np.testing.assert_array_equal(state[2].asnumpy().ravel(), states[k].var)
        if option == "ema":
            np.testing.assert_allclose(state[-1].asnumpy().ravel(), averages[k], rtol=2e-6,
                                       atol=1e-7)
