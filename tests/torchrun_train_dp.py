"""Run (by ``torchrun`` or plainly) in tests/test_distributed_dp.py: ``lblctl train-dp`` with a backbone
without BatchNorm registered (per-rank batch statistics would differ from one process's), each rank's
pid written to ``$LBLCTL_TEST_PIDS/rank<R>.pid`` (so a test can kill one rank)."""

import os
import sys
from pathlib import Path

from torch import nn

from lblctl.cli import main
from lblctl.models.backbones import register_backbone

NAME = "test_nobn"


def nobn(embedding_size: int = 32, input_size: int = 32, width: int = 4) -> nn.Module:
    """conv(stride 2) → ReLU → pool → linear: trainable, no BatchNorm."""
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(16 * width, embedding_size))


def register() -> None:
    """Put the backbone in the registry (in the test process only while its test runs: the CLI's help lists
    every registered backbone, and a test checks that)."""
    register_backbone(NAME, default_input_size=32)(nobn)


if __name__ == "__main__":
    register()
    pids = os.environ.get("LBLCTL_TEST_PIDS")
    if pids:
        Path(pids, f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
    main(["train-dp", *sys.argv[1:]])
