"""The HDF5 layer of the core files (the prototype store and the queues): the one place besides the
features reader that opens h5py. Row files are contiguous, early-allocated datasets, so that rows
are updated in place (through a memory map or a plain write) without touching HDF5 metadata."""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from lblctl.core.errors import IncompatibleArtifact

Dataset = h5py.Dataset
File = h5py.File


def open_file(path: str | os.PathLike, mode: str = "r", *, what: str = "HDF5 file", hint: str = "",
              **kw: Any) -> h5py.File:
    """``h5py.File(path, mode)``; an unreadable file is an :class:`IncompatibleArtifact` naming ``what``."""
    try:
        return h5py.File(path, mode, **kw)
    except OSError as exc:
        if mode in ("w", "w-", "x"):
            raise
        raise IncompatibleArtifact(f"{path}: not a readable {what} (truncated or another format: "
                                   f"{str(exc).splitlines()[0][:120]}){hint}") from None


def contiguous_dcpl() -> h5py.h5p.PropDCID:
    """A dataset layout that is contiguous and allocated at creation (it has a file offset at once),
    never filled (no gigabytes of zeros written when it is made)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def string_dtype() -> Any:
    return h5py.string_dtype("utf-8")


def row_map(path: str | os.PathLike, ds: h5py.Dataset) -> np.ndarray | None:
    """A read-only memory map of a contiguous, allocated dataset (None otherwise): scattered rows read through
    it cost ~0.1 ms per 256 where h5py's point selection takes ~2 ms. Writes through h5py land in the same
    file pages, so the map sees them."""
    offset = ds.id.get_offset()
    if offset is None or ds.chunks is not None or ds.size == 0:
        return None
    return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)


def read_rows(ds: h5py.Dataset, rows: np.ndarray, mapped: np.ndarray | None = None) -> np.ndarray:
    """``ds[rows]`` for any order and repeats (h5py wants sorted unique indices); through ``mapped``
    (:func:`row_map`) when given."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
    if rows.min() < 0 or rows.max() >= ds.shape[0]:
        raise IndexError(f"row out of range 0..{ds.shape[0] - 1}")
    if mapped is not None:
        return np.asarray(mapped[rows])
    uniq, inverse = np.unique(rows, return_inverse=True)
    span = int(uniq[-1] - uniq[0] + 1)
    if span <= 4 * len(uniq) + 256:  # dense enough: one contiguous read
        block = ds[int(uniq[0]) : int(uniq[-1]) + 1]
        data = block[uniq - uniq[0]]
    else:
        data = ds[uniq]
    return data[inverse.reshape(-1)]


def write_runs(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """Write sorted unique rows in runs of consecutive rows (few, large HDF5 writes)."""
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run_rows, run_vals in zip(np.split(rows, breaks), np.split(values, breaks), strict=True):
        ds[int(run_rows[0]) : int(run_rows[-1]) + 1] = run_vals
