"""Data-parallel LAMB on several processes of this machine: the two-rings MLP of
train_mlp.py, each worker on its share of every global batch.

MXNet's parameter-server kvstore (scheduler, servers and workers on 127.0.0.1)::

    python -m mxlamb.launch --workers 2 --servers 1 -- python examples/train_distributed.py

    python -m mxlamb.launch --workers 2 --servers 2 -- \\
        python examples/train_distributed.py --update-on-kvstore 0

Horovod with gloo (``make horovod`` installs it)::

    horovodrun -np 2 -H localhost:2 --gloo --network-interface lo \\
        python examples/train_distributed.py --backend horovod
"""
import argparse

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

import mxlamb
from train_mlp import rings  # the two-rings data (this script's folder is on sys.path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["kvstore", "horovod"], default="kvstore")
    parser.add_argument("--update-on-kvstore", type=int, default=1,
                        help="1: LAMB runs on the servers; 0: on every worker")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()

    net = gluon.nn.HybridSequential(prefix="mlp_")
    with net.name_scope():
        net.add(gluon.nn.Dense(128, activation="tanh", in_units=2),
                gluon.nn.Dense(128, activation="tanh", in_units=128),
                gluon.nn.Dense(2, in_units=128))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    params = net.collect_params()
    lamb = mxlamb.LAMB(learning_rate=args.lr, wd=1e-4, exclude_from_weight_decay=["bias"])

    if args.backend == "horovod":
        import horovod.mxnet as hvd
        hvd.init()
        rank, workers = hvd.rank(), hvd.size()
        hvd.broadcast_parameters(params, root_rank=0)
        trainer = hvd.DistributedTrainer(params, lamb)
    else:
        trainer = gluon.Trainer(params, lamb, kvstore="dist_sync",
                                update_on_kvstore=bool(args.update_on_kvstore))
        # Before the first step: rank 0's initial weights everywhere, the optimizer (with
        # the gradient scale of this batch size) on the servers.
        mxlamb.contrib.dist.prepare(trainer, args.global_batch_size)
        rank, workers = trainer._kvstore.rank, trainer._kvstore.num_workers
    if args.global_batch_size % workers:
        raise SystemExit("--global-batch-size %d does not split over %d workers"
                         % (args.global_batch_size, workers))
    share = args.global_batch_size // workers
    # The kvstore sums the workers' gradients: step(global batch) averages them. Horovod's
    # trainer divides by the number of ranks itself: step(this worker's share).
    step_size = share if args.backend == "horovod" else args.global_batch_size

    x_train, y_train = rings(8192, np.random.RandomState(0))
    x_test, y_test = rings(1024, np.random.RandomState(1))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    batches = len(x_train) // args.global_batch_size
    bar = tqdm(range(args.epochs), desc="worker %d/%d" % (rank, workers), unit="epoch",
               disable=rank != 0)
    for epoch in bar:
        order = np.random.RandomState(epoch).permutation(len(x_train))  # same on every worker
        total = 0.0
        for b in range(batches):
            rows = order[b * args.global_batch_size:(b + 1) * args.global_batch_size]
            rows = rows[rank * share:(rank + 1) * share]
            data, label = mx.nd.array(x_train[rows]), mx.nd.array(y_train[rows])
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(step_size)
            total += loss.mean().asscalar()
        bar.set_postfix(loss="%.4f" % (total / batches))
    accuracy = (net(mx.nd.array(x_test)).argmax(axis=1).asnumpy() == y_test).mean()
    if rank == 0:
        print("rank 0: test accuracy %.3f after %d epochs on %d workers (%s)"
              % (accuracy, args.epochs, workers, args.backend))


if __name__ == "__main__":
    main()
