"""The store streamer: all of train-dp's store traffic, in one background thread, in order.

While step t computes, the thread writes back step t−1 (the rows and their momentum, as a provisional
commit: the store keeps them in memory until train-dp's next checkpoint) and prepares step t+1
(gather its rows and momentum, choose and decode its photos). Step t+1 was gathered before step t's
rows were written back, so when it is handed out the rows it shares with step t are patched with
step t's fresh values: no update is lost, and the result is bit-identical to the serial order
(``overlap=False``: gather step t+1 only once step t is committed), which is kept as the reference.

An error in the thread (a full disk, an unreadable store) is re-raised in the main thread at the
next :meth:`StoreStreamer.next`, :meth:`write_back` or :meth:`drain`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from lblctl.core.store import PrototypeStore, cast

Photos = Callable[[int, np.ndarray], tuple[torch.Tensor, torch.Tensor]]  # (step, class rows) → (inputs, labels)


@dataclass
class StepData:
    """Everything step ``step`` needs, made by the background thread."""

    step: int
    rows: np.ndarray
    vectors: np.ndarray
    momentum: np.ndarray | None
    inputs: torch.Tensor
    labels: torch.Tensor


def as_stored(v: np.ndarray, dtype: str, normalise: bool) -> np.ndarray:
    """What the store returns after writing ``v``: renormalised in float32, cast to its dtype."""
    v = np.asarray(v, dtype=np.float32)
    if normalise:
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return cast(cast(v, np.float16 if dtype == "float16" else np.float32), np.float32)


def _one_torch_thread() -> None:
    """Torch ops in this thread (stacking a batch, preprocessing) run serially.

    OpenMP gives every thread that enters a parallel region its own team: with the default
    (all cores) the streamer's first ``torch.stack`` would start a second team beside the training
    step's, more busy threads than cores, and each of the step's parallel regions then waits at its
    barrier for a worker the streamer preempted. ``torch.set_num_threads`` here sets this thread's
    OpenMP team size (and the default of threads started after it, which the constructor restores);
    the main thread's is unchanged.
    """
    torch.get_num_threads()  # torch's lazy per-thread init first, or it would undo the next line
    torch.set_num_threads(1)


class StoreStreamer:
    """Hands out the steps' data in order and takes their trained rows back.

    ``select(step)`` gives a step's class rows; it is called in the main thread (it reads the
    dominant queues, which the main thread updates) one step ahead: the rows of step t+1 are
    chosen when step t is handed out, and are :attr:`next_rows` until step t+1 is.
    ``photos(step, rows)`` chooses and loads a step's photos in the background thread.
    ``lookahead`` d > 0: when step t+1's rows are chosen, the background thread chooses the rows of step
    t+1+d too (the sampler is deterministic; the queues may still change, so they are a hint) and the
    store starts reading their pages (:meth:`PrototypeStore.prefetch`): a cold gather finds them in memory
    d steps later, and so does the main thread's ``select`` the queue rows it reads. ``ahead(step)``, when
    given, chooses those rows instead of ``select`` (a sharded run's ``select`` is collective: the
    background thread must not call it).
    """

    def __init__(self, store: PrototypeStore, select: Callable[[int], np.ndarray], photos: Photos, *,
                 overlap: bool = True, pin: bool = False, lookahead: int = 2,
                 ahead: Callable[[int], np.ndarray] | None = None) -> None:
        self.store, self.select, self.photos = store, select, photos
        self.ahead = ahead  # the read-ahead's rows (None: select's); not select where that joins collectives
        self.lookahead = lookahead
        self.overlap, self.pin = overlap, pin  # pin: page-lock the photos, so the copy to the GPU is async
        self.wait_s = 0.0  # main thread blocked on the thread: store traffic + decoding not hidden
        threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lblctl-store", initializer=_one_torch_thread)
        self._pool.submit(int).result()  # the thread exists and has set its own team size
        torch.set_num_threads(threads)  # threads started later (none of ours) get the default again
        self._writes: deque[Future] = deque()
        self._fresh: tuple[int, np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._cur: tuple[int, np.ndarray, Future | None] | None = None
        self._nxt: tuple[int, np.ndarray, Future | None] | None = None
        self._handed = False

    # ------------------------------------------------------------------ background work
    def _prepare(self, step: int, rows: np.ndarray) -> StepData:
        vec = self.store.gather(rows)
        mom = self.store.gather_momentum(rows) if self.store.has_momentum else None
        x, y = self.photos(step, rows)
        if self.pin and x.numel():
            x = x.pin_memory()
        return StepData(step, rows, vec, mom, x, y)

    def _write(self, step: int, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None) -> None:
        self.store.scatter(rows, vec, momentum=mom, normalised=True)  # the bits the next step was patched with
        self.store.commit(step, provisional=True)  # made durable by train-dp's checkpoint (store.checkpoint)

    def _prefetch(self, step: int) -> None:
        if self.lookahead > 0 and self.overlap:
            self._pool.submit(self._read_ahead, step)

    def _read_ahead(self, step: int) -> None:
        self.store.prefetch((self.ahead or self.select)(step))

    def _submit(self, step: int, rows: np.ndarray) -> Future:
        return self._pool.submit(self._prepare, step, rows)

    # ------------------------------------------------------------------ main thread
    def start(self, step: int, rows: np.ndarray) -> None:
        """Begin at ``step`` with its rows (a resumed run's saved :attr:`next_rows`)."""
        self._cur = (step, rows, self._submit(step, rows))
        nrows = self.select(step + 1)
        self._nxt = (step + 1, nrows, self._submit(step + 1, nrows) if self.overlap else None)
        self._handed = False
        for ahead in range(step + 2, step + 2 + self.lookahead):  # the steps between: their pages too
            self._prefetch(ahead)

    @property
    def next_rows(self) -> np.ndarray:
        """Rows of the step after the one handed out last (what a checkpoint must remember)."""
        assert self._nxt is not None, "start() first"
        return self._nxt[1]

    def next(self) -> StepData:
        """The next step's data, its rows shared with the previous step patched with fresh values."""
        assert self._cur is not None and self._nxt is not None, "start() first"
        if self._handed:
            step, rows, fut = self._nxt
            if fut is None:  # serial: gather only once the previous step is committed
                self.drain()
                fut = self._submit(step, rows)
            self._cur = (step, rows, fut)
            nrows = self.select(step + 1)
            self._nxt = (step + 1, nrows, self._submit(step + 1, nrows) if self.overlap else None)
            self._prefetch(step + 1 + self.lookahead)
        self._handed = True
        step, _, fut = self._cur
        assert fut is not None
        t0 = time.perf_counter()
        data = fut.result()
        self.wait_s += time.perf_counter() - t0
        if self._fresh is not None and self._fresh[0] == step - 1:
            _, rows, vec, mom = self._fresh
            _, i, j = np.intersect1d(data.rows, rows, assume_unique=True, return_indices=True)
            data.vectors[i] = vec[j]
            if data.momentum is not None and mom is not None:
                data.momentum[i] = mom[j]
        self._reap(block=False)
        return data

    def write_back(self, data: StepData, vectors: np.ndarray, momentum: np.ndarray | None, commit_as: int) -> None:
        """Queue the trained rows of ``data``'s step (and their momentum) for the store, committed as
        step ``commit_as`` (the engine's count of steps done)."""
        vec = as_stored(vectors, self.store.dtype, True)
        mom = as_stored(momentum, self.store.dtype, False) if (momentum is not None and self.store.has_momentum) \
            else None
        self._writes.append(self._pool.submit(self._write, commit_as, data.rows, vec, mom))
        self._fresh = (data.step, data.rows, vec, mom)
        self._reap(block=False)

    def _reap(self, block: bool) -> None:
        while self._writes and (block or self._writes[0].done()):
            self._writes.popleft().result()  # re-raise a writer error here, in the main thread

    def drain(self) -> None:
        """Wait until every queued write-back is committed (before a checkpoint, at the end)."""
        self._reap(block=True)

    def close(self) -> None:
        """Stop the thread; pending preparations are dropped, write-backs finished."""
        if self._nxt is not None and self._nxt[2] is not None:
            self._nxt[2].cancel()
        self._pool.shutdown(wait=True)

