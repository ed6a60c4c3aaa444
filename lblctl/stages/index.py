"""The nearest-neighbour search over the prototypes: which faiss index, how to build it, and the
k-NN of *every* row (the candidate queues), with a recall estimate against exact search.

Index choice (``auto``): exact ``IndexFlatIP`` up to ``FLAT_MAX_ROWS`` rows; above, IVF-flat while
the raw vectors fit half the available memory, else IVF-PQ whose short-list is re-ranked with the
exact vectors gathered from the store. HNSW on request.

The all-rows search is a self-join, so on the CPU the IVF-flat path does not query the index row
by row: it takes each inverted list as a block of queries and multiplies it (BLAS) with the
vectors of the ``nprobe`` lists nearest to that list's centroid (probing per list rather than per
query: about 10× faster than faiss' own search at D = 512 on a CPU; on structureless data it
finds fewer neighbours than per-query probing, which the recall estimate shows). With faiss-gpu
and a visible GPU every index
is searched on the GPU with faiss' batched search instead; results are post-processed by the same
code (self removed, ties broken by lower row number, −1 padding).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from lblctl.core import ui
from lblctl.core.artifacts import describe_input, write_manifest
from lblctl.core.errors import LblError
from lblctl.core.journal import atomic_open
from lblctl.core.queues import QUEUES, Queues
from lblctl.core.runtime import available_memory
from lblctl.core.summary import Summary

FLAT_MAX_ROWS = 50_000
LOW_RECALL = 0.9  # below this build-index warns and suggests another index
INDEX_FILE = "index.faiss"
INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
_BLOCK_FLOATS = 1 << 25  # scores computed per BLAS block (128 MiB of float32)


class VectorSource(Protocol):
    """What the search needs from a prototype store (``lblctl.core.store.PrototypeStore`` fits)."""

    @property
    def num_rows(self) -> int: ...

    @property
    def embedding_size(self) -> int: ...

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]: ...

    def gather(self, rows: np.ndarray) -> np.ndarray: ...


class ArraySource:
    """An in-memory N×D array as a :class:`VectorSource` (tests, benchmarks, features files)."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    @property
    def num_rows(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def embedding_size(self) -> int:
        return int(self.vectors.shape[1])

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.num_rows, chunk_rows):
            yield start, self.vectors[start : start + chunk_rows]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.vectors[np.asarray(rows, dtype=np.int64)]


