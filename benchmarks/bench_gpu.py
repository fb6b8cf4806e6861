"""The CUDA LAMB kernels on BERT parameter sets, against PyTorch in the same run, per byte.

    python3 benchmarks/bench_gpu.py [--models bert-base,bert-large] [--precisions fp32,fp16]
                                    [--steps 30] [--lib libmxlamb_cuda.so] [--json F]

Needs a CUDA GPU, PyTorch and nvcc (no MXNet): builds src/operators/lamb_cuda.cu unless --lib
names a build. For each model and precision it times one optimizer step in steady state (after
3 warm-ups, --steps steps in 5 rounds of back-to-back steps between CUDA events, as a training
loop enqueues them; the median round's time per step) of:

- mxlamb's one-call step (mxlamb_cuda_step: phase 1, norms, phase 2), and the two phases as
  two calls (what mxlamb_phase1 + mxlamb_phase2 run);
- mxlamb's phase 1 alone and phase 2 alone (their bytes: 24 and 16 B/param in fp32);
- a PyTorch LAMB made of torch._foreach_* operations (the same update, unfused);
- timm's `Lamb` (foreach where this timm has it; max_grad_norm=None, so no global clipping);
- optax's `lamb` under `jax.jit` (params and state donated), in a child process so that JAX and
  PyTorch do not share the device's memory pool (XLA_PYTHON_CLIENT_PREALLOCATE=false);
- torch.optim.AdamW(fused=True) on float32: one pass over p, g, m, v, the bandwidth anchor.

fp16 rows are float32 master weights with float16 gradients and float16 model weights: every
peer widens the gradients and writes the float16 copy inside the timed step, as mxlamb does.

A peer that is missing or fails is reported as such (a row with its error), never dropped.

"GB/s" is the bytes the algorithm must move per parameter (below) times the parameter count,
over the time; "% copy" divides that by the device's device-to-device copy bandwidth measured
in the same run (bytes read + written over the time of a 1 GiB copy). LAMB reads every
parameter's state twice (phase 2 needs ||u||, known only after phase 1 has seen the whole
tensor), so it moves 40 B/param where AdamW moves 28: per byte, the two can both reach ~90%.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from cuda_interface import FLOAT16, FLOAT32, PP, Group, LambParams, c_array, load  # noqa: E402
from param_sets import PARAM_SETS  # noqa: E402

# Bytes per parameter that one step must move.
#   fp32: phase 1 reads w, g, m, v and writes m, v (24); phase 2 reads w, m, v, writes w (16).
#   fp16 (float32 master, float16 gradient and model weight): phase 1 reads w, g16, m, v and
#   writes m, v (22); phase 2 reads w, m, v and writes w and w16 (18).
LAMB_BYTES = {"fp32": 40, "fp16": 40}
PHASE_BYTES = {"fp32": (24, 16), "fp16": (22, 18)}
ADAMW_BYTES = 28  # fp32: reads p, g, m, v; writes p, m, v
Q8_BYTES = {"fp32": 22, "fp16": 22}  # 8-bit moments: 12 + 10 (fp16: 10 + 12)
LR, WD, BETA1, BETA2, EPS = 1e-3, 0.01, 0.9, 0.999, 1e-6


ROUNDS = 5


def cuda_time(fn, steps, warmup=3):
    """Seconds per fn() in steady state: `steps` calls back to back (as a training loop
    enqueues its steps, so the host's work for one step overlaps the device's for the one
    before) between two CUDA events, in ROUNDS rounds; the median round's time per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_round = max(1, steps // ROUNDS)
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_round):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per_round)
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 30):
    a = torch.empty(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    seconds = cuda_time(lambda: b.copy_(a), 20)
    del a, b
    return 2 * nbytes / seconds


def mxlamb_step(lib, params, grads, means, variances, model_weights, stages, scales=None):
    """A step function over the C interface; host step counts, advanced by each call.
    ``scales``: (mean scales, var scales) of 8-bit moments (means, variances: uint8 codes)."""
    n = len(params)
    ptrs = lambda ts: c_array(ctypes.c_void_p, [t.data_ptr() for t in ts])  # noqa: E731
    counts = c_array(ctypes.c_double, [1.0] * n)
    keep = dict(sizes=c_array(ctypes.c_int64, [p.numel() for p in params]),
                lrs=c_array(ctypes.c_double, [LR] * n), wds=c_array(ctypes.c_double, [WD] * n),
                dtypes=c_array(ctypes.c_int, [FLOAT16 if grads[0].dtype == torch.float16
                                              else FLOAT32] * n))
    group = Group(num_tensors=n, math_dtype=FLOAT32, lowp_dtype=FLOAT16,
                  weights=ptrs(params), grads=ptrs(grads), grad_dtypes=keep["dtypes"],
                  means=ptrs(means), vars=ptrs(variances),
                  weights_lowp=ptrs(model_weights) if model_weights else None,
                  sizes=keep["sizes"], lrs=keep["lrs"], wds=keep["wds"], step_counts=counts,
                  params=LambParams(BETA1, BETA2, EPS), rescale_grad=1.0, clipnorm=-1.0)
    if scales is not None:
        group.mean_scales = ctypes.cast(ptrs(scales[0]), PP)
        group.var_scales = ctypes.cast(ptrs(scales[1]), PP)
        keep["scales"] = (group.mean_scales, group.var_scales, scales)
    nbytes = lib.mxlamb_cuda_workspace_bytes(ctypes.byref(group))
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    sumsq = torch.zeros((n, 2), dtype=torch.float64, device="cuda")

    def step():
        stream = torch.cuda.current_stream().cuda_stream
        for t in range(n):  # the previous step's count + 1 (before the clock's first kernel)
            counts[t] = step.count
        step.count += 1
        args = (ctypes.byref(group), sumsq.data_ptr(), workspace.data_ptr(), nbytes, stream)
        for name in stages:
            assert getattr(lib, name)(*args) == 0, name
    step.count = 1
    step.keep = (keep, counts, workspace)
    return step


def foreach_lamb_step(params, grads, means, variances, model_weights):
    """LAMB on torch._foreach_* operations (float16 gradients widened, model weights copied)."""
    count = [0]

    def step():
        count[0] += 1
        c1, c2 = 1 - BETA1 ** count[0], 1 - BETA2 ** count[0]
        g = grads if grads[0].dtype == torch.float32 else [x.float() for x in grads]
        torch._foreach_mul_(means, BETA1)
        torch._foreach_add_(means, g, alpha=1 - BETA1)
        torch._foreach_mul_(variances, BETA2)
        torch._foreach_addcmul_(variances, g, g, value=1 - BETA2)
        denom = torch._foreach_sqrt(torch._foreach_div(variances, c2))
        torch._foreach_add_(denom, EPS)
        update = torch._foreach_div(torch._foreach_div(means, c1), denom)
        torch._foreach_add_(update, params, alpha=WD)
        r1 = torch.stack(torch._foreach_norm(params))
        r2 = torch.stack(torch._foreach_norm(update))
        ratio = torch.where((r1 > 0) & (r2 > 0), r1 / r2, torch.ones_like(r1))
        torch._foreach_mul_(update, list((-LR * ratio).unbind()))
        torch._foreach_add_(params, update)
        if model_weights:
            torch._foreach_copy_(model_weights, params)
    return step


def timm_lamb_step(params, grads, model_weights):
    """timm.optim.Lamb (foreach where this timm has it), without its default global clipping;
    float16 gradients are widened into float32 .grad buffers inside the step."""
    import inspect

    from timm.optim import Lamb
    params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(params, grads):
        p.grad = g if g.dtype == torch.float32 else torch.empty_like(p)
    kwargs = dict(lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, max_grad_norm=None)
    if "foreach" in inspect.signature(Lamb).parameters:
        kwargs["foreach"] = True
    opt = Lamb(params, **kwargs)
    widen = grads[0].dtype != torch.float32

    def step():
        if widen:
            torch._foreach_copy_([p.grad for p in params], grads)
        opt.step()
        if model_weights:
            torch._foreach_copy_(model_weights, [p.detach() for p in params])
    step.keep = (params, opt, "foreach" in kwargs)
    return step


def optax_child(model, precision, steps):
    """In a child process: optax.lamb under jax.jit on `model`'s shapes; prints one JSON line
    {"seconds": per step, "jax": version} (wall clock around rounds of steps, each round
    blocked until ready at its end)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import time

    import jax
    import jax.numpy as jnp
    import optax
    shapes = PARAM_SETS[model]()
    key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, 2 * len(shapes))
    params = [jax.random.normal(keys[2 * i], s, jnp.float32) * 0.05 for i, s in enumerate(shapes)]
    gdtype = jnp.float16 if precision == "fp16" else jnp.float32
    grads = [(jax.random.normal(keys[2 * i + 1], s, jnp.float32) * 1e-3).astype(gdtype)
             for i, s in enumerate(shapes)]
    tx = optax.lamb(LR, b1=BETA1, b2=BETA2, eps=EPS, weight_decay=WD)
    state = tx.init(params)

    def step(params, state, grads):
        grads = [g.astype(jnp.float32) for g in grads]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        lowp = [p.astype(jnp.float16) for p in params] if precision == "fp16" else []
        return params, state, lowp

    jitted = jax.jit(step, donate_argnums=(0, 1))
    for _ in range(3):
        params, state, lowp = jitted(params, state, grads)
    jax.block_until_ready((params, state, lowp))
    per_round = max(1, steps // ROUNDS)
    times = []
    for _ in range(ROUNDS):  # as cuda_time: steps back to back, the median round per step
        start = time.perf_counter()
        for _ in range(per_round):
            params, state, lowp = jitted(params, state, grads)
        jax.block_until_ready((params, state, lowp))
        times.append((time.perf_counter() - start) / per_round)
    print(json.dumps({"seconds": statistics.median(times), "jax": jax.__version__,
                      "backend": jax.devices()[0].device_kind}))


def optax_seconds(model, precision, steps, timeout):
    """optax_child's median, or raises with the child's error."""
    import subprocess
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--optax-child",
                          "%s,%s" % (model, precision), "--steps", str(steps)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip()
                           else "exit %d" % out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-base,bert-large")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lib", help="a built libmxlamb_cuda.so (default: build one)")
    parser.add_argument("--json")
    parser.add_argument("--peers", default="foreach,timm,optax,adamw",
                        help="which peers to time (comma-separated)")
    parser.add_argument("--optax-timeout", type=float, default=90.0,
                        help="seconds for each optax child (its jit compile included)")
    parser.add_argument("--optax-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.optax_child:
        optax_child(*args.optax_child.split(","), args.steps)
        return
    peers = set(args.peers.split(",")) if args.peers else set()
    lib = load(args.lib)
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print("device: %s, copy bandwidth %.0f GB/s (read + write)" % (device, bandwidth / 1e9))
    print("%-10s %-5s %-26s %10s %8s %7s %9s" % ("model", "prec", "case", "ms/step", "GB/s",
                                                 "% copy", "B/param"))
    results = []

    def failed(model, precision, case, error):
        results.append({"model": model, "precision": precision, "case": case,
                        "error": str(error)})
        print("%-10s %-5s %-26s failed: %s" % (model, precision, case, error), flush=True)

    def report(model, precision, case, fn, numel, bytes_per_param, seconds=None):
        if seconds is None:
            try:
                seconds = cuda_time(fn, args.steps)
            except Exception as e:  # noqa: BLE001 (a peer's failure is a result, said so)
                failed(model, precision, case, "%s: %s" % (type(e).__name__, e))
                return
        rate = bytes_per_param * numel / seconds
        results.append({"model": model, "precision": precision, "case": case,
                        "seconds": seconds, "params": numel, "bytes_per_param": bytes_per_param,
                        "bytes_per_second": rate, "fraction_of_copy_bandwidth": rate / bandwidth})
        print("%-10s %-5s %-26s %10.3f %8.0f %6.1f%% %9d" % (model, precision, case,
                                                             seconds * 1e3, rate / 1e9,
                                                             100 * rate / bandwidth,
                                                             bytes_per_param), flush=True)

    for model in args.models.split(","):
        shapes = PARAM_SETS[model]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        for precision in args.precisions.split(","):
            gen = torch.Generator(device="cuda").manual_seed(0)
            params = [torch.randn(s, device="cuda", generator=gen) * 0.05 for s in shapes]
            grad_dtype = torch.float16 if precision == "fp16" else torch.float32
            grads = [(torch.randn(s, device="cuda", generator=gen) * 1e-3).to(grad_dtype)
                     for s in shapes]
            model_weights = [p.half() for p in params] if precision == "fp16" else None
            phase1_bytes, phase2_bytes = PHASE_BYTES[precision]
            for case, stages, nbytes in (
                    ("mxlamb step (one call)", ["mxlamb_cuda_step"], LAMB_BYTES[precision]),
                    ("mxlamb phase1 + phase2", ["mxlamb_cuda_phase1", "mxlamb_cuda_phase2"],
                     LAMB_BYTES[precision]),
                    ("mxlamb phase1 alone", ["mxlamb_cuda_phase1"], phase1_bytes),
                    ("mxlamb phase2 alone", ["mxlamb_cuda_phase2"], phase2_bytes)):
                state = ([torch.zeros_like(p) for p in params],
                         [torch.zeros_like(p) for p in params])
                if case == "mxlamb phase2 alone":  # phase 2 of a real step's moments and norms
                    mxlamb_step(lib, params, grads, state[0], state[1], model_weights,
                                ["mxlamb_cuda_phase1"])()
                report(model, precision, case,
                       mxlamb_step(lib, params, grads, state[0], state[1], model_weights,
                                   stages), numel, nbytes)
                del state
            # 8-bit moments (state_bits=8) for the tensors of 4,096 elements or more: read w,
            # g, m8, v8 and write m8, v8; then read w, m8, v8 and write w (22 B/param in fp32,
            # fp16 as its float32 case less 2 + 2; the block scales and the small tensors'
            # float32 moments add under 1%). Every tensor is 8-bit here, as one group.
            codes = ([torch.zeros(p.shape, dtype=torch.uint8, device="cuda") for p in params],
                     [torch.zeros(p.shape, dtype=torch.uint8, device="cuda") for p in params])
            block_scales = tuple([torch.zeros((p.numel() + 255) // 256, device="cuda")
                                  for p in params] for _ in range(2))
            report(model, precision, "mxlamb step, 8-bit moments",
                   mxlamb_step(lib, params, grads, codes[0], codes[1], model_weights,
                               ["mxlamb_cuda_step"], scales=block_scales), numel,
                   Q8_BYTES[precision])
            del codes, block_scales
            if "foreach" in peers:
                state = ([torch.zeros_like(p) for p in params],
                         [torch.zeros_like(p) for p in params])
                report(model, precision, "torch _foreach LAMB",
                       foreach_lamb_step(params, grads, state[0], state[1], model_weights), numel,
                       LAMB_BYTES[precision])
                del state
            if "timm" in peers:
                try:
                    fn = timm_lamb_step(params, grads, model_weights)
                except Exception as e:  # noqa: BLE001
                    failed(model, precision, "timm Lamb", "%s: %s" % (type(e).__name__, e))
                else:
                    report(model, precision,
                           "timm Lamb (%s)" % ("foreach" if fn.keep[2] else "per tensor"), fn,
                           numel, LAMB_BYTES[precision])
                    del fn
                torch.cuda.empty_cache()
            if "optax" in peers:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                try:
                    child = optax_seconds(model, precision, args.steps, args.optax_timeout)
                except Exception as e:  # noqa: BLE001
                    failed(model, precision, "optax lamb (jax.jit)", "%s: %s"
                           % (type(e).__name__, e))
                else:
                    report(model, precision, "optax lamb (jax.jit)", None, numel,
                           LAMB_BYTES[precision], seconds=child["seconds"])
            if precision == "fp32" and "adamw" in peers:
                adam_params = [torch.nn.Parameter(p.clone()) for p in params]
                for p, g in zip(adam_params, grads):
                    p.grad = g
                adamw = torch.optim.AdamW(adam_params, lr=LR, weight_decay=WD, fused=True)
                report(model, precision, "torch AdamW(fused=True)", adamw.step, numel,
                       ADAMW_BYTES)
                del adamw, adam_params
            del params, grads, model_weights
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "copy_bandwidth": bandwidth, "torch": torch.__version__,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
