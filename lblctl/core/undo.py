"""The undo journal: old values of every row first changed since the last checkpoint, so that a run
killed at any moment can put its tables back exactly as that checkpoint saw them. train-dp keeps the
dominant queues' here (``queu``); the store's rows roll back through the store's own log (provisional
commits, :meth:`lblctl.core.store.PrototypeStore.checkpoint`); ``prot``/``mome`` records of runs made
before that are still read and rolled back on resume.

A :class:`~lblctl.core.journal.RecordLog` (kind ``undo``): a ``checkpoint`` record (the step) and
then one ``undo`` record per batch of rows, each appended *before* the rows it saves are
overwritten. A record cut short by a kill is ignored on replay, which is harmless because its rows
had not been overwritten yet. ``reset(step)`` empties the log by truncation (no file is created or
removed per checkpoint).
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import numpy as np

from lblctl.core.journal import RecordLog, read_log

KIND = b"undo"
_CHECKPOINT, _UNDO = 1, 2
_STEP = struct.Struct("<q")
_UNDO_HEAD = struct.Struct("<4sqqq")  # table tag, count, cols, value kind (4 = float32, 1 = int32, 2 = float16)
_KINDS = {4: np.dtype("<f4"), 1: np.dtype("<i4"), 2: np.dtype("<f2")}


class UndoJournal:
    """Old values of rows, per table (``prot``, ``mome``, ``queu``…), since the last checkpoint.

    Thread-safe: train-dp's store thread and its main thread (queues) both record. Which rows were
    saved is a bit per row and table (N/8 bytes), so memory stays small at 10M identities.
    """

    def __init__(self, path: str | os.PathLike, num_rows: int) -> None:
        self.path = Path(path)
        self.num_rows = int(num_rows)
        self._touched: dict[str, np.ndarray] = {}
        self._log: RecordLog | None = None
        self._lock = threading.Lock()
        self.step = -1

    def reset(self, step: int) -> None:
        """Start an empty journal for checkpoint ``step`` (the log is truncated, then fsynced)."""
        if self._log is None:
            self._log = RecordLog(self.path, KIND, keep_records=False)
        self._log.reset(sync=False)
        self._log.append(_CHECKPOINT, _STEP.pack(int(step)))
        self._log.sync()
        with self._lock:
            self._touched = {}
        self.step = int(step)

    def first_touch(self, table: str, rows: np.ndarray) -> np.ndarray:
        """The subset of ``rows`` not yet saved for ``table`` since the checkpoint (marks them)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        with self._lock:
            seen = self._touched.setdefault(table, np.zeros((self.num_rows + 7) // 8, dtype=np.uint8))
            bits = (1 << (rows & 7)).astype(np.uint8)
            new = rows[(seen[rows >> 3] & bits) == 0]
            np.bitwise_or.at(seen, new >> 3, (1 << (new & 7)).astype(np.uint8))
        return new

    def record(self, table: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Append the old ``values`` of ``rows`` (before they are overwritten)."""
        if self._log is None:
            raise RuntimeError("undo journal: reset() before recording")
        if len(rows) == 0:
            return
        values = np.ascontiguousarray(values)
        kind = {dt: k for k, dt in _KINDS.items()}[values.dtype.newbyteorder("<")]
        tag = table.encode()[:4].ljust(4, b"_")
        self._log.append(_UNDO, _UNDO_HEAD.pack(tag, len(rows), values.shape[1], kind),
                         np.ascontiguousarray(rows, dtype="<i8"),
                         np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")))

    @staticmethod
    def read(path: str | os.PathLike) -> tuple[int, list[tuple[str, np.ndarray, np.ndarray]]]:
        """``(checkpoint step, [(table, rows, old values), …])``; a torn tail record is dropped."""
        records = read_log(path, KIND)
        if not records or records[0][0] != _CHECKPOINT:
            return -1, []
        (step,) = _STEP.unpack(records[0][1])
        out = []
        for rtype, payload in records[1:]:
            if rtype != _UNDO or len(payload) < _UNDO_HEAD.size:
                break
            tag, count, cols, kind = _UNDO_HEAD.unpack_from(payload, 0)
            dtype = _KINDS.get(kind)
            if dtype is None or len(payload) != _UNDO_HEAD.size + count * (8 + cols * dtype.itemsize):
                break
            rows = np.frombuffer(payload, dtype="<i8", count=count, offset=_UNDO_HEAD.size)
            values = np.frombuffer(payload, dtype=dtype, count=count * cols,
                                   offset=_UNDO_HEAD.size + 8 * count).reshape(count, cols)
            out.append((tag.decode().rstrip("_"), rows, values))
        return int(step), out

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
