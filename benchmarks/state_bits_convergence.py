"""Does BERT pretrain the same with 8-bit moments? examples/bert_pretrain.py with mxlamb's LAMB
on float32 moments and on 8-bit moments (state_bits=8), over several seeds (initial weights and
data order), every curve plotted.

    python benchmarks/state_bits_convergence.py [--seeds 4] [--steps 200] [--out DIR]

For each seed both optimizers see the same initial weights and the same batches. The figure
shows every run's masked-LM curve; the JSON holds every per-step loss and, per run, the mean
masked-LM loss of the last 10% of the steps. The seed-to-seed spread of the float32 runs is
the yardstick: the 8-bit runs should fall inside it (and each differ from its float32 twin by
less than the spread).
"""
import argparse
import importlib.util
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPTIMIZERS = ("mxlamb", "mxlamb-8bit")


def load_example():
    path = os.path.join(ROOT, "examples", "bert_pretrain.py")
    spec = importlib.util.spec_from_file_location("bert_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tail_mean(values, fraction=0.1):
    values = np.asarray(values)
    return float(values[-max(1, int(len(values) * fraction)):].mean())


def run(seeds, steps, out_dir, extra=()):
    """{optimizer: {seed: history}} of examples/bert_pretrain.py."""
    example = load_example()
    runs = {name: {} for name in OPTIMIZERS}
    for seed in seeds:
        histories = example.main(["--steps", str(steps), "--optimizers", ",".join(OPTIMIZERS),
                                  "--seed", str(seed),
                                  "--out-dir", os.path.join(out_dir, "seed%d" % seed)]
                                 + list(extra))
        for name in OPTIMIZERS:
            runs[name][seed] = histories[name]
    return runs


def summary(runs):
    """Per optimizer: each seed's last-10% masked-LM mean, their mean, min, max."""
    table = {}
    for name, by_seed in runs.items():
        finals = {seed: tail_mean(h["mlm"]) for seed, h in by_seed.items()}
        values = list(finals.values())
        table[name] = {"final_mlm": finals, "mean": float(np.mean(values)),
                       "min": float(np.min(values)), "max": float(np.max(values)),
                       "seconds": {seed: h["seconds"] for seed, h in by_seed.items()}}
    return table


def plot(runs, path, steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    example = load_example()
    figure, axis = plt.subplots(figsize=(8, 5))
    colors = {"mxlamb": "tab:blue", "mxlamb-8bit": "tab:red"}
    for name, by_seed in runs.items():
        for k, (seed, history) in enumerate(sorted(by_seed.items())):
            axis.plot(np.arange(1, len(history["mlm"]) + 1),
                      example.moving_average(history["mlm"]), color=colors[name], alpha=0.7,
                      linestyle="-" if name == "mxlamb" else ":", linewidth=1.6,
                      label="%s (%d seeds)" % (name, len(by_seed)) if k == 0 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("masked-LM cross-entropy per masked token")
    axis.set_title("tiny BERT, %d steps: float32 vs 8-bit LAMB moments, every seed "
                   "(moving average over %d steps)" % (steps, example.SMOOTHING_STEPS),
                   fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="state_bits_out")
    args = parser.parse_args(argv)
    if args.seeds < 2 or args.steps < 10:
        parser.error("--seeds must be >= 2 (a spread) and --steps >= 10")
    os.makedirs(args.out, exist_ok=True)
    runs = run(range(args.seeds), args.steps, args.out)
    table = summary(runs)
    with open(os.path.join(args.out, "state_bits_convergence.json"), "w") as out:
        json.dump({"args": vars(args), "summary": table,
                   "runs": {n: {str(s): h for s, h in r.items()} for n, r in runs.items()}},
                  out)
    plot(runs, os.path.join(args.out, "state_bits_convergence.png"), args.steps)
    print("last-10%% mean masked-LM loss over %d seeds:" % args.seeds)
    for name, row in table.items():
        print("  %-12s mean %.4f  min %.4f  max %.4f  per seed %s" % (
            name, row["mean"], row["min"], row["max"],
            " ".join("%.4f" % v for v in row["final_mlm"].values())))
    float32 = table["mxlamb"]
    paired = [table["mxlamb-8bit"]["final_mlm"][s] - float32["final_mlm"][s]
              for s in float32["final_mlm"]]
    print("  8-bit minus float32, per seed: %s; float32 seed-to-seed spread (max - min): %.4f"
          % (" ".join("%+.4f" % d for d in paired), float32["max"] - float32["min"]))
    return table


if __name__ == "__main__":
    sys.exit(main() and 0)
