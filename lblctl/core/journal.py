"""The one crash-safety layer: checksummed append-only records and atomic file replacement.

Every lblctl file that must survive ``kill -9`` (or power loss, where asked) is written in one of
two ways, both defined here and nowhere else:

* **Atomic replacement** (:func:`atomic_open`, :func:`atomic_write_bytes`): the new content goes
  to a temp file beside the target, is fsynced, renamed over the target, and the folder is fsynced.
  A crash leaves the old file or the new one under the name, never a mix.
* **A record log** (:class:`RecordLog`): one file, a 16-byte header (magic + what the log is for),
  then records ``type u32 · length u64 · crc32 u32 · payload``. Records are only appended; a record
  cut short by a crash (or damaged) fails its checksum, and it and everything after it are ignored
  (and cut off by the next writer). A log is emptied by truncation, never by creating or removing a
  file, so a steady writer touches one file for its whole life. Used by the store's write-ahead log,
  the queues' flush journal, train-dp's undo journal, align's row journal and imprint's staging.

``durable`` in these APIs means "fsync, so the data survives power loss"; without it the data
survives a killed process (it is in the kernel's page cache the moment ``write`` returns).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_MAGIC = b"LBLLOG01"
_FILE_HEAD = struct.Struct("<8s8s")  # magic, kind (what the log is for, padded with NULs)
_REC_HEAD = struct.Struct("<IQI")  # type, payload length, crc32 of (type, length, payload)
HEADER_SIZE = _FILE_HEAD.size


def _read_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else set-and-restore
    once at import, before any writer thread can exist."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def file_mode(mode: int = 0o666) -> int:
    """The permission bits a plain ``open`` would give a new file (umask applied, no process state touched)."""
    return mode & ~_UMASK


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or a new name in it survives power loss (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on success (fsync and) rename it over ``path``.

    A crash at any point leaves either the old file or the new one under the final name, never a
    half-written one. ``durable=False`` skips the two fsyncs (safe against a killed process, not
    against power loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)


# ----------------------------------------------------------------------------- record logs


def _crc(rtype: int, length: int, parts: Sequence[bytes | memoryview]) -> int:
    crc = zlib.crc32(struct.pack("<IQ", rtype, length))
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc


def _as_bytes_view(p: Any) -> memoryview:
    mv = memoryview(p)
    if not mv.c_contiguous:
        raise ValueError("record parts must be contiguous buffers")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _kind(kind: bytes | str) -> bytes:
    k = kind.encode() if isinstance(kind, str) else kind
    if len(k) > 8:
        raise ValueError(f"log kind {k!r}: at most 8 bytes")
    return k.ljust(8, b"\0")


def scan(data: bytes | memoryview, kind: bytes | str) -> tuple[list[tuple[int, memoryview, int]], int]:
    """``([(type, payload, offset), …], end)`` of the whole records in a log image; ``end`` is where
    the valid records stop (a torn or damaged tail begins there). A missing or foreign header
    yields no records and ``end = 0``."""
    mv = memoryview(data)
    if len(mv) < HEADER_SIZE:
        return [], 0
    magic, k = _FILE_HEAD.unpack_from(mv, 0)
    if magic != _MAGIC or k != _kind(kind):
        return [], 0
    pos, out = HEADER_SIZE, []
    while pos + _REC_HEAD.size <= len(mv):
        rtype, length, crc = _REC_HEAD.unpack_from(mv, pos)
        start = pos + _REC_HEAD.size
        if length > len(mv) - start:
            break
        payload = mv[start:start + length]
        if _crc(rtype, length, (payload,)) != crc:
            break
        out.append((rtype, payload, pos))
        pos = start + length
    return out, pos


def read_log(path: str | os.PathLike, kind: bytes | str) -> list[tuple[int, memoryview]]:
    """The whole records of the log at ``path`` (``[]`` when it does not exist), torn tail dropped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records, _ = scan(data, kind)
    return [(t, p) for t, p, _ in records]


