"""The prototype store: one unit vector per identity, for millions of identities, on the host.

Layout of ``STORE/prototypes.h5`` (plain h5py reads every dataset):

* ``prototypes`` N×D (float32 or float16), ``row_step`` N (int64, the commit step that last wrote
  each row, −1 = as created) and, optionally, ``momentum`` N×D: virtual datasets over contiguous,
  early-allocated segments ``_segments/<k>/…``. Appending identities adds a segment and re-points
  the virtual datasets; nothing is rewritten. With momentum (``lblctl-store/2``) a segment holds
  ``rows`` n×2×D, each row beside its momentum, page-aligned: train-dp reads and writes both, so a
  random row costs one page (D 512 float32: 2 + 2 KB), not two; ``lblctl-store/1`` stores (rows and
  momentum in two datasets) are read and written as they are.
* ``identities`` N and ``id_photos`` N (variable-length utf-8; ``id_photos`` may hold "").
* ``committed_step`` (int64, shape 1): the step of the last commit.
* attributes ``format``, ``embedding_size``, ``backbone_fingerprint``, ``dtype``, ``has_momentum``.

Rows are read through ``np.memmap`` on the segments' file offsets (or a RAM copy when it fits) and
written back with ``pwrite`` at those offsets, so a random-row gather/scatter does not depend on N,
and the HDF5 library never writes while training runs: only structural changes (create, append, a
new backbone fingerprint) go through h5py. A writer pre-faults the mapping (``MADV_POPULATE_READ``)
when the file fits in memory, so that random rows then cost no page faults; the rows stay file-backed
pages (they are not anonymous memory, and the kernel may drop them under pressure).

Crash safety (kill -9 at any moment), through the one layer of :mod:`lblctl.core.journal`:
``scatter`` only stages rows in memory; ``commit(step)`` appends them as one checksummed record to
the active write-ahead log (the commit point) and keeps them in a bounded **write-back cache** in
memory; the data file is not touched. The cache is written to the file, and its log emptied, when
the cache (or the log) is full, at :meth:`flush` (train-dp calls ``flush(wait=False)`` at every
checkpoint) and at :meth:`close`. So a step creates no file, removes
none and dirties no random page of a multi-GB file: its traffic is one sequential append, whatever N.

The write-back runs **in the background**: the full cache is frozen with its log, new commits go to a
fresh cache and the other log (two fixed files, ``prototypes.wal`` and ``prototypes.wal2``, each
begun by a generation record, so a replay knows their order), and a flusher thread writes the
frozen rows with ``pwrite`` (never through a shared mapping: the kernel writes a page dirtied through
one back a whole folio at a time, up to the whole file for scattered rows, and the fsync that cleans
pages mapped writable flushes the TLB of every core per page), fsyncs the data file, and only then
empties the frozen log. Reads see live cache over frozen cache over the file. At most one write-back
is in flight (a second waits for it), so memory stays at most two caches.

**Provisional commits** (train-dp's steps, ``commit(step, provisional=True)``) write no record at all:
train-dp's unit of durability is its checkpoint, so a step's store traffic is a cache insert, whatever N.
:meth:`checkpoint` makes them one commit point (the cached rows as ``_ROWS`` records, in the cache's
own order, then a ``_CHECKPOINT`` record, fsynced); their write-back waits for the caller's release
(``flush(wait=False)``, once its own checkpoint is durable), so that ``open(..., recover_to=step)`` can
still reopen the store at the caller's previous checkpoint. When an interval's rows outgrow the cache,
they go to the data file early, each after an ``_UNDO`` record of what the file held (once per row and interval).

``open`` replays both logs' whole records in generation order (a record cut short by the kill is
ignored: its commit did not happen; a commit replayed onto a file that already holds it writes the
same bits): undo records after the last commit point put their rows back, then every commit up to
it is replayed, so every row is from the last completed commit point; ``recovery`` says what was
done. A reader opening a store whose writer died sees the same state without changing the file.
With ``durable=True`` every commit also fsyncs, which extends the guarantee to power loss.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lblctl.core.artifacts import MANIFEST, check_compatible, read_manifest, write_manifest
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.hdf5 import contiguous_dcpl
from lblctl.core.journal import RecordLog, fsync_dir, read_log
from lblctl.core.runtime import available_memory
from lblctl.core.strings import StringArray, StringArrayBuilder

FORMAT = "lblctl-store/2"  # a store with momentum keeps each row and its momentum side by side (one page)
FORMAT_SEPARATE = "lblctl-store/1"  # rows and momentum in two datasets (earlier stores; read and written as they are)
FILENAME = "prototypes.h5"
WAL_NAME = "prototypes.wal"
WAL2_NAME = "prototypes.wal2"  # the second log: commits go here while the first one's rows are written back
_LOG_NAMES = (WAL_NAME, WAL2_NAME)
LOCK_NAME = ".store.lock"
WAL_KIND = b"storewal"
_COMMIT = 1  # record type: one commit (a commit point of its own)
_GENERATION = 2  # record type: first record of a log made active by a rotation (order of the two logs)
_ROWS = 3  # record type: rows of a checkpoint, each with its step; they count once its _CHECKPOINT follows
_CHECKPOINT = 4  # record type: a commit point for the provisional commits so far (their _ROWS precede it)
_UNDO = 5  # record type: rows as the last commit point left them, saved before provisional rows overwrote them
_GEN = struct.Struct("<q")  # also a _CHECKPOINT's payload: its step
_COMMIT_HEAD = struct.Struct("<qqq")  # step, row count, has_momentum; then rows i8, [steps i8,] vectors, momentum
_RECORD_ROWS = 8192  # rows per record (and per write) when a whole cache is logged, spilled or written back
DEFAULT_WRITE_CACHE_ROWS = 65536
_NAME_CHUNK = 100_000
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
# Row datasets start on a page boundary, so that a row of up to a page never straddles two pages: a random
# row costs one page read, not two (D 512 float32 rows were half straddling). Older stores read the same.
_ALIGN = {"alignment_threshold": 4096, "alignment_interval": 4096}
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux ≥ 5.14
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _LIBC = None
_PAGE = mmap.PAGESIZE


def _normalise(vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] < 1e-12)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} row(s) are zero or not finite; "
                         "a prototype must be a unit vector")
    return v / norms


def cast(a: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """``a.astype(dtype)``, bit for bit (round to nearest even). float32 ↔ float16 goes through torch when the
    process has loaded it (train-dp has): its conversion is ~8× faster than numpy's here (1,024 × 512: 0.17 ms
    against 1.4 ms), a cost a float16 store pays several times a step. ``a`` itself when it has ``dtype``."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    torch = sys.modules.get("torch")  # never imported here: a process without it keeps numpy's cast
    if torch is not None and a.size >= 4096 and {a.dtype.str, dtype.str} == {"<f4", "<f2"} and a.flags.writeable:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float16 if dtype.str == "<f2"
                                                            else torch.float32).numpy()
    return a.astype(dtype)


def _as_strings(items: Iterable[str] | StringArray) -> StringArray:
    return items if isinstance(items, StringArray) else StringArray.from_iter(items)


def _duplicates(names: StringArray) -> list[str]:
    """Names that occur more than once (compared by value)."""
    return names.duplicates() if len(names) > 1 else []


class _WriteBack:
    """Committed rows not yet in the data file: at most ``capacity`` rows, kept in the store's dtype
    (so a gather returns the very bits the file will hold) with the step that wrote each."""

    def __init__(self, capacity: int, dim: int, dtype: np.dtype, momentum: bool) -> None:
        self.capacity = int(capacity)
        self.keys = np.zeros(0, dtype=np.int64)  # rows, sorted
        self.slots = np.zeros(0, dtype=np.int64)  # slot of each key
        self.vec = np.empty((self.capacity, dim), dtype=dtype)  # pages are touched (and count) only when used
        self.mom = np.empty((self.capacity, dim), dtype=dtype) if momentum else None
        self.step = np.empty(self.capacity, dtype=np.int64)
        self.puts = self.hits = 0

    def __len__(self) -> int:
        return len(self.keys)

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(insertion position in the sorted keys, hit mask)`` of each of ``rows``."""
        pos = np.searchsorted(self.keys, rows)
        hit = np.zeros(len(rows), dtype=bool)
        inside = pos < len(self.keys)
        hit[inside] = self.keys[pos[inside]] == rows[inside]
        return pos, hit

    def find(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(hit mask, slot of each hit)`` for ``rows``."""
        if not len(self.keys):
            return np.zeros(len(rows), dtype=bool), np.zeros(0, dtype=np.int64)
        pos, hit = self._locate(rows)
        return hit, self.slots[pos[hit]]

    def fits(self, rows: np.ndarray) -> bool:
        hit, _ = self.find(rows)
        return len(self.keys) + int((~hit).sum()) <= self.capacity

    def put(self, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None, step: int | np.ndarray) -> None:
        """Store sorted unique ``rows`` (the caller checked :meth:`fits`); ``step``: one, or one per row."""
        pos, hit = self._locate(rows)
        fresh = ~hit
        first, count = len(self.keys), int(fresh.sum())
        old = self.slots[pos[hit]]
        if count:
            self.keys = np.insert(self.keys, pos[fresh], rows[fresh])
            self.slots = np.insert(self.slots, pos[fresh], np.arange(first, first + count))
        step = np.broadcast_to(np.asarray(step, dtype=np.int64), (len(rows),))
        # fresh rows take the next slots: one slice, not a scatter (a scatter into pages never touched yet cost
        # ~4× more here: 1.9 ms against 0.47 ms per MB)
        new = slice(first, first + count)
        for buf, val in ((self.vec, vec), (self.mom, mom), (self.step, step)):
            if buf is None or val is None:
                continue
            if count:
                buf[new] = val if count == len(rows) else val[fresh]
            if count < len(rows):
                buf[old] = val[hit]
        self.puts += len(rows)
        self.hits += len(rows) - count

    def clear(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.slots = np.zeros(0, dtype=np.int64)

    def by_slot(self, size: int = _RECORD_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                np.ndarray]]:
        """``(rows, vectors, momentum, steps)`` in slot order (rows unsorted), ``size`` rows at a time: views of
        the cache, no copy (a checkpoint logs a 400 MB cache without the gather that row order costs: 0.35 s)."""
        rows = np.empty(len(self.keys), dtype=np.int64)
        rows[self.slots] = self.keys  # slots are 0..len-1: fresh rows take the next one
        for a in range(0, len(rows), size):
            b = min(a + size, len(rows))
            yield rows[a:b], self.vec[a:b], self.mom[a:b] if self.mom is not None else None, self.step[a:b]

    def chunks(self, size: int = _RECORD_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                               np.ndarray]]:
        """``(rows, vectors, momentum, steps)`` in row order, ``size`` rows at a time (bounded copies)."""
        for a in range(0, len(self.keys), size):
            keys, slots = self.keys[a:a + size], self.slots[a:a + size]
            yield keys, self.vec[slots], self.mom[slots] if self.mom is not None else None, self.step[slots]


