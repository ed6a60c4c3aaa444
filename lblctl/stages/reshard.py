"""``reshard``: lay a prototype store out for another world size, or merge its shards into one plain store.

A store made on one machine trains on many (``train-dp`` under torchrun reads one shard per rank,
:mod:`lblctl.core.shards`), and what a sharded run wrote goes back to one plain store for ``eval``,
``export`` and ``build-index``. Every row is copied bit for bit (no renormalisation) with its momentum
and commit step; names, ID photos, dtype, backbone fingerprint and the committed step follow, and so
do the queues (global row ids, so their entries never change) and the store-level files of
``build-index`` (index, duplicate report, index manifest). Rows stream a chunk at a time, so memory is
one chunk of rows whatever N (plus the names, which a store's creation takes at once).

Crash safety: everything is written into ``.<OUT>.reshard-tmp`` beside ``OUT`` and renamed to ``OUT`` at
the end (a sharded ``OUT`` also gets its ``shards.json`` last). A killed reshard leaves ``OUT`` as it was
(absent, or the old store with ``overwrite``); running it again starts the temporary folder afresh and
gives the same result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lblctl.core import ui
from lblctl.core.artifacts import describe_file, describe_input, read_manifest
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.journal import fsync_dir
from lblctl.core.queues import QUEUES, Queues, QueueWriter
from lblctl.core.shards import (
    LAYOUT,
    ShardedStoreView,
    ShardLayout,
    read_layout,
    shard_dir,
    take_strings,
    write_layout,
)
from lblctl.core.store import FILENAME, LOCK_NAME, PrototypeStore
from lblctl.core.summary import Summary

# build-index's and imprint's files that describe the whole store: they live at the top of a plain and of
# a sharded store alike (their row numbers are global), so they are copied as they are
STORE_FILES = ("index.faiss", "duplicates.csv", "duplicates.html", "left_out.csv", "problems.csv")
INDEX_MANIFEST = "index_manifest.json"
_QUEUE_OWN_ATTRS = ("format", "num_rows", "candidates", "dominant")


@dataclass
class ReshardConfig:
    store: Path
    out: Path
    world: int
    overwrite: bool = False
    chunk_rows: int = 65536


def temp_dir(out: str | Path) -> Path:
    """Where a reshard builds ``out`` before renaming it into place."""
    out = Path(out)
    return out.parent / f".{out.name}.reshard-tmp"


def _old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.reshard-old"


def _open_source(store: Path) -> PrototypeStore | ShardedStoreView:
    if read_layout(store) is not None:
        return ShardedStoreView(store)
    if not (store / FILENAME).is_file():
        raise LblError(f"--store {store}: no {FILENAME} and no {LAYOUT}; not a prototype store")
    return PrototypeStore.open(store, "r", cache="mmap")


class _QueueSource:
    """The queues of a plain or sharded store, read by global row (None when it has none)."""

    def __init__(self, store: Path, source: PrototypeStore | ShardedStoreView) -> None:
        self.parts: list[Queues] = []
        self.layout = source.layout if isinstance(source, ShardedStoreView) else None
        folders = ([shard_dir(store, r, self.layout.world_size) for r in range(self.layout.world_size)]
                   if self.layout is not None else [store])
        have = [(f / QUEUES).is_file() for f in folders]
        if any(have) and not all(have):
            missing = folders[have.index(False)]
            raise IncompatibleArtifact(f"{missing}: no {QUEUES} while other shards have one; re-run "
                                       f"`lblctl build-index --store {store}`")
        try:
            for f in folders if all(have) else []:
                self.parts.append(Queues.open(f / QUEUES, "r"))
        except BaseException:
            self.close()
            raise
        if self.parts:
            widths = {(q.cq, q.dq) for q in self.parts}
            if len(widths) > 1:
                self.close()
                raise IncompatibleArtifact(f"{store}: the shards' queues differ in width ({sorted(widths)}); "
                                           "re-run build-index")
            self.cq, self.dq = self.parts[0].cq, self.parts[0].dq
            self.attrs = {k: v for k, v in self.parts[0].meta.items() if k not in _QUEUE_OWN_ATTRS}

    def __bool__(self) -> bool:
        return bool(self.parts)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(candidates, candidate_scores, dominant)`` of global ``rows``."""
        if self.layout is None:
            q = self.parts[0]
            return q.candidates(rows), q.candidate_scores(rows), q.dominant(rows)
        owner, local = self.layout.owner(rows), self.layout.local(rows)
        cand = np.empty((len(rows), self.cq), dtype=np.int32)
        score = np.empty((len(rows), self.cq), dtype=np.float32)
        dom = np.empty((len(rows), self.dq), dtype=np.int32)
        for rank in np.unique(owner).tolist():
            m = owner == rank
            q = self.parts[rank]
            cand[m], score[m], dom[m] = q.candidates(local[m]), q.candidate_scores(local[m]), q.dominant(local[m])
        return cand, score, dom

    def close(self) -> None:
        for q in self.parts:
            q.close()
        self.parts = []


