"""Where this process stands in a ``torchrun`` job: rank, world size, local device.

lblctl does not launch or connect processes itself: ``torchrun`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous variables, :func:`init` joins the process group with
``torch.distributed`` (NCCL on GPUs, gloo on CPUs), and every stage reads :class:`DistEnv` to know
which shard of the data, the classifier and the store it owns. Without torchrun the world has one
process and nothing here opens a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lblctl.core.errors import LblError

if TYPE_CHECKING:
    import torch

_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (``world_size == 1``: a plain, single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes progress, summaries, manifests and shared checkpoints."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """The contiguous rows [start, stop) of ``n`` that this rank owns (Partial FC's split)."""
        return shard_range(n, self.rank, self.world_size)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows of ``n`` for ``rank``: the first ``n % world_size`` ranks hold one row more."""
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def from_environ(environ: dict[str, str] | None = None) -> DistEnv:
    """Read torchrun's variables; a single process when none is set."""
    env = os.environ if environ is None else environ
    if not any(v in env for v in _VARS):
        return DistEnv()
    try:
        rank, world, local = (int(env.get(v, "0")) for v in _VARS)
    except ValueError:
        raise LblError(f"torchrun environment: {', '.join(f'{v}={env.get(v)!r}' for v in _VARS)} "
                       "must be integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LblError(f"torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} "
                       "do not describe a process of the job")
    return DistEnv(rank, world, local)


def init(env: DistEnv, device_type: str) -> None:
    """Join the job's process group (once); NCCL for CUDA devices, gloo otherwise."""
    if not env.active:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)


def join(device: torch.device | str = "auto") -> tuple[DistEnv, torch.device]:
    """A stage's start: this process's place in the job and its ``torch.device`` (under torchrun
    ``cuda:LOCAL_RANK``, set as the process's GPU before NCCL starts); the process group joined; ranks
    other than 0 quiet. Without torchrun: ``DistEnv()`` and the device resolved."""
    import torch

    from lblctl.core import ui
    from lblctl.core.runtime import as_device

    env, dev = from_environ(), as_device(device)
    if env.active:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # NCCL's own buffers go to this process's GPU too
        init(env, dev.type)
        if not env.is_main:
            ui.set_quiet(True)
    return env, dev


def launch(nproc: int, argv: list[str]) -> int:
    """``--nproc N`` on one machine: run this same command under ``torchrun --standalone`` (N processes).

    Returns torchrun's exit status. ``--nproc`` and its value are dropped from the relaunched command.
    """
    import subprocess
    import sys

    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = i + 1 < len(argv)
            continue
        if not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
           "-m", "lblctl", *args]
    return subprocess.call(cmd)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