@dataclass
class IndexSpec:
    kind: str  # flat | ivf | ivfpq | hnsw
    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 0
    pq_m: int = 0
    rerank: int = 0  # ivfpq: short-list length re-ranked with exact vectors
    train_rows: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The parameters that apply to this kind of index."""
        fields = {"flat": (), "ivf": ("nlist", "nprobe", "train_rows"),
                  "ivfpq": ("nlist", "nprobe", "train_rows", "pq_m", "rerank"),
                  "hnsw": ("hnsw_m", "ef_construction", "ef_search")}[self.kind]
        d = asdict(self)
        return {"kind": self.kind, **{k: d[k] for k in fields}, "reason": self.reason}


def choose_index(num_rows: int, dim: int, k: int, kind: str = "auto", *, nlist: int = 0, nprobe: int = 0,
                 ef_search: int = 0, memory_bytes: int | None = None) -> IndexSpec:
    """Pick the index and its knobs from N, D and memory; explicit options win."""
    if kind not in INDEX_KINDS:
        raise LblError(f"--index {kind}: expected one of {', '.join(INDEX_KINDS)}")
    raw = num_rows * dim * 4
    budget = (memory_bytes if memory_bytes is not None else available_memory()) // 2
    reason = f"chosen: {kind}"
    if kind == "auto":
        if num_rows <= FLAT_MAX_ROWS:
            kind, reason = "flat", f"N={num_rows} ≤ {FLAT_MAX_ROWS}: exact search is affordable"
        elif raw <= budget:
            kind, reason = "ivf", (f"N={num_rows} > {FLAT_MAX_ROWS} and the vectors ({raw / 2**30:.1f} GiB) "
                                   "fit memory")
        else:
            kind, reason = "ivfpq", (f"the vectors ({raw / 2**30:.1f} GiB) exceed half the available memory "
                                     f"({budget / 2**30:.1f} GiB): compressed codes + exact re-ranking")
    spec = IndexSpec(kind=kind, reason=reason)
    if kind in ("ivf", "ivfpq"):
        # ~2√N lists of ~√N/2 rows: BLAS-sized blocks for the self-join, cheap coarse assignment
        spec.nlist = nlist or int(min(max(1, num_rows // 39), max(16, round(2 * np.sqrt(num_rows)))))
        spec.nlist = max(1, min(spec.nlist, num_rows))
        spec.nprobe = max(1, min(spec.nlist, nprobe or (8 if kind == "ivf" else 32)))
        spec.train_rows = int(min(num_rows, max(64 * spec.nlist, 10_000)))
        if kind == "ivfpq":
            # ≥ 8 dimensions per sub-quantizer (64 bytes a vector at D = 512)
            spec.pq_m = next((m for m in (64, 32, 16, 8, 4, 2) if dim % m == 0 and dim // m >= 8), 1)
            spec.rerank = 4 * (k + 1)
    elif kind == "hnsw":
        spec.ef_search = max(ef_search or 0, 2 * (k + 1), 64)
    elif nlist or nprobe or ef_search:
        ui.warn("--nlist/--nprobe/--ef-search do not apply to an exact (flat) index; ignored")
    if kind == "hnsw" and (nlist or nprobe):
        ui.warn("--nlist/--nprobe do not apply to hnsw; ignored")
    return spec


# -- GPU ---------------------------------------------------------------------------------------

def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU
        return 0


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    res = faiss.StandardGpuResources()
    to_gpu.resources = res  # type: ignore[attr-defined]  # keep alive with the index
    return faiss.index_cpu_to_gpu(res, device, index)


def to_all_gpus(index: faiss.Index) -> faiss.Index:
    """The index on every visible GPU, its vectors split between them (``IndexShards``: each GPU holds
    1/G of the rows, a query goes to all and the results are merged), so an index G× one GPU's memory
    fits; on one GPU the same as :func:`to_gpu`."""
    if gpu_count() <= 1:
        return to_gpu(index)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options)


# -- building ----------------------------------------------------------------------------------

def _check_chunk(start: int, chunk: np.ndarray) -> np.ndarray:
    chunk = np.ascontiguousarray(chunk, dtype=np.float32)
    if not np.isfinite(chunk).all():
        bad = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
        raise LblError(f"prototype row {bad} is not finite (NaN/inf); re-imprint that identity")
    return chunk


def build_index(source: VectorSource, spec: IndexSpec, *, seed: int = 0, chunk_rows: int = 65536,
                use_gpu: bool = False) -> faiss.Index:
    """Build (train + add) a CPU faiss index over every row of ``source``; row number = faiss id."""
    n, d = source.num_rows, source.embedding_size
    metric = faiss.METRIC_INNER_PRODUCT
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, metric)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        quantizer = faiss.IndexFlatIP(d)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, spec.nlist, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.pq_m, 8, metric)
        index.cp.seed = seed
        index.cp.spherical = True
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, spec.train_rows), replace=False))
        sample = _check_chunk(0, source.gather(rows))
        with ui.console.status(f"training {spec.kind} ({spec.nlist} lists) on {len(rows)} rows",
                               spinner="dots") if not ui.is_quiet() else contextlib.nullcontext():
            if use_gpu and spec.kind == "ivf":
                clus = faiss.Clustering(d, spec.nlist, index.cp)
                gpu_q = to_gpu(faiss.IndexFlatIP(d))
                clus.train(sample, gpu_q)
                quantizer.add(faiss.vector_float_to_array(clus.centroids).reshape(spec.nlist, d))
                index.is_trained = True
            else:
                index.train(sample)
        del sample
    with ui.progress() as bar:
        task = bar.add_task(f"add ({spec.kind})", total=n)
        for start, chunk in source.iter_chunks(chunk_rows):
            chunk = _check_chunk(start, chunk)
            index.add(chunk)
            bar.advance(task, len(chunk))
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} vectors, expected {n}")
    return index


def write_index(index: faiss.Index, path: str | os.PathLike) -> Path:
    """Write a (CPU) index atomically (the one atomic writer): a crash leaves the old file or the new."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))
    return path


