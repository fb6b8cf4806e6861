"""A short, real LAMB training run: a Gluon MLP learns to tell two noisy rings apart.

    python examples/train_mlp.py [--epochs 40] [--lr 0.02] [--trust-ratios ratios.png]

With --trust-ratios the per-parameter trust ratios (read once per epoch from
``trainer._optimizer.trust_ratios()``) are plotted to that PNG file.

Nothing is downloaded: the data are generated. ``import mxlamb`` is all it takes for
``gluon.Trainer(..., 'lamb', ...)`` to use mxlamb's operators.
"""
import argparse

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

import mxlamb  # noqa: F401  (makes "lamb" mxlamb.LAMB)


def rings(n, seed):
    rng = np.random.RandomState(seed)
    label = rng.randint(0, 2, n)
    radius = np.where(label == 1, 1.0, 0.45) + rng.randn(n) * 0.08
    angle = rng.rand(n) * 2 * np.pi
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1).astype(np.float32)
    return x, label.astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trust-ratios", metavar="PNG", help="plot the trust ratios here")
    args = parser.parse_args()

    mx.random.seed(0)
    x_train, y_train = rings(4096, seed=0)
    x_test, y_test = rings(1024, seed=1)
    train_data = gluon.data.DataLoader(gluon.data.ArrayDataset(x_train, y_train),
                                       batch_size=args.batch_size, shuffle=True)
    net = gluon.nn.HybridSequential(prefix="mlp_")
    with net.name_scope():
        net.add(gluon.nn.Dense(128, activation="tanh"), gluon.nn.Dense(128, activation="tanh"),
                gluon.nn.Dense(2))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "lamb",
                            {"learning_rate": args.lr, "wd": 1e-4,
                             "exclude_from_weight_decay": ["bias"]})
    print("optimizer: %s.%s" % (type(trainer._optimizer).__module__,
                                type(trainer._optimizer).__name__))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    first = None
    history = []  # per epoch: the last step's trust ratios
    bar = tqdm(range(args.epochs), desc="training", unit="epoch")
    for epoch in bar:
        total, count = 0.0, 0
        for data, label in train_data:
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(data.shape[0])
            total += loss.sum().asscalar()
            count += data.shape[0]
        epoch_loss = total / count
        first = epoch_loss if first is None else first
        bar.set_postfix(loss="%.4f" % epoch_loss)
        ratios = trainer._optimizer.trust_ratios()
        history.append((ratios.keys, ratios.values.asnumpy()))
    accuracy = (net(mx.nd.array(x_test)).argmax(axis=1).asnumpy() == y_test).mean()
    print("loss: first epoch %.4f -> last epoch %.4f; test accuracy %.3f"
          % (first, epoch_loss, accuracy))
    if args.trust_ratios:
        plot_trust_ratios(history, args.trust_ratios)


def plot_trust_ratios(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = history[0][0]
    values = np.array([v for _, v in history])
    fig, ax = plt.subplots(figsize=(7, 4))
    for column, key in enumerate(keys):
        ax.plot(np.arange(1, len(values) + 1), values[:, column], label=str(key))
    ax.set_xlabel("epoch")
    ax.set_ylabel("trust ratio ||w|| / ||u|| (last step of the epoch)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print("trust ratios plotted to %s" % path)


if __name__ == "__main__":
    main()
