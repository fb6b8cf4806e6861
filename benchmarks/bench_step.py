"""One LAMB step on real model parameter sets: mxlamb vs MXNet's LAMB vs NumPy vs the bound.

    python benchmarks/bench_step.py [--models bert-base,resnet-50,200x768] [--large]
                                    [--steps 5] [--rounds N] [--json out.json] [--png out.png]
                                    [--peers-python .venv-peers/bin/python]

In one run it times every implementation with warm-up, ``mx.nd.waitall()`` before reading the
clock, and the median of several steps: through MXNet's Updater (the path of gluon.Trainer and
Module) and through ``gluon.Trainer.step`` itself and
``mxlamb.contrib.ContiguousTrainer``'s. A step's time depends on what its process ran before
and on the machine's other load, so each case is timed alone in a fresh process, in
alternating rounds (5 for a set under a million parameters, 3 above; --rounds), and its lowest
round kept. Each run also measures a STREAM-like read-modify-write bandwidth with the
library's own threads, just before and after its steps (the machine's bandwidth moves within
minutes), and its byte bound is the two-pass LAMB step's bytes at that bandwidth: 40 bytes per
parameter (read w, g, m, v and write m, v; then read w, m, v and write w). The one-call step
runs both passes over batches of consecutive tensors of about 16 MiB (a larger tensor alone),
so for the tensors that fit its second pass reads from the cache, and it can go under that
bound (not under the 28 bytes per parameter that must cross memory). It prints a table of
medians and ratios; nothing here is asserted.

With --peers-python (default: $MXLAMB_PEERS_PYTHON; `make bench` passes .venv-peers/bin/python
where `make peers-venv` has made it), each model's table also has the CPU peers a user could
pick instead, each timed by benchmarks/bench_peers.py in a fresh process of that Python (they
need numpy 2: not in MXNet's venv) on the same shapes and hyper-parameters: a torch._foreach_*
LAMB, timm's Lamb, optax's lamb under jax.jit and Keras 3's Lamb on JAX (its weight decay is
decoupled: see bench_peers.py). They join the alternating rounds (lowest round kept). A peer
that fails is a row saying why.
"""
import argparse
import ctypes
import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import gluon
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mxlamb  # noqa: E402
from mxlamb import _library  # noqa: E402
from param_sets import PARAM_SETS  # noqa: E402

BYTES_PER_PARAM = 40  # two passes, fp32 (and fp16 with an fp32 master: 22 + 18 bytes)
# state_bits=8: read w, g, m8, v8 and write m8, v8 (12); read w, m8, v8 and write w (10). The
# block scales (8 bytes per 256 elements and moment, read and written) and the float32
# moments of the tensors under 4,096 elements add well under 1%.
STATE_BITS_8 = "mxlamb defaults, state_bits=8"
CASE_BYTES = {STATE_BITS_8: 22}
# bytes of optimizer state per parameter (moments), where the case says
STATE_BYTES = {"mxlamb defaults": 8, STATE_BITS_8: 2 + 8 / 256}
SMALL_MODEL = 1 << 20  # parameters; below, more rounds, and the floor ratios are printed
ROUNDS = 5  # alternating rounds of a set under SMALL_MODEL parameters
LARGE_ROUNDS = 3  # and above (a BERT-base round takes about 3 minutes)
PEERS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_peers.py")
# bench_peers.py --impl, and the row's name.
PEERS = [("torch-foreach", "torch _foreach_ LAMB"), ("timm", "timm Lamb"),
         ("optax", "optax lamb (jax.jit)"), ("keras", "Keras 3 Lamb (JAX, jit)")]


def rmw_bandwidth(n=1 << 26, repeats=7):
    """Bytes per second of a[i] += s * b[i] (12 bytes per element), median of repeats."""
    a, b = np.ones(n, np.float32), np.full(n, 1e-7, np.float32)
    fn = _library.native.mxlamb_rmw_seconds
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float]
    fn(a.ctypes.data, b.ctypes.data, n, 1.0)  # fault the pages in
    seconds = [fn(a.ctypes.data, b.ctypes.data, n, 1.0) for _ in range(repeats)]
    return 12.0 * n / statistics.median(seconds)


