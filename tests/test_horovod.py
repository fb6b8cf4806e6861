"""Horovod (gloo, 2 ranks on 127.0.0.1): hvd.DistributedTrainer(params, mxlamb.LAMB) gives the
weights of a single-process run on the global batch. Skipped where Horovod is not installed
(``make horovod`` installs it; ``make test`` does when a usable cmake is there)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import mxnet1_only

pytest.importorskip("horovod.mxnet", reason="Horovod is not installed (make horovod)")

from dist_job import assert_same_weights  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "dist_job.py")
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")

pytestmark = mxnet1_only


def test_horovod_distributed_trainer_equals_single_process(tmp_path):
    single, out = tmp_path / "single.npz", tmp_path / "hvd.npz"
    subprocess.run([sys.executable, JOB, "--mode", "single", "--out", str(single)], check=True,
                   timeout=120)
    proc = subprocess.run(
        [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo",
         sys.executable, JOB, "--mode", "horovod", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert_same_weights(dict(np.load(single)), out)
