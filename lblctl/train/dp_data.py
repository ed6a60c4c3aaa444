"""Photos of a step's classes for ``train-dp``: images from identity folders, or precomputed
features (head-only mode). Both map store rows to their photos by identity name."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lblctl.core.strings import StringArray
from lblctl.data.faces import FaceIndex, ImageProblem, Preprocess, ProblemLog, load_image
from lblctl.data.features import FeaturesFile


class ImageSource:
    """Store row → identity folder; P photos per class, the ID photo first (bisample)."""

    kind = "images"

    def __init__(self, index: FaceIndex, store_names: StringArray, preprocess: Preprocess, workers: int) -> None:
        self.index, self.preprocess = index, preprocess
        ident_of_row = index.names.lookup(store_names)  # store row → identity (−1: no photos)
        self.ident_of_row = ident_of_row
        self.trainable = np.flatnonzero(ident_of_row >= 0)
        self.missing_in_store = int(index.num_identities - len(self.trainable))
        self.problems = ProblemLog()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="lblctl-decode")

    def choose(self, rows: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(image rows, label positions) for the classes ``rows`` (those without photos are skipped)."""
        picks, labels = [], []
        for pos, r in enumerate(rows.tolist()):
            ident = int(self.ident_of_row[r])
            if ident < 0:
                continue
            ids, spots = self.index.images_of(ident, "id"), self.index.images_of(ident, "spot")
            chosen = [int(rng.choice(ids))]
            if per_class > 1:
                pool = spots if len(spots) else self.index.images_of(ident)
                chosen += rng.choice(pool, per_class - 1, replace=len(pool) < per_class - 1).tolist()
            picks += chosen
            labels += [pos] * len(chosen)
        return np.asarray(picks, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def _load(self, image: int) -> torch.Tensor | None:
        path = self.index.path(image)
        try:
            return self.preprocess(load_image(path))
        except ImageProblem as exc:
            self.problems.add(path, str(exc))
            return None

    def load(self, items: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = list(self._pool.map(self._load, items.tolist()))
        keep = [i for i, t in enumerate(tensors) if t is not None]
        if not keep:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.stack([tensors[i] for i in keep]), torch.as_tensor(labels[keep])

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class FeatureSource:
    """Precomputed embeddings (``features`` M×D, ``identities`` M): a store can be trained without
    images. Rows of one identity are that identity's "photos"."""

    kind = "features"

    def __init__(self, path: str | os.PathLike, store_names: StringArray, embedding_size: int,
                 ram_limit_bytes: int = 2 << 30) -> None:
        self._file = FeaturesFile(path, embedding_size=embedding_size)
        feats = self._file.features
        row_of_feature = self._file.rows_in(store_names)
        order = np.argsort(row_of_feature, kind="stable")
        sorted_rows = row_of_feature[order]
        valid = sorted_rows >= 0
        self.order = order[valid]
        sorted_rows = sorted_rows[valid]
        num_rows = len(store_names)
        self.starts = np.searchsorted(sorted_rows, np.arange(num_rows + 1))
        self.trainable = np.flatnonzero(np.diff(self.starts) > 0)
        self.missing_in_store = int((row_of_feature < 0).sum())
        self.problems = ProblemLog()
        self._ram = feats[:].astype(np.float32) if feats.size * 4 <= ram_limit_bytes else None
        self._feats = feats

    def choose(self, rows: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        picks, labels = [], []
        for pos, r in enumerate(rows.tolist()):
            lo, hi = int(self.starts[r]), int(self.starts[r + 1])
            if hi == lo:
                continue
            k = rng.choice(np.arange(lo, hi), per_class, replace=(hi - lo) < per_class)
            picks += self.order[k].tolist()
            labels += [pos] * per_class
        return np.asarray(picks, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def load(self, items: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ram is not None:
            x = self._ram[items]
        else:
            uniq, inverse = np.unique(items, return_inverse=True)
            x = self._feats[uniq].astype(np.float32)[inverse]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.as_tensor(labels)

    def close(self) -> None:
        self._file.close()
