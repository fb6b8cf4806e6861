"""Which 8-bit code for LAMB's moments? A NumPy study of the block-wise codes state_bits=8 could
use, on Adam moments of gradients whose scale varies over several decades inside a block.

    python benchmarks/state_code_study.py [--spread 2.0] [--steps 300]

Each element i gets gradients g_t = s_i (mu_i + noise), with s_i log-normal (``--spread`` is the
standard deviation of ln s_i: 0.7 is a mild model, 2.0 a harsh one, where v = E[g^2] spans about
2^31 within a block of 256). The moments are kept in float64 (the reference) and, for each code,
stored after every step in blocks of 256 with their absmax scale (what state_bits=8 does). It
prints, at a few steps, the relative error of the update direction u = m_hat / (sqrt(v_hat) +
eps) against the reference, ||u_q - u|| / ||u||, and the largest |u_q| over the largest |u|
(above 1: an element's update blew up). Codes, as "m code / v code":

- ``lin``: linear, 127 (signed) or 255 (unsigned) levels of the scale;
- ``EeMm``: a minifloat without subnormals, e exponent and m mantissa bits, code 0 the zero,
  rounded to nearest; ``f``: a positive value is never stored as 0 (the smallest code instead);
- ``sqrt EeMm``: sqrt(v) stored in that code (and squared back).
"""
import argparse

import numpy as np

BLOCK = 256


def minifloat(x, exponent_bits, mantissa_bits, floor=False):
    """x in [0, 1] rounded to the nearest value of the code (float64 arithmetic)."""
    emax = 2 ** exponent_bits - 1
    table = sorted({2.0 ** (e - emax) * (1 + m / 2 ** mantissa_bits)
                    for e in range(2 ** exponent_bits) for m in range(2 ** mantissa_bits)
                    if (e, m) != (0, 0)} | {0.0})
    table = np.array([v for v in table if v <= 1.0])
    index = np.searchsorted(table, x).clip(1, len(table) - 1)
    low, high = table[index - 1], table[index]
    out = np.where(x - low <= high - x, low, high)
    if floor:
        out = np.where((x > 0) & (out == 0), table[1], out)
    return out


def store(x, code, signed):
    """x stored block-wise in ``code`` ((kind, ...)) with an absmax scale per block."""
    blocks = x.reshape(-1, BLOCK)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    scale[scale == 0] = 1
    y = np.abs(blocks) / scale
    kind = code[0]
    if kind == "lin":
        levels = 127 if signed else 255
        r = np.round(y * levels) / levels
    elif kind == "sqrt":
        r = minifloat(np.sqrt(y), *code[1:]) ** 2
    else:
        r = minifloat(y, *code[1:])
    return (np.sign(blocks) * r * scale).reshape(x.shape)


CODES = {
    "lin/lin": (("lin",), ("lin",)),
    "E4M3/E5M3": (("mf", 4, 3), ("mf", 5, 3)),
    "E4M3/E5M3f": (("mf", 4, 3), ("mf", 5, 3, True)),
    "E5M2/E5M3f": (("mf", 5, 2), ("mf", 5, 3, True)),
    "E3M4/E5M3f": (("mf", 3, 4), ("mf", 5, 3, True)),
    "E4M3/sqrt E4M4f": (("mf", 4, 3), ("sqrt", 4, 4, True)),
    "lin/E5M3f": (("lin",), ("mf", 5, 3, True)),
}


def study(spread, steps, n=BLOCK * 400, beta1=0.9, beta2=0.999, eps=1e-6, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, spread, n))
    mu = rng.normal(0, 0.3, n)
    states = {name: [np.zeros(n), np.zeros(n)] for name in ["float64"] + list(CODES)}
    rows = []
    for t in range(1, steps + 1):
        g = scale * (mu + rng.normal(0, 1, n))
        for name, (m, v) in states.items():
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            if name != "float64":
                m, v = store(m, CODES[name][0], True), store(v, CODES[name][1], False)
            states[name] = [m, v]
        if t in (1, 10, 100, steps):
            c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
            m, v = states["float64"]
            u = (m / c1) / (np.sqrt(v / c2) + eps)
            row = {"step": t}
            for name in CODES:
                mq, vq = states[name]
                uq = (mq / c1) / (np.sqrt(vq / c2) + eps)
                row[name] = (np.linalg.norm(uq - u) / np.linalg.norm(u),
                             np.abs(uq).max() / np.abs(u).max())
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spread", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print("gradient scale spread %.1f (ln), %d steps; ||u_q - u|| / ||u|| (max |u_q| / max |u|)"
          % (args.spread, args.steps))
    print("%-6s" % "step" + "".join("%22s" % name for name in CODES))
    for row in study(args.spread, args.steps):
        print("%-6d" % row["step"] + "".join("%14.3g (%5.1f)" % row[name] for name in CODES))


if __name__ == "__main__":
    main()
