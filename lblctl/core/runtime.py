"""Device choice, seeding, worker counts and the memory this process may use: the same code path on
CPU and CUDA, in a container or not."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lblctl.core.errors import LblError

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a torch device, refusing CUDA where there is none.

    Under torchrun, ``auto`` and ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``."""
    import torch

    from lblctl.core.dist import from_environ

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LblError(f"--device {spec}: no CUDA GPU is visible here; use --device cpu or auto")
        index = from_environ().local_rank  # 0 outside torchrun
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
    import torch

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
    import torch

    return device if isinstance(device, torch.device) else resolve_device(device)


def _meminfo_available(proc: Path) -> int | None:
    try:
        with open(proc / "meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_headroom(proc: Path, cgroup_root: Path) -> int | None:
    """Smallest ``limit − (usage − inactive file pages)`` over this process's memory cgroup and its
    ancestors (cgroup v2 ``memory.max``/``memory.current``, or v1 ``memory.limit_in_bytes``/
    ``memory.usage_in_bytes``); ``None`` where no limit applies. Inactive file pages are page cache the
    kernel reclaims before it would kill us, so they count as free, as ``MemAvailable`` counts them."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    candidates: list[tuple[Path, str]] = []  # (own cgroup folder, version)
    for line in lines:
        hid, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        rel = rel.lstrip("/")
        if hid == "0" and controllers == "":
            candidates.append((cgroup_root / rel, "v2"))
        elif "memory" in controllers.split(","):
            candidates.append((cgroup_root / "memory" / rel, "v1"))
    if not candidates:
        candidates = [(cgroup_root, "v2"), (cgroup_root / "memory", "v1")]
    best: int | None = None
    for own, version in candidates:
        names = (("memory.max", "memory.current", "inactive_file") if version == "v2"
                 else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
        base = cgroup_root if version == "v2" else cgroup_root / "memory"
        folder = own
        while True:  # the namespace may hide our own folder: then its root is the nearest one seen
            limit = _read_int(folder / names[0])
            if limit is not None and limit < (1 << 60):
                usage = _read_int(folder / names[1]) or 0
                usage -= _stat_value(folder / "memory.stat", names[2])
                headroom = max(0, limit - max(0, usage))
                best = headroom if best is None else min(best, headroom)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return best


def available_memory(proc: str | os.PathLike = "/proc", cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """Bytes this process can still use now: the smaller of the host's ``MemAvailable`` and the
    headroom under its container's memory limit (cgroup v2 or v1). The one place lblctl asks."""
    avail = _meminfo_available(Path(proc))
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (OSError, ValueError):
            avail = 4 << 30
    headroom = _cgroup_headroom(Path(proc), Path(cgroup_root))
    return avail if headroom is None else min(avail, headroom)
