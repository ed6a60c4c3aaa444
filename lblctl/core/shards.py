"""A prototype store sharded by rank, for ``train-dp`` (and ``imprint``) under ``torchrun``.

Layout of a store sharded for a world of W ranks::

    STORE/shards.json                 {"format": FORMAT, "world_size": W, "num_rows": N, "embedding_size": D}
    STORE/shard-00000-of-0000W/       a complete plain store (prototypes.h5 + manifest, queues.h5, …)
    STORE/shard-00001-of-0000W/
    …

Global row ``r`` (0 ≤ r < N, the row order of the unsharded store) is owned by rank ``r % W`` and
is local row ``r // W`` of that rank's shard. Row-mod-W (not contiguous ranges) spreads any run of
neighbouring rows, e.g. the identities of one folder, over every rank. Each shard is an ordinary
store folder, so every guarantee of a plain store (manifest, append-only log, crash recovery) holds
per shard, and each rank opens only its own shard for writing: two ranks never write one file, on
one host or on a shared filesystem (NFS/Lustre). The queues of a shard list **global** rows.

``shards.json`` is written last (atomically) when a sharded store is made: a folder without it is
not a sharded store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lblctl.core.artifacts import atomic_write_json
from lblctl.core.errors import IncompatibleArtifact, LblError

LAYOUT = "shards.json"
FORMAT = "lblctl-sharded-store/1"


@dataclass(frozen=True)
class ShardLayout:
    """Which rank owns which global row (row % world_size), and where its shard lives."""

    world_size: int
    num_rows: int
    embedding_size: int

    def owner(self, rows: np.ndarray) -> np.ndarray:
        """The rank that owns each global row."""
        return np.asarray(rows, dtype=np.int64) % self.world_size

    def local(self, rows: np.ndarray) -> np.ndarray:
        """Each global row's index inside its owner's shard."""
        return np.asarray(rows, dtype=np.int64) // self.world_size

    def to_global(self, rank: int, local_rows: np.ndarray) -> np.ndarray:
        """Global rows of ``rank``'s local rows."""
        return np.asarray(local_rows, dtype=np.int64) * self.world_size + rank

    def rows_of(self, rank: int) -> np.ndarray:
        """All global rows ``rank`` owns, in local order."""
        return np.arange(rank, self.num_rows, self.world_size, dtype=np.int64)

    def shard_size(self, rank: int) -> int:
        """How many rows ``rank`` owns."""
        return len(range(rank, self.num_rows, self.world_size))

    def to_json(self) -> dict[str, object]:
        return {"format": FORMAT, "world_size": self.world_size, "num_rows": self.num_rows,
                "embedding_size": self.embedding_size, "rule": "row % world_size"}


def shard_dir(store: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The folder of ``rank``'s shard (a plain store)."""
    return Path(store) / f"shard-{rank:05d}-of-{world_size:05d}"


def is_sharded(store: str | os.PathLike) -> bool:
    return (Path(store) / LAYOUT).is_file()


def read_layout(store: str | os.PathLike) -> ShardLayout | None:
    """The store's shard layout, or None for a plain (unsharded) store."""
    path = Path(store) / LAYOUT
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        layout = ShardLayout(int(meta["world_size"]), int(meta["num_rows"]), int(meta["embedding_size"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IncompatibleArtifact(f"{path}: not a readable shard layout ({exc})") from None
    if layout.world_size < 1 or layout.num_rows < 0:
        raise IncompatibleArtifact(f"{path}: world_size {layout.world_size}, num_rows {layout.num_rows}")
    return layout


def write_layout(store: str | os.PathLike, layout: ShardLayout) -> None:
    """Mark ``store`` as sharded; call after every shard is complete (the file is the commit point)."""
    atomic_write_json(Path(store) / LAYOUT, layout.to_json())


def check_world(store: str | os.PathLike, layout: ShardLayout, world_size: int) -> None:
    """Refuse a sharded store made for another world size, saying how to re-shard it."""
    if layout.world_size != world_size:
        raise LblError(f"--store {store}: sharded for {layout.world_size} rank(s), this job has {world_size}; "
                       f"re-shard it first: lblctl reshard --store {store} --world {world_size} --out NEW_STORE")
