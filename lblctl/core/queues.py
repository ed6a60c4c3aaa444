"""The candidate and dominant queues of every identity (``STORE/queues.h5``) and their update API.

``build-index`` writes the file once; ``train-dp`` reads the queues to choose each step's classes
and calls :meth:`Queues.promote` with what the step predicted. Format (HDF5, contiguous datasets):

- ``candidates`` N×cq int32: each row's nearest other prototypes, best first, −1 padded; never
  the row itself.
- ``candidate_scores`` N×cq float32: their cosine similarities (NaN where padded).
- ``dominant`` N×dq int32: the hardest negatives, initially the first dq candidates; −1 padded.
- attrs: ``format``, ``num_rows``, ``candidates``, ``dominant``, ``embedding_size``,
  ``backbone_fingerprint``, ``index`` (a JSON description of the search that made it).

Crash safety (the one layer of :mod:`lblctl.core.journal`): a new file is written under a temp name
and renamed into place. Updates are kept in memory until :meth:`Queues.flush`, which first appends
the changed rows' *final* values as one checksummed record to the journal ``queues.h5.journal``
(fsynced), then writes them into the file in place, fsyncs it and empties the journal (by
truncation; the file goes when the queues are closed). Opening a file with a whole journal record
left by a crash replays it (replay is idempotent: it holds absolute values); a record cut short is
ignored (the file was not touched yet), so the file always reflects either the last flush or the
one before it, never a half-written mix. h5py is reached only through :mod:`lblctl.core.hdf5`.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lblctl.core import hdf5
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.journal import RecordLog, fsync_dir, read_log

QUEUES = "queues.h5"
FORMAT = "lblctl-queues-1"
JOURNAL_KIND = b"queues"
_FLUSH = 1  # journal record: count, dq, then rows i8 and dominant queues i4
_FLUSH_HEAD = struct.Struct("<qq")


def journal_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".journal")


def _journal_rows(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows and values of the last whole flush record in the journal, if any."""
    records = read_log(journal_path(path), JOURNAL_KIND)
    if not records:
        return None
    rtype, payload = records[-1]
    count, dq = _FLUSH_HEAD.unpack_from(payload, 0) if len(payload) >= _FLUSH_HEAD.size else (-1, -1)
    if rtype != _FLUSH or count < 0 or len(payload) != _FLUSH_HEAD.size + count * (8 + 4 * dq):
        raise IncompatibleArtifact(f"{journal_path(path)}: damaged queue journal; delete it to keep the "
                                   "queues as last flushed")
    rows = np.frombuffer(payload, dtype="<i8", count=count, offset=_FLUSH_HEAD.size)
    values = np.frombuffer(payload, dtype="<i4", count=count * dq, offset=_FLUSH_HEAD.size + 8 * count)
    return rows, values.reshape(count, dq)


