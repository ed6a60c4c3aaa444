"""Compact arrays of strings: one byte buffer + offsets, with a hashed name → row lookup.

Ten million identity names or fifty million image paths as Python ``str`` objects cost
gigabytes; as one ``uint8`` buffer plus ``int64`` offsets they cost their bytes plus 8 per item.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


class StringArray(Sequence[str]):
    """An immutable sequence of strings stored as utf-8 bytes with offsets."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray) -> None:
        self.buffer = np.ascontiguousarray(buffer, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self._hashes: np.ndarray | None = None
        self._order: np.ndarray | None = None

    @classmethod
    def from_iter(cls, items: Iterable[str]) -> StringArray:
        builder = StringArrayBuilder()
        for s in items:
            builder.append(s)
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def encoded(self, i: int) -> bytes:
        """Item ``i`` as its utf-8 bytes (no decoding)."""
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def hashes(self) -> np.ndarray:
        """A 64-bit hash of every item (equal items hash equal; unequal ones may collide)."""
        return np.fromiter((_hash64(self.encoded(i)) for i in range(len(self))), dtype=np.int64, count=len(self))

    def unique(self) -> tuple[np.ndarray, np.ndarray]:
        """Group the items by value: ``(first, inverse)`` where ``first[k]`` is the row of the k-th distinct
        item in order of first appearance and ``inverse[i]`` its group. Hashes only find candidates; equal
        hashes are confirmed on the bytes, so two names that collide stay apart."""
        n = len(self)
        if n == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        h = self.hashes()
        order = np.argsort(h, kind="stable")
        sh = h[order]
        bounds = np.flatnonzero(np.r_[True, sh[1:] != sh[:-1], True])
        group = np.empty(n, dtype=np.int64)  # by sorted position
        runs = np.flatnonzero(np.diff(bounds) > 1)
        group_of_run = np.arange(len(bounds) - 1, dtype=np.int64)
        group[:] = np.repeat(group_of_run, np.diff(bounds))
        extra = len(bounds) - 1
        for r in runs.tolist():  # equal hashes: split by the bytes (a real collision is ~never seen)
            s, e = int(bounds[r]), int(bounds[r + 1])
            seen: dict[bytes, int] = {}
            for k in range(s, e):
                key = self.encoded(int(order[k]))
                if not seen:
                    seen[key] = int(group[k])
                elif key not in seen:
                    seen[key] = extra
                    extra += 1
                group[k] = seen[key]
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = group
        first = np.full(extra, n, dtype=np.int64)
        np.minimum.at(first, inverse, np.arange(n, dtype=np.int64))
        rank = np.empty(extra, dtype=np.int64)
        by_first = np.argsort(first, kind="stable")
        rank[by_first] = np.arange(extra)
        return first[by_first], rank[inverse]

    def duplicates(self) -> list[str]:
        """Items that occur more than once (by value), each once, in order of first appearance."""
        first, inverse = self.unique()
        counts = np.bincount(inverse, minlength=len(first))
        return [self[int(first[k])] for k in np.flatnonzero(counts > 1)]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self.encoded(int(i)).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self.encoded(i).decode("utf-8")

    def take(self, rows: np.ndarray) -> list[str]:
        return [self[int(r)] for r in rows]

    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes

    def _build_lookup(self) -> None:
        hashes = self.hashes()
        self._order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._order]

    def lookup(self, names: Iterable[str]) -> np.ndarray:
        """Rows of ``names`` (−1 where absent), by a sorted 64-bit hash table (16 bytes per item)."""
        if self._hashes is None:
            self._build_lookup()
        assert self._hashes is not None and self._order is not None
        out = []
        for name in names:
            key = name.encode("utf-8")
            h = _hash64(key)
            lo = int(np.searchsorted(self._hashes, h, side="left"))
            row = -1
            while lo < len(self._hashes) and self._hashes[lo] == h:
                cand = int(self._order[lo])
                if self.encoded(cand) == key:
                    row = cand
                    break
                lo += 1
            out.append(row)
        return np.asarray(out, dtype=np.int64)

    def index(self, name: str) -> int:  # type: ignore[override]
        row = int(self.lookup([name])[0])
        if row < 0:
            raise KeyError(name)
        return row


class StringArrayBuilder:
    """Appends strings into a growing byte buffer without keeping Python objects."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offsets = array("q", [0])

    def append(self, s: str) -> int:
        self._buf += s.encode("utf-8")
        self._offsets.append(len(self._buf))
        return len(self._offsets) - 2

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def build(self) -> StringArray:
        return StringArray(np.frombuffer(bytes(self._buf), dtype=np.uint8),
                           np.frombuffer(self._offsets.tobytes(), dtype=np.int64))
