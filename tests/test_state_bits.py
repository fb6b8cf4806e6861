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
from conftest import supported_isas
from mxlamb import _library
from quantized_reference import BLOCK, MEAN, VAR, QuantizedLAMB, decode_mean, decode_var
from quantized_reference import encode_mean, encode_var, block_max

# Two 8-bit tensors (a partial last block, several 32768-element chunks) and a small one.
SHAPES = [(300, 300), (70001,), (7,)]
STEPS = 4


@pytest.mark.parametrize("code", [MEAN, VAR], ids=["mean E4M3", "var E5M3"])
def test_codes_round_to_the_nearest_value(code):
    rng = np.random.RandomState(0)
    x = np.concatenate([np.exp(rng.uniform(np.log(1e-12), 0, 20000)), [0.0, 1.0],
                        code.value(np.arange(1, code.one + 1))]).astype(np.float32)
    table = code.value(np.arange(code.one + 1))
    got = code.encode(x, np.zeros(x.shape, bool)).astype(np.int64)
    error = np.abs(code.value(got) - x.astype(np.float64))
    best = np.abs(table[None, :] - x.astype(np.float64)[:, None]).min(axis=1)
    np.testing.assert_array_equal(error, best)
    # every code decodes to its value and encodes back to itself
    codes = np.arange(code.one + 1)
    np.testing.assert_array_equal(code.decode(codes).astype(np.float64), table)
    np.testing.assert_array_equal(code.encode(code.decode(codes), codes > 0), codes)


def test_a_positive_var_is_never_stored_as_zero():
    v = np.array([1.0, 1e-30, 0.0, 1e-45] + [0.0] * 252, dtype=np.float32)
    scales = block_max(v)
    codes = encode_var(v, scales)
    assert codes[:4].tolist()[:2] == [VAR.one, 1] and codes[2] == 0 and codes[3] == 1
    m = np.array([1.0, -1e-30, -0.25], dtype=np.float32)
    np.testing.assert_array_equal(decode_mean(encode_mean(m, block_max(m)), block_max(m)),
                                  [1.0, 0.0, -0.25])


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
    ws = [mx.nd.array(w, dtype=dtype) for w in weights]
    for step_grads in grads:
        updater(list(range(len(ws))), [mx.nd.array(g, dtype=dtype) for g in step_grads], ws)
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


def _judge(case, dtype="float32"):
    _, make_judge, kwargs = CASES[case]
    weights, grads = _inputs()
    judge = make_judge()
    masters = [w.astype(np.float16).astype(np.float32) if dtype == "float16" else w
               for w in weights]
    states = [judge.moments(w.size) for w in masters]
    out = []
    for k, (w, state) in enumerate(zip(masters, states)):
        w = w.ravel()
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[k].astype(dtype).astype(np.float32).ravel()
            w = judge.step(w, g, state, t, 0.01, **kwargs)
        out.append(w)
    return out, states


def _codes(state, name):
    return state[name].asnumpy().ravel()


def _moments(states, index, dtype):
    state = states[index]
    if dtype == "float16":
        state = state[1]
    return state


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_equal_the_judge(case, dtype):
    make = CASES[case][0]
    if dtype == "float16":
        base = make
        make = lambda: _multi_precision(base())  # noqa: E731
    weights, states = _run(make, dtype)
    expected_weights, expected_states = _judge(case, dtype)
    for k, shape in enumerate(SHAPES):
        moments = _moments(states, k, dtype)
        master = states[k][0] if dtype == "float16" else weights[k]
        if np.prod(shape) <= 65536:  # small: float32 moments, as without state_bits
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
        if dtype == "float16":  # the model weight: the master rounded
            np.testing.assert_array_equal(weights[k].asnumpy(),
                                          master.asnumpy().astype(np.float16))


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


@pytest.mark.parametrize("case", ["lamb", "adamw amsgrad"])
def test_same_bits_on_every_isa_level_thread_count_and_grouping(case):
    before_isa = _library.native.mxlamb_active_isa()
    before_threads = _library.native.mxlamb_num_threads()
    runs = {}
    try:
        for isa in supported_isas():
            for threads in (1, 2):
                assert _library.native.mxlamb_set_isa(isa.encode())
                _library.native.mxlamb_set_num_threads(threads)
                runs[(isa, threads)] = _digest(*_run(CASES[case][0]))
        runs["one tensor per call"] = _digest(*_run(CASES[case][0], aggregate_num=1))
    finally:
        _library.native.mxlamb_set_isa(before_isa)
        _library.native.mxlamb_set_num_threads(before_threads)
    first = next(iter(runs.values()))
    for key, digest in runs.items():
        assert digest == first, key


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
    small = opt.create_state(1, mx.nd.zeros((256, 256)))  # 65,536 elements: float32
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
