"""One LAMB step of the CPU peers a user could pick instead of mxlamb (no MXNet here).

    python benchmarks/bench_peers.py --model bert-base --impl torch-foreach|timm|optax|keras
                                     [--steps 5]
    python benchmarks/bench_peers.py --check [--impl ...]

Run by a Python holding torch, timm, jax, optax and keras (numpy 2, so never mxlamb's .venv:
`make peers-venv` creates .venv-peers); benchmarks/bench_step.py --peers-python runs it once per
peer in a fresh process and adds its rows to its table. It times one implementation on a
model's parameter shapes (param_sets.py), float32 weights and gradients drawn from a standard
normal, with the hyper-parameters of bench_step's NumPy LAMB: lr 1e-3, weight decay 0.01,
betas 0.9/0.999, eps 1e-6, bias correction on, trust ratio ||w|| / ||u|| (1 where either norm
is 0), the gradients the same at every step. As bench_step does: warm-up steps (2; jit
compilation happens in the first), one step to size the run, then the median of --steps timed
steps or of as many more (up to 500) as fill half a second, each step blocked until its results
are ready. Threads and devices are what a user gets by default (printed on stderr: torch's
get_num_threads(), JAX's device; XLA's CPU client keeps its own thread pool, sized to the
machine). JAX_PLATFORMS defaults to cpu here, so a CUDA jaxlib stays off its GPU. The output is
one JSON line on stdout: {"impl", "model", "params", "seconds" (median), "steps" (timed),
"versions", and "threads" (torch; timm also "foreach") or "device" (JAX)}.

The peers:

- torch-foreach: LAMB written with torch._foreach_* operations (bench_gpu.foreach_lamb_step,
  the same update unfused: a pass per operation). On CPU the foreach operations loop over the
  tensors with torch's per-tensor kernels (there are no multi-tensor CPU kernels): an OpenMP
  parallel region per tensor and operation, so where other processes share the cores each can
  wait for a descheduled thread (seen: 25x slower on BERT-base with 2 threads on 2 busy cores).
- timm: timm.optim.Lamb(lr, betas, eps, weight_decay, max_grad_norm=None, foreach=True) as
  bench_gpu.timm_lamb_step builds it. timm's defaults differ: max_grad_norm=1.0 (a global
  gradient-norm clip before the step; None here) and, on CPU, foreach=None resolves to its
  single-tensor loop (foreach=True here, "where available": this timm has it). Its other
  defaults match (bias_correction=True, grad_averaging=True, trust_clip=False, decoupled_decay
  =False; with weight_decay != 0 every tensor is adapted). It folds the bias corrections into
  scalars (eps * sqrt(1 - beta2^t), then scaled): the same update up to rounding.
- optax: optax.lamb(lr, b1, b2, eps=1e-6, weight_decay=0.01) (scale_by_adam,
  add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate) with optax.apply_updates,
  under jax.jit with the parameters and the state donated. optax.lamb's own default
  weight_decay is 0.0 and its eps is already 1e-6.
- keras: keras.optimizers.Lamb on the JAX backend, its step as Keras' JAX trainer makes it:
  optimizer.stateless_apply(optimizer_variables, grads, trainable_variables) under jax.jit with
  the variables and the optimizer's state donated (the trainer jits its train step with
  donate_argnums=0, its state). Keras' defaults differ: epsilon 1e-7 (1e-6 passed here) and
  weight_decay=None. Its weight decay is decoupled and outside the trust ratio:
  w <- w - lr * wd * w first, then w <- w - lr * ||w|| / ||m_hat / (sqrt(v_hat) + eps)|| * ...
  with no wd * w in the update. It is timed with weight_decay=0.01 (the same hyper-parameter,
  and decay work in the step, though not the same math); --check compares it with a reference
  doing exactly that.

--check runs 3 steps of each implementation (or of --impl) on a small set of shapes (one of
them all zeros and with zero gradients: both norms 0; one with gradients around 1e-6, where
eps = 1e-6 weighs as much as sqrt(v_hat)) with new gradients at every step, and
compares the weights with a float64 NumPy LAMB: per tensor, ||w - w_ref|| / ||w_ref|| (must be
under 1e-5) and, far more sensitive at lr 1e-3, the same of the weights' change over the 3 steps
(under 1e-3). Keras is compared with the decoupled variant (and its distance from the
standard LAMB printed too). A missing or failing peer is reported and the check fails.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from param_sets import PARAM_SETS  # noqa: E402 (shapes only: no imports)

# bench_step.numpy_lamb's hyper-parameters (and bench_gpu's LR, WD, BETA1, BETA2, EPS).
LR, WD, BETA1, BETA2, EPS = 1e-3, 0.01, 0.9, 0.999, 1e-6
IMPLS = ("torch-foreach", "timm", "optax", "keras")
CHECK_SHAPES = [(64, 48), (48,), (5, 3, 3, 3), (1,), (33,), (7,)]
ZERO_TENSOR = 5  # CHECK_SHAPES index whose weights and gradients are all zeros
TINY_GRADS = 1  # CHECK_SHAPES index whose gradients are ~1e-6, where eps matters
CHECK_STEPS = 3
WEIGHT_TOL, UPDATE_TOL = 1e-5, 1e-3


class TorchPeer:
    """torch-foreach or timm on CPU tensors sharing the given NumPy arrays' memory."""

    def __init__(self, weights, grads, use_timm):
        import torch
        from bench_gpu import foreach_lamb_step, timm_lamb_step  # (CPU-safe: no CUDA at import)
        self.torch = torch
        params = [torch.from_numpy(w) for w in weights]
        self.grads = [torch.from_numpy(g) for g in grads]
        self.versions = {"torch": torch.__version__}
        if use_timm:
            import timm
            self.versions["timm"] = timm.__version__
            self._step = timm_lamb_step(params, self.grads, None)
            self.params, _, foreach = self._step.keep  # (its own clones, as nn.Parameters)
        else:
            means = [torch.zeros_like(p) for p in params]
            variances = [torch.zeros_like(p) for p in params]
            self._step = foreach_lamb_step(params, self.grads, means, variances, None)
            self.params = params
        self.info = {"threads": torch.get_num_threads()}
        if use_timm:
            self.info["foreach"] = foreach  # (False: this timm's Lamb has no foreach argument)
        print("torch threads: %d" % torch.get_num_threads(), file=sys.stderr)

    def step(self):  # (synchronous on CPU)
        self._step()

    def set_grads(self, grads):
        for t, g in zip(self.grads, grads):
            t.copy_(self.torch.from_numpy(g))

    def weights(self):
        return [p.detach().numpy().copy() for p in self.params]