def read_index(path: str | os.PathLike) -> faiss.Index:
    path = Path(path)
    if not path.is_file():
        raise LblError(f"{path}: no faiss index; run `lblctl build-index --store {path.parent}`")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise LblError(f"{path}: unreadable faiss index ({first}); re-run build-index") from None


# -- the self-join -----------------------------------------------------------------------------

def finish_rows(rows: np.ndarray, ids: np.ndarray, scores: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row itself and −1s, order by score then lower row number, keep k, pad with −1/NaN."""
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32).copy()
    bad = (ids < 0) | (ids == np.asarray(rows, dtype=np.int64)[:, None]) | ~np.isfinite(scores)
    scores[bad] = -np.inf
    key_ids = np.where(bad, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_ids, -scores), axis=-1)[:, :k]
    out_ids = np.take_along_axis(ids, order, 1)
    out_scores = np.take_along_axis(scores, order, 1)
    invalid = np.take_along_axis(bad, order, 1)
    out_ids[invalid] = -1
    out_scores[invalid] = np.nan
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=np.nan)
    return out_ids.astype(np.int32), out_scores.astype(np.float32)


SinkFn = Callable[[int, np.ndarray, np.ndarray], None]


def search_all(index: faiss.Index, source: VectorSource, spec: IndexSpec, k: int, sink: SinkFn, *,
               batch_size: int = 4096, use_gpu: bool = False) -> None:
    """The k nearest other rows of every row, in row order, handed to ``sink(start, ids, scores)``.

    Memory: the index, one batch of queries and results (the IVF self-join also keeps the N×k
    results in RAM, 8·k bytes a row, before handing them out in row order).
    """
    n = source.num_rows
    if n == 0:
        return
    if spec.kind == "ivf" and not use_gpu:
        _ivf_self_join(index, source, spec, k, sink, batch_size=batch_size)
        return
    search_index = index
    if spec.kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    if spec.kind == "hnsw":
        index.hnsw.efSearch = spec.ef_search
    if use_gpu and spec.kind != "hnsw":
        # exact search: the vectors split over every GPU; IVF stays on one (its nprobe is set per GPU index)
        search_index = to_all_gpus(index) if spec.kind == "flat" else to_gpu(index)
        if spec.kind in ("ivf", "ivfpq"):
            faiss.GpuParameterSpace().set_index_parameter(search_index, "nprobe", spec.nprobe)
    fetch = k + 1 + (2 if spec.kind == "flat" else 0)  # self + slack for ties at the boundary
    if spec.kind == "ivfpq":
        fetch = max(fetch, spec.rerank)
    fetch = min(fetch, n)
    with ui.progress() as bar:
        task = bar.add_task(f"search ({spec.kind})", total=n)
        for start, chunk in source.iter_chunks(batch_size):
            chunk = _check_chunk(start, chunk)
            scores, ids = search_index.search(chunk, fetch)
            rows = np.arange(start, start + len(chunk))
            if spec.kind == "ivfpq":
                scores = _rerank(source, chunk, ids)
            sink(start, *finish_rows(rows, ids, scores, k))
            bar.advance(task, len(chunk))


def _rerank(source: VectorSource, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact scores of a compressed index's short-list, from the store's own vectors."""
    valid = ids >= 0
    uniq, inverse = np.unique(ids[valid], return_inverse=True)
    vectors = (np.asarray(source.gather(uniq), dtype=np.float32) if uniq.size
               else np.zeros((0, queries.shape[1]), dtype=np.float32))
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    qi = np.nonzero(valid)[0]
    scores[valid] = np.einsum("ij,ij->i", queries[qi], vectors[inverse])
    return scores


def _ivf_lists(ivf: faiss.IndexIVF) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each inverted list's row ids and (for IVF-flat) its raw vectors, as views into the index."""
    invlists = ivf.invlists
    d = ivf.d
    ids, vecs = [], []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size == 0:
            ids.append(np.empty(0, dtype=np.int64))
            vecs.append(np.empty((0, d), dtype=np.float32))
            continue
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).astype(np.int64))
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * d * 4)
        vecs.append(np.frombuffer(codes, dtype=np.float32).reshape(size, d))
    return ids, vecs