class _Segment:
    """One contiguous run of rows [start, stop) and its memory maps."""

    def __init__(self, start: int, stop: int, vec_offset: int, step_offset: int,
                 mom_offset: int | None, stride: int, interleaved: bool = False) -> None:
        self.start, self.stop = start, stop
        self.vec_offset, self.step_offset, self.mom_offset = vec_offset, step_offset, mom_offset
        self.stride = stride  # bytes from one row to the next (2 rows' worth when interleaved)
        self.interleaved = interleaved  # ``rows`` n×2×D: row and its momentum are neighbours on the disk
        self.vec: np.ndarray | None = None
        self.step: np.ndarray | None = None
        self.mom: np.ndarray | None = None

    def read_bytes(self, which: str) -> int:
        """Bytes one row's read of ``which`` ("vec" or "mom") covers from its start: an interleaved row's
        read takes its momentum along, so "mom" then needs none of its own (0)."""
        return 0 if self.interleaved and which == "mom" else self.stride


class PrototypeStore:
    """A prototype store opened for reading (``mode="r"``, many readers) or writing (``"r+"``, one writer).

    Use :meth:`create` to make one and :meth:`open` to open one; both work as context managers.
    """

    def __init__(self) -> None:  # use create() / open()
        self.folder = Path()
        self.path = Path()
        self.mode = "r"
        self.cache = "mmap"
        self.durable = False
        self.recovery = "clean"
        self._attrs: dict[str, Any] = {}
        self._segments: list[_Segment] = []
        self._starts = np.zeros(1, dtype=np.int64)
        self._num_rows = 0
        self._dtype = DTYPES["float32"]
        self._dim = 0
        self._has_mom = False
        self._committed = -1
        self._ram_vec: np.ndarray | None = None
        self._ram_mom: np.ndarray | None = None
        self._p_rows = np.zeros(0, dtype=np.int64)
        self._p_vec = np.zeros((0, 0), dtype=np.float32)
        self._p_mom: np.ndarray | None = None
        self._names: StringArray | None = None
        self._id_photos: StringArray | None = None
        self._lock_fd: int | None = None
        self._data_fd: int | None = None
        self._complete_on_close = False
        self._filled: np.ndarray | None = None  # rows written so far, for a store being created
        self._manifest_meta: dict[str, Any] = {}
        self._closed = False
        self._populated = False
        self._no_populate = False  # MADV_POPULATE_READ refused (kernel < 5.14)
        self._advise_fd: int | None = None
        self._wb: _WriteBack | None = None
        self._frozen: _WriteBack | None = None  # rows being written back by the flusher thread
        self._spare: _WriteBack | None = None  # buffers of the last written-back cache, for reuse
        self._logs: list[RecordLog | None] = [None, None]  # WAL_NAME, WAL2_NAME
        self._active = 0
        self._generation = 0
        self._flusher: threading.Thread | None = None
        self._flush_error: BaseException | None = None
        self._held = False  # the frozen cache is a checkpoint the caller has not released to the data file yet
        self._frozen_log: RecordLog | None = None
        self._frozen_step = -1
        self._unlogged = False  # the live cache holds provisional commits: in no log record yet
        self._spilled = np.zeros(0, dtype=np.int64)  # rows with provisional values in the file (undo logged)
        self._reader: ThreadPoolExecutor | None = None  # prefetch: posix_fadvise off the caller's thread
        self._reads_queued = 0
        self._reads_lock = threading.Lock()
        self._wal_limit = 0
        self.stats: dict[str, float] = {"commits": 0, "commit_s": 0.0, "wal_bytes": 0, "flushes": 0,
                                        "flush_s": 0.0, "flushed_rows": 0, "flush_wait_s": 0.0,
                                        "background_flushes": 0, "checkpoints": 0, "spills": 0,
                                        "spilled_rows": 0}

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, folder: str | os.PathLike, embedding_size: int, names: Iterable[str] | StringArray,
               dtype: str = "float32", backbone_fingerprint: str | None = None, *,
               id_photos: Iterable[str] | StringArray | None = None, momentum: bool = False,
               vectors: np.ndarray | None = None, params: dict[str, Any] | None = None,
               inputs: dict[str, Any] | None = None, cache: str = "auto", durable: bool = False,
               overwrite: bool = False) -> PrototypeStore:
        """Make ``folder/prototypes.h5`` with one row per name and return it open for writing.

        Rows not given in ``vectors`` must be written with :meth:`fill` before :meth:`close`;
        ``close`` (or leaving the ``with`` block without an error) writes the manifest that makes
        the store openable, so a half-filled store is never taken for a whole one.
        """
        folder = Path(folder)
        if dtype not in DTYPES:
            raise LblError(f"--dtype {dtype}: expected float32 or float16")
        if embedding_size < 1:
            raise LblError(f"embedding size {embedding_size}: must be positive")
        names = _as_strings(names)
        photos = _as_strings(id_photos) if id_photos is not None else None
        if photos is not None and len(photos) != len(names):
            raise ValueError(f"id_photos has {len(photos)} entries for {len(names)} names")
        dups = _duplicates(names)
        if dups:
            raise LblError(f"{len(dups)} identity name(s) occur twice (e.g. '{dups[0]}'); "
                           "names must be unique")
        path = folder / FILENAME
        if path.exists() and not overwrite:
            raise LblError(f"{path}: already exists; choose a new folder or remove it")
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (folder / MANIFEST, folder / WAL_NAME, folder / WAL2_NAME):
            stale.unlink(missing_ok=True)
        tmp = folder / (FILENAME + ".creating")
        tmp.unlink(missing_ok=True)
        n = len(names)
        with h5py.File(tmp, "w", **_ALIGN) as f:
            f.attrs["format"] = FORMAT if momentum else FORMAT_SEPARATE
            f.attrs["embedding_size"] = int(embedding_size)
            f.attrs["backbone_fingerprint"] = backbone_fingerprint or ""
            f.attrs["dtype"] = dtype
            f.attrs["has_momentum"] = bool(momentum)
            f.create_dataset("committed_step", shape=(1,), dtype="<i8", dcpl=contiguous_dcpl())[0] = -1
            sdt = h5py.string_dtype("utf-8")
            f.create_dataset("identities", shape=(0,), maxshape=(None,), dtype=sdt, chunks=(8192,))
            f.create_dataset("id_photos", shape=(0,), maxshape=(None,), dtype=sdt, chunks=(8192,))
            _add_segment(f, n, int(embedding_size), DTYPES[dtype], bool(momentum))
            _append_strings(f["identities"], names)
            _append_strings(f["id_photos"], photos, n)
        os.replace(tmp, path)
        store = cls._open(folder, "r+", cache=cache, durable=durable, need_manifest=False)
        store._names = names
        store._complete_on_close = True
        store._filled = np.zeros(n, dtype=bool)
        store._manifest_meta = {"params": params or {}, "inputs": inputs or {}}
        if vectors is not None:
            store.fill(0, vectors)
        return store

    @classmethod
    def open(cls, folder: str | os.PathLike, mode: str = "r", expect_embedding_size: int | None = None,
             expect_backbone_fingerprint: str | None = None, cache: str = "auto", durable: bool = False,
             ram_limit_bytes: int | None = None, populate: bool | None = None,
             write_cache_rows: int | None = None, recover_to: int | None = None) -> PrototypeStore:
        """Open a store; refuse (``IncompatibleArtifact``) one of another embedding size or backbone.

        ``cache``: ``ram`` reads the rows into memory, ``mmap`` maps the file, ``auto`` uses RAM
        when the rows take at most ``ram_limit_bytes`` (default: 1 GiB and ≤ ¼ of free memory).
        ``populate`` (mmap only) pre-faults the mapping so that random rows cost no page faults later
        (it reads the file into the page cache once); default: for writers, when the rows take at most
        80 % of the available memory (MemAvailable, which counts the page cache).
        ``durable`` fsyncs every commit (power-loss safe, ~10–100 ms a commit).
        ``write_cache_rows`` (writers): committed rows kept in memory before they are written to the
        file in row order (default 65,536, fewer when memory is short); its memory is
        ``rows × D × itemsize × (2 with momentum)``, twice that while a write-back runs in the background.
        ``recover_to``: recover the state of the last commit point at or before this step, dropping the later
        ones still in the log (train-dp's resume: the store goes back to the run's own checkpoint, which a
        kill may have left one store checkpoint behind); ``None``: the last commit point.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode {mode!r}: expected 'r' or 'r+'")
        if cache not in ("auto", "ram", "mmap"):
            raise LblError(f"cache {cache!r}: expected auto, ram or mmap")
        folder = Path(folder)
        if folder.name == FILENAME:
            folder = folder.parent
        store = cls._open(folder, mode, cache=cache, durable=durable, need_manifest=True,
                          ram_limit_bytes=ram_limit_bytes, populate=populate, write_cache_rows=write_cache_rows,
                          recover_to=recover_to)
        try:
            check_compatible(str(folder), {"embedding_size": store.embedding_size,
                                           "backbone_fingerprint": store.backbone_fingerprint},
                             expect_embedding_size, expect_backbone_fingerprint)
        except BaseException:
            store.close(complete=False)
            raise
        return store

    @classmethod
    def _open(cls, folder: Path, mode: str, *, cache: str, durable: bool, need_manifest: bool,
              ram_limit_bytes: int | None = None, populate: bool | None = None,
              write_cache_rows: int | None = None, recover_to: int | None = None) -> PrototypeStore:
        path = folder / FILENAME
        if not path.is_file():
            raise LblError(f"{folder}: no {FILENAME}; make a store with `lblctl imprint`")
        if need_manifest:
            if not (folder / MANIFEST).is_file():
                raise IncompatibleArtifact(f"{folder}: store was never completed (no {MANIFEST}); "
                                           "re-run `lblctl imprint` (with --resume)")
            read_manifest(folder, kind="store")
        self = cls()
        self.folder, self.path, self.mode, self.durable = folder, path, mode, durable
        if mode == "r+":
            self._lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise LblError(f"{folder}: another process has this store open for writing; "
                               "wait for it or open read-only") from None
            if not os.access(path, os.W_OK):
                self.close(complete=False)
                raise LblError(f"{path}: not writable; open it read-only or fix its permissions")
        try:
            self._read_layout()
            self._map()
            self._make_write_cache(write_cache_rows)
            self._recover(recover_to)
            self._choose_cache(cache, ram_limit_bytes)
            self._populate(populate)
        except BaseException:
            self.close(complete=False)
            raise
        return self

    def _read_layout(self) -> None:
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise IncompatibleArtifact(f"{self.path}: not a readable HDF5 store (truncated or another "
                                       f"format: {str(exc).splitlines()[0][:120]})") from None
        with f:
            if f.attrs.get("format") not in (FORMAT, FORMAT_SEPARATE):
                raise IncompatibleArtifact(f"{self.path}: not an lblctl prototype store "
                                           f"(format {FORMAT} or {FORMAT_SEPARATE} expected)")
            self._attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            self._dim = int(self._attrs["embedding_size"])
            self._dtype = DTYPES[str(self._attrs["dtype"])]
            self._has_mom = bool(self._attrs["has_momentum"])
            row_bytes = self._dim * self._dtype.itemsize
            segs = []
            for key in sorted(f["_segments"], key=int):
                g = f["_segments"][key]
                inter = "rows" in g
                offs = [g[n].id.get_offset() for n in ("rows" if inter else "prototypes", "row_step")]
                if inter:
                    mom_off = None if offs[0] is None else offs[0] + row_bytes
                else:
                    mom_off = g["momentum"].id.get_offset() if self._has_mom else None
                start = int(g.attrs["start"])
                stop = start + g["row_step"].shape[0]
                if stop > start and (None in offs or (self._has_mom and mom_off is None)):
                    raise IncompatibleArtifact(f"{self.path}: segment {key} is not contiguous on disk")
                segs.append(_Segment(start, stop, int(offs[0] or 0), int(offs[1] or 0),
                                     None if mom_off is None else int(mom_off),
                                     row_bytes * (2 if inter else 1), inter))
            commit_off = f["committed_step"].id.get_offset()
        self._num_rows = segs[-1].stop if segs else 0
        if self._num_rows != sum(s.stop - s.start for s in segs):
            raise IncompatibleArtifact(f"{self.path}: segments do not tile the rows; the file is damaged")
        size = self.path.stat().st_size
        for s in segs:
            n = s.stop - s.start
            ends = [s.vec_offset + n * s.stride, s.step_offset + 8 * n]
            if s.mom_offset is not None and not s.interleaved:
                ends.append(s.mom_offset + n * s.stride)
            if n and max(ends) > size:
                raise IncompatibleArtifact(f"{self.path}: {size} bytes, too short for its "
                                           f"{self._num_rows} rows "
                                           "(truncated); re-create the store")
        self._segments = segs
        self._starts = np.asarray([s.start for s in segs], dtype=np.int64)
        self._commit_offset = int(commit_off)

    def _map_segment(self, s: _Segment, mm_mode: str) -> _Segment:
        """``s`` with memory maps of its rows, steps and momentum (``s`` itself, mapped in place)."""
        n = s.stop - s.start
        if n == 0:
            s.vec = np.zeros((0, self._dim), dtype=self._dtype)
            s.step = np.zeros(0, dtype="<i8")
            s.mom = np.zeros((0, self._dim), dtype=self._dtype) if self._has_mom else None
            return s
        s.step = np.memmap(self.path, dtype="<i8", mode=mm_mode, offset=s.step_offset, shape=(n,))
        if s.interleaved:  # one map; the row and its momentum are two strided views of it
            both = np.memmap(self.path, dtype=self._dtype, mode=mm_mode, offset=s.vec_offset,
                             shape=(n, 2, self._dim))
            s.vec, s.mom = both[:, 0, :], both[:, 1, :]
            return s
        s.vec = np.memmap(self.path, dtype=self._dtype, mode=mm_mode, offset=s.vec_offset, shape=(n, self._dim))
        if self._has_mom:
            s.mom = np.memmap(self.path, dtype=self._dtype, mode=mm_mode, offset=s.mom_offset, shape=(n, self._dim))
        return s

    def _map(self) -> None:
        mm_mode = "r+" if self.mode == "r+" else "r"
        for s in self._segments:
            self._map_segment(s, mm_mode)
        self._committed = int(np.memmap(self.path, dtype="<i8", mode="r", offset=self._commit_offset, shape=(1,))[0])
        if self.mode == "r+" and self._data_fd is None:
            self._data_fd = os.open(self.path, os.O_RDWR)

    def _choose_cache(self, cache: str, ram_limit_bytes: int | None) -> None:
        nbytes = self._num_rows * self._dim * self._dtype.itemsize * (2 if self._has_mom else 1)
        if cache == "auto":
            limit = ram_limit_bytes if ram_limit_bytes is not None else min(1 << 30, available_memory() // 4)
            cache = "ram" if nbytes <= limit else "mmap"
        self.cache = cache
        if cache == "ram":
            self._ram_vec = self._concat("vec")
            self._ram_mom = self._concat("mom") if self._has_mom else None
        else:
            self._ram_vec = self._ram_mom = None

    def _populate(self, populate: bool | None) -> None:
        if self.cache != "mmap":
            return
        maps = [mm for s in self._segments for mm in (s.vec, s.step, s.mom) if isinstance(mm, np.memmap)]
        if populate is None:
            nbytes = sum(mm.nbytes for mm in maps)
            populate = self.mode == "r+" and nbytes <= 0.8 * available_memory()
        if not populate:
            return
        raws = {id(r): r for r in (getattr(mm, "_mmap", None) for mm in maps) if r is not None}
        for raw in raws.values():
            try:
                raw.madvise(_MADV_POPULATE_READ)  # elsewhere a no-op
            except (AttributeError, OSError, ValueError):
                return
        self._populated = True

    def _advise(self, rows: np.ndarray, which: str) -> None:
        """Ask the kernel to read the rows' pages now, all at once (a cold page cache then costs
        about one disk latency per gather instead of one per row, paid in turn by the page faults)."""
        for s, _, r in self._by_segment(rows):
            length = s.read_bytes(which)
            if length:  # 0: an interleaved row's momentum, read with its row
                base = s.vec_offset if which == "vec" else (s.mom_offset or 0)
                self._advise_offsets(base + r * s.stride, length)

    def _by_segment(self, rows: np.ndarray) -> Iterator[tuple[_Segment, slice | np.ndarray, np.ndarray]]:
        """``(segment, which of rows fall in it, those rows local to it)`` for each segment ``rows`` touch."""
        segments = self._segments
        if len(segments) == 1:
            yield segments[0], slice(None), rows - segments[0].start
            return
        seg = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(seg).tolist():
            s, m = segments[k], seg == k
            yield s, m, rows[m] - s.start

    def _advise_offsets(self, offsets: np.ndarray, length: int) -> None:
        """posix_fadvise(WILLNEED) for ``length`` bytes at each offset: the reads go out together."""
        fd = self._data_fd  # a writer's own descriptor (the flusher thread uses it too); readers open one
        if fd is None:
            if self._advise_fd is None:
                try:
                    self._advise_fd = os.open(self.path, os.O_RDONLY)
                except OSError:
                    self._advise_fd = -1
            fd = self._advise_fd
        if fd < 0 or not hasattr(os, "posix_fadvise"):
            return
        for off in np.unique(offsets).tolist():
            os.posix_fadvise(fd, int(off), length, os.POSIX_FADV_WILLNEED)

    def _map_rows(self, rows: np.ndarray, which: str) -> None:
        """Map the rows' pages into this process (``MADV_POPULATE_READ``, one call per row, through ctypes,
        which releases the GIL). A page in the page cache but not yet in this process's page table costs a
        fault at the first touch: 5–30 ms for a 1,024-row gather here, against 1–2 ms once mapped; this
        pays them on the read-ahead thread instead of the gathering one."""
        if _LIBC is None or self._no_populate or self._closed:
            return
        for s, _, r in self._by_segment(rows):
            mm, span = getattr(s, which), s.read_bytes(which)
            if not isinstance(mm, np.memmap) or not span:
                continue  # 0: an interleaved row's momentum, mapped with its row
            addr = mm.ctypes.data + r * s.stride
            first = addr - addr % _PAGE
            length = (addr + span + _PAGE - 1) // _PAGE * _PAGE - first
            for a, n in zip(first.tolist(), length.tolist(), strict=True):
                if self._closed:
                    return
                if _LIBC.madvise(a, n, _MADV_POPULATE_READ) != 0:
                    self._no_populate = True  # an older kernel (EINVAL): the gather takes the faults
                    return

    def _concat(self, attr: str) -> np.ndarray:
        out = np.empty((self._num_rows, self._dim), dtype=self._dtype)
        for s in self._segments:
            out[s.start:s.stop] = getattr(s, attr)
        return out

    # ------------------------------------------------------------------ properties

    @property
    def num_rows(self) -> int:
        return self._num_rows

    def __len__(self) -> int:
        return self._num_rows

    @property
    def embedding_size(self) -> int:
        return self._dim

    @property
    def dtype(self) -> str:
        return "float16" if self._dtype.itemsize == 2 else "float32"

    @property
    def has_momentum(self) -> bool:
        return self._has_mom

    @property
    def backbone_fingerprint(self) -> str | None:
        return str(self._attrs.get("backbone_fingerprint") or "") or None

    @property
    def committed_step(self) -> int:
        """Step of the last completed commit (−1: never committed since creation)."""
        return self._committed

    @property
    def pending_rows(self) -> int:
        return len(self._p_rows)

    @property
    def names(self) -> StringArray:
        """Identity names (row order), with ``.lookup(names)`` → rows (−1 where absent)."""
        if self._names is None:
            self._names = self._read_strings("identities")
        return self._names

    @property
    def id_photos(self) -> StringArray:
        """ID photo path of each identity ("" where the store was made from features)."""
        if self._id_photos is None:
            self._id_photos = self._read_strings("id_photos")
        return self._id_photos

    def _read_strings(self, name: str) -> StringArray:
        builder = StringArrayBuilder()
        with h5py.File(self.path, "r") as f:
            ds = f[name]
            for a in range(0, ds.shape[0], _NAME_CHUNK):
                for s in ds[a:a + _NAME_CHUNK]:
                    builder.append(s.decode("utf-8") if isinstance(s, bytes) else str(s))
        return builder.build()

    # ------------------------------------------------------------------ reading

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self._num_rows):
            raise IndexError(f"row out of range 0..{self._num_rows - 1}")
        return rows

    def _file_rows(self, rows: np.ndarray, which: str) -> np.ndarray:
        """``rows`` as the data file (or its RAM copy) holds them, in the store's dtype; no cache over them."""
        ram = self._ram_vec if which == "vec" else self._ram_mom
        if ram is None and not self._populated and len(rows) >= 64:
            self._advise(rows, which)
        if ram is not None:
            return ram[rows]
        if len(self._segments) == 1:
            return getattr(self._segments[0], which)[rows]
        out = np.empty((len(rows), self._dim), dtype=self._dtype)
        for s, m, r in self._by_segment(rows):
            out[m] = getattr(s, which)[r]
        return out

    def _file_steps(self, rows: np.ndarray) -> np.ndarray:
        """Commit step of each row as the data file holds it (no cache over it)."""
        out = np.empty(len(rows), dtype=np.int64)
        for s, m, r in self._by_segment(rows):
            out[m] = s.step[r]
        return out

    def _base(self, rows: np.ndarray, which: str) -> np.ndarray:
        """Committed values of ``rows`` as float32: the write-back cache over the RAM copy or the file."""
        out = cast(self._file_rows(rows, which), np.float32)  # a fresh array: ours to patch
        for wb in (self._frozen, self._wb):  # live over frozen: the newest commit of a row wins
            if wb is not None and len(wb):
                hit, slots = wb.find(rows)
                if len(slots):
                    out[hit] = cast((wb.vec if which == "vec" else wb.mom)[slots], np.float32)
        return out

    def _overlay(self, rows: np.ndarray, out: np.ndarray, pending: np.ndarray | None) -> np.ndarray:
        if len(self._p_rows) and pending is not None:
            pos = np.minimum(np.searchsorted(self._p_rows, rows), len(self._p_rows) - 1)
            hit = self._p_rows[pos] == rows
            if hit.any():
                out[hit] = pending[pos[hit]]
        return out

    def prefetch(self, rows: np.ndarray) -> None:
        """A hint: ``rows`` (and their momentum) will be gathered soon, so start reading their pages now
        (``posix_fadvise(WILLNEED)``, all at once; it returns without waiting for the disk). Nothing to
        do for a RAM copy or a pre-faulted mapping."""
        self._check_open()
        if self._ram_vec is not None or self._populated:
            return
        rows = self._check_rows(rows)
        with self._reads_lock:
            if not len(rows) or self._reads_queued >= 4:  # a hint: dropped when the disk is that far behind
                return
            self._reads_queued += 1
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="lblctl-readahead")
        self._reader.submit(self._read_ahead, rows)

    def _read_ahead(self, rows: np.ndarray) -> None:
        """The readahead thread: one posix_fadvise per page run (each waits while the disk queue is full,
        ~70 µs a page here, so it must not run on the thread that gathers)."""
        try:
            kinds = ("vec", "mom") if self._has_mom else ("vec",)
            for which in kinds:  # every read asked for at once (the disk serves them in parallel) ...
                self._advise(rows, which)
            for which in kinds:  # ... then mapped here, so that the gather takes no page fault
                self._map_rows(rows, which)
        except (OSError, ValueError):
            pass  # a hint only (the store may be closing)
        finally:
            with self._reads_lock:
                self._reads_queued -= 1

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows as a K×D float32 array (staged, uncommitted rows included)."""
        self._check_open()
        rows = self._check_rows(rows)
        return self._overlay(rows, self._base(rows, "vec"), self._p_vec)

    def gather_momentum(self, rows: np.ndarray) -> np.ndarray:
        self._check_open()
        if not self._has_mom:
            raise LblError(f"{self.folder}: this store keeps no momentum (create it with momentum=True)")
        rows = self._check_rows(rows)
        return self._overlay(rows, self._base(rows, "mom"), self._p_mom)

    def row_steps(self, rows: np.ndarray) -> np.ndarray:
        """Commit step that last wrote each row (−1: as created)."""
        rows = self._check_rows(rows)
        out = self._file_steps(rows)
        for wb in (self._frozen, self._wb):
            if wb is not None and len(wb):
                hit, slots = wb.find(rows)
                out[hit] = wb.step[slots]
        return out

    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Stream every row in order as (start, float32 array), without loading the whole store."""
        self._check_open()
        for start in range(0, self._num_rows, max(1, int(chunk_rows))):
            rows = np.arange(start, min(self._num_rows, start + chunk_rows), dtype=np.int64)
            yield start, self._overlay(rows, self._base(rows, "vec"), self._p_vec)

    # ------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode != "r+":
            raise LblError(f"{self.folder}: opened read-only; open it with mode='r+' to write")

    def scatter(self, rows: np.ndarray, vectors: np.ndarray, step: int | None = None,
                momentum: np.ndarray | None = None, normalised: bool = False) -> None:
        """Stage new values of ``rows`` (renormalised to unit length); ``step`` given = commit now.

        A row given twice keeps its last vector. Nothing reaches the file before :meth:`commit`.
        """
        self._check_writable()
        rows = self._check_rows(rows)
        vecs = np.asarray(vectors, dtype=np.float32).reshape(len(rows), self._dim)
        if normalised:  # the caller normalised them (and keeps the same bits in memory): check only
            norms = np.linalg.norm(vecs, axis=1)
            if not np.all(np.abs(norms - 1.0) < 1e-2):
                raise ValueError("scatter(normalised=True): rows are not unit vectors")
        else:
            vecs = _normalise(vecs, "scatter")
        mom = None
        if momentum is not None:
            if not self._has_mom:
                raise LblError(f"{self.folder}: this store keeps no momentum (create it with momentum=True)")
            mom = np.asarray(momentum, dtype=np.float32).reshape(len(rows), self._dim)
        self._stage(rows, vecs, mom)
        if step is not None:
            self.commit(step)

    def scatter_momentum(self, rows: np.ndarray, momentum: np.ndarray) -> None:
        """Stage new optimiser momentum for ``rows`` (kept as is, not normalised)."""
        self._check_writable()
        if not self._has_mom:
            raise LblError(f"{self.folder}: this store keeps no momentum (create it with momentum=True)")
        rows = self._check_rows(rows)
        self._stage(rows, None, np.asarray(momentum, dtype=np.float32).reshape(len(rows), self._dim))

    def _stage(self, rows: np.ndarray, vecs: np.ndarray | None, mom: np.ndarray | None) -> None:
        rev = rows[::-1]
        urows, first = np.unique(rev, return_index=True)  # last occurrence wins
        keep = len(rows) - 1 - first
        vecs = vecs[keep] if vecs is not None else None
        mom = mom[keep] if mom is not None else None
        if len(self._p_rows):
            pos = np.minimum(np.searchsorted(self._p_rows, urows), len(self._p_rows) - 1)
            hit = self._p_rows[pos] == urows
        else:
            pos = np.zeros(len(urows), dtype=np.int64)
            hit = np.zeros(len(urows), dtype=bool)
        if hit.any():
            if vecs is not None:
                self._p_vec[pos[hit]] = vecs[hit]
            if mom is not None and self._p_mom is not None:
                self._p_mom[pos[hit]] = mom[hit]
        new = ~hit
        if new.all() and not len(self._p_rows) and vecs is not None and (mom is not None or not self._has_mom):
            self._p_rows, self._p_vec, self._p_mom = urows, vecs, mom  # nothing staged yet: already sorted
            return
        if new.any():
            nrows = urows[new]
            nvec = vecs[new] if vecs is not None else self._base(nrows, "vec")
            nmom = None
            if self._has_mom:
                nmom = mom[new] if mom is not None else self._base(nrows, "mom")
            all_rows = np.concatenate([self._p_rows, nrows])
            order = np.argsort(all_rows, kind="stable")
            self._p_rows = all_rows[order]
            pv = self._p_vec if len(self._p_vec) else np.zeros((0, self._dim), dtype=np.float32)
            self._p_vec = np.concatenate([pv, nvec.astype(np.float32)])[order]
            if self._has_mom:
                pm = self._p_mom if self._p_mom is not None else np.zeros((0, self._dim), dtype=np.float32)
                self._p_mom = np.concatenate([pm, nmom.astype(np.float32)])[order]

    def discard(self) -> None:
        """Forget staged rows (the store stays at its committed step)."""
        self._p_rows = np.zeros(0, dtype=np.int64)
        self._p_vec = np.zeros((0, self._dim), dtype=np.float32)
        self._p_mom = None

    def commit(self, step: int, provisional: bool = False) -> None:
        """Make the staged rows the committed state of ``step``: one record appended to the
        write-ahead log (the commit point), the rows kept in the write-back cache.

        ``provisional=True`` (train-dp's steps): no record; the commit reaches the log only with the next
        :meth:`checkpoint`, and a kill before that returns the store to the last commit point. The rows
        stay in the cache; when it is full they go to the data file, after an undo record of what the file
        held (once per row and checkpoint), so a step's store traffic is a cache insert, whatever N is.
        """
        self._check_writable()
        step = int(step)
        if step < 0:
            raise ValueError(f"commit step {step}: must be ≥ 0")
        t0 = time.perf_counter()
        rows = self._p_rows
        vec = cast(self._p_vec, self._dtype) if len(rows) else np.zeros((0, self._dim), self._dtype)
        mom = None
        if self._has_mom:
            mom = cast(self._p_mom, self._dtype) if len(rows) else np.zeros((0, self._dim), self._dtype)
        if provisional or self._provisional:
            self._commit_provisional(step, rows, vec, mom)
            if not provisional:  # a commit point: the provisional commits before it go into the log with it
                self.checkpoint()
        else:
            self._commit_rows(step, rows, vec, mom)
        self.discard()
        self.stats["commits"] += 1
        self.stats["commit_s"] += time.perf_counter() - t0

    @property
    def _provisional(self) -> bool:
        """Whether commits since the last commit point are in no log record (in the cache, or spilled)."""
        return self._unlogged or len(self._spilled) > 0

    def _commit_provisional(self, step: int, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None) -> None:
        self._reap_flush()
        wb = self._wb
        assert wb is not None
        steps = np.full(len(rows), step, dtype=np.int64)
        if not wb.fits(rows):
            for chunk in wb.by_slot():
                self._spill(*chunk)
            wb.clear()
        if len(rows) > wb.capacity:
            self._spill(rows, vec, mom, steps)
        else:
            wb.put(rows, vec, mom, steps)
        self._unlogged = True
        self._committed = step

    def _spill(self, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None, steps: np.ndarray) -> None:
        """Write provisional rows (unique) into the data file before their checkpoint: the cache is
        full. First, for rows not spilled since the last commit point, what the file holds (their state at
        that commit point) goes to the log as an undo record; recovery puts it back unless a later commit
        point covers the rows."""
        self._wait_flush()  # the file holds every commit point's rows (an unreleased checkpoint goes first)
        new = rows[~np.isin(rows, self._spilled, assume_unique=True)]
        if len(new):
            old_mom = self._file_rows(new, "mom") if self._has_mom else None
            self._append(_UNDO, self._committed, new, self._file_rows(new, "vec"), old_mom, self._file_steps(new))
            self._spilled = np.union1d(self._spilled, new)
        self._write_rows(rows, vec, mom, steps)
        self.stats["spills"] += 1
        self.stats["spilled_rows"] += len(rows)

    def checkpoint(self) -> None:
        """A commit point for every commit so far, provisional ones included: the cached rows changed since
        the last one go to the log (sequential records, then fsync); nothing reaches the data file yet.

        The cache is handed to a write-back that starts at the next :meth:`flush` (``wait=False``: in the
        background) or at any later write that needs it: the caller first makes its own checkpoint durable,
        so that a run killed in between reopens the store at its previous checkpoint
        (``open(..., recover_to=…)``). While the last checkpoint's write-back is still under way it is not
        waited for: the rows stay in the cache, logged, and go with the next checkpoint's write-back."""
        self._check_writable()
        wal = self._wal
        assert wal is not None and self._wb is not None
        if not self._provisional:
            wal.sync()  # every commit is in the log already: make them durable
            return
        for rows, vec, mom, steps in self._wb.by_slot():
            self._append(_ROWS, self._committed, rows, vec, mom, steps)
        wal.append(_CHECKPOINT, _GEN.pack(self._committed))
        wal.sync()
        self._unlogged, self._spilled = False, np.zeros(0, dtype=np.int64)
        self.stats["checkpoints"] += 1
        self._reap_flush()
        if self._flusher is None:  # the other log is free: freeze the cache with this one
            self._start_flush(hold=True)

    def _commit_rows(self, step: int, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None) -> None:
        """Log and cache one commit of sorted unique rows; a full cache goes to the background write-back first."""
        self._reap_flush()
        wb, wal = self._wb, self._wal
        assert wb is not None and wal is not None
        record = _COMMIT_HEAD.size + len(rows) * (8 + vec.shape[1] * self._dtype.itemsize * (1 + (mom is not None)))
        if len(rows) > wb.capacity:  # bigger than the whole cache: log it, then write it through
            self._flush_cache()
            self._append(_COMMIT, step, rows, vec, mom)
            self._write_rows(rows, vec, mom, np.full(len(rows), step, dtype=np.int64))
            self._committed = step
            self._flush_cache(force=True)
            return
        if not wb.fits(rows) or wal.size + record > self._wal_limit:
            self._start_flush()
            wb = self._wb
        self._append(_COMMIT, step, rows, vec, mom)
        wb.put(rows, vec, mom, step)
        self._committed = step

    def _append(self, rtype: int, step: int, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None,
                steps: np.ndarray | None = None) -> None:
        """One record of rows: a commit (``steps`` None: every row is ``step``'s), or _ROWS / _UNDO (a step per row)."""
        assert self._wal is not None
        parts = [_COMMIT_HEAD.pack(step, len(rows), int(mom is not None)), np.ascontiguousarray(rows, dtype="<i8")]
        if steps is not None:
            parts.append(np.ascontiguousarray(steps, dtype="<i8"))
        parts.append(np.ascontiguousarray(vec))
        if mom is not None:
            parts.append(np.ascontiguousarray(mom))
        before = self._wal.size
        self._wal.append(rtype, *parts)
        self.stats["wal_bytes"] += self._wal.size - before

    def _parse_rows(self, payload: memoryview, per_row_steps: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray | None] | None:
        """A record's ``(step, rows, steps, vectors, momentum)`` (see :meth:`_append`); ``None`` when it does not
        fit this store."""
        if len(payload) < _COMMIT_HEAD.size:
            return None
        step, count, has_mom = _COMMIT_HEAD.unpack_from(payload, 0)
        row_bytes = self._dim * self._dtype.itemsize
        if count < 0 or bool(has_mom) != self._has_mom or len(payload) != \
                _COMMIT_HEAD.size + count * (8 * (1 + per_row_steps) + row_bytes * (1 + bool(has_mom))):
            return None
        o = _COMMIT_HEAD.size
        rows = np.frombuffer(payload, dtype="<i8", count=count, offset=o)
        o += 8 * count
        if per_row_steps:
            steps = np.frombuffer(payload, dtype="<i8", count=count, offset=o)
            o += 8 * count
        else:
            steps = np.full(count, step, dtype=np.int64)
        vec = np.frombuffer(payload, dtype=self._dtype, count=count * self._dim, offset=o).reshape(count, self._dim)
        o += row_bytes * count
        mom = None
        if has_mom:
            mom = np.frombuffer(payload, dtype=self._dtype, count=count * self._dim, offset=o).reshape(count,
                                                                                                    self._dim)
        if count and (rows.min() < 0 or rows.max() >= self._num_rows):
            return None
        return int(step), rows, steps, vec, mom

    def _write_rows(self, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None, steps: np.ndarray) -> None:
        """Write unique rows into the data file, with ``pwrite`` (one per run of consecutive rows), and into
        the RAM copy.

        Never through a shared mapping. A page written through one is written back a whole *folio* at a time,
        and the page cache holds a file the kernel read or wrote sequentially (``imprint``'s writes, a scan,
        its read-ahead) in large folios (ext4 on this project's Linux 6.18): 10,000 random 4 KB rows written through a
        mapping made the disk write the whole 4.2 GB file here, against 41 MB with ``pwrite``, which dirties
        only the blocks it covers. Nor does the fsync then have to write-protect pages mapped writable (one
        interprocessor interrupt per page). On a cold file the partial pages must be read before they are
        written: their reads are asked for first, all at once."""
        if not len(rows):
            return
        if self._ram_vec is None and not self._populated and len(rows) >= 64:  # cold: ask for every page at once
            self._advise(rows, "vec")
            if mom is not None:
                self._advise(rows, "mom")
            for s, _, r in self._by_segment(rows):  # and the steps' pages: a pwrite reads no more than its block
                self._advise_offsets((s.step_offset + r * 8) // _PAGE * _PAGE, _PAGE)  # (a fault read around it)
        if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):  # row order: runs of consecutive rows
            order = np.argsort(rows, kind="stable")
            rows, steps, vec = rows[order], steps[order], vec[order]
            mom = mom[order] if mom is not None else None
        steps = np.ascontiguousarray(steps, dtype="<i8")
        vec = np.ascontiguousarray(cast(vec, self._dtype))
        mom = np.ascontiguousarray(cast(mom, self._dtype)) if mom is not None else None
        fd = self._data_fd
        assert fd is not None
        for s, m, r in self._by_segment(rows):
            if s.interleaved and mom is not None:  # the row and its momentum side by side, as in the file
                both = np.empty((len(r), 2, self._dim), dtype=self._dtype)
                both[:, 0], both[:, 1] = vec[m], mom[m]
                _pwrite_runs(fd, s.vec_offset, r, both)
            elif s.interleaved:  # the row alone: every row is a run of its own (its momentum follows it)
                _pwrite_runs(fd, s.vec_offset, r, vec[m], stride=s.stride)
            else:
                _pwrite_runs(fd, s.vec_offset, r, vec[m])
                if mom is not None and s.mom_offset is not None:
                    _pwrite_runs(fd, s.mom_offset, r, mom[m])
            _pwrite_runs(fd, s.step_offset, r, steps[m])
        if self._ram_vec is not None:
            self._ram_vec[rows] = vec
        if self._ram_mom is not None and mom is not None:
            self._ram_mom[rows] = mom

    def _write_cache(self, wb: _WriteBack) -> None:
        """All rows of ``wb`` into the file in row order, a chunk at a time: consecutive rows then go in one
        ``pwrite`` (at 10k rows the whole cache is a handful), and the thread gives up the GIL once per run."""
        for rows, vec, mom, steps in wb.chunks():
            self._write_rows(rows, vec, mom, steps)

    def _write_committed_step(self, step: int) -> None:
        assert self._data_fd is not None
        os.pwrite(self._data_fd, np.int64(step).astype("<i8").tobytes(), self._commit_offset)

    def _flush_cache(self, force: bool = False) -> None:
        """Write the cached rows to the file in row order, record the step, empty the log (synchronous:
        waits for a background write-back first)."""
        if self._wb is None or self._wal is None:
            return
        if self._provisional:  # an explicit flush makes them a commit point first
            self.checkpoint()
        self._wait_flush()
        if self._frozen is not None:  # a failed background write-back: its rows go in first
            self._write_cache(self._frozen)
            self._frozen = None
            self._logs[1 - self._active].reset(sync=self.durable)  # type: ignore[union-attr]
        wb, wal = self._wb, self._wal
        if not len(wb) and wal.empty and not force:
            return
        t0 = time.perf_counter()
        self._write_cache(wb)
        self._write_committed_step(self._committed)
        if self.durable and self._data_fd is not None:
            os.fsync(self._data_fd)
        wal.reset(sync=self.durable)  # only now may the log forget: the file holds every commit
        self.stats["flushes"] += 1
        self.stats["flushed_rows"] += len(wb)
        self.stats["flush_s"] += time.perf_counter() - t0
        wb.clear()

    @property
    def _wal(self) -> RecordLog | None:
        """The active log: where the next commit goes."""
        return self._logs[self._active]

    def _start_flush(self, hold: bool = False) -> None:
        """Freeze the cache with its log and write it back in a flusher thread; commits go on into a
        fresh cache and the other log (begun by a generation record, so that a replay orders the two).
        ``hold``: the write-back waits for :meth:`_launch` (a checkpoint not yet released)."""
        self._wait_flush()
        wb, wal = self._wb, self._wal
        assert wb is not None and wal is not None
        if not len(wb) and wal.empty:
            return
        other = 1 - self._active
        if self._logs[other] is None:
            self._logs[other] = RecordLog(self.folder / _LOG_NAMES[other], WAL_KIND, durable=self.durable,
                                          keep_records=False)
        nxt = self._logs[other]
        assert nxt is not None
        nxt.reset(sync=False)  # empty already: its own write-back truncated it (fsynced) before it ended
        self._generation += 1
        nxt.append(_GENERATION, _GEN.pack(self._generation))
        self._active = other
        fresh = self._spare if self._spare is not None else _WriteBack(wb.capacity, self._dim, self._dtype,
                                                                       self._has_mom)
        fresh.clear()
        self._spare, self._wb, self._frozen = None, fresh, wb
        self._frozen_log, self._frozen_step = wal, self._committed
        self._held = hold
        if not hold:
            self._launch()

    def _launch(self) -> None:
        """Start the flusher thread on the frozen cache."""
        assert self._frozen is not None and self._frozen_log is not None
        self._held = False
        self._flush_error = None
        self._flusher = threading.Thread(target=self._write_back, args=(self._frozen, self._frozen_log,
                                                                        self._frozen_step),
                                         name="lblctl-store-flush", daemon=True)
        self._flusher.start()
        self.stats["background_flushes"] += 1

    def _write_back(self, wb: _WriteBack, log: RecordLog, step: int) -> None:
        """The flusher thread: rows to the file in row order, fsync the file, then truncate their log."""
        t0 = time.perf_counter()
        try:
            self._write_cache(wb)
            self._write_committed_step(step)
            assert self._data_fd is not None
            os.fsync(self._data_fd)  # the rows are on the disk before the log that also holds them is emptied
            log.reset(sync=True)
            self.stats["flushes"] += 1
            self.stats["flushed_rows"] += len(wb)
            self.stats["flush_s"] += time.perf_counter() - t0
        except BaseException as exc:  # re-raised in the writer's thread by _wait_flush
            self._flush_error = exc

    def _wait_flush(self) -> None:
        """Wait for the background write-back (if any; a held one is started first); re-raise its error here."""
        if self._held:
            self._launch()
        t = self._flusher
        if t is None:
            return
        t0 = time.perf_counter()
        t.join()
        self.stats["flush_wait_s"] += time.perf_counter() - t0
        self._flusher = None
        err, self._flush_error = self._flush_error, None
        if err is not None:  # the frozen rows stay readable (and are retried by the next flush)
            raise OSError(f"{self.path}: background write-back failed: {err}") from err
        self._spare, self._frozen = self._frozen, None

    def wait_write_back(self) -> None:
        """Wait until the background write-back (if one is under way) has ended; re-raise its error."""
        self._wait_flush()

    def _reap_flush(self) -> None:
        if self._flusher is not None and not self._flusher.is_alive():
            self._wait_flush()

    @property
    def flushing(self) -> bool:
        """Whether a background write-back is under way."""
        return self._flusher is not None and self._flusher.is_alive()

    @property
    def _cached_row_bytes(self) -> int:
        """Memory one cached row takes (with its momentum)."""
        return self._dim * self._dtype.itemsize * (2 if self._has_mom else 1)

    def _memory_rows(self) -> int:
        """Cached rows that fit in 1/8 of the free memory."""
        return available_memory() // 8 // max(1, self._cached_row_bytes)

    def _make_write_cache(self, rows: int | None) -> None:
        if self.mode != "r+":
            return
        row_bytes = self._cached_row_bytes
        if rows is None:
            rows = min(DEFAULT_WRITE_CACHE_ROWS, max(1024, self._memory_rows()))
        if rows < 1:
            raise LblError(f"write cache of {rows} rows: need at least 1")
        self._wb = _WriteBack(rows, self._dim, self._dtype, self._has_mom)
        self._wal_limit = max(64 << 20, 2 * rows * (row_bytes + 8))

    def size_write_cache(self, rows: int) -> None:
        """Give the write-back cache room for ``rows`` (at most the store's rows and 1/8 of the free memory, at
        least 1,024), before the first commit: train-dp sizes it to what a checkpoint interval touches, so that
        its provisional rows stay in memory until their checkpoint."""
        self._check_writable()
        if len(self._p_rows) or (self._wb is not None and len(self._wb)) or self._frozen is not None:
            raise LblError("size_write_cache: only before the first commit")
        self._make_write_cache(max(1024, min(self._num_rows, int(rows), self._memory_rows())))

    @property
    def write_cache_rows(self) -> int:
        """Capacity of the write-back cache (0 for a reader)."""
        return self._wb.capacity if self._wb is not None else 0

    @property
    def cached_rows(self) -> int:
        """Committed rows waiting in memory for the next flush."""
        return len(self._wb) if self._wb is not None else 0

    def _recover(self, target: int | None = None) -> None:
        """Bring the store to its last commit point (at or before step ``target`` when given) from the logs,
        older log first: undo records after that point put back rows that provisional commits wrote to the
        file, then every commit up to it is replayed; later records, and a record cut short by a kill (its
        commit never happened), are dropped. A writer writes the result into the file and empties the logs;
        a reader keeps it in memory."""
        notes = []
        before = self._committed
        found = []  # (generation, which log, records, torn bytes)
        for i, name in enumerate(_LOG_NAMES):
            path = self.folder / name
            if self.mode == "r+":
                if i and not path.exists():
                    continue
                log = RecordLog(path, WAL_KIND, durable=self.durable)
                self._logs[i] = log
                records, torn = log.records, log.torn_bytes
                log.records = []
            else:
                records, torn = read_log(path, WAL_KIND), 0
            gen = -1  # a log never rotated into (the first one of a store) has no generation record
            if records and records[0][0] == _GENERATION and len(records[0][1]) == _GEN.size:
                (gen,) = _GEN.unpack(records[0][1])
                records = records[1:]
            parsed = []
            for rtype, payload in records:
                rec = self._parse_record(rtype, payload)
                if rec is None:
                    notes.append("discarded a damaged write-ahead log record")
                    break
                parsed.append(rec)
            found.append((gen, i, parsed, torn))
        found.sort(key=lambda x: (x[0], x[1]))
        torn = sum(t for *_, t in found)
        self._generation = max([0] + [g for g, *_ in found])
        redo, pending, undo, dropped = [], [], [], 0
        for rtype, step, piece in (rec for _, _, recs, _ in found for rec in recs):
            if rtype == _UNDO:
                undo.append(piece)
            elif rtype == _ROWS:
                pending.append(piece)
            elif dropped or (target is not None and step > target):  # a commit point past the target
                dropped += 1
                pending = []
            else:  # a commit point: everything before it counts; the undo records before it are void
                redo += pending + ([piece] if piece is not None else [])
                pending, undo = [], []
                self._committed = step
        if torn:
            notes.append(f"discarded an unfinished commit after step {self._committed if redo else before}")
        if dropped:
            notes.append(f"dropped {dropped} commit point(s) after step {target}")
        pieces = undo[::-1] + redo  # undo first, the earliest record of a row last; then the commits in order
        replay = None
        if pieces:
            replay = _WriteBack(sum(len(p[0]) for p in pieces), self._dim, self._dtype, self._has_mom)
            for rows, steps, vec, mom in pieces:
                if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):  # a checkpoint logs in slot order
                    o = np.argsort(rows)
                    rows, steps, vec, mom = rows[o], steps[o], vec[o], None if mom is None else mom[o]
                replay.put(rows, vec, mom, steps)
        if undo:
            notes.append(f"rolled back {len(np.unique(np.concatenate([p[0] for p in undo])))} row(s) written "
                         f"after step {self._committed}")
        if self.mode == "r+":
            if redo:
                notes.append(f"completed the commit of step {self._committed} from the write-ahead log")
            if replay is not None:
                self._write_cache(replay)
            if replay is not None or torn or any(log is not None and not log.empty for log in self._logs):
                self._write_committed_step(self._committed)
                if self.durable and self._data_fd is not None:
                    os.fsync(self._data_fd)
                for log in self._logs:
                    if log is not None:
                        log.reset(sync=self.durable)
                self.stats["flushes"] += 1
            self._active = 0
        elif replay is not None:  # a reader sees the committed state without touching the file
            self._wb = replay
            if redo:
                notes.append(f"read the commit of step {self._committed} from the write-ahead log")
        self.recovery = "; ".join(notes) if notes else "clean"

    def _parse_record(self, rtype: int, payload: memoryview) -> tuple[int, int, tuple | None] | None:
        """``(type, step, (rows, steps, vectors, momentum) or None)`` of a log record; None if damaged."""
        if rtype == _CHECKPOINT:
            return (rtype, _GEN.unpack(payload)[0], None) if len(payload) == _GEN.size else None
        if rtype not in (_COMMIT, _ROWS, _UNDO):
            return None
        rec = self._parse_rows(payload, per_row_steps=rtype != _COMMIT)
        return None if rec is None else (rtype, rec[0], rec[1:])

    def fill(self, start: int, vectors: np.ndarray) -> None:
        """Write rows ``start…`` directly (renormalised): for populating a new store, not for training."""
        self._check_writable()
        if len(self._p_rows):
            raise LblError("fill: commit or discard the staged rows first")
        vecs = _normalise(vectors, "fill").astype(self._dtype)
        stop = start + len(vecs)
        if start < 0 or stop > self._num_rows:
            raise IndexError(f"fill rows {start}..{stop} outside 0..{self._num_rows}")
        self._flush_cache()
        for s in self._segments:
            a, b = max(start, s.start), min(stop, s.stop)
            if a < b:
                s.vec[a - s.start:b - s.start] = vecs[a - start:b - start]
                s.step[a - s.start:b - s.start] = -1
                if s.mom is not None:
                    s.mom[a - s.start:b - s.start] = 0
        if self._ram_vec is not None:
            self._ram_vec[start:stop] = vecs
        if self._ram_mom is not None:
            self._ram_mom[start:stop] = 0
        if self._filled is not None:
            self._filled[start:stop] = True

    def fill_exact(self, start: int, vectors: np.ndarray, momentum: np.ndarray | None = None,
                   row_steps: np.ndarray | None = None) -> None:
        """Write rows ``start…`` of a store being created bit for bit (no renormalisation), with their
        momentum and commit steps: for copying rows between stores (re-shard, merge), where :meth:`fill`'s
        renormalisation would change the last bits."""
        self._check_writable()
        if self._filled is None or len(self._p_rows):
            raise LblError("fill_exact: only for a store being created, with nothing staged")
        vecs = np.asarray(vectors).reshape(-1, self._dim).astype(self._dtype)
        stop = start + len(vecs)
        if start < 0 or stop > self._num_rows:
            raise IndexError(f"fill rows {start}..{stop} outside 0..{self._num_rows}")
        mom = None if momentum is None or not self._has_mom else np.asarray(momentum).astype(self._dtype)
        steps = np.full(len(vecs), -1, dtype=np.int64) if row_steps is None else np.asarray(row_steps, np.int64)
        self._flush_cache()
        for s in self._segments:
            a, b = max(start, s.start), min(stop, s.stop)
            if a < b:
                s.vec[a - s.start:b - s.start] = vecs[a - start:b - start]
                s.step[a - s.start:b - s.start] = steps[a - start:b - start]
                if s.mom is not None:
                    s.mom[a - s.start:b - s.start] = 0 if mom is None else mom[a - start:b - start]
        if self._ram_vec is not None:
            self._ram_vec[start:stop] = vecs
        if self._ram_mom is not None:
            self._ram_mom[start:stop] = 0 if mom is None else mom
        self._filled[start:stop] = True

    def set_committed_step(self, step: int) -> None:
        """Record ``step`` as the last commit of a store being created (a copy keeps its source's step)."""
        self._check_writable()
        if self._filled is None:
            raise LblError("set_committed_step: only for a store being created")
        self._committed = int(step)
        self._write_committed_step(self._committed)

    def append(self, names: Iterable[str] | StringArray, vectors: np.ndarray,
               id_photos: Iterable[str] | StringArray | None = None) -> np.ndarray:
        """Add identities as a new segment (nothing is rewritten); return their rows.

        A structural change (it goes through the HDF5 library): do it between trainings, not while
        a kill may come; staged rows must be committed first.
        """
        self._check_writable()
        if len(self._p_rows):
            raise LblError("append: commit or discard the staged rows first")
        names = _as_strings(names)
        photos = _as_strings(id_photos) if id_photos is not None else None
        vecs = _normalise(np.asarray(vectors).reshape(len(names), self._dim), "append").astype(self._dtype)
        dups = _duplicates(names)
        if dups:
            raise LblError(f"append: '{dups[0]}' is given twice")
        clash = self.names.lookup(names) if len(names) else np.zeros(0, dtype=np.int64)
        if (clash >= 0).any():
            first = names[int(np.flatnonzero(clash >= 0)[0])]
            raise LblError(f"append: identity '{first}' is already in the store")
        if len(names) == 0:
            return np.zeros(0, dtype=np.int64)
        self._flush_cache()
        start = self._num_rows
        self._stop_reader()
        self._unmap()
        with h5py.File(self.path, "r+", **_ALIGN) as f:
            g = _add_segment(f, len(names), self._dim, self._dtype, self._has_mom)
            if "rows" in g:
                g["rows"][:, 0, :] = vecs
                g["rows"][:, 1, :] = 0
            else:
                g["prototypes"][...] = vecs
                if self._has_mom:
                    g["momentum"][...] = np.zeros_like(vecs)
            g["row_step"][...] = -1
            _append_strings(f["identities"], names)
            _append_strings(f["id_photos"], photos, len(names))
        self._read_layout()
        self._map()
        if self._filled is not None:
            self._filled = np.concatenate([self._filled, np.ones(len(names), dtype=bool)])
        if self.cache == "ram":
            self._choose_cache("ram", None)
        if self._names is not None:  # join the byte buffers; no per-name Python work
            old = self._names
            self._names = StringArray(np.concatenate([old.buffer, names.buffer]),
                                      np.concatenate([old.offsets, names.offsets[1:] + old.offsets[-1]]))
        self._id_photos = None
        if (self.folder / MANIFEST).is_file() and not self._complete_on_close:
            self._write_manifest()
        return np.arange(start, self._num_rows, dtype=np.int64)

    def flush(self, wait: bool = True) -> None:
        """Write the write-back cache to the file in row order, empty the log and fsync the file:
        afterwards the file alone holds every commit.

        ``wait=False`` (train-dp at each checkpoint): fsync the active log, so that every commit so far
        is durable (the checkpoint's commit point), then hand the write-back to the flusher thread and
        return; the caller's next steps run while it writes. A write-back still under way from the last
        checkpoint is not waited for (the cache goes on filling; the next checkpoint or a full cache writes
        it back). Any later write waits for a write-back only if the new cache fills first.
        After :meth:`checkpoint` (or with provisional commits, which it checkpoints first), ``wait=False``
        starts that checkpoint's write-back: the caller's release once its own checkpoint is durable."""
        if not wait and self.mode == "r+" and self._wb is not None:
            self._check_open()
            assert self._wal is not None
            if self._provisional:
                self.checkpoint()
            if self._held:  # the caller's checkpoint is durable: release the store's to the data file
                self._launch()
                return
            self._wal.sync()  # the checkpoint's commit point: every commit so far is durable in the log
            self._reap_flush()
            if self._flusher is None:  # one write-back at a time: a checkpoint never waits for the last one
                self._start_flush()
            return
        if self.mode == "r+":
            self._flush_cache()
        for s in self._segments:
            for mm in (s.vec, s.step, s.mom):
                if isinstance(mm, np.memmap) and self.mode == "r+":
                    mm.flush()
        if self._data_fd is not None:
            os.fsync(self._data_fd)
        if self._wal is not None and self.durable:
            fsync_dir(self.folder)

    def set_backbone_fingerprint(self, fingerprint: str) -> None:
        """Tie the store to another backbone: train-dp fine-tunes the prototypes and the backbone
        together, so its store belongs to the backbone it writes (the manifest follows on close)."""
        self._check_writable()
        self.flush()
        with h5py.File(self.path, "r+") as f:  # an attribute only: the mapped rows do not move
            f.attrs["backbone_fingerprint"] = fingerprint
        self._attrs["backbone_fingerprint"] = fingerprint
        self._complete_on_close = True

    # ------------------------------------------------------------------ closing

    def _write_manifest(self) -> None:
        meta = self._manifest_meta
        if not meta and (self.folder / MANIFEST).is_file():
            old = read_manifest(self.folder, kind="store", verify_files=False)
            meta = {"params": old.get("params", {}), "inputs": old.get("inputs", {}),
                    "command": old.get("command")}
        write_manifest(self.folder, "store", params=meta.get("params"), inputs=meta.get("inputs"),
                       files=[FILENAME], embedding_size=self._dim,
                       backbone_fingerprint=self.backbone_fingerprint,
                       extra={"num_rows": self._num_rows, "dtype": self.dtype, "has_momentum": self._has_mom,
                              "store_format": str(self._attrs.get("format", FORMAT))}, command=meta.get("command"))

    def _stop_reader(self) -> None:
        """End the read-ahead thread (its queued hints are dropped)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None

    def _unmap(self) -> None:
        for s in self._segments:
            for name in ("vec", "step", "mom"):
                mm = getattr(s, name)
                if isinstance(mm, np.memmap) and self.mode == "r+":
                    mm.flush()
                setattr(s, name, None)

    def close(self, complete: bool = True) -> None:
        """Unmap and unlock; a newly created store gets its manifest here (when ``complete``)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_reader()  # its madvise calls end before the mapping goes
            if self._held or self._provisional:
                # an unreleased checkpoint or provisional commits (a run that stopped between checkpoints):
                # left as a kill would leave them, for the next open to recover (to the run's checkpoint)
                self._reap_flush()
            elif self.mode == "r+" and self._segments and self._segments[0].vec is not None:
                self.flush()
            self._unmap()
            self._ram_vec = self._ram_mom = None
            if complete and self._complete_on_close:
                missing = np.flatnonzero(~self._filled) if self._filled is not None else []
                if len(missing):
                    raise LblError(f"{self.folder}: {len(missing)} row(s) never written (first: row "
                                   f"{int(missing[0])}); the store is left incomplete")
                self._write_manifest()
        finally:
            if self._flusher is not None:  # an error above: the write-back still ends before the files close
                self._flusher.join()
                self._flusher = None
            self._stop_reader()
            for i, log in enumerate(self._logs):
                if log is not None:
                    log.close()
                self._logs[i] = None
            self._frozen = self._spare = None
            self._wb = None
            if self._advise_fd is not None and self._advise_fd >= 0:
                os.close(self._advise_fd)
            self._advise_fd = None
            for fd in (self._data_fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._data_fd = self._lock_fd = None

    def _check_open(self) -> None:
        if self._closed:
            raise LblError(f"{self.folder}: store is closed")

    def __enter__(self) -> PrototypeStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    def __repr__(self) -> str:
        return (f"PrototypeStore({str(self.folder)!r}, rows={self._num_rows}, dim={self._dim}, "
                f"dtype={self.dtype}, "
                f"cache={self.cache}, committed_step={self._committed}, mode={self.mode!r})")


# ---------------------------------------------------------------------- helpers (h5py side)


def _pwrite_runs(fd: int, offset: int, rows: np.ndarray, data: np.ndarray, stride: int | None = None) -> None:
    """``data[i]`` to ``offset + rows[i] * stride`` (default: one row's bytes) for sorted unique ``rows``: one
    ``pwrite`` per run of consecutive rows (every row its own where ``stride`` leaves gaps between them)."""
    data = np.ascontiguousarray(data)
    size = data.nbytes // len(rows)
    stride = stride or size
    raw = memoryview(data.reshape(-1)).cast("B")
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1 if stride == size else np.arange(1, len(rows))
    for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)], strict=True):
        chunk, pos = raw[a * size:b * size], offset + int(rows[a]) * stride
        while chunk:  # a pwrite may write less than asked
            done = os.pwrite(fd, chunk, pos)
            chunk, pos = chunk[done:], pos + done


