"""One Gluon Trainer step with ``'lamb'`` (mxlamb) against the float64 reference.

Run as a script (not collected by pytest) by the packaging and CPU-level tests, with whatever
mxlamb the interpreter imports: an installed wheel or sdist, from outside the source tree, or
the tree itself under qemu. MXNet 1.x and 2.0. Prints one JSON line (mxlamb's and mxnet's
versions and places, the ISA level, the largest error) and exits 1 if the step is wrong.
"""
import json
import os
import sys

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon

import mxlamb
from reference import ReferenceLAMB

MXNET2 = int(mx.__version__.split(".")[0]) >= 2
LR, WD = 0.01, 0.01


def main():
    if MXNET2:
        mx.util.set_flush_denorms(False)  # the reference is IEEE arithmetic
    array = mx.np.array if MXNET2 else mx.nd.array
    rng = np.random.RandomState(0)
    net = gluon.nn.Dense(5, in_units=7)  # two odd-sized tensors: weight and bias
    net.initialize(mx.init.Normal(0.5))
    trainer = gluon.Trainer(net.collect_params(), "lamb", {"learning_rate": LR, "wd": WD})
    with autograd.record():
        loss = (net(array(rng.randn(4, 7).astype(np.float32))) ** 2).sum()
    loss.backward()
    params = list(net.collect_params().values())
    reference = ReferenceLAMB()
    for k, param in enumerate(params):
        reference.init(k, param.data().asnumpy())
    expected = [reference.step(k, p.grad().asnumpy().astype(np.float64), LR, WD)
                for k, p in enumerate(params)]
    trainer.step(1)
    error = max(float(np.max(np.abs(p.data().asnumpy() - e) / (2e-6 + 2e-5 * np.abs(e))))
                for p, e in zip(params, expected))
    report = {"mxlamb": mxlamb.__version__, "mxlamb_file": os.path.abspath(mxlamb.__file__),
              "mxnet": mx.__version__, "mxnet_file": os.path.abspath(mx.__file__),
              "optimizer": type(trainer._optimizer).__module__,
              "isa": mxlamb._library.native.mxlamb_active_isa().decode(),
              "error_over_tolerance": error}
    print(json.dumps(report))
    return 0 if error <= 1.0 and isinstance(trainer._optimizer, mxlamb.LAMB) else 1


if __name__ == "__main__":
    sys.exit(main())