def numpy_lamb(weights, grads, means, variances, t, lr=1e-3, wd=0.01, beta1=0.9, beta2=0.999,
               eps=1e-6):
    """A vectorised float32 NumPy LAMB step (in-place where NumPy allows)."""
    c1, c2 = 1.0 / (1 - beta1 ** t), 1.0 / (1 - beta2 ** t)
    for w, g, m, v in zip(weights, grads, means, variances):
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        u = np.sqrt(v * c2)
        u += eps
        np.divide(m * c1, u, out=u)
        u += wd * w
        r1, r2 = np.linalg.norm(w), np.linalg.norm(u)
        ratio = r1 / r2 if r1 > 0 and r2 > 0 else 1.0
        w -= (lr * ratio) * u


def time_steps(step, steps, warmup=1, min_seconds=0.5, before=None):
    """Median seconds of ``steps`` timed steps, or of as many more (up to 500) as fill
    ``min_seconds``: a sub-millisecond step needs hundreds for a stable median. ``before``
    (untimed) runs before each step: what a backward pass would do."""
    before = before or (lambda: None)
    for _ in range(warmup):
        before()
        step()
    mx.nd.waitall()
    before()
    start = time.perf_counter()
    step()
    mx.nd.waitall()
    estimate = time.perf_counter() - start
    steps = max(steps, min(500, int(min_seconds / max(estimate, 1e-6))))
    times = []
    for _ in range(steps):
        before()
        mx.nd.waitall()
        start = time.perf_counter()
        step()
        mx.nd.waitall()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def updater_step(optimizer, weights, grads):
    updater = mx.optimizer.get_updater(optimizer)
    indices = list(range(len(weights)))
    return lambda: updater(indices, grads, weights)


def builtin_lamb(aggregate):
    os.environ["MXNET_OPTIMIZER_AGGREGATION_SIZE"] = str(aggregate)
    try:
        return mx.optimizer.optimizer.LAMB(learning_rate=1e-3, wd=0.01)
    finally:
        del os.environ["MXNET_OPTIMIZER_AGGREGATION_SIZE"]


def direct_fused_step(make_optimizer):
    """fused_step called directly (the 2.0 API, without MXNet's Updater around it)."""
    def make(weights, grads):
        optimizer = make_optimizer()
        indices = list(range(len(weights)))
        states = [optimizer.create_state_multi_precision(i, w) for i, w in zip(indices, weights)]
        return lambda: optimizer.fused_step(indices, weights, grads, states)
    return make


class FloorOptimizer(mx.optimizer.Optimizer):
    """What any optimizer pays through MXNet's Updater for a group: the Updater itself and one
    built-in operator call that only reads every weight and gradient (multi_sum_sq)."""

    def __init__(self, aggregate_num):
        super().__init__()
        self.aggregate_num = aggregate_num

    def create_state(self, index, weight):
        return None

    def update(self, index, weight, grad, state):
        weights, grads = mx.base._as_list(weight), mx.base._as_list(grad)
        mx.nd.multi_sum_sq(*weights, *grads, num_arrays=2 * len(weights))

    update_multi_precision = update


class NoOpOptimizer(mx.optimizer.Optimizer):
    """The floor of gluon.Trainer.step itself: its per-parameter loop and MXNet's Updater
    around an optimizer that does nothing (one call for the whole step)."""

    def __init__(self):
        super().__init__()
        self.aggregate_num = 1 << 30

    def create_state(self, index, weight):
        return None

    def update(self, index, weight, grad, state):
        pass

    update_multi_precision = update


def one_thread(make):
    """The case on one mxlamb thread (the operators run on MXNet's engine thread, so the count
    is set for the whole step, waited for inside it)."""
    def make_one_thread(weights, grads):
        step = make(weights, grads)

        def run():
            threads = _library.native.mxlamb_num_threads()
            _library.native.mxlamb_set_num_threads(1)
            try:
                step()
                mx.nd.waitall()
            finally:
                _library.native.mxlamb_set_num_threads(threads)
        return run
    return make_one_thread


