"""A short, real LAMB training run: a Gluon MLP learns to tell two noisy rings apart.

    python examples/train_mlp.py [--seed 0] [--epochs 20] [--lr 0.01] [--warmup-epochs 2]
                                 [--optimizer mxlamb|mxnet-lamb] [--trust-ratios ratios.png]

The settings that make every seed converge (0.998 or better on seeds 0-19):
- the learning rate rises linearly from 0 to --lr over --warmup-epochs, then falls linearly
  to 0 at the end of the last epoch. LAMB makes each step about lr * ||w|| long however small
  the gradient has become, so a constant learning rate keeps moving the weights after the
  rings are separated (a constant 0.02 diverged);
- lower_bound=1 (--lower-bound): LAMB's trust ratio is ||w|| / ||update||, and the biases
  start at 0, so they could only grow by a factor of (1 + lr) per step and the MLP, unable
  to shift its units, stayed at chance. lower_bound counts ||w|| as at least 1 in the ratio.
  (mxlamb's exclude_from_layer_adaptation=["bias"] does it too; MXNet's LAMB lacks it.)
The last line printed is ``test accuracy 0.xxx``.

--seed sets everything that is random: the data, the initial weights (``mx.random.seed``),
the order of the batches, NumPy's and Python's global generators.
--optimizer mxnet-lamb trains with MXNet's own LAMB on the same settings, for comparison.
--trust-ratios PNG plots mxlamb's per-parameter trust ratios (read once per epoch from
``optimizer.trust_ratios()``) to that file; it needs matplotlib (pip install 'mxlamb[examples]').

Nothing is downloaded: the data are generated. ``import mxlamb`` is all it takes for
``gluon.Trainer(..., 'lamb', ...)`` and ``mx.optimizer.create('lamb', ...)`` to use mxlamb.
"""
import argparse
import random

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

import mxlamb  # noqa: F401  (makes "lamb" mxlamb.LAMB)

TRAIN_SIZE = 4096
TEST_SIZE = 1024


def rings(n, rng):
    """n points on two noisy rings (radius 0.45: label 0, radius 1.0: label 1)."""
    label = rng.randint(0, 2, n)
    radius = np.where(label == 1, 1.0, 0.45) + rng.randn(n) * 0.08
    angle = rng.rand(n) * 2 * np.pi
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1).astype(np.float32)
    return x, label.astype(np.float32)


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear decay to 0 at
    ``total_steps``; ``step`` counts from 1."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    return peak * (total_steps - step) / max(1, total_steps - warmup_steps)


def make_optimizer(name, args):
    settings = {"learning_rate": args.lr, "wd": args.wd, "lower_bound": args.lower_bound}
    if name == "mxlamb":
        return mx.optimizer.create("lamb", **settings)  # mxlamb.LAMB since `import mxlamb`
    return mx.optimizer.optimizer.LAMB(**settings)  # MXNet's own LAMB


def train(args, show_progress=True):
    """Trains the MLP; returns (test accuracy, per-epoch losses, per-epoch trust ratios as
    (parameter names, values) of each epoch's last step, or [] for MXNet's LAMB)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    rng = np.random.RandomState(args.seed)  # the data, then the order of the batches
    x_train, y_train = rings(TRAIN_SIZE, rng)
    x_test, y_test = rings(TEST_SIZE, rng)

    net = gluon.nn.HybridSequential(prefix="mlp_")
    with net.name_scope():
        net.add(gluon.nn.Dense(128, activation="tanh"), gluon.nn.Dense(128, activation="tanh"),
                gluon.nn.Dense(2))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    params = net.collect_params()
    net.collect_params(".*bias").setattr("wd_mult", 0.0)  # no weight decay for the biases
    optimizer = make_optimizer(args.optimizer, args)
    trainer = gluon.Trainer(params, optimizer)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    steps_per_epoch = -(-TRAIN_SIZE // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = max(1, int(args.warmup_epochs * steps_per_epoch))
    step = 0
    epoch_losses = []
    trust_ratio_history = []
    bar = tqdm(range(args.epochs), desc="training", unit="epoch", disable=not show_progress)
    for _ in bar:
        loss_sum = 0.0
        order = rng.permutation(TRAIN_SIZE)
        for start in range(0, TRAIN_SIZE, args.batch_size):
            rows = order[start:start + args.batch_size]
            data, label = mx.nd.array(x_train[rows]), mx.nd.array(y_train[rows])
            step += 1
            trainer.set_learning_rate(learning_rate(step, total_steps, warmup_steps, args.lr))
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(len(rows))
            loss_sum += loss.sum().asscalar()
        epoch_losses.append(loss_sum / TRAIN_SIZE)
        bar.set_postfix(loss="%.4f" % epoch_losses[-1])
        if args.optimizer == "mxlamb":
            ratios = optimizer.trust_ratios()
            trust_ratio_history.append((ratios.keys, ratios.values.asnumpy()))
    predictions = net(mx.nd.array(x_test)).argmax(axis=1).asnumpy()
    accuracy = float((predictions == y_test).mean())
    return accuracy, epoch_losses, trust_ratio_history


def trust_ratio_figure(history):
    """The trust ratios of each epoch's last step, one curve per parameter, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = history[0][0]
    values = np.array([epoch_values for _, epoch_values in history])
    epochs = np.arange(1, len(values) + 1)
    figure, axis = plt.subplots(figsize=(7, 4))
    for column, name in enumerate(names):
        axis.plot(epochs, values[:, column], label=str(name))
    axis.set_xlabel("epoch")
    axis.set_ylabel("trust ratio max(||w||, lower_bound) / ||update||")
    axis.set_yscale("log")
    axis.set_title("mxlamb trust ratios, last step of each epoch (not smoothed)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_trust_ratios(history, path):
    figure = trust_ratio_figure(history)
    figure.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the data, the initial weights and the batch order")
    parser.add_argument("--epochs", type=int, default=20,
                        help="passes over the %d training points" % TRAIN_SIZE)
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    parser.add_argument("--warmup-epochs", type=float, default=2.0,
                        help="epochs of linear warm-up before the linear decay to 0")
    parser.add_argument("--wd", type=float, default=1e-4, help="weight decay (not the biases)")
    parser.add_argument("--lower-bound", type=float, default=1.0,
                        help="LAMB's lower_bound: ||w|| counts as at least this in the trust "
                             "ratio, so that the zero-initialised biases can grow")
    parser.add_argument("--batch-size", type=int, default=64, help="points per step")
    parser.add_argument("--optimizer", choices=("mxlamb", "mxnet-lamb"), default="mxlamb",
                        help="mxlamb's LAMB, or MXNet's own LAMB for comparison")
    parser.add_argument("--trust-ratios", metavar="PNG",
                        help="plot mxlamb's trust ratios to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.trust_ratios:
        if args.optimizer != "mxlamb":
            parser.error("--trust-ratios reads mxlamb's trust ratios: use --optimizer mxlamb")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--trust-ratios needs matplotlib: pip install 'mxlamb[examples]'")

    accuracy, epoch_losses, trust_ratio_history = train(args)
    if args.trust_ratios:
        plot_trust_ratios(trust_ratio_history, args.trust_ratios)
        print("trust ratios plotted to %s" % args.trust_ratios)
    print("optimizer %s, seed %d: loss first epoch %.4f -> last epoch %.4f"
          % (args.optimizer, args.seed, epoch_losses[0], epoch_losses[-1]))
    print("test accuracy %.3f" % accuracy)
    return accuracy


if __name__ == "__main__":
    main()
