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

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class _EpochPermutation:
    """A keyed bijection of ``0…n−1`` (one epoch's order), computed per position in O(1).

    A balanced Feistel network over the smallest even-bit power of two ≥ n, its round function the
    splitmix64 finaliser under six keys drawn from (seed, epoch); positions that land outside
    ``0…n−1`` are fed through again (cycle walking), which keeps it a bijection of ``0…n−1``.
    No O(n) table is ever built, so the sampler's cost per step does not grow with N.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n, self.epoch = int(n), int(epoch)
        bits = max(2, (self.n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.default_rng([int(seed), 3, self.epoch]).bit_generator.random_raw(self.ROUNDS)
        self.keys = np.asarray(self.keys, dtype=np.uint64)

    def _round(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        z = r ^ key
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The permuted value of each position (uint64, each in ``0…n−1``)."""
        with np.errstate(over="ignore"):
            out = self._feistel(np.asarray(positions, dtype=np.uint64))
            out_of_range = out >= np.uint64(self.n)
            while out_of_range.any():  # cycle walking: at most 4× the domain, a few rounds expected
                out[out_of_range] = self._feistel(out[out_of_range])
                out_of_range = out >= np.uint64(self.n)
        return out


class DominantSampler:
    """Chooses each step's K classes: S sampled identities, then their dominant queues, in order.

    The S identities come from a permutation of the trainable rows that depends only on
    (seed, epoch), so an epoch visits every trainable identity once. The permutation is a keyed
    bijection (:class:`_EpochPermutation`), evaluated only at the S positions a step needs: a step
    costs O(S) whatever N, and any step (a resumed run's) is computed without the ones before it.
    Queue members are taken
    column by column (every queue's first entry, then every second, …), so the hardest
    negatives of all S identities enter before the easier ones. Short queues are topped up with
    random rows. ``hard_fraction`` caps the queue members at that share of the K − S non-sampled
    slots; the rest are random rows (train-dp's default 0.5: with every slot a queue member the
    prototypes in the queues are pushed away from the data while rows outside them are not, and
    retrieval over all N collapses; README "Does train-dp pay off?"). ``mode="random"`` skips the
    queues (Partial-FC-style baseline); ``"full"`` selects every row.
    """

    def __init__(self, num_rows: int, trainable: np.ndarray, classes: int, sampled: int, seed: int,
                 mode: str = "dp", hard_fraction: float = 1.0) -> None:
        self.num_rows = int(num_rows)
        self.trainable = np.asarray(trainable, dtype=np.int64)
        self.mode = mode
        self.classes = self.num_rows if mode == "full" else min(int(classes), self.num_rows)
        self.sampled = min(int(sampled), self.classes, len(self.trainable))
        self.seed = int(seed)
        self.hard_fraction = float(hard_fraction)
        self._perm: _EpochPermutation | None = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.trainable) // self.sampled)

    def seeds(self, step: int) -> np.ndarray:
        """The S sampled identities of ``step``: positions ``pos·S … pos·S+S−1`` of its epoch's permutation."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        perm = self._perm  # one read: another thread (the streamer's read-ahead) may replace it meanwhile
        if perm is None or perm.epoch != epoch:
            perm = self._perm = _EpochPermutation(len(self.trainable), self.seed, epoch)
        at = np.arange(pos * self.sampled, (pos + 1) * self.sampled, dtype=np.uint64)
        return self.trainable[perm(at).astype(np.int64)]

    def select(self, step: int, dominant_of: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
        """The K class rows of ``step``; the first ``sampled`` are the sampled identities."""
        seeds = self.seeds(step)
        if self.mode == "full":
            rest = np.setdiff1d(np.arange(self.num_rows), seeds, assume_unique=True)
            return np.concatenate([seeds, rest])
        chosen = [seeds]
        taken = set(seeds.tolist())
        need = self.classes - len(seeds)
        hard = int(np.floor(self.hard_fraction * need + 1e-9))
        if self.mode == "dp" and dominant_of is not None and hard > 0:
            flat = np.asarray(dominant_of(seeds)).T.reshape(-1)  # column-major: hardest first
            flat = flat[flat >= 0]
            _, first = np.unique(flat, return_index=True)
            ordered = flat[np.sort(first)]
            fresh = [r for r in ordered.tolist() if r not in taken][:hard]
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
