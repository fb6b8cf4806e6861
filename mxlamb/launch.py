"""``python -m mxlamb.launch --workers 2 --servers 1 -- python train.py``: a distributed MXNet
job on this machine's loopback (see :mod:`mxlamb.contrib.dist`)."""
import sys

from mxlamb.contrib.dist import main

if __name__ == "__main__":
    sys.exit(main())