def _add_segment(f: h5py.File, n: int, dim: int, dtype: np.dtype, momentum: bool) -> h5py.Group:
    """Add contiguous datasets for ``n`` more rows and re-point the virtual datasets over all segments."""
    segs = f.require_group("_segments")
    key = str(len(segs))
    start = sum(segs[k]["row_step"].shape[0] for k in segs)
    inter = momentum and f.attrs["format"] == FORMAT  # an earlier store keeps its own layout
    g = segs.create_group(key)
    g.attrs["start"] = start
    g.create_dataset("row_step", shape=(n,), dtype="<i8", dcpl=contiguous_dcpl())
    if inter:
        g.create_dataset("rows", shape=(n, 2, dim), dtype=dtype, dcpl=contiguous_dcpl())
    else:
        for name in ("prototypes", "momentum") if momentum else ("prototypes",):
            g.create_dataset(name, shape=(n, dim), dtype=dtype, dcpl=contiguous_dcpl())
    views = [("row_step", np.dtype("<i8"), None), ("prototypes", dtype, 0)] + \
        ([("momentum", dtype, 1)] if momentum else [])
    total = start + n
    for name, dt, half in views:  # the datasets a plain h5py reader sees: virtual, over every segment
        layout = h5py.VirtualLayout(shape=(total,) if half is None else (total, dim), dtype=dt)
        for k in sorted(segs, key=int):
            a, m = int(segs[k].attrs["start"]), segs[k]["row_step"].shape[0]
            if not m:
                continue
            if half is not None and "rows" in segs[k]:
                layout[a:a + m] = h5py.VirtualSource(segs[k]["rows"])[:, half, :]
            else:
                layout[a:a + m] = h5py.VirtualSource(segs[k][name])
        if name in f:
            del f[name]
        f.create_virtual_dataset(name, layout, fillvalue=0)
    return g


def _append_strings(ds: h5py.Dataset, items: StringArray | None, count: int | None = None) -> None:
    n = len(items) if items is not None else int(count or 0)
    base = ds.shape[0]
    ds.resize((base + n,))
    for a in range(0, n, _NAME_CHUNK):
        b = min(n, a + _NAME_CHUNK)
        chunk = [items[i] for i in range(a, b)] if items is not None else [""] * (b - a)
        ds[base + a:base + b] = np.array(chunk, dtype=object)

