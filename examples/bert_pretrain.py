"""Pretrains a tiny BERT (GluonNLP 0.10) with masked LM + next-sentence prediction on the
corpus shipped in examples/bert/, with mxlamb's LAMB (float32 moments, and 8-bit moments:
``state_bits=8``), MXNet's built-in LAMB and Adam, on the same data in the same order, and
plots their loss curves.

    python examples/bert_pretrain.py [--steps 200] [--out-dir bert_out] [--devices 2]

GluonNLP's pretraining recipe, scaled down: linear warm-up then linear decay of the learning
rate, weight decay 0.01 with LayerNorm (gamma, beta) and biases excluded, gradient
accumulation (``grad_req='add'``, one optimizer step per ``--accumulate`` micro-batches).
The recipe's float16 model with float32 master weights does not run here: MXNet 1.9.1's CPU
FullyConnected has no float16 kernel ("only supported by CuDNN"), so the model is float32
(mxlamb's float16 multi-precision update itself is tested in tests/). Nothing is downloaded:
the vocabulary is counted from the corpus.

``--devices N`` trains on N CPU contexts the way GluonNLP's script trains on N GPUs: each
micro-batch split across them, kvstore 'device' with update_on_kvstore=False, each device's
loss its share of the micro-batch's loss, so that the curves equal one device's (with
``--dropout 0``; dropout draws other masks on other devices).

Writes to ``--out-dir``:
- ``loss_curves.png``: the masked-LM and next-sentence losses of each optimizer against the
  step, each curve a moving average over 9 steps (not smoothed if there are fewer steps);
- ``losses.json``: the raw per-step losses, ``{"args": {...}, "histories": {optimizer:
  {"mlm": [...], "nsp": [...], "seconds": ...}}}``, one value per optimizer step (the mean over
  its accumulated micro-batches).
"""
import argparse
import collections
import json
import os
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

import gluonnlp as nlp
import mxlamb

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert", "corpus.txt")
OPTIMIZERS = ("mxlamb", "mxlamb-8bit", "mxnet-lamb", "adam")


def read_documents(path):
    """Documents as lists of sentences (token lists); an empty line ends a document."""
    documents, current = [], []
    with open(path) as corpus:
        for line in corpus:
            tokens = line.split()
            if tokens:
                current.append(tokens)
            elif current:
                documents.append(current)
                current = []
    if current:
        documents.append(current)
    return documents


def make_instances(documents, vocab, seq_len, max_predictions, seed=0):
    """BERT's pretraining instances: [CLS] A [SEP] B [SEP], B the next sentence half of the
    time (label 1) and a sentence of another document otherwise (label 0); 15% of the tokens
    masked (80% [MASK], 10% a random token, 10% unchanged). Returns numpy arrays."""
    rng = np.random.RandomState(seed)
    special = {vocab[t] for t in (vocab.cls_token, vocab.sep_token, vocab.padding_token)}
    ordinary = np.array([i for i in range(len(vocab)) if i not in special
                         and vocab.idx_to_token[i] not in (vocab.mask_token, vocab.unknown_token)])
    columns = collections.defaultdict(list)
    for d, document in enumerate(documents):
        for i in range(len(document) - 1):
            first = document[i]
            if rng.rand() < 0.5:
                second, is_next = document[i + 1], 1
            else:
                other = (d + 1 + rng.randint(len(documents) - 1)) % len(documents)
                second, is_next = documents[other][rng.randint(len(documents[other]))], 0
            tokens = [vocab.cls_token] + first + [vocab.sep_token] + second + [vocab.sep_token]
            tokens = tokens[:seq_len - 1] + [vocab.sep_token] if len(tokens) > seq_len else tokens
            ids = np.array(vocab[tokens])
            segments = np.zeros(seq_len, np.float32)
            segments[len(first) + 2:len(tokens)] = 1
            candidates = [p for p, t in enumerate(ids) if t not in special]
            count = min(max_predictions, max(1, int(round(0.15 * len(candidates)))))
            positions = np.sort(rng.choice(candidates, count, replace=False))
            labels = ids[positions].copy()
            for p in positions:
                roll = rng.rand()
                ids[p] = (vocab[vocab.mask_token] if roll < 0.8 else
                          rng.choice(ordinary) if roll < 0.9 else ids[p])
            pad = seq_len - len(ids)
            columns["ids"].append(np.pad(ids, (0, pad), constant_values=vocab[vocab.padding_token]))
            columns["segments"].append(segments)
            columns["valid_length"].append(len(tokens))
            columns["next"].append(is_next)
            extra = max_predictions - count
            columns["positions"].append(np.pad(positions, (0, extra)))
            columns["labels"].append(np.pad(labels, (0, extra)))
            columns["weights"].append(np.pad(np.ones(count), (0, extra)))
    return {name: np.array(values, dtype=np.float32) for name, values in columns.items()}


