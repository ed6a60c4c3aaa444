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
from lblctl.core.strings import StringArray

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


def check_world(store: str | os.PathLike, layout: ShardLayout | None, world_size: int) -> None:
    """Refuse a store made for another world size (``layout`` None: a plain store, a world of one),
    saying how to re-shard it."""
    have = 1 if layout is None else layout.world_size
    if have != world_size:
        made = "a plain (unsharded) store" if layout is None else f"sharded for {have} rank(s)"
        raise LblError(f"--store {store}: {made}, this job has {world_size}; "
                       f"re-shard it first: lblctl reshard --store {store} --world {world_size} --out NEW_STORE")


# ---------------------------------------------------------------------- reading a sharded store whole


def take_strings(strings: StringArray, rows: np.ndarray, chunk_rows: int = 8192) -> StringArray:
    """``strings[rows]`` as a new StringArray, without a Python object per item (and, beside the result,
    memory for one chunk of rows: the byte index of a chunk costs 8 bytes per byte of its strings)."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = strings.offsets[rows]
    lengths = strings.offsets[rows + 1] - starts
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buffer = np.empty(int(offsets[-1]), dtype=np.uint8)
    for a in range(0, len(rows), chunk_rows):
        b = min(len(rows), a + chunk_rows)
        lo, hi = int(offsets[a]), int(offsets[b])
        # byte j of the output comes from starts[item] + (j − offsets[item])
        src = np.repeat(starts[a:b] - offsets[a:b], lengths[a:b]) + np.arange(lo, hi, dtype=np.int64)
        buffer[lo:hi] = strings.buffer[src]
    return StringArray(buffer, offsets)


def interleave_strings(parts: list[StringArray], layout: ShardLayout) -> StringArray:
    """The global order of per-shard string arrays (global row r = shard r % W, local row r // W)."""
    if len(parts) != layout.world_size:
        raise ValueError(f"{len(parts)} parts for a world of {layout.world_size}")
    base = np.cumsum([0] + [len(p) for p in parts[:-1]]).astype(np.int64)
    buffers, offsets, shift = [], [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        buffers.append(p.buffer)
        offsets.append(p.offsets[1:] + shift)
        shift += int(p.offsets[-1])
    joined = StringArray(np.concatenate(buffers) if buffers else np.zeros(0, np.uint8), np.concatenate(offsets))
    rows = np.arange(layout.num_rows, dtype=np.int64)
    return take_strings(joined, base[layout.owner(rows)] + layout.local(rows))


class ShardedStoreView:
    """A sharded store read as one store, by global row (read-only; every shard opened for reading).

    It has what the readers of a plain :class:`~lblctl.core.store.PrototypeStore` use (``gather``,
    ``iter_chunks``, ``names`` …), so re-sharding, build-index and merging stream over it; memory holds
    one chunk of rows (and, when asked for, the names)."""

    def __init__(self, folder: str | os.PathLike, layout: ShardLayout | None = None) -> None:
        from lblctl.core.store import PrototypeStore

        self.folder = Path(folder)
        found = layout or read_layout(self.folder)
        if found is None:
            raise LblError(f"{self.folder}: not a sharded store (no {LAYOUT})")
        self.layout = found
        self.shards: list[PrototypeStore] = []
        try:
            for rank in range(found.world_size):
                path = shard_dir(self.folder, rank, found.world_size)
                if not path.is_dir():
                    raise IncompatibleArtifact(f"{path}: missing; {self.folder} lists {found.world_size} shards")
                store = PrototypeStore.open(path, "r", cache="mmap")
                self.shards.append(store)
                if store.num_rows != found.shard_size(rank) or store.embedding_size != found.embedding_size:
                    raise IncompatibleArtifact(
                        f"{path}: {store.num_rows} rows × {store.embedding_size}, the layout says "
                        f"{found.shard_size(rank)} × {found.embedding_size}; the sharded store is damaged")
            first = self.shards[0] if self.shards else None
            for store in self.shards[1:]:
                assert first is not None
                if (store.dtype, store.has_momentum, store.backbone_fingerprint) != \
                        (first.dtype, first.has_momentum, first.backbone_fingerprint):
                    raise IncompatibleArtifact(f"{store.folder}: dtype, momentum or backbone differ from "
                                               f"{first.folder}; the shards are not one store")
        except BaseException:
            self.close()
            raise
        self._names: StringArray | None = None
        self._photos: StringArray | None = None

    # what a plain store says about itself
    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    def __len__(self) -> int:
        return self.layout.num_rows

    @property
    def embedding_size(self) -> int:
        return self.layout.embedding_size

    @property
    def dtype(self) -> str:
        return self.shards[0].dtype if self.shards else "float32"

    @property
    def has_momentum(self) -> bool:
        return bool(self.shards) and self.shards[0].has_momentum

    @property
    def backbone_fingerprint(self) -> str | None:
        return self.shards[0].backbone_fingerprint if self.shards else None

    @property
    def committed_steps(self) -> list[int]:
        """Each shard's last committed step (equal when every rank finished the same step)."""
        return [s.committed_step for s in self.shards]

    @property
    def committed_step(self) -> int:
        """The last step every shard committed (the step a resume would start from)."""
        return min(self.committed_steps) if self.shards else -1

    @property
    def names(self) -> StringArray:
        if self._names is None:
            self._names = interleave_strings([s.names for s in self.shards], self.layout)
        return self._names

    @property
    def id_photos(self) -> StringArray:
        if self._photos is None:
            self._photos = interleave_strings([s.id_photos for s in self.shards], self.layout)
        return self._photos

    # rows by global id
    def _by_shard(self, rows: np.ndarray, read) -> np.ndarray:  # noqa: ANN001 (shard, local rows) -> array
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row out of range 0..{self.num_rows - 1}")
        owner, local = self.layout.owner(rows), self.layout.local(rows)
        out: np.ndarray | None = None
        for rank in np.unique(owner).tolist():
            m = owner == rank
            part = read(self.shards[rank], local[m])
            if out is None:
                out = np.empty((len(rows), *part.shape[1:]), dtype=part.dtype)
            out[m] = part
        if out is None:
            out = read(self.shards[0], local[:0]) if self.shards else np.zeros((0, self.embedding_size), np.float32)
        return out

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self._by_shard(rows, lambda s, r: s.gather(r))

    def gather_momentum(self, rows: np.ndarray) -> np.ndarray:
        return self._by_shard(rows, lambda s, r: s.gather_momentum(r))

    def row_steps(self, rows: np.ndarray) -> np.ndarray:
        return self._by_shard(rows, lambda s, r: s.row_steps(r))

    def iter_chunks(self, chunk_rows: int = 65536):  # noqa: ANN201 (Iterator[tuple[int, np.ndarray]])
        """Every row in global order as ``(start, float32 array)``, a chunk at a time."""
        step = max(1, int(chunk_rows))
        for start in range(0, self.num_rows, step):
            yield start, self.gather(np.arange(start, min(self.num_rows, start + step), dtype=np.int64))

    def close(self) -> None:
        for s in self.shards:
            s.close(complete=False)
        self.shards = []

    def __enter__(self) -> ShardedStoreView:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def open_store_view(folder: str | os.PathLike):  # noqa: ANN201 (PrototypeStore | ShardedStoreView)
    """A store opened for reading: a plain one as is, a sharded one through :class:`ShardedStoreView`."""
    from lblctl.core.store import PrototypeStore

    return ShardedStoreView(folder) if is_sharded(folder) else PrototypeStore.open(folder, "r")


# ---------------------------------------------------------------------- the queues of a sharded store


def queue_paths(store: str | os.PathLike, layout: ShardLayout | None) -> list[Path]:
    """The queue files of a store: one per shard (global row ids inside), or ``STORE/queues.h5``."""
    from lblctl.core.queues import QUEUES

    if layout is None:
        return [Path(store) / QUEUES]
    return [shard_dir(store, r, layout.world_size) / QUEUES for r in range(layout.world_size)]


class ShardedQueues:
    """The queues of a sharded store read by global row (read-only), as a plain :class:`Queues` reads."""

    def __init__(self, store: str | os.PathLike, layout: ShardLayout) -> None:
        from lblctl.core.queues import Queues

        self.layout = layout
        self.parts: list[Queues] = []
        try:
            for rank, path in enumerate(queue_paths(store, layout)):
                q = Queues.open(path, "r", expect_rows=layout.shard_size(rank))
                self.parts.append(q)
        except BaseException:
            self.close()
            raise
        widths = {(q.cq, q.dq) for q in self.parts}
        if len(widths) > 1:
            self.close()
            raise IncompatibleArtifact(f"{store}: the shards' queues differ in width ({sorted(widths)}); "
                                       "re-run build-index")
        self.num_rows = layout.num_rows
        self.cq, self.dq = (self.parts[0].cq, self.parts[0].dq) if self.parts else (0, 0)

    @property
    def meta(self) -> dict[str, object]:
        return {**self.parts[0].meta, "num_rows": self.num_rows} if self.parts else {}

    def _read(self, rows: np.ndarray, width: int, dtype: type, name: str) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row out of range 0..{self.num_rows - 1}")
        owner, local = self.layout.owner(rows), self.layout.local(rows)
        out = np.empty((len(rows), width), dtype=dtype)
        for rank in np.unique(owner).tolist():
            m = owner == rank
            out[m] = getattr(self.parts[rank], name)(local[m])
        return out

    def candidates(self, rows: np.ndarray) -> np.ndarray:
        return self._read(rows, self.cq, np.int32, "candidates")

    def candidate_scores(self, rows: np.ndarray) -> np.ndarray:
        return self._read(rows, self.cq, np.float32, "candidate_scores")

    def dominant(self, rows: np.ndarray) -> np.ndarray:
        return self._read(rows, self.dq, np.int32, "dominant")

    def iter_chunks(self, chunk_rows: int = 65536):  # noqa: ANN201 (Iterator[tuple[int, ndarray, ndarray]])
        """``(start, candidates, candidate_scores)`` in global row order, a chunk at a time."""
        for start in range(0, self.num_rows, max(1, int(chunk_rows))):
            rows = np.arange(start, min(self.num_rows, start + chunk_rows), dtype=np.int64)
            yield start, self.candidates(rows), self.candidate_scores(rows)

    def close(self) -> None:
        for q in self.parts:
            q.close()
        self.parts = []

    def __enter__(self) -> ShardedQueues:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


class ShardedQueueWriter:
    """New queue files for every shard, written by global row: rows ``start…`` go to their owners' files
    (each a :class:`~lblctl.core.queues.QueueWriter`: temp name, renamed at :meth:`commit`)."""

    def __init__(self, store: str | os.PathLike, layout: ShardLayout, cq: int, dq: int,
                 attrs: dict[str, object] | None = None) -> None:
        from lblctl.core.queues import QueueWriter

        self.layout = layout
        self.writers: list[QueueWriter] = []
        try:
            for rank, path in enumerate(queue_paths(store, layout)):
                self.writers.append(QueueWriter(path, layout.shard_size(rank), cq, dq, attrs))
        except BaseException:
            self.abort()
            raise

    def write(self, start: int, candidates: np.ndarray, scores: np.ndarray,
              dominant: np.ndarray | None = None) -> None:
        """Global rows ``start:start+len(candidates)`` (a run of rows: each owner's share is a run of its
        local rows); ``dominant`` None: the first dq candidates."""
        rows = np.arange(start, start + len(candidates), dtype=np.int64)
        owner = self.layout.owner(rows)
        for rank in range(self.layout.world_size):
            m = owner == rank
            if not m.any():
                continue
            local0 = int(self.layout.local(rows[m][:1])[0])
            w = self.writers[rank]
            w.write(local0, candidates[m], scores[m])
            if dominant is not None:
                w.dominant[local0:local0 + int(m.sum())] = dominant[m]

    def commit(self) -> list[Path]:
        """Rename every shard's file into place (each atomically; the caller's commit point comes after)."""
        return [w.commit() for w in self.writers]

    def abort(self) -> None:
        for w in self.writers:
            w.abort()

    def __enter__(self) -> ShardedQueueWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
