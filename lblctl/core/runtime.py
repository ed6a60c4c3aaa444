"""Device choice and seeding: the same code path on CPU and CUDA."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from lblctl.core.errors import LblError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a torch device, refusing CUDA where there is none."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LblError(f"--device {spec}: no CUDA GPU is visible here; use --device cpu or auto")
        index = 0
        if ":" in spec:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise LblError(f"--device {spec}: expected cuda:N with N a GPU number") from None
        if index >= torch.cuda.device_count():
            raise LblError(
                f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0.."
                f"cuda:{torch.cuda.device_count() - 1})"
            )
        return torch.device("cuda", index)
    raise LblError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) so that a CPU run is repeatable. (Not PYTHONHASHSEED:
    it only acts at interpreter start-up, and no result here depends on str hashing.)"""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_workers(requested: int = -1) -> int:
    """Worker count for ``--workers``: a given count (≥ 0) as is; negative = auto, which leaves one
    core for the main process (none on one core)."""
    if requested >= 0:
        return requested
    n = os.cpu_count() or 1
    return 0 if n <= 1 else min(8, n - 1)


def as_device(device: torch.device | str) -> torch.device:
    """A stage's ``device`` argument: a torch.device as is, a string as ``--device`` takes it."""
    return device if isinstance(device, torch.device) else resolve_device(device)