def build_model(vocab, seq_len, contexts, dropout=0.1, seed=0):
    encoder = nlp.model.BERTEncoder(num_layers=2, units=128, hidden_size=512,
                                    max_length=seq_len, num_heads=2, dropout=dropout)
    model = nlp.model.BERTModel(encoder, vocab_size=len(vocab), token_type_vocab_size=2,
                                units=128, embed_size=128, use_pooler=True, use_decoder=True,
                                use_classifier=True)
    mx.random.seed(42 + seed)  # the same initial weights for every optimizer
    model.initialize(mx.init.Normal(0.02), ctx=contexts)
    model.hybridize(static_alloc=True)
    return model


def make_optimizer(name, args):
    common = {"learning_rate": args.lr, "wd": 0.01}
    if name == "mxlamb":
        return mxlamb.LAMB(**common)
    if name == "mxlamb-8bit":  # 8-bit moments for the tensors of 4,096 elements or more
        return mxlamb.LAMB(state_bits=8, **common)
    if name == "mxnet-lamb":
        return mx.optimizer.optimizer.LAMB(**common)
    return mx.optimizer.Adam(**dict(common, learning_rate=args.adam_lr))


def learning_rate(step, total, peak, warmup_ratio):
    """Linear warm-up to ``peak`` over the first warmup_ratio of the steps, then linear decay
    to 0 (GluonNLP's BERT schedule); ``step`` counts from 1."""
    warmup = max(1, int(total * warmup_ratio))
    if step <= warmup:
        return peak * step / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def pretrain(name, vocab, data, args):
    """Trains a fresh model with optimizer ``name``; returns per-step (mlm, nsp) losses."""
    contexts = [mx.cpu(k) for k in range(args.devices)]
    model = build_model(vocab, args.seq_len, contexts, args.dropout, args.seed)
    params = model.collect_params()
    for param in model.collect_params(".*gamma|.*beta|.*bias").values():
        param.wd_mult = 0.0  # no weight decay for LayerNorm and biases
    params.setattr("grad_req", "add")
    trainer = gluon.Trainer(params, make_optimizer(name, args),
                            kvstore="device" if len(contexts) > 1 else None,
                            update_on_kvstore=False)
    ce = gluon.loss.SoftmaxCELoss()
    order = np.random.RandomState(1 + args.seed).permutation(len(data["ids"]))
    history = {"mlm": [], "nsp": [], "seconds": 0.0}
    micro = 0
    peak = args.adam_lr if name == "adam" else args.lr
    bar = tqdm(range(1, args.steps + 1), desc="%-10s" % name, unit="step")
    start = time.perf_counter()
    for step in bar:
        trainer.set_learning_rate(learning_rate(step, args.steps, peak, args.warmup_ratio))
        mlm_total = nsp_total = 0.0
        for _ in range(args.accumulate):
            rows = order[np.arange(micro * args.batch_size, (micro + 1) * args.batch_size)
                         % len(order)]
            micro += 1
            # The MLM loss is the mean over the micro-batch's masked tokens (weight 1; padding
            # slots have weight 0), the NSP loss the mean over its sentence pairs: each device
            # computes its share of both sums, so the devices' gradients add up to one's.
            masked = float(data["weights"][rows].sum()) + 1e-8
            parts = [{k: mx.nd.array(v[rows[d::len(contexts)]], ctx=ctx)
                      for k, v in data.items()} for d, ctx in enumerate(contexts)]
            with autograd.record():
                losses = []
                for batch in parts:
                    _, _, nsp_scores, mlm_scores = model(
                        batch["ids"], batch["segments"], batch["valid_length"],
                        batch["positions"])
                    weights = batch["weights"]
                    # SoftmaxCELoss means over the prediction slots: times their number
                    mlm = (ce(mlm_scores, batch["labels"], weights.expand_dims(-1)).sum()
                           * weights.shape[1] / masked)
                    nsp = ce(nsp_scores, batch["next"]).sum() / len(rows)
                    losses.append((mlm, nsp, mlm + nsp))
            autograd.backward([loss for _, _, loss in losses])
            mlm_total += sum(mlm.asscalar() for mlm, _, _ in losses)
            nsp_total += sum(nsp.asscalar() for _, nsp, _ in losses)
        # The micro-batch losses are means: the step averages the accumulate micro-batches.
        trainer.step(args.accumulate)
        params.zero_grad()
        history["mlm"].append(mlm_total / args.accumulate)
        history["nsp"].append(nsp_total / args.accumulate)
        bar.set_postfix(mlm="%.3f" % history["mlm"][-1], nsp="%.3f" % history["nsp"][-1])
    mx.nd.waitall()
    history["seconds"] = time.perf_counter() - start
    return history


