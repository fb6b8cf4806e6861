"""Shared by the option tests: a seeded problem, stepping through MXNet's Updater, the float64
reference alongside, and the float32 tolerance."""
import mxnet as mx
import numpy as np
from mxnet import autograd

from conftest import TOLERANCE, mx_array, to_f64

SHAPES = [(5,), (40000,), (3, 7), (1,), (129,)]
LR, WD = 0.01, 0.01
RTOL, ATOL = TOLERANCE["float32"]


def problem(seed=0, steps=4, scale=1.0, shapes=SHAPES):
    rng = np.random.RandomState(seed)
    weights = [rng.randn(*s).astype(np.float32) for s in shapes]
    grads = [[(scale * rng.randn(*s)).astype(np.float32) for s in shapes]
             for _ in range(steps)]
    return weights, grads


def run_updater(opt, weights, grads, dtype="float32", mixed=False, arrays_out=None):
    """Steps through mx.optimizer.get_updater (list calls, as Trainer makes them). ``mixed``
    makes every other parameter float32 (the Updater then calls once per dtype). The weight
    arrays stepped are appended to ``arrays_out`` if given."""
    dtypes = [("float32" if mixed and i % 2 else dtype) for i in range(len(weights))]
    arrays = [mx_array(w, d) for w, d in zip(weights, dtypes)]
    if arrays_out is not None:
        arrays_out += arrays
    updater = mx.optimizer.get_updater(opt)
    for step in grads:
        updater(list(range(len(arrays))), [mx_array(g, d) for g, d in zip(step, dtypes)], arrays)
    return [to_f64(a) for a in arrays], updater


def run_ref(ref, weights, grads, lr=LR, wd=WD):
    for k, w in enumerate(weights):
        ref.init(k, w)
    for step in grads:
        ref.step(dict(enumerate(step)), lr, wd)
    return [ref.inner.weight[k] for k in range(len(weights))]


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg="parameter %d" % i)


def train_alongside(net, trainer, ref, x, batch_size, lr, wd, steps=3):
    """Steps ``trainer`` on the loss sum((net(x))^2) and the reference on the same gradients,
    from the same initial weights; asserts the weights agree after ``steps`` steps."""
    params = net.collect_params()
    for n, p in params.items():
        ref.init(n, p.data().asnumpy().astype(np.float64))
    for _ in range(steps):
        with autograd.record():
            loss = (net(x) ** 2).sum()
        loss.backward()
        grads = {n: p.grad().asnumpy() for n, p in params.items()}
        trainer.step(batch_size)
        ref.step(grads, lr, wd)
    for n, p in params.items():
        np.testing.assert_allclose(p.data().asnumpy(), ref.inner.weight[n], rtol=RTOL,
                                   atol=ATOL, err_msg=n)
