"""Where the 8-bit step's time goes: the operators' phases on one large tensor, float32 moments
against 8-bit ones, on 1 and 2 mxlamb threads; and the phase kernels' arithmetic alone.

    python benchmarks/bench_state_bits_phases.py [--elements 33554432] [--repeats 5]

Times (the lowest of --repeats, after one warm-up, mx.nd.waitall() before reading the clock)
mxlamb_step (both phases in one call), mxlamb_phase1 and mxlamb_phase2 on one tensor, with
float32 moments and with state_bits=8 (codes and block scales), called directly.

Then the arithmetic: each phase kernel of every ISA level the CPU has on one span of
--cache-elements elements, small enough to stay in the core's cache, on one thread
(mxlamb_phase_arithmetic_seconds, src/operators/bench_probe.cc), in ns per element (the lowest
of three rounds). With memory free, a step on T threads cannot take less than (phase 1 +
phase 2) x elements / T: the script prints that floor (at the active level) for the large
tensor on 2 threads beside the float32 step's measured time. Nothing is asserted;
docs/8bit.md#speed quotes a run.
"""
import argparse
import ctypes
import time

import mxnet as mx
import numpy as np

import mxlamb  # noqa: F401  (loads the operators)
from mxlamb import _library

COMMON = dict(num_tensors=1, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
              lrs="0.001", wds="0.01", rescale_grad=1.0)


def lowest(fn, repeats):
    fn()
    mx.nd.waitall()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        mx.nd.waitall()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-elements", type=int, default=1 << 15)
    parser.add_argument("--cache-repeats", type=int, default=2000)
    args = parser.parse_args()
    n = args.elements
    rng = np.random.RandomState(0)
    w = mx.nd.array(rng.randn(n).astype(np.float32) * 0.1)
    g = mx.nd.array(rng.randn(n).astype(np.float32) * 0.01)
    m32, v32 = mx.nd.zeros(n), mx.nd.zeros(n)
    m8, v8 = mx.nd.zeros(n, dtype="uint8"), mx.nd.zeros(n, dtype="uint8")
    ms, vs = mx.nd.zeros((n + 255) // 256), mx.nd.zeros((n + 255) // 256)
    table = mx.nd.mxlamb_phase1(w, g, m32, v32, step_counts="3", **COMMON)
    out = mx.nd.zeros(n)
    cases = {
        "step float32": lambda: mx.nd.mxlamb_step(w, g, m32, v32, step_counts="3", **COMMON),
        "step 8-bit": lambda: mx.nd.mxlamb_step(w, g, m8, v8, ms, vs, step_counts="3",
                                                state_bits=8, **COMMON),
        "phase 1 float32": lambda: mx.nd.mxlamb_phase1(w, g, m32, v32, step_counts="3",
                                                       **COMMON),
        "phase 1 8-bit": lambda: mx.nd.mxlamb_phase1(w, g, m8, v8, ms, vs, step_counts="3",
                                                     state_bits=8, **COMMON),
        "phase 2 float32": lambda: mx.nd.mxlamb_phase2(w, m32, v32, table, out=out,
                                                       step_counts="3", **COMMON),
        "phase 2 8-bit": lambda: mx.nd.mxlamb_phase2(w, m8, v8, ms, vs, table, out=out,
                                                     step_counts="3", state_bits=8, **COMMON),
    }
    print("one tensor of %d elements, ISA %s" % (n, _library.native.mxlamb_active_isa().decode()))
    print("%-16s %12s %12s" % ("ms", "1 thread", "2 threads"))
    results = {}
    for threads in (1, 2):
        _library.native.mxlamb_set_num_threads(threads)
        for name, fn in cases.items():
            results.setdefault(name, []).append(lowest(fn, args.repeats) * 1e3)
    _library.native.mxlamb_set_num_threads(0)
    for name, (one, two) in results.items():
        print("%-16s %12.1f %12.1f" % (name, one, two))

    probe = _library.native.mxlamb_phase_arithmetic_seconds
    probe.restype = ctypes.c_double
    probe.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    small = args.cache_elements
    kinds = [("phase 1 float32", 0), ("phase 1 8-bit", 1), ("phase 2 float32", 2),
             ("phase 2 8-bit", 3)]
    active = _library.native.mxlamb_active_isa()
    levels = [isa for isa in (b"avx512", b"avx2", b"baseline")
              if _library.native.mxlamb_set_isa(isa)]
    arithmetic = {}  # (isa, name) -> ns per element
    try:
        for _ in range(3):  # three rounds over the levels and kernels, the lowest of each kept
            for isa in levels:
                _library.native.mxlamb_set_isa(isa)
                for name, kind in kinds:
                    ns = probe(kind, small, args.cache_repeats) / small * 1e9
                    arithmetic[isa, name] = min(ns, arithmetic.get((isa, name), ns))
    finally:
        _library.native.mxlamb_set_isa(active)
    print("\narithmetic: one span of %d elements in cache, one thread, ns per element" % small)
    print("%-16s" % "ISA level" + "".join("%12s" % isa.decode() for isa in levels))
    for name, _ in kinds:
        print("%-16s" % name + "".join("%12.3f" % arithmetic[isa, name] for isa in levels))
    for moments in ("float32", "8-bit"):
        per_element = (arithmetic[active, "phase 1 " + moments] +
                       arithmetic[active, "phase 2 " + moments])
        floor = per_element * n / 2 * 1e-6
        print("step %-7s arithmetic floor on 2 threads (%s): %.1f ms (%.2f x the float32 step "
              "measured above)" % (moments, active.decode(), floor,
                                   floor / results["step float32"][1]))

if __name__ == "__main__":
    main()