class QueueWriter:
    """Writes a new queue file batch by batch under a temp name; :meth:`commit` renames it in place."""

    def __init__(self, path: str | os.PathLike, num_rows: int, cq: int, dq: int,
                 attrs: dict[str, Any] | None = None) -> None:
        if cq < 1 or dq < 0 or dq > cq:
            raise LblError(f"queue sizes: need candidates ≥ 1 and 0 ≤ dominant ≤ candidates (got {cq}, {dq})")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.num_rows, self.cq, self.dq = int(num_rows), int(cq), int(dq)
        self.h5 = hdf5.open_file(self.tmp, "w", libver="earliest")
        self.h5.attrs.update({"format": FORMAT, "num_rows": self.num_rows, "candidates": self.cq,
                              "dominant": self.dq})
        for key, value in (attrs or {}).items():
            self.h5.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
        # contiguous, fully allocated: in-place row updates later never touch HDF5 metadata
        kw: dict[str, Any] = {"track_times": False}
        n, cq, dq = self.num_rows, self.cq, self.dq
        self.candidates = self.h5.create_dataset("candidates", (n, cq), dtype=np.int32, **kw)
        self.scores = self.h5.create_dataset("candidate_scores", (n, cq), dtype=np.float32, **kw)
        self.dominant = self.h5.create_dataset("dominant", (n, dq), dtype=np.int32, **kw)
        self.written = 0

    def write(self, start: int, candidates: np.ndarray, scores: np.ndarray) -> None:
        """Rows ``start:start+len(candidates)``; the dominant queue is their first dq candidates."""
        stop = start + len(candidates)
        self.candidates[start:stop] = candidates
        self.scores[start:stop] = scores
        self.dominant[start:stop] = candidates[:, : self.dq]
        self.written += len(candidates)

    def set_attr(self, key: str, value: Any) -> None:
        self.h5.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value

    def commit(self) -> Path:
        if self.written != self.num_rows:
            self.abort()
            raise RuntimeError(f"queue file incomplete: {self.written} of {self.num_rows} rows written")
        self.h5.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        journal_path(self.path).unlink(missing_ok=True)  # a journal of an older file must not replay
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            self.h5.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> QueueWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class Queues:
    """An open queue file: read rows' queues, promote hard negatives, flush crash-safely."""

    def __init__(self, path: Path, h5: hdf5.File, mode: str) -> None:
        self.path = path
        self.h5 = h5
        self.mode = mode
        self._cand = h5["candidates"]
        self._scores = h5["candidate_scores"]
        self._dom = h5["dominant"]
        # scattered rows (the sampler reads S queues a step) through memory maps; writes still go through h5py
        self._cand_map, self._dom_map = hdf5.row_map(path, self._cand), hdf5.row_map(path, self._dom)
        self.num_rows = int(self._cand.shape[0])
        self.cq = int(self._cand.shape[1])
        self.dq = int(self._dom.shape[1])
        self._dirty: dict[int, np.ndarray] = {}
        self.promotions = 0
        self._journal: RecordLog | None = None

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, num_rows: int, cq: int, dq: int,
               attrs: dict[str, Any] | None = None) -> QueueWriter:
        return QueueWriter(path, num_rows, cq, dq, attrs)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, expect_rows: int | None = None,
             expect_embedding_size: int | None = None,
             expect_backbone_fingerprint: str | None = None) -> Queues:
        """Open ``queues.h5`` (or a store folder holding one); refuse a file that does not fit."""
        path = Path(path)
        if path.is_dir():
            path = path / QUEUES
        if mode not in ("r", "r+"):
            raise ValueError(f"mode {mode!r}: expected 'r' or 'r+'")
        if not path.is_file():
            raise LblError(f"{path}: no queue file; run `lblctl build-index --store {path.parent}` first")
        if journal_path(path).is_file():
            _replay_journal(path)
        h5 = hdf5.open_file(path, mode, what="HDF5 queue file", hint="; re-run build-index")
        if h5.attrs.get("format") != FORMAT or not {"candidates", "candidate_scores", "dominant"} <= set(h5):
            h5.close()
            raise IncompatibleArtifact(f"{path}: not an lblctl queue file; re-run build-index")
        q = cls(path, h5, mode)
        meta = q.meta
        if expect_rows is not None and q.num_rows != int(expect_rows):
            q.close()
            raise IncompatibleArtifact(f"{path}: queues for {meta['num_rows']} identities but the store has "
                                       f"{expect_rows}; re-run build-index")
        es, fp = meta.get("embedding_size"), meta.get("backbone_fingerprint")
        if expect_embedding_size is not None and es is not None and int(es) != int(expect_embedding_size):
            q.close()
            raise IncompatibleArtifact(f"{path}: queues built for embedding size {es}, expected "
                                       f"{expect_embedding_size}; re-run build-index")
        if expect_backbone_fingerprint and fp and fp != expect_backbone_fingerprint:
            q.close()
            raise IncompatibleArtifact(f"{path}: queues built from another backbone's store; "
                                       "re-run build-index")
        return q

    @property
    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.h5.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value[:1] in "{[":
                with contextlib.suppress(json.JSONDecodeError):
                    value = json.loads(value)
            out[key] = value.item() if isinstance(value, np.generic) else value
        return out

    # -- reading -------------------------------------------------------------------------------
    def candidates(self, rows: np.ndarray) -> np.ndarray:
        return hdf5.read_rows(self._cand, rows, self._cand_map)

    def candidate_scores(self, rows: np.ndarray) -> np.ndarray:
        return hdf5.read_rows(self._scores, rows)

    def dominant(self, rows: np.ndarray) -> np.ndarray:
        """The rows' dominant queues, including promotions not yet flushed."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = hdf5.read_rows(self._dom, rows, self._dom_map)
        if self._dirty:
            for i, r in enumerate(rows.tolist()):
                if r in self._dirty:
                    out[i] = self._dirty[r]
        return out

    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(start, candidates, candidate_scores)`` in row order, a chunk at a time."""
        for start in range(0, self.num_rows, chunk_rows):
            stop = min(self.num_rows, start + chunk_rows)
            yield start, self._cand[start:stop], self._scores[start:stop]

    def all_dominant(self) -> np.ndarray:
        """The whole dominant queue in RAM (N×dq int32: 80 bytes per identity at dq=20)."""
        out = self._dom[:]
        for r, q in self._dirty.items():
            out[r] = q
        return out

    # -- updating ------------------------------------------------------------------------------
    def promote(self, class_rows: np.ndarray, confused_rows: np.ndarray, *, class_ids: np.ndarray | None = None,
                id_rows: int | None = None) -> int:
        """For each pair, move ``confused`` to the front of ``class``'s dominant queue when it is in
        that class's candidate queue (the seed's rule); the last entry drops out when it was not in
        the dominant queue yet. Pairs apply in order; returns how many queues changed.

        A shard's queues (:mod:`lblctl.core.shards`) hold global rows: ``class_ids`` are then the
        classes' global rows (``class_rows`` their rows in this file) and ``id_rows`` the global count."""
        if self.mode != "r+":
            raise LblError(f"{self.path}: opened read-only; open with mode='r+' to update queues")
        cls_rows = np.asarray(class_rows, dtype=np.int64).reshape(-1)
        conf = np.asarray(confused_rows, dtype=np.int64).reshape(-1)
        ids = cls_rows if class_ids is None else np.asarray(class_ids, dtype=np.int64).reshape(-1)
        if cls_rows.shape != conf.shape or ids.shape != conf.shape:
            raise ValueError("promote: class_rows and confused_rows differ in length")
        keep = (conf != ids) & (conf >= 0) & (cls_rows >= 0)
        cls_rows, conf = cls_rows[keep], conf[keep]
        if cls_rows.size == 0 or self.dq == 0:
            return 0
        if cls_rows.max() >= self.num_rows or conf.max() >= (id_rows or self.num_rows):
            raise IndexError(f"promote: row out of range 0..{self.num_rows - 1}")
        uniq = np.unique(cls_rows)
        cands = hdf5.read_rows(self._cand, uniq, self._cand_map)
        in_cand = (cands[np.searchsorted(uniq, cls_rows)] == conf[:, None]).any(axis=1)
        cls_rows, conf = cls_rows[in_cand], conf[in_cand]
        if cls_rows.size == 0:
            return 0
        need = np.unique(cls_rows)
        current = self.dominant(need)
        queues = {int(r): current[i].copy() for i, r in enumerate(need.tolist())}
        changed = 0
        for c, x in zip(cls_rows.tolist(), conf.tolist(), strict=True):
            q = queues[c]
            if q[0] == x:
                continue
            hit = np.flatnonzero(q == x)
            end = int(hit[0]) if hit.size else self.dq - 1  # shift entries before it (or all but the last)
            q[1 : end + 1] = q[:end].copy()
            q[0] = x
            self._dirty[c] = q
            changed += 1
        self.promotions += changed
        return changed

    def restore(self, rows: np.ndarray, values: np.ndarray) -> int:
        """Set rows' dominant queues to saved values (undo to a checkpoint) and flush; where a row
        repeats, its first value wins (the oldest record is the checkpoint's state)."""
        if self.mode != "r+":
            raise LblError(f"{self.path}: opened read-only; open with mode='r+' to update queues")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.int32).reshape(len(rows), self.dq)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"restore: row out of range 0..{self.num_rows - 1}")
        _, first = np.unique(rows, return_index=True)
        for i in first.tolist():
            self._dirty[int(rows[i])] = values[i].copy()
        return self.flush()

    @property
    def pending(self) -> int:
        """Rows changed since the last flush."""
        return len(self._dirty)

    def flush(self) -> int:
        """Make the promotions durable (journal first, then in place); returns the rows written."""
        if not self._dirty:
            return 0
        rows = np.fromiter(sorted(self._dirty), dtype=np.int64, count=len(self._dirty))
        values = np.stack([self._dirty[int(r)] for r in rows]).astype("<i4")
        if self._journal is None:
            self._journal = RecordLog(journal_path(self.path), JOURNAL_KIND, durable=True, keep_records=False)
        self._journal.reset(sync=False)
        self._journal.append(_FLUSH, _FLUSH_HEAD.pack(len(rows), self.dq), rows.astype("<i8"), values)  # fsynced
        _write_rows(self._dom, rows, values)
        self.h5.flush()
        with open(self.path, "rb") as fh:
            os.fsync(fh.fileno())
        self._journal.reset(sync=False)  # a stale record would only rewrite the same values
        self._dirty.clear()
        return len(rows)

    def close(self) -> None:
        if self.h5.id.valid:
            if self.mode == "r+":
                self.flush()
            self._cand_map = self._dom_map = None
            self.h5.close()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
            journal_path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> Queues:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def _write_rows(ds: hdf5.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    hdf5.write_runs(ds, rows, values)


def _replay_journal(path: Path) -> None:
    """Finish the flush a crash interrupted (its record is whole), then drop the journal."""
    found = _journal_rows(path)
    if found is not None:
        rows, values = found
        with hdf5.open_file(path, "r+", what="HDF5 queue file") as h5:
            _write_rows(h5["dominant"], rows, values)
            h5.flush()
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        journal_path(path).unlink()  # an empty journal (a writer's, between flushes) is left alone