class JaxPeer:
    """A jitted (params, state, grads) -> (params, state) with params and state donated."""

    def __init__(self, weights, grads):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jaxlib
        self.jax = jax
        self.versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
        params = [jax.numpy.array(w) for w in weights]  # (copies)
        self.grads = [jax.numpy.array(g) for g in grads]
        self.params, self.state, update = self.build(params)
        self._jitted = jax.jit(update, donate_argnums=(0, 1))
        device = jax.devices()[0]
        self.info = {"device": "%s (%s, %d devices)" % (device, device.device_kind,
                                                        len(jax.devices()))}
        print("jax device: %s" % self.info["device"], file=sys.stderr)

    def step(self):
        self.params, self.state = self._jitted(self.params, self.state, self.grads)
        self.jax.block_until_ready((self.params, self.state))

    def set_grads(self, grads):
        self.grads = [self.jax.numpy.array(g) for g in grads]

    def weights(self):
        return [np.array(p) for p in self.params]


class OptaxPeer(JaxPeer):
    def build(self, params):
        import optax
        self.versions["optax"] = optax.__version__
        tx = optax.lamb(LR, b1=BETA1, b2=BETA2, eps=EPS, weight_decay=WD)

        def update(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        return params, tx.init(params), update


class KerasPeer(JaxPeer):
    def build(self, params):
        os.environ["KERAS_BACKEND"] = "jax"
        import keras
        assert keras.backend.backend() == "jax", keras.backend.backend()
        self.versions["keras"] = keras.__version__
        optimizer = keras.optimizers.Lamb(learning_rate=LR, beta_1=BETA1, beta_2=BETA2,
                                          epsilon=EPS, weight_decay=WD)
        variables = [keras.Variable(p, dtype="float32") for p in params]
        optimizer.build(variables)
        self.optimizer = optimizer

        def update(params, state, grads):
            params, state = optimizer.stateless_apply(state, grads, params)
            return params, state
        return [v.value for v in variables], [v.value for v in optimizer.variables], update


def make_peer(impl, weights, grads):
    if impl in ("torch-foreach", "timm"):
        return TorchPeer(weights, grads, use_timm=impl == "timm")
    return {"optax": OptaxPeer, "keras": KerasPeer}[impl](weights, grads)


def time_steps(step, steps, warmup=2, min_seconds=0.5):
    """(median seconds, count) of timed steps, as bench_step.time_steps: ``steps`` of them or
    as many more (up to 500) as fill ``min_seconds``; ``step`` blocks until it is done."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    step()
    estimate = time.perf_counter() - start
    steps = max(steps, min(500, int(min_seconds / max(estimate, 1e-6))))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def reference_lamb(weights, grad_steps, decoupled=False):
    """float64 NumPy LAMB from float32 ``weights`` over one gradient list per step. With
    ``decoupled``: Keras' weight decay (w <- w * (1 - lr wd) before an update without wd w)."""
    ws = [w.astype(np.float64) for w in weights]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for t, grads in enumerate(grad_steps, 1):
        c1, c2 = 1 - BETA1 ** t, 1 - BETA2 ** t
        for i, g in enumerate(grads):
            g = g.astype(np.float64)
            ms[i] = BETA1 * ms[i] + (1 - BETA1) * g
            vs[i] = BETA2 * vs[i] + (1 - BETA2) * g * g
            u = (ms[i] / c1) / (np.sqrt(vs[i] / c2) + EPS)
            w = ws[i]
            if decoupled:
                w = w * (1 - LR * WD)
            else:
                u = u + WD * w
            r1, r2 = np.linalg.norm(w), np.linalg.norm(u)
            ratio = r1 / r2 if r1 > 0 and r2 > 0 else 1.0
            ws[i] = w - LR * ratio * u
    return ws


def errors(weights, reference, initial):
    """(max over tensors of ||w - ref|| / ||ref||, the same of the change from ``initial``)."""
    def rel(a, b):
        diff, norm = np.linalg.norm(a - b), np.linalg.norm(b)
        return diff / norm if norm > 0 else diff
    return (max(rel(w.astype(np.float64), r) for w, r in zip(weights, reference)),
            max(rel(w.astype(np.float64) - w0, r - w0)
                for w, r, w0 in zip(weights, reference, initial)))


def check(impls):
    rng = np.random.default_rng(1)
    initial = [rng.standard_normal(s).astype(np.float32) for s in CHECK_SHAPES]
    grad_steps = [[rng.standard_normal(s).astype(np.float32) for s in CHECK_SHAPES]
                  for _ in range(CHECK_STEPS)]
    for arrays in [initial] + grad_steps:
        arrays[ZERO_TENSOR][:] = 0
    for grads in grad_steps:
        grads[TINY_GRADS] *= np.float32(1e-6)
    references = {False: reference_lamb(initial, grad_steps),
                  True: reference_lamb(initial, grad_steps, decoupled=True)}
    ok = True
    for impl in impls:
        try:
            peer = make_peer(impl, [w.copy() for w in initial], [g.copy() for g in grad_steps[0]])
            for grads in grad_steps:
                peer.set_grads(grads)
                peer.step()
            weights = peer.weights()
        except Exception as e:  # noqa: BLE001 (a peer's failure is a result, said so)
            print("%-14s failed: %s: %s" % (impl, type(e).__name__, e))
            ok = False
            continue
        decoupled = impl == "keras"
        w_err, u_err = errors(weights, references[decoupled], initial)
        passed = w_err <= WEIGHT_TOL and u_err <= UPDATE_TOL
        ok &= passed
        line = "%-14s %s  weights %.1e, change over %d steps %.1e (vs %s LAMB)" % (
            impl, "ok  " if passed else "DIFF", w_err, CHECK_STEPS, u_err,
            "decoupled-decay" if decoupled else "float64")
        if decoupled:
            line += "; vs standard LAMB: weights %.1e, change %.1e" % errors(
                weights, references[False], initial)
        print(line + "  " + " ".join("%s %s" % kv for kv in peer.versions.items()), flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PARAM_SETS), default="bert-base")
    parser.add_argument("--impl", choices=IMPLS, help="required unless --check")
    parser.add_argument("--steps", type=int, default=5, help="timed steps at least (median)")
    parser.add_argument("--check", action="store_true",
                        help="compare 3 steps of each peer with a float64 NumPy LAMB")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check([args.impl] if args.impl else IMPLS) else 1)
    if not args.impl:
        parser.error("--impl is required (or --check)")
    rng = np.random.default_rng(0)
    shapes = PARAM_SETS[args.model]()
    weights = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    params = sum(w.size for w in weights)
    peer = make_peer(args.impl, weights, grads)
    del weights, grads  # (the JAX peers hold copies)
    seconds, count = time_steps(peer.step, args.steps)
    print(json.dumps(dict({"impl": args.impl, "model": args.model, "params": int(params),
                           "seconds": seconds, "steps": count, "versions": peer.versions},
                          **peer.info)))


if __name__ == "__main__":
    main()
