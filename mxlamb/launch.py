"""``python -m mxlamb.launch --workers 2 --servers 1 -- python train.py``: a distributed MXNet
job on this machine's loopback (see :mod:`mxlamb.dist`)."""
import sys

from mxlamb.dist import main

if __name__ == "__main__":
    sys.exit(main())
