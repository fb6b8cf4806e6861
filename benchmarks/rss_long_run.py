"""Long-run memory check: many LAMB steps of a small model, resident set size sampled.

    python benchmarks/rss_long_run.py --steps 10000      (or: make rss)

Trains a small Gluon MLP with mxlamb through gluon.Trainer (forward, backward, step: the
path a user runs), with the options that keep extra state on (global clipping, EMA,
skip_nonfinite), and prints RSS every --every steps. Exits non-zero if RSS grew by more than
--limit-mb after the warm-up. tests/test_long_run.py runs the same function.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import mxlamb  # noqa: E402,F401


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(steps, every=500, warmup=500, progress=None):
    """[(step, RSS in MiB)] sampled after ``warmup`` steps and every ``every`` steps."""
    mx.random.seed(0)
    net = gluon.nn.HybridSequential(prefix="rss_")
    with net.name_scope():
        net.add(gluon.nn.Dense(64, activation="relu", in_units=32),
                gluon.nn.Dense(64, activation="relu", in_units=64), gluon.nn.Dense(4, in_units=64))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "lamb", {
        "learning_rate": 1e-3, "wd": 1e-4, "global_clipnorm": 1.0, "use_ema": True,
        "skip_nonfinite": True, "aggregate_num": 3})
    rng = np.random.RandomState(0)
    x = mx.nd.array(rng.randn(16, 32))
    y = mx.nd.array(rng.randint(0, 4, 16))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    samples = []
    for step in range(1, steps + 1):
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(16)
        if step >= warmup and (step - warmup) % every == 0:
            mx.nd.waitall()
            samples.append((step, rss_mb()))
        if progress is not None:
            progress(1)
    mx.nd.waitall()
    samples.append((steps, rss_mb()))
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--limit-mb", type=float, default=20.0)
    args = parser.parse_args()
    from tqdm import tqdm
    with tqdm(total=args.steps, unit="step") as bar:
        samples = measure(args.steps, args.every, warmup=min(500, args.steps), progress=bar.update)
    for step, rss in samples:
        print("step %6d  RSS %8.1f MiB" % (step, rss))
    growth = samples[-1][1] - samples[0][1]
    print("growth after warm-up: %+.1f MiB (limit %.0f)" % (growth, args.limit_mb))
    return 0 if growth <= args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())
