"""10,000 Trainer steps keep the resident set flat (a generous bound: leaks of even a few
hundred bytes per step would exceed it)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from conftest import mxnet1_only  # noqa: E402
from rss_long_run import measure  # noqa: E402


@mxnet1_only
def test_rss_stays_flat_over_10000_steps():
    samples = measure(10000, every=1000, warmup=1000)
    rss = [mb for _, mb in samples]
    # 10 MiB over 9,000 steps is ~1 KiB per step: a leaked array of the model would show.
    assert rss[-1] - rss[0] < 10.0, samples
