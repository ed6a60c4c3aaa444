"""Precomputed embeddings: an HDF5 file with ``features`` M×D and ``identities`` M (one reader, for
``imprint --features`` and ``train-dp --features``).

Rows of one identity are grouped by the name's value (hashes only find candidates), so two
different names never merge, however their hashes fall.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lblctl.core.errors import LblError
from lblctl.core.strings import StringArray, StringArrayBuilder

EXPECTED = "expected datasets 'features' M×D and 'identities' M"


class FeaturesFile:
    """An open features file, checked when opened; use as a context manager or ``close()``."""

    def __init__(self, path: str | os.PathLike, *, embedding_size: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LblError(f"--features {self.path}: no such file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError:
            raise LblError(f"--features {self.path}: not an HDF5 file; {EXPECTED}") from None
        try:
            if "features" not in self._h5 or "identities" not in self._h5:
                raise LblError(f"--features {self.path}: needs datasets 'features' (M×D) and 'identities' (M); "
                               f"found {', '.join(self._h5.keys()) or 'none'}")
            self.features: Any = self._h5["features"]  # an h5py dataset: rows are read on demand
            self._idents = self._h5["identities"]
            if self.features.ndim != 2 or self._idents.shape != (self.features.shape[0],):
                raise LblError(f"--features {self.path}: 'features' is {self.features.shape} and 'identities' "
                               f"{self._idents.shape}; {EXPECTED}")
            if embedding_size is not None and self.features.shape[1] != embedding_size:
                raise LblError(f"--features {self.path}: features are {self.features.shape}, the store needs "
                               f"M×{embedding_size}")
        except LblError:
            self._h5.close()
            raise
        self.num_rows, self.dim = (int(x) for x in self.features.shape)
        fp = self._h5.attrs.get("backbone_fingerprint")
        self.backbone_fingerprint: str | None = str(fp) if fp else None

    def names(self, chunk: int = 1 << 16) -> StringArray:
        """The identity name of every row (M), read in chunks into a compact array."""
        out = StringArrayBuilder()
        for a in range(0, self.num_rows, chunk):
            for x in self._idents[a:a + chunk]:
                out.append(x.decode("utf-8") if isinstance(x, bytes) else str(x))
        return out.build()

    def identities(self) -> tuple[StringArray, np.ndarray]:
        """The distinct identities in order of first appearance, and each row's identity number."""
        names = self.names()
        first, inverse = names.unique()
        distinct = StringArrayBuilder()
        for r in first.tolist():
            distinct.append(names[r])
        return distinct.build(), inverse

    def rows_in(self, store_names: StringArray, chunk: int = 1 << 16) -> np.ndarray:
        """Per feature row, the row of its identity in ``store_names`` (−1 where the store lacks it)."""
        names = self.names()
        out = np.empty(len(names), dtype=np.int64)
        for a in range(0, len(names), chunk):
            out[a:a + chunk] = store_names.lookup(names[a:a + chunk])
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.features[start:stop])

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> FeaturesFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
