"""Dominant-prototype machinery: which K classes a step trains, how the queues learn from its
predictions. (The undo journal that lets a killed run roll the store back to its checkpoint is
:mod:`lblctl.core.undo`, part of the one crash-safety layer; it is re-exported here.)

Nothing here touches a file format directly: the store is :mod:`lblctl.core.store`, the queues are
:mod:`lblctl.core.queues`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lblctl.core.undo import UndoJournal  # noqa: F401 - re-exported: the journal lives in the core layer


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