class TrainerStep:
    """gluon.Trainer.step on Parameters holding the set's weights and gradients (one CPU
    context, no kvstore), with ``contiguous``: an mxlamb.contrib.ContiguousTrainer instead.
    ``before`` marks every gradient fresh, as a backward pass does (untimed)."""

    def __init__(self, make_optimizer, contiguous=False):
        self.make_optimizer, self.contiguous = make_optimizer, contiguous

    def __call__(self, weights, grads):
        params = [gluon.Parameter("p%d_weight" % i, shape=w.shape) for i, w in enumerate(weights)]
        for param, weight in zip(params, weights):
            param.initialize(ctx=mx.cpu())
            param.set_data(weight)
        trainer_class = mxlamb.contrib.ContiguousTrainer if self.contiguous else gluon.Trainer
        trainer = trainer_class(params, self.make_optimizer(), kvstore=None,
                                update_on_kvstore=False)
        for param, grad in zip(params, grads):  # (into the flat buffers' views, if any)
            param.grad()[:] = grad
        arrays = [p.data() for p in params]

        def mark_fresh():
            for array in arrays:
                array._fresh_grad = True
        step = functools.partial(trainer.step, 1)
        step.before = mark_fresh
        return step


def cases(model, shapes):
    """(name, make_step) for every implementation on this parameter set."""
    def mx_case(make_optimizer, dtype="float32"):
        def make(weights, grads):
            if dtype != "float32":
                weights = [w.astype(dtype) for w in weights]
                grads = [g.astype(dtype) for g in grads]
            return updater_step(make_optimizer(), weights, grads)
        return make

    def numpy_case(weights, grads):
        ws = [w.asnumpy() for w in weights]
        gs = [g.asnumpy() for g in grads]
        ms, vs = [np.zeros_like(w) for w in ws], [np.zeros_like(w) for w in ws]
        counter = [0]

        def step():
            counter[0] += 1
            numpy_lamb(ws, gs, ms, vs, counter[0])
        return step

    n = len(shapes)
    yield "mxlamb defaults", mx_case(lambda: mxlamb.LAMB(wd=0.01))
    yield STATE_BITS_8, mx_case(lambda: mxlamb.LAMB(wd=0.01, state_bits=8))
    yield "mxlamb aggregate_num=4 (MXNet's default)", mx_case(
        lambda: mxlamb.LAMB(wd=0.01, aggregate_num=4))
    if model == "200x768":
        yield "mxlamb defaults, no Updater (fused_step)", direct_fused_step(
            lambda: mxlamb.LAMB(wd=0.01))
        yield "floor: Updater + 1 read-only op on w, g (%d)" % n, mx_case(
            lambda: FloorOptimizer(aggregate_num=n))
    yield "mxlamb defaults, 1 thread", one_thread(mx_case(lambda: mxlamb.LAMB(wd=0.01)))
    yield "mxlamb step (one tensor per call)", mx_case(
        lambda: mxlamb.LAMB(wd=0.01, use_fused_step=False))
    yield "mxlamb fp16 multi_precision", mx_case(
        lambda: mxlamb.LAMB(wd=0.01, multi_precision=True), "float16")
    yield "mxlamb defaults, Trainer.step", TrainerStep(lambda: mxlamb.LAMB(wd=0.01))
    yield "mxlamb contiguous, Trainer.step", TrainerStep(lambda: mxlamb.LAMB(wd=0.01),
                                                         contiguous=True)
    yield "floor: Trainer.step, an optimizer that does nothing", TrainerStep(NoOpOptimizer)
    yield "MXNet LAMB, Trainer.step (aggregation 4)", TrainerStep(lambda: builtin_lamb(4))
    yield "MXNet LAMB (aggregation 4, its default)", mx_case(lambda: builtin_lamb(4))
    yield "MXNet LAMB (aggregation 45)", mx_case(lambda: builtin_lamb(45))
    yield "NumPy LAMB", numpy_case


def time_in_fresh_process(model, case, steps):
    """{"seconds": per step, "bandwidth": bytes/s around them} of case number ``case`` of
    ``model``, timed in a new Python."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--time-case",
                           "%s:%d" % (model, case), "--steps", str(steps)],
                          capture_output=True, text=True)
    if done.returncode != 0:  # a row saying why, not a lost run
        lines = done.stderr.strip().splitlines() or ["no output"]
        return {"error": "exit code %d: %s" % (done.returncode, lines[-1])}
    seconds, bandwidth = map(float, done.stdout.split()[-2:])
    return {"seconds": seconds, "bandwidth": bandwidth}


def time_peer_between_bandwidths(python, model, impl, steps, timeout):
    """time_peer's run with the bandwidth measured here just before and after it (the peer's
    process cannot load mxlamb's kernel)."""
    before = rmw_bandwidth()
    run = time_peer(python, model, impl, steps, timeout)
    run["bandwidth"] = max(before, rmw_bandwidth())
    return run