def _ivf_self_join(index: faiss.Index, source: VectorSource, spec: IndexSpec, k: int, sink: SinkFn, *,
                   batch_size: int) -> None:
    """Each inverted list's rows as one block of queries, scored with one matrix product against
    the vectors of the ``nprobe`` lists nearest to that list's centroid (probing per list, not per
    query: a query lies nearest its own centroid, so these are nearly the lists faiss would probe
    for it; the recall estimate measures the difference)."""
    ivf = faiss.extract_index_ivf(index)
    n, nlist = source.num_rows, ivf.nlist
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    nprobe = min(spec.nprobe, nlist)
    _, probes = ivf.quantizer.search(centroids, nprobe)
    list_ids, list_vecs = _ivf_lists(ivf)
    out_ids = np.full((n, k), -1, dtype=np.int32)
    out_scores = np.full((n, k), np.nan, dtype=np.float32)
    with ui.progress() as bar:
        task = bar.add_task(f"search (ivf blocks, nprobe {nprobe})", total=n)
        for lst in range(nlist):
            q_ids = list_ids[lst]
            if q_ids.size == 0:
                continue
            probe = [int(p) for p in probes[lst] if p >= 0]
            if lst not in probe:
                probe = [lst, *probe[:-1]]
            db_ids = np.concatenate([list_ids[p] for p in probe])
            db = np.concatenate([list_vecs[p] for p in probe])
            step = max(1, _BLOCK_FLOATS // max(1, len(db_ids)))
            for s in range(0, len(q_ids), step):
                rows = q_ids[s : s + step]
                sims = list_vecs[lst][s : s + step] @ db.T
                keep = min(k + 1, sims.shape[1])
                if keep < sims.shape[1]:
                    top = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
                else:
                    top = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
                ids, scores = finish_rows(rows, db_ids[top], np.take_along_axis(sims, top, 1), k)
                out_ids[rows] = ids
                out_scores[rows] = scores
            bar.advance(task, len(q_ids))
    for start in range(0, n, batch_size):
        sink(start, out_ids[start : start + batch_size], out_scores[start : start + batch_size])


# -- exact reference and recall ----------------------------------------------------------------

def exact_knn(source: VectorSource, rows: np.ndarray, k: int, *, chunk_rows: int = 65536,
              description: str = "exact k-NN") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows of ``rows`` (one pass over the store, bounded memory)."""
    rows = np.asarray(rows, dtype=np.int64)
    queries = _check_chunk(0, source.gather(rows)) if rows.size else np.zeros((0, source.embedding_size),
                                                                              np.float32)
    fetch = min(k + 3, source.num_rows)
    heap = faiss.ResultHeap(len(rows), fetch, keep_max=True)
    with ui.progress() as bar:
        task = bar.add_task(description, total=source.num_rows)
        for start, chunk in source.iter_chunks(chunk_rows):
            chunk = _check_chunk(start, chunk)
            kk = min(fetch, len(chunk))
            scores, ids = faiss.knn(queries, chunk, kk, metric=faiss.METRIC_INNER_PRODUCT)
            if kk < fetch:
                scores = np.pad(scores, ((0, 0), (0, fetch - kk)), constant_values=-np.inf)
                ids = np.pad(ids, ((0, 0), (0, fetch - kk)), constant_values=-1)
            ids = np.where(ids >= 0, ids + start, -1)
            heap.add_result(np.ascontiguousarray(scores, dtype=np.float32),
                            np.ascontiguousarray(ids, dtype=np.int64))
            bar.advance(task, len(chunk))
    heap.finalize()
    return finish_rows(rows, heap.I, heap.D, k)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact neighbours (−1 padding ignored) that the approximate search found."""
    hits = total = 0
    for f, e in zip(found, exact, strict=True):
        e = e[e >= 0]
        total += len(e)
        hits += len(np.intersect1d(f[f >= 0], e))
    return hits / total if total else 1.0


def estimate_recall(source: VectorSource, queues: Queues, k: int, sample_rows: int, seed: int
                    ) -> tuple[float, int]:
    """Recall@k of the written candidate queues on a random sample of rows vs exact search."""
    n = source.num_rows
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample_rows), replace=False))
    exact, _ = exact_knn(source, rows, k, description=f"recall check ({len(rows)} rows)")
    return recall_at_k(queues.candidates(rows), exact), len(rows)


