"""Run by ``torchrun`` in tests/test_distributed.py: ``lblctl pretrain`` where rank 1 may get a missing --data."""

import os
import sys

from lblctl.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if os.environ.get("RANK") == "1" and os.environ.get("LBLCTL_TEST_BREAK_RANK1"):
        args[args.index("--data") + 1] = "/nonexistent/photos"
    main(["pretrain", *args])