@contextlib.contextmanager
def _no_writer(store: Path, layout: ShardLayout | None):
    """Hold a shared lock on the store (every shard) while it is copied: a running writer (train-dp) is
    refused now, and none can start until the copy is done (a writer takes the lock exclusively)."""
    folders = [store] if layout is None else [shard_dir(store, r, layout.world_size) for r in range(layout.world_size)]
    fds = []
    try:
        for folder in folders:
            try:
                fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
            except OSError:
                continue  # no writer ever opened it
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LblError(f"--store {store}: {folder} is open for writing (a train-dp run?); "
                               "re-shard it when that process has ended") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _check_paths(store: Path, out: Path, world: int, overwrite: bool) -> None:
    if world < 1:
        raise LblError(f"--world {world}: must be at least 1")
    if not store.is_dir():
        raise LblError(f"--store {store}: no such folder")
    src, dst = store.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise LblError(f"--out {out}: must be a folder outside --store {store} (and not holding it)")
    if out.exists() and not overwrite:
        raise LblError(f"--out {out}: already exists; add --overwrite to replace it or choose a new folder")


def _manifest_meta(store: Path, source: PrototypeStore | ShardedStoreView) -> dict[str, Any]:
    """The source store's params (from its manifest, or shard 0's)."""
    folder = source.shards[0].folder if isinstance(source, ShardedStoreView) and source.shards else store
    try:
        return dict(read_manifest(folder, kind="store", verify_files=False).get("params", {}))
    except (LblError, IncompatibleArtifact):
        return {}