# -- the build-index stage ---------------------------------------------------------------------

INDEX_MANIFEST = "index_manifest.json"


@dataclass
class BuildIndexConfig:
    store: Path
    candidates: int = 50
    dominant: int = 20
    index: str = "auto"
    nlist: int = 0
    nprobe: int = 0
    ef_search: int = 0
    dup_threshold: float | None = None
    dup_html: bool = False
    batch_size: int = 4096
    recall_rows: int = 1000
    seed: int = 0


def build_store_index(cfg: BuildIndexConfig, use_gpu: bool = False) -> dict[str, Any]:
    """Index a prototype store, write its queues, duplicate report and index manifest; return a summary.

    A sharded store (:mod:`lblctl.core.shards`) is read through its shards by global row; each shard gets
    the queues of its own rows (global row ids inside), the index and the duplicate report stay at the top."""
    from lblctl.core.shards import ShardedQueues, ShardedQueueWriter, open_store_view, queue_paths, read_layout
    from lblctl.stages.duplicates import (
        DUPLICATES_CSV,
        DUPLICATES_HTML,
        auto_threshold,
        find_pairs,
        write_csv,
        write_html,
    )

    if cfg.index not in INDEX_KINDS:
        raise LblError(f"--index {cfg.index}: expected one of {', '.join(INDEX_KINDS)}")
    if cfg.candidates < 1:
        raise LblError(f"--candidates {cfg.candidates}: need at least 1")
    if not 0 <= cfg.dominant <= cfg.candidates:
        raise LblError(f"--dominant {cfg.dominant}: must be between 0 and --candidates ({cfg.candidates})")
    if cfg.batch_size < 1:
        raise LblError(f"--batch-size {cfg.batch_size}: need at least 1")
    if cfg.dup_threshold is not None and not -1.0 <= cfg.dup_threshold <= 1.0:
        raise LblError(f"--dup-threshold {cfg.dup_threshold}: a cosine, between -1 and 1")
    folder = Path(cfg.store)
    use_gpu = bool(use_gpu and gpu_count() > 0)
    t_start = time.perf_counter()
    layout = read_layout(folder)
    with open_store_view(folder) as store:
        n, d = store.num_rows, store.embedding_size
        if n < 2:
            raise LblError(f"{folder}: the store holds {n} identit{'y' if n == 1 else 'ies'}; "
                           "queues need at least 2")
        k, dominant = queue_sizes(n, cfg.candidates, cfg.dominant)
        spec = choose_index(n, d, k, cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
        where = "GPU" if use_gpu else "CPU"
        ui.info(f"{n} prototypes × {d}: {spec.kind} index ({spec.reason}); faiss on {where}")
        t0 = time.perf_counter()
        index = build_index(store, spec, seed=cfg.seed, chunk_rows=max(cfg.batch_size, 65536),
                            use_gpu=use_gpu)
        build_s = time.perf_counter() - t0
        write_index(index, folder / INDEX_FILE)
        attrs = {"embedding_size": d, "backbone_fingerprint": store.backbone_fingerprint or "",
                 "index": json.dumps(spec.as_dict())}
        t0 = time.perf_counter()
        with (Queues.create(folder / QUEUES, n, k, dominant, attrs) if layout is None else
              ShardedQueueWriter(folder, layout, k, dominant, attrs)) as writer:
            search_all(index, store, spec, k, writer.write, batch_size=cfg.batch_size, use_gpu=use_gpu)
            writer.commit()
        search_s = time.perf_counter() - t0
        del index
        with (Queues.open(folder / QUEUES, "r") if layout is None else ShardedQueues(folder, layout)) as queues:
            if spec.kind == "flat":
                recall, recall_rows = 1.0, 0
            else:
                t0 = time.perf_counter()
                recall, recall_rows = estimate_recall(store, queues, k, cfg.recall_rows, cfg.seed)
                ui.info(f"recall@{k} ≈ {recall:.4f} on {recall_rows} random rows vs exact search "
                        f"({time.perf_counter() - t0:.1f} s)")
                if recall < LOW_RECALL:
                    ui.warn(f"recall@{k} {recall:.3f} is low: these prototypes have little cluster structure "
                            "for an IVF index; use --index hnsw (or flat, exact) or a larger --nprobe")
            nn = np.concatenate([s[:, 0] for _, _, s in queues.iter_chunks()])
            threshold = (auto_threshold(nn) if cfg.dup_threshold is None else
                         _given_threshold(cfg.dup_threshold))
            a, b, s = find_pairs(queues.iter_chunks(), threshold.value)
        names, photos = store.names, _id_photos(store)
        write_csv(folder / DUPLICATES_CSV, a, b, s, names, photos)
        queue_files = [str(p.relative_to(folder)) for p in queue_paths(folder, layout)]
        files = [INDEX_FILE, *queue_files, DUPLICATES_CSV]
        if cfg.dup_html:
            write_html(folder / DUPLICATES_HTML, a, b, s, names, photos, threshold=threshold)
            files.append(DUPLICATES_HTML)
        backbone_fp = store.backbone_fingerprint
    finite = nn[np.isfinite(nn)]
    summary: dict[str, Any] = {
        "store": str(folder),
        "identities": n,
        "embedding_size": d,
        "index": spec.as_dict(),
        "faiss_device": (f"gpu × {gpu_count()}" if gpu_count() > 1 and spec.kind == "flat" else "gpu")
        if use_gpu else "cpu",
        "layout": f"sharded for {layout.world_size}" if layout is not None else "plain",
        "candidates": k,
        "dominant": dominant,
        "recall_at_k": round(recall, 5),
        "recall_rows": recall_rows,
        "recall_note": ("exact index" if spec.kind == "flat"
                        else f"vs exact search on {recall_rows} random rows"),
        "nn_score_median": round(float(np.median(finite)), 5) if finite.size else None,
        "duplicates": int(len(a)),
        "dup_threshold": round(threshold.value, 5),
        "dup_threshold_rule": threshold.rule,
        "build_s": round(build_s, 2),
        "search_s": round(search_s, 2),
        "total_s": round(time.perf_counter() - t_start, 2),
        "files": [str(folder / f) for f in files],
    }
    write_index_manifest(folder, files, params={k2: v for k2, v in vars(cfg).items() if k2 != "store"},
                         embedding_size=d, backbone_fingerprint=backbone_fp, summary=summary)
    return summary


def queue_sizes(n: int, candidates: int, dominant: int) -> tuple[int, int]:
    """Queue widths that fit N identities (at most N − 1 others each), with a warning when cut."""
    k, dq = min(candidates, n - 1), min(dominant, n - 1)
    if (k, dq) != (candidates, dominant):
        ui.warn(f"--candidates {candidates} / --dominant {dominant}: the store holds {n} identities, so each "
                f"has only {n - 1} others; using --candidates {k} --dominant {dq}")
    return k, dq


def _given_threshold(value: float):
    from lblctl.stages.duplicates import Threshold

    return Threshold(float(value), "given by --dup-threshold")


def _id_photos(store: Any) -> Any:
    try:
        photos = store.id_photos
    except (AttributeError, KeyError):
        return None
    return photos if len(photos) == store.num_rows else None


def write_index_manifest(folder: Path, files: list[str], *, params: dict[str, Any], embedding_size: int,
                         backbone_fingerprint: str | None, summary: dict[str, Any]) -> dict[str, Any]:
    """``STORE/index_manifest.json``: beside the store's own manifest, never over it."""
    keys = ("index", "recall_at_k", "recall_rows", "duplicates", "dup_threshold", "dup_threshold_rule")
    return write_manifest(folder, "index", params=params, inputs={"store": describe_input(folder)}, files=files,
                          embedding_size=embedding_size, backbone_fingerprint=backbone_fingerprint,
                          extra={k: summary[k] for k in keys}, filename=INDEX_MANIFEST)


def run(cfg: BuildIndexConfig, device: Any = "auto") -> Summary:
    """The build-index stage: faiss on the GPU when ``device`` is one (and faiss-gpu is installed)."""
    from lblctl.core.dist import from_environ
    from lblctl.core.runtime import as_device

    if from_environ().active:  # W processes would each write the same index and queue files
        raise LblError("build-index runs in one process (with faiss-gpu it uses every visible GPU itself); "
                       "run it without torchrun, on a plain or a sharded store")
    return Summary("build-index", build_store_index(cfg, use_gpu=as_device(device).type == "cuda"))