def time_peer(python, model, impl, steps, timeout):
    """bench_peers.py's JSON for one peer, timed in a fresh ``python``, or {"error": why}."""
    try:
        out = subprocess.run([python, PEERS_SCRIPT, "--model", model, "--impl", impl,
                              "--steps", str(steps)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after %d s" % timeout}
    except OSError as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "exit status %d" % out.returncode}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": "no JSON line from bench_peers.py: %r" % out.stdout[-200:]}


def row_of(runs):
    """A result row's fields from a case's or a peer's runs (its rounds), the lowest kept;
    failed where no run gave a time (the first failure ends its rounds)."""
    times = [r for r in runs if "error" not in r]
    if not times:
        return {"seconds": None, "error": runs[-1]["error"], "rounds": None}
    best = min(times, key=lambda r: r["seconds"])
    row = {"seconds": best["seconds"], "bandwidth": best.get("bandwidth"),
           "rounds": [r.get("seconds") for r in runs],
           "round_bandwidths": [r.get("bandwidth") for r in runs]}
    row.update({k: best[k] for k in ("versions", "threads", "device") if k in best})
    if len(times) < len(runs):
        row["error"] = runs[-1]["error"]
    return row


def time_case(model, case, steps):
    """Prints the case's seconds per step and the bandwidth around them: the machine's
    bandwidth moves within minutes, so each time is set against its own."""
    rng = np.random.RandomState(0)
    shapes = PARAM_SETS[model]()
    weights = [mx.nd.array(rng.randn(*s).astype(np.float32)) for s in shapes]
    grads = [mx.nd.array(rng.randn(*s).astype(np.float32)) for s in shapes]
    step = list(cases(model, shapes))[case][1](weights, grads)
    before = rmw_bandwidth()
    seconds = time_steps(step, steps, before=getattr(step, "before", None))
    print(seconds, max(before, rmw_bandwidth()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-base,resnet-50,200x768")
    parser.add_argument("--large", action="store_true", help="also BERT-large (336M parameters)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median)")
    parser.add_argument("--json", help="write the table as JSON here")
    parser.add_argument("--png", help="write a bar chart here")
    parser.add_argument("--peers-python", default=os.environ.get("MXLAMB_PEERS_PYTHON") or None,
                        help="a Python with torch, timm, jax, optax and keras (numpy 2) that "
                        "runs bench_peers.py (default: $MXLAMB_PEERS_PYTHON; none: no peers)")
    parser.add_argument("--peers-timeout", type=float, default=1200,
                        help="seconds for each peer's process (jit compilation included)")
    def positive(text):
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError("must be a positive integer, got %r" % text)
        return int(text)

    parser.add_argument("--rounds", type=positive, help="alternating rounds per model (default: "
                        "%d under a million parameters, %d above)" % (ROUNDS, LARGE_ROUNDS))
    parser.add_argument("--cases", help="only the cases whose names this regular expression "
                        "finds (e.g. 'defaults$|state_bits'); default: all")
    parser.add_argument("--time-case", help=argparse.SUPPRESS)  # MODEL:N, in a fresh process
    args = parser.parse_args()
    if args.time_case:
        model, case = args.time_case.split(":")
        return time_case(model, int(case), args.steps)
    models = args.models.split(",") + (["bert-large"] if args.large else [])
    peers_python = args.peers_python and shutil.which(args.peers_python)
    if args.peers_python and not peers_python:
        parser.error("--peers-python %s: no such executable" % args.peers_python)
    peers = PEERS if peers_python else []

    bandwidth = rmw_bandwidth()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "isa": _library.native.mxlamb_active_isa().decode(),
               "mxlamb_threads": _library.native.mxlamb_num_threads(),
               "rmw_bandwidth_GBps": bandwidth / 1e9, "mxnet": mx.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            machine["cpu"] = next(l.split(":", 1)[1].strip() for l in f if "model name" in l)
    except (OSError, StopIteration):
        pass
    print("machine: %(cpu)s, %(cores)d cores, ISA %(isa)s, %(mxlamb_threads)d mxlamb threads, "
          "mxnet %(mxnet)s" % machine)
    print("read-modify-write bandwidth at the start: %.1f GB/s" % (bandwidth / 1e9))
    if peers_python:
        machine["peers_python"] = peers_python
        print("peers (torch, timm, optax, Keras): bench_peers.py in %s" % peers_python)
    else:
        print("peers (torch, timm, optax, Keras) not measured: `make peers-venv`, then pass "
              "--peers-python .venv-peers/bin/python (or set MXLAMB_PEERS_PYTHON)")

    def rounds_for(params):
        return args.rounds or (ROUNDS if params < SMALL_MODEL else LARGE_ROUNDS)

    def params_of(model):
        return sum(int(np.prod(s)) for s in PARAM_SETS[model]())

    def chosen(model):
        """(number, name) of the cases --cases picks (the number is what --time-case runs)."""
        return [(number, name) for number, (name, _) in enumerate(cases(model, PARAM_SETS[model]()))
                if not args.cases or re.search(args.cases, name)]

    results = []
    # one tick per process run: every case and every peer, once per round
    progress = tqdm(total=sum(rounds_for(params_of(m))
                              * (len(chosen(m)) + len(peers))
                              for m in models),
                    desc="benchmark", unit="run")
    for model in models:
        shapes = PARAM_SETS[model]()
        params = params_of(model)
        named = chosen(model)
        # A step's time depends on what its process ran before (after MXNet's own LAMB every
        # small step ran up to 1.7x slower, the floor too) and on the machine's other load
        # (its memory bandwidth moved by 1.5x between runs of one afternoon): each case runs
        # alone in a fresh process, in alternating rounds, and keeps its lowest round (a
        # median of its steps). Each run measures the bandwidth just before and after its
        # steps (the peers: this process, around theirs), and its byte bound is taken at that
        # bandwidth. The peers (each a fresh process of the peers' Python) join the rounds.
        rounds_here = rounds_for(params)
        timings = [[] for _ in named]
        peer_runs = [[] for _ in peers]
        for _ in range(rounds_here):
            for (case, _), timing in zip(named, timings):
                if not timing or "error" not in timing[-1]:
                    timing.append(time_in_fresh_process(model, case, args.steps))
                progress.update(1)
            for (impl, _), runs in zip(peers, peer_runs):
                if not runs or "error" not in runs[-1]:
                    runs.append(time_peer_between_bandwidths(peers_python, model, impl,
                                                             args.steps, args.peers_timeout))
                progress.update(1)
        for (_, name), timing in zip(named, timings):
            results.append(dict({"model": model, "case": name, "params": params,
                                 "bytes_per_param": CASE_BYTES.get(name, BYTES_PER_PARAM),
                                 "state_bytes_per_param": STATE_BYTES.get(name)},
                                **row_of(timing)))
        for (impl, name), runs in zip(peers, peer_runs):
            results.append(dict({"model": model, "case": name, "params": params, "peer": impl},
                                **row_of(runs)))
    progress.close()
    measured = [b for r in results for b in r.get("round_bandwidths") or [r.get("bandwidth")]
                if b]
    machine["rmw_bandwidth_GBps"] = max(measured) / 1e9
    machine["rmw_bandwidth_GBps_range"] = [min(measured) / 1e9, max(measured) / 1e9]
    for r in results:
        if r.get("bandwidth"):
            r["bound_seconds"] = (r.get("bytes_per_param") or BYTES_PER_PARAM) * r["params"] \
                / r["bandwidth"]
    print("read-modify-write bandwidth around the runs: %.1f to %.1f GB/s"
          % tuple(machine["rmw_bandwidth_GBps_range"]))

    print()
    header = "%-11s %-48s %10s %9s %9s %9s" % ("model", "implementation", "median", "vs MXNet",
                                                "vs NumPy", "vs bound")
    print(header)
    print("-" * len(header))
    for model in models:
        rows = [r for r in results if r["model"] == model]
        # "vs MXNet": MXNet's LAMB at its default (4 tensors per call), as the README compares
        builtin = next((r["seconds"] for r in rows
                        if r["case"] == "MXNet LAMB (aggregation 4, its default)"),
                       None) or float("nan")
        numpy_s = next((r["seconds"] for r in rows if r["case"] == "NumPy LAMB"),
                       None) or float("nan")
        for r in rows:
            if r["seconds"] is None:
                print("%-11s %-48s failed: %s" % (model, r["case"], r["error"]))
                continue
            r["speedup_vs_mxnet"] = builtin / r["seconds"]
            r["speedup_vs_numpy"] = numpy_s / r["seconds"]
            r["ratio_to_bound"] = r["seconds"] / r["bound_seconds"]
            print("%-11s %-48s %8.2fms %8.1fx %8.1fx %8.2fx" % (
                model, r["case"], r["seconds"] * 1e3, r["speedup_vs_mxnet"],
                r["speedup_vs_numpy"], r["ratio_to_bound"]))
        print("%-11s %-48s %8.2fms   (%d parameters, %d bytes each at %.1f GB/s, the "
              "highest; each row against the bandwidth around its own run)" % (
                  model, "byte bound", BYTES_PER_PARAM * rows[0]["params"] / max(measured) * 1e3,
                  rows[0]["params"], BYTES_PER_PARAM, max(measured) / 1e9))
        # The targets of the small set: the defaults against the Updater's floor, the
        # contiguous Trainer.step against both floors.
        floors = {r["case"]: r["seconds"] for r in rows if r["case"].startswith("floor")
                  and r["params"] < SMALL_MODEL and r["seconds"] is not None}
        for r in rows:
            if r["case"] not in ("mxlamb defaults", "mxlamb contiguous, Trainer.step") or (
                    r["seconds"] is None):
                continue
            for floor, seconds in floors.items():
                if r["case"] == "mxlamb defaults" and "Updater" not in floor:
                    continue
                r.setdefault("ratio_to_floor", {})[floor] = r["seconds"] / seconds
                print("%-11s %-48s %8.2fx  %s" % (model, r["case"], r["seconds"] / seconds,
                                                  floor))
        # 8-bit moments against float32 ones, in the same run.
        timed = {r["case"]: r for r in rows if r["seconds"] is not None}
        if STATE_BITS_8 in timed and "mxlamb defaults" in timed:
            eight, float32 = timed[STATE_BITS_8], timed["mxlamb defaults"]
            eight["ratio_to_float32"] = eight["seconds"] / float32["seconds"]
            print("%-11s %-48s %8.2fx  the float32 step's time; state %.2f bytes/param against "
                  "%d; %.2fx its own %d-byte bound" % (
                      model, STATE_BITS_8, eight["ratio_to_float32"],
                      STATE_BYTES[STATE_BITS_8], STATE_BYTES["mxlamb defaults"],
                      eight["ratio_to_bound"], CASE_BYTES[STATE_BITS_8]))

    versions = {}
    for r in results:
        if r.get("peer") and r["seconds"] is not None:
            versions.update(r.get("versions", {}))
            extra = ["%d torch threads" % r["threads"]] if "threads" in r else []
            extra += ["JAX device %s" % r["device"]] if "device" in r else []
            machine.setdefault("peers", {})[r["peer"]] = ", ".join(extra)
    if versions:
        print("peers: %s; %s" % (", ".join("%s %s" % kv for kv in sorted(versions.items())),
                                 "; ".join(sorted(set(machine["peers"].values())))))
        machine["peer_versions"] = versions

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
        for ax, model in zip(axes[0], models):
            rows = [r for r in results if r["model"] == model and r["seconds"] is not None]
            ax.barh([r["case"] for r in rows], [r["seconds"] * 1e3 for r in rows])
            ax.axvline(BYTES_PER_PARAM * rows[0]["params"] / max(measured) * 1e3, color="k",
                       ls="--", label="byte bound (highest bandwidth)")
            ax.set_xscale("log")
            ax.set_xlabel("ms per step (log)")
            ax.set_title("%s (%.1fM parameters)" % (model, rows[0]["params"] / 1e6))
            ax.invert_yaxis()
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