def _synced(path: Path) -> None:
    """fsync a file written here, so that the folder renamed into place holds it whole after a power loss."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _copy_store_files(store: Path, tmp: Path, queue_files: list[str]) -> list[str]:
    """The store-level files of build-index/imprint, and the index manifest with its file list renewed
    (``queue_files``: the new store's queue files, one per shard or one)."""
    copied = []
    for name in STORE_FILES:
        if (store / name).is_file():
            shutil.copyfile(store / name, tmp / name)
            _synced(tmp / name)
            copied.append(name)
    if (store / INDEX_MANIFEST).is_file():
        manifest = json.loads((store / INDEX_MANIFEST).read_text(encoding="utf-8"))
        entries = []
        for entry in manifest.get("files", []):
            name = str(entry.get("path") or "")
            if name and Path(name).name != QUEUES and (tmp / name).is_file():
                entries.append(describe_file(tmp / name, tmp))
            elif Path(name).name == QUEUES and queue_files:
                entries.extend(describe_file(tmp / q, tmp) for q in queue_files)
                queue_files = []
        manifest["files"] = entries
        manifest["resharded_from"] = str(store.resolve())
        (tmp / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _synced(tmp / INDEX_MANIFEST)
        copied.append(INDEX_MANIFEST)
    return copied


def reshard(store: str | Path, out: str | Path, world: int, *, overwrite: bool = False,
            chunk_rows: int = 65536) -> dict[str, Any]:
    """Copy the plain or sharded store ``store`` to ``out``: sharded for ``world`` ranks, or (``world`` 1)
    one plain store. Returns a summary. Bit-exact; streaming; ``out`` appears only when complete."""
    store, out, world = Path(store), Path(out), int(world)
    _check_paths(store, out, world, overwrite)
    t0 = time.perf_counter()
    with _no_writer(store, read_layout(store)):
        return _reshard(store, out, world, chunk_rows, t0)


def _reshard(store: Path, out: Path, world: int, chunk_rows: int, t0: float) -> dict[str, Any]:
    source = _open_source(store)
    queues: _QueueSource | None = None
    tmp = temp_dir(out)
    try:
        if isinstance(source, ShardedStoreView) and len(set(source.committed_steps)) > 1:
            raise LblError(f"--store {store}: its shards were committed at different steps "
                           f"({sorted(set(source.committed_steps))}): a train-dp run stopped between two ranks' "
                           "commits; finish it with --resume before re-sharding")
        queues = _QueueSource(store, source)
        if tmp.exists():
            shutil.rmtree(tmp)  # what a killed reshard left: start afresh
        tmp.mkdir(parents=True)
        _write(store, source, queues, tmp, world, max(1, int(chunk_rows)))
        queue_files = ([QUEUES] if world == 1 else [f"{shard_dir(tmp, r, world).name}/{QUEUES}" for r in range(world)])
        copied = _copy_store_files(store, tmp, queue_files if queues else [])
        from_world = source.layout.world_size if isinstance(source, ShardedStoreView) else 1
        summary = {"store": str(store), "out": str(out), "from_world": from_world,
                   "from_layout": "sharded" if isinstance(source, ShardedStoreView) else "plain",
                   "world": world, "layout": "sharded" if world > 1 else "plain", "rows": source.num_rows,
                   "embedding_size": source.embedding_size, "dtype": source.dtype,
                   "momentum": source.has_momentum, "committed_step": source.committed_step,
                   "queues": bool(queues), "files_copied": copied}
    finally:
        if queues is not None:
            queues.close()
        source.close()
    if world > 1:  # the commit point of a sharded store: written after every shard is whole
        write_layout(tmp, ShardLayout(world, summary["rows"], summary["embedding_size"]))
    fsync_dir(tmp)
    old = _old_dir(out)
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _write(store: Path, source: PrototypeStore | ShardedStoreView, queues: _QueueSource, tmp: Path,
           world: int, chunk_rows: int) -> None:
    """Write ``world`` plain stores (one at ``tmp`` itself when ``world`` is 1) from ``source``, chunk by chunk."""
    n, dim = source.num_rows, source.embedding_size
    layout = ShardLayout(world, n, dim)
    folders = [tmp] if world == 1 else [shard_dir(tmp, r, world) for r in range(world)]
    names, photos = source.names, source.id_photos
    params = {**_manifest_meta(store, source), "resharded_for_world": world}
    inputs = {"store": describe_input(store)}
    momentum = source.has_momentum
    writers: list[PrototypeStore] = []
    qwriters: list[QueueWriter] = []
    try:
        for rank, folder in enumerate(folders):
            rows = layout.rows_of(rank)
            whole = world == 1  # a merge takes the names as they are (no second copy of N names)
            writers.append(PrototypeStore.create(
                folder, dim, names if whole else take_strings(names, rows), source.dtype,
                source.backbone_fingerprint, id_photos=photos if whole else take_strings(photos, rows),
                momentum=momentum, params=params, inputs=inputs, cache="mmap"))
            if queues:
                qwriters.append(QueueWriter(folder / QUEUES, len(rows), queues.cq, queues.dq, queues.attrs))
        del names, photos
        chunk = max(world, chunk_rows // world * world)  # a multiple of world: each rank's rows are a run
        with ui.progress() as bar:
            task = bar.add_task(f"reshard → {world} rank(s)" if world > 1 else "merge", total=n)
            for start in range(0, n, chunk):
                rows = np.arange(start, min(n, start + chunk), dtype=np.int64)
                vec = source.gather(rows)
                mom = source.gather_momentum(rows) if momentum else None
                steps = source.row_steps(rows)
                q = queues.read(rows) if queues else None
                owner = layout.owner(rows)
                for rank in range(world):
                    m = owner == rank
                    if not m.any():
                        continue
                    local0 = int(layout.local(rows[m][:1])[0])
                    writers[rank].fill_exact(local0, vec[m], None if mom is None else mom[m], steps[m])
                    if q is not None:
                        qw = qwriters[rank]
                        qw.write(local0, q[0][m], q[1][m])
                        qw.dominant[local0:local0 + int(m.sum())] = q[2][m]  # trained queues, not cand[:dq]
                bar.advance(task, len(rows))
        for w in writers:
            w.set_committed_step(source.committed_step)
        while writers:
            writers.pop(0).close()
        while qwriters:
            qwriters.pop(0).commit()
    except BaseException:
        for w in writers:
            w.close(complete=False)
        for qw in qwriters:
            qw.abort()
        raise


def run(cfg: ReshardConfig, device: Any = None) -> Summary:
    """The reshard stage (CPU and disk only; ``device`` is ignored)."""
    figures = reshard(cfg.store, cfg.out, cfg.world, overwrite=cfg.overwrite, chunk_rows=cfg.chunk_rows)
    notes = []
    if figures["world"] == 1:
        notes.append(f"{cfg.out} is one plain store: eval, export and build-index read it")
    else:
        notes.append(f"train with: torchrun --nproc-per-node={figures['world']} -m lblctl train-dp --store {cfg.out} …")
    return Summary("reshard", figures, notes=notes)