SMOOTHING_STEPS = 9  # the plotted curves are moving averages over this many steps


def moving_average(values, width=SMOOTHING_STEPS):
    """Centred moving average over ``width`` steps (the ends padded with the end values);
    ``values`` unchanged when there are fewer than ``width``."""
    values = np.asarray(values)
    if len(values) < width:
        return values
    kernel = np.ones(width) / width
    return np.convolve(np.pad(values, (width // 2, width // 2), mode="edge"), kernel, "valid")


def loss_figure(histories, args):
    """The two panels of loss_curves.png (masked LM, next sentence) as a matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(next(iter(histories.values()))["mlm"])
    smoothing = ("moving average over %d steps" % SMOOTHING_STEPS
                 if steps >= SMOOTHING_STEPS else "not smoothed")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        # mxlamb and MXNet's LAMB compute the same update: mxlamb's curve is dashed on top.
        style = {"linestyle": "--", "linewidth": 2.2, "zorder": 3} if name == "mxlamb" else {}
        if name == "mxlamb-8bit":
            style = {"linestyle": ":", "linewidth": 2.2, "zorder": 4}
        for axis, key in zip(axes, ("mlm", "nsp")):
            axis.plot(np.arange(1, len(history[key]) + 1), moving_average(history[key]),
                      label=name, **style)
    axes[0].set_title("masked LM loss (%s)" % smoothing)
    axes[0].set_ylabel("cross-entropy per masked token")
    axes[1].set_title("next-sentence loss (%s)" % smoothing)
    axes[1].set_ylabel("cross-entropy per sentence pair")
    for axis in axes:
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("tiny BERT (2 layers, 128 units), batch %d x %d accumulated, peak lr %g "
                    "(Adam %g)" % (args.batch_size, args.accumulate, args.lr, args.adam_lr))
    figure.tight_layout()
    return figure


def plot(histories, path, args):
    figure = loss_figure(histories, args)
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per optimizer")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--max-predictions", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02, help="peak lr of both LAMBs")
    parser.add_argument("--adam-lr", type=float, default=0.004, help="peak lr of Adam")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated, from %s" % ", ".join(OPTIMIZERS))
    parser.add_argument("--out-dir", default="bert_out",
                        help="where loss_curves.png (the curves, moving averages over %d "
                             "steps) and losses.json (the per-step losses) go"
                             % SMOOTHING_STEPS)
    parser.add_argument("--devices", type=int, default=1,
                        help="CPU contexts to split each micro-batch across")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights and data order (the same for every optimizer)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.batch_size % args.devices:
        parser.error("--devices must be >= 1 and divide --batch-size")
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        parser.error("unknown optimizer(s) %s; choose from %s" % (unknown, OPTIMIZERS))

    documents = read_documents(CORPUS)
    counter = nlp.data.count_tokens(t for d in documents for s in d for t in s)
    vocab = nlp.vocab.BERTVocab(counter)
    data = make_instances(documents, vocab, args.seq_len, args.max_predictions)
    print("corpus: %d documents, %d sentence pairs, vocabulary of %d"
          % (len(documents), len(data["ids"]), len(vocab)))

    histories = collections.OrderedDict((name, pretrain(name, vocab, data, args))
                                        for name in names)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "losses.json"), "w") as out:
        json.dump({"args": vars(args), "histories": histories}, out)
    plot(histories, os.path.join(args.out_dir, "loss_curves.png"), args)
    for name, history in histories.items():
        tail = max(1, len(history["mlm"]) // 10)
        print("%-10s last-10%% mean: masked LM %.3f, next sentence %.3f (%.1f s)"
              % (name, np.mean(history["mlm"][-tail:]), np.mean(history["nsp"][-tail:]),
                 history["seconds"]))
    print("loss curves: %s, per-step losses: %s"
          % (os.path.join(args.out_dir, "loss_curves.png"),
             os.path.join(args.out_dir, "losses.json")))
    return histories


if __name__ == "__main__":
    main()
