"""The CUDA LAMB kernels on BERT parameter sets vs PyTorch, as % of copy bandwidth.

    python benchmarks/bench_gpu.py [--models bert-base,bert-large] [--steps 20] [--json F]

Needs a CUDA GPU, PyTorch and nvcc (no MXNet). Builds src/operators/lamb_cuda.cu, then times
one LAMB step (phase 1 + norms + phase 2) with CUDA events, a PyTorch LAMB made of
torch._foreach_* operations, and torch.optim.AdamW(fused=True), on the same parameters. The
kernel's bytes per parameter (40 for fp32: read w, g, m, v, write m, v; read w, m, v, write w)
divided by its time, over the device's measured copy bandwidth, is the "% of copy" column.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from param_sets import PARAM_SETS  # noqa: E402
from setup import compile_cuda_library  # noqa: E402
from test_cuda import Group, TensorCoeffs, step_coeffs, tensor_coeffs  # noqa: E402

BYTES_PER_PARAM = 40


def cuda_time(fn, steps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes=1 << 30):
    a = torch.empty(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / cuda_time(lambda: b.copy_(a), 20)


def mxlamb_step(lib, params, grads, means, variances, lr=1e-3, wd=0.01):
    n = len(params)
    ptrs = lambda ts: (ctypes.c_void_p * n)(*[t.data_ptr() for t in ts])  # noqa: E731
    count = [0]
    sumsq = torch.zeros((n, 2), dtype=torch.float64, device="cuda")
    coeffs = (TensorCoeffs * n)(*[tensor_coeffs(1, lr, wd)] * n)
    group = Group(num_tensors=n, weights=ptrs(params), grads=ptrs(grads), means=ptrs(means),
                  vars=ptrs(variances), weights_lowp=None,
                  sizes=(ctypes.c_int64 * n)(*[p.numel() for p in params]), grad_dtype=0,
                  lowp_dtype=0, step=step_coeffs(), coeffs=coeffs)
    nbytes = lib.mxlamb_cuda_workspace_bytes(ctypes.byref(group))
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def step():
        count[0] += 1
        coeffs[:] = [tensor_coeffs(count[0], lr, wd)] * n
        assert lib.mxlamb_cuda_phase1(ctypes.byref(group), sumsq.data_ptr(), workspace.data_ptr(),
                                      nbytes, stream) == 0
        assert lib.mxlamb_cuda_phase2(ctypes.byref(group), sumsq.data_ptr(), workspace.data_ptr(),
                                      nbytes, stream) == 0
    return step


def foreach_lamb_step(params, grads, means, variances, lr=1e-3, wd=0.01, beta1=0.9,
                      beta2=0.999, eps=1e-6):
    count = [0]

    def step():
        count[0] += 1
        c1, c2 = 1 - beta1 ** count[0], 1 - beta2 ** count[0]
        torch._foreach_mul_(means, beta1)
        torch._foreach_add_(means, grads, alpha=1 - beta1)
        torch._foreach_mul_(variances, beta2)
        torch._foreach_addcmul_(variances, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(torch._foreach_div(variances, c2))
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(torch._foreach_div(means, c1), denom)
        torch._foreach_add_(update, params, alpha=wd)
        r1 = torch.stack(torch._foreach_norm(params))
        r2 = torch.stack(torch._foreach_norm(update))
        ratio = torch.where((r1 > 0) & (r2 > 0), r1 / r2, torch.ones_like(r1))
        torch._foreach_mul_(update, list((-lr * ratio).unbind()))
        torch._foreach_add_(params, update)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-base,bert-large")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    lib = ctypes.CDLL(compile_cuda_library(os.path.join(tempfile.mkdtemp(), "libmxlamb_cuda.so")))
    lib.mxlamb_cuda_workspace_bytes.restype = ctypes.c_size_t
    for fn in (lib.mxlamb_cuda_phase1, lib.mxlamb_cuda_phase2):
        fn.argtypes = [ctypes.POINTER(Group), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_void_p]
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print("device: %s, copy bandwidth %.0f GB/s" % (device, bandwidth / 1e9))
    results = []
    for model in args.models.split(","):
        shapes = PARAM_SETS[model]()
        make = lambda: [torch.randn(s, device="cuda") for s in shapes]  # noqa: E731
        params, grads = make(), make()
        numel = sum(p.numel() for p in params)
        zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
        cases = [("mxlamb CUDA LAMB", mxlamb_step(lib, params, grads, zeros(), zeros())),
                 ("torch _foreach LAMB", foreach_lamb_step(params, grads, zeros(), zeros()))]
        adam_params = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(adam_params, grads):
            p.grad = g
        adamw = torch.optim.AdamW(adam_params, lr=1e-3, fused=True)
        cases.append(("torch AdamW(fused=True)", adamw.step))
        for name, fn in cases:
            seconds = cuda_time(fn, args.steps)
            share = BYTES_PER_PARAM * numel / seconds / bandwidth
            results.append({"model": model, "case": name, "seconds": seconds,
                            "params": numel, "fraction_of_copy_bandwidth": share})
            print("%-11s %-26s %9.3f ms  %5.1f%% of copy bandwidth at %d B/param"
                  % (model, name, seconds * 1e3, 100 * share, BYTES_PER_PARAM))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "copy_bandwidth": bandwidth, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
