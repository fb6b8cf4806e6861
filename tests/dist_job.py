"""A small LAMB training job for the distributed tests: run by each worker under
``python -m mxlamb.launch`` (or ``horovodrun``), or alone as the single-process reference on
the global batch. Writes the final weights (rank 0 only) to an .npz file."""
import argparse

import numpy as np

import mxnet as mx
from mxnet import autograd, gluon

import mxlamb

GLOBAL_BATCH = 16
IN_UNITS = 40


def build_net(hidden=48):
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Dense(hidden, in_units=IN_UNITS, activation="tanh"))
        net.add(gluon.nn.Dense(10, in_units=hidden))
    mx.random.seed(7)
    net.initialize(mx.init.Xavier())
    return net


def batches(steps):
    rng = np.random.RandomState(11)
    for _ in range(steps):
        yield (rng.randn(GLOBAL_BATCH, IN_UNITS).astype(np.float32),
               rng.randint(0, 10, size=GLOBAL_BATCH).astype(np.float32))


def assert_same_weights(reference, out, hidden=48):
    """The weights in ``out`` (.npz) equal ``reference`` (a dict) to fp32 round-off, and the
    run did train (every weight matrix moved from its initial value)."""
    weights = dict(np.load(out))
    assert sorted(weights) == sorted(reference)
    for name in reference:
        # Summed over workers, the gradients add up in another order than in one backward pass.
        np.testing.assert_allclose(weights[name], reference[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    initial = {name: p.data().asnumpy()
               for name, p in build_net(hidden).collect_params().items()}
    assert all(np.abs(weights[n] - initial[n]).max() > 1e-3 for n in reference if "weight" in n)


class MainModuleLAMB(mxlamb.LAMB):
    """Defined in the job's __main__: a server cannot unpickle it."""


# wd and the per-parameter multipliers and exclusions below must reach a kvstore server too.
OPTIONS = {"learning_rate": 0.02, "wd": 0.1, "lower_bound": 1e-3, "upper_bound": 10.0,
           "exclude_from_weight_decay": ["dense1_bias"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "dist", "horovod"], required=True)
    parser.add_argument("--update-on-kvstore", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", choices=["lamb", "main-module"], default="lamb")
    parser.add_argument("--global-clipnorm", type=float, default=None)
    parser.add_argument("--contiguous", action="store_true",
                        help="an mxlamb.contrib.ContiguousTrainer")
    parser.add_argument("--state-bits", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=48,
                        help="units of the first layer (128: 5,120 weights, 8-bit moments "
                             "under --state-bits 8)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    net = build_net(args.hidden)
    params = net.collect_params()
    params["net_dense1_weight"].lr_mult = 0.5
    params["net_dense0_bias"].wd_mult = 0.0
    options = dict(OPTIONS, global_clipnorm=args.global_clipnorm, state_bits=args.state_bits)
    optimizer = (mxlamb.LAMB(**options) if args.optimizer == "lamb"
                 else MainModuleLAMB(**options))
    rank, workers = 0, 1
    trainer_class = mxlamb.contrib.ContiguousTrainer if args.contiguous else gluon.Trainer
    if args.mode == "dist":
        trainer = trainer_class(params, optimizer, kvstore="dist_sync",
                                update_on_kvstore=bool(args.update_on_kvstore))
        mxlamb.contrib.dist.prepare(trainer, GLOBAL_BATCH)
        rank, workers = trainer._kvstore.rank, trainer._kvstore.num_workers
    elif args.mode == "horovod":
        import horovod.mxnet as hvd
        hvd.init()
        rank, workers = hvd.rank(), hvd.size()
        hvd.broadcast_parameters(params, root_rank=0)
        trainer = hvd.DistributedTrainer(params, optimizer)
    else:
        trainer = trainer_class(params, optimizer, kvstore=None)

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    share = GLOBAL_BATCH // workers
    for data, label in batches(args.steps):
        data = mx.nd.array(data[rank * share:(rank + 1) * share])
        label = mx.nd.array(label[rank * share:(rank + 1) * share])
        with autograd.record():
            loss = loss_fn(net(data), label)
        loss.backward()
        # Horovod's DistributedTrainer averages gradients over ranks; the kvstore sums them.
        trainer.step(share if args.mode == "horovod" else GLOBAL_BATCH)
    mx.nd.waitall()
    if rank == 0:
        np.savez(args.out, **{name: p.data().asnumpy() for name, p in params.items()})
        if args.contiguous:  # how many steps took the ContiguousTrainer's own step
            with open(str(args.out) + ".planned", "w") as f:
                f.write(str(trainer.fast_steps))


if __name__ == "__main__":
    main()