def is_log(path: str | os.PathLike, kind: bytes | str) -> bool:
    """Whether ``path`` starts with the header of a ``kind`` log."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_SIZE)
    except OSError:
        return False
    return len(head) == HEADER_SIZE and _FILE_HEAD.unpack(head) == (_MAGIC, _kind(kind))


class RecordLog:
    """An append-only log of checksummed records in one file, held open by one writer.

    Opening it (``mode="a"``) reads the whole records already there (:attr:`records`, for a replay),
    cuts off a torn tail, and appends after them; :meth:`reset` empties it by truncation. Appends
    are thread-safe. ``durable=True`` fsyncs after every append.
    """

    def __init__(self, path: str | os.PathLike, kind: bytes | str, *, durable: bool = False,
                 keep_records: bool = True) -> None:
        self.path = Path(path)
        self.kind = _kind(kind)
        self.durable = durable
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            size = os.fstat(self._fd).st_size
            data = os.pread(self._fd, size, 0) if size else b""
            records, end = scan(data, self.kind)
            if end == 0:  # new, empty or foreign: start a fresh log
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, _FILE_HEAD.pack(_MAGIC, self.kind), 0)
                end = HEADER_SIZE
                if durable:
                    os.fsync(self._fd)
                    fsync_dir(self.path.parent)
            elif end < size:
                os.ftruncate(self._fd, end)  # a torn tail: the next record goes where it began
            self.torn_bytes = max(0, size - end) if size >= HEADER_SIZE else 0
            self.records: list[tuple[int, memoryview]] = [(t, p) for t, p, _ in records] if keep_records else []
            self._end = end
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def size(self) -> int:
        """Bytes in the log (header included)."""
        return self._end

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def empty(self) -> bool:
        return self._end <= HEADER_SIZE

    def append(self, rtype: int, *parts: Any) -> int:
        """Append one record made of ``parts`` (contiguous buffers); returns its offset."""
        views = [_as_bytes_view(p) for p in parts]
        length = sum(len(v) for v in views)
        head = _REC_HEAD.pack(rtype, length, _crc(rtype, length, views))
        with self._lock:
            at = self._end
            _pwritev_all(self._fd, [memoryview(head), *views], at)
            self._end = at + _REC_HEAD.size + length
            if self.durable:
                os.fsync(self._fd)
        return at

    def read_at(self, offset: int) -> tuple[int, bytes]:
        """``(type, payload)`` of the record at ``offset`` (as returned by :meth:`append`)."""
        head = os.pread(self._fd, _REC_HEAD.size, offset)
        rtype, length, crc = _REC_HEAD.unpack(head)
        payload = os.pread(self._fd, length, offset + _REC_HEAD.size)
        if len(payload) != length or _crc(rtype, length, (payload,)) != crc:
            raise OSError(f"{self.path}: damaged record at offset {offset}")
        return rtype, payload

    def sync(self) -> None:
        """fsync the log (what was appended survives power loss)."""
        os.fsync(self._fd)

    def reset(self, *, sync: bool = True) -> None:
        """Empty the log (truncate to its header); fsynced unless ``sync=False``."""
        with self._lock:
            os.ftruncate(self._fd, HEADER_SIZE)
            self._end = HEADER_SIZE
            self.records = []
            if sync:
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write every byte of ``views`` at ``offset`` (``pwritev`` may write less than asked)."""
    total = sum(len(v) for v in views)
    done = os.pwritev(fd, views, offset) if hasattr(os, "pwritev") else _pwrite_each(fd, views, offset)
    while done < total:  # rare: a short write; finish it piece by piece
        skip = done
        rest = []
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        done += os.pwrite(fd, rest[0], offset + done)


def _pwrite_each(fd: int, views: list[memoryview], offset: int) -> int:
    done = 0
    for v in views:
        done += os.pwrite(fd, v, offset + done)
    return done
