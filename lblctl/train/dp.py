"""Dominant-prototype machinery: which K classes a step trains, how the queues learn from its
predictions, and the undo journal that lets a killed run roll the store back to its checkpoint.

Nothing here touches a file format directly: the store is :mod:`lblctl.core.store`, the queues are
:mod:`lblctl.core.queues`.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


class DominantSampler:
    """Chooses each step's K classes: S sampled identities, then their dominant queues, in order.

    The S identities come from a permutation of the trainable rows that depends only on
    (seed, epoch), so an epoch visits every trainable identity once. Queue members are taken
    column by column (every queue's first entry, then every second, …), so the hardest
    negatives of all S identities enter before the easier ones. Short queues are topped up with
    random rows. ``mode="random"`` skips the queues (Partial-FC-style baseline); ``"full"``
    selects every row.
    """

    def __init__(self, num_rows: int, trainable: np.ndarray, classes: int, sampled: int, seed: int,
                 mode: str = "dp") -> None:
        self.num_rows = int(num_rows)
        self.trainable = np.asarray(trainable, dtype=np.int64)
        self.mode = mode
        self.classes = self.num_rows if mode == "full" else min(int(classes), self.num_rows)
        self.sampled = min(int(sampled), self.classes, len(self.trainable))
        self.seed = int(seed)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.trainable) // self.sampled)

    def seeds(self, step: int) -> np.ndarray:
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.trainable)
        return perm[pos * self.sampled : (pos + 1) * self.sampled]

    def select(self, step: int, dominant_of: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
        """The K class rows of ``step``; the first ``sampled`` are the sampled identities."""
        seeds = self.seeds(step)
        if self.mode == "full":
            rest = np.setdiff1d(np.arange(self.num_rows), seeds, assume_unique=True)
            return np.concatenate([seeds, rest])
        chosen = [seeds]
        taken = set(seeds.tolist())
        need = self.classes - len(seeds)
        if self.mode == "dp" and dominant_of is not None and need > 0:
            flat = np.asarray(dominant_of(seeds)).T.reshape(-1)  # column-major: hardest first
            flat = flat[flat >= 0]
            _, first = np.unique(flat, return_index=True)
            ordered = flat[np.sort(first)]
            fresh = [r for r in ordered.tolist() if r not in taken][:need]
            taken.update(fresh)
            chosen.append(np.asarray(fresh, dtype=np.int64))
            need -= len(fresh)
        if need > 0:
            rng = np.random.default_rng([self.seed, 1, int(step)])
            extra: list[int] = []
            while len(extra) < need:
                for r in rng.integers(0, self.num_rows, size=2 * need + 8).tolist():
                    if r not in taken:
                        taken.add(r)
                        extra.append(r)
                        if len(extra) == need:
                            break
            chosen.append(np.asarray(extra, dtype=np.int64))
        return np.concatenate(chosen).astype(np.int64)


def hardest_wrong(cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, the class that scored highest among the wrong ones (= the predicted class
    whenever the prediction is wrong): the seed's signal for the dominant queues."""
    masked = cosine.detach().float().clone()
    masked[torch.arange(len(labels), device=masked.device), labels] = float("-inf")
    return masked.argmax(dim=1)


# ----------------------------------------------------------------------------- undo journal
_MAGIC = b"LBLUNDO1"
_HEAD = struct.Struct("<8sq")  # magic, checkpoint step
_REC = struct.Struct("<4sqqqI")  # table tag, count, cols, itemsize-kind, crc32 of payload


class UndoJournal:
    """Old values of every row first changed since the last checkpoint, so that a run killed
    at any moment can put the store and the queues back exactly as that checkpoint saw them.

    Each record is written (and flushed to the OS) *before* the rows it saves are overwritten;
    a record cut short by a kill is ignored on replay, which is harmless because its rows had
    not been overwritten yet. ``reset(step)`` starts a new, empty journal for a new checkpoint.
    """

    def __init__(self, path: str | os.PathLike, num_rows: int) -> None:
        self.path = Path(path)
        self.num_rows = int(num_rows)
        self._touched: dict[str, np.ndarray] = {}
        self._fh = None
        self._lock = threading.Lock()
        self.step = -1

    def reset(self, step: int) -> None:
        """Start an empty journal for checkpoint ``step`` (atomically replaces the old one)."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(_HEAD.pack(_MAGIC, int(step)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._touched = {}
        self.step = int(step)
        self._fh = open(self.path, "ab")  # noqa: SIM115 - held open between records, closed by close()

    def first_touch(self, table: str, rows: np.ndarray) -> np.ndarray:
        """The subset of ``rows`` not yet saved for ``table`` since the checkpoint (marks them)."""
        with self._lock:
            seen = self._touched.setdefault(table, np.zeros(self.num_rows, dtype=bool))
            rows = np.unique(np.asarray(rows, dtype=np.int64))
            new = rows[~seen[rows]]
            seen[new] = True
        return new

    def record(self, table: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Append the old ``values`` of ``rows`` (before they are overwritten)."""
        if self._fh is None:
            raise RuntimeError("undo journal: reset() before recording")
        if len(rows) == 0:
            return
        values = np.ascontiguousarray(values)
        kind = {np.dtype("<f4"): 4, np.dtype("<i4"): 1}[values.dtype.newbyteorder("<")]
        payload = np.asarray(rows, dtype="<i8").tobytes() + values.astype(values.dtype.newbyteorder("<")).tobytes()
        tag = table.encode()[:4].ljust(4, b"_")
        with self._lock:  # the store's writer thread and the main thread (queues) both record
            self._fh.write(_REC.pack(tag, len(rows), values.shape[1], kind, zlib.crc32(payload)) + payload)
            self._fh.flush()

    @staticmethod
    def read(path: str | os.PathLike) -> tuple[int, list[tuple[str, np.ndarray, np.ndarray]]]:
        """``(checkpoint step, [(table, rows, old values), …])``; a torn tail record is dropped."""
        data = Path(path).read_bytes()
        if len(data) < _HEAD.size or data[:8] != _MAGIC:
            return -1, []
        _, step = _HEAD.unpack_from(data, 0)
        pos, out = _HEAD.size, []
        while pos + _REC.size <= len(data):
            tag, count, cols, kind, crc = _REC.unpack_from(data, pos)
            dtype = np.dtype("<f4") if kind == 4 else np.dtype("<i4")
            size = count * 8 + count * cols * dtype.itemsize
            payload = data[pos + _REC.size : pos + _REC.size + size]
            if len(payload) < size or zlib.crc32(payload) != crc:
                break
            rows = np.frombuffer(payload[: count * 8], dtype="<i8")
            values = np.frombuffer(payload[count * 8 :], dtype=dtype).reshape(count, cols)
            out.append((tag.decode().rstrip("_"), rows, values))
            pos += _REC.size + size
        return int(step), out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
