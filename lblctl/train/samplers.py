"""Identity-balanced batches: P identities × K images each (FaceNet, "In defense of the triplet loss").

Triplet and pair-verification losses need genuine pairs in every batch; plain shuffled batches of
a long-tailed face set almost never have them. Like :class:`~lblctl.data.faces.EpochBatchSampler`, the
batches depend only on (seed, epoch), so a resumed run sees exactly the ones it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from lblctl.core.dist import DistEnv
from lblctl.core.errors import LblError


class PKBatchSampler(Sampler[list[int]]):
    """Batches of ``p`` distinct identities × ``k`` dataset items each.

    ``labels`` gives the identity of every dataset item. Identities with fewer than
    ``min_images`` items are left out (one photo makes no genuine pair). An epoch has as many
    batches as a plain sampler would (eligible items // (p·k)), so ``--epochs`` means the same
    number of images with or without P×K. Identities are visited in shuffled rounds (each round
    visits every identity at most once); each visit takes the next ``k`` photos of the identity's
    own shuffled cycle, so its photos are all used before any repeats (an identity with fewer
    than ``k`` repeats them inside the batch). ``start`` skips that many batches of the epoch.

    With ``is_id`` (which items are ID photos), every visit is **one ID photo + k − 1 spot
    photos** of the identity (the ID-vs-spot pairs of the CVC recipe's V stage): the ID photo
    cycles through the identity's ID photos, the spots through its own shuffled cycle, and
    identities without an ID photo or without a spot photo are left out.
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int, epoch: int = 0, start: int = 0,
                 min_images: int = 2, is_id: np.ndarray | None = None) -> None:
        if p < 2 or k < 2:
            raise LblError(f"--pk-identities {p} --pk-images {k}: need at least 2 identities × 2 images")
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        ids, first, counts = np.unique(labels[order], return_index=True, return_counts=True)
        keep = counts >= min_images
        self.id_groups: list[np.ndarray] | None = None
        if is_id is not None:
            is_id = np.asarray(is_id, dtype=bool)
            n_id = np.add.reduceat(is_id[order].astype(np.int64), first) if len(first) else first
            keep &= (n_id > 0) & (n_id < counts)
        self.groups = [order[f:f + c] for f, c in zip(first[keep], counts[keep], strict=True)]
        if is_id is not None:
            self.id_groups = [g[is_id[g]] for g in self.groups]
            self.groups = [g[~is_id[g]] for g in self.groups]  # the spot photos
        self.identities = ids[keep]
        if len(self.groups) < p:
            need = "an ID photo and a spot photo" if is_id is not None else f"≥ {min_images} photos"
            raise LblError(f"--pk-identities {p}: only {len(self.groups)} identities have {need}; "
                           "lower P or add data")
        self.items = int(counts[keep].sum())
        self.p, self.k, self.seed, self.epoch, self.start = p, k, seed, epoch, start

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def batches_per_epoch(self) -> int:
        return max(1, self.items // (self.p * self.k))

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)

    def _plan(self) -> list[np.ndarray]:
        """Every batch of the epoch, drawn up front: skipped batches cost no decoding, and the
        batches after ``start`` are exactly those of an uninterrupted epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        n, per_round = self.batches_per_epoch(), len(self.groups) // self.p
        cycles: dict[int, list[int]] = {}
        batches: list[np.ndarray] = []
        while len(batches) < n:
            order = rng.permutation(len(self.groups))
            for b in range(min(per_round, n - len(batches))):
                picks = []
                for g in order[b * self.p:(b + 1) * self.p]:
                    group, queue = self.groups[g], cycles.setdefault(int(g), [])
                    k = self.k if self.id_groups is None else self.k - 1
                    if self.id_groups is not None:  # the ID photo first, in turn when there are several
                        id_queue = cycles.setdefault(-1 - int(g), [])
                        if not id_queue:
                            id_queue[:] = rng.permutation(self.id_groups[g]).tolist()
                        picks.append(id_queue[:1])
                        del id_queue[:1]
                    if len(queue) < k:  # start a fresh shuffled cycle (no repeats within a visit)
                        reps = -(-k // len(group))
                        queue[:] = np.concatenate([rng.permutation(group) for _ in range(reps)]).tolist()
                    picks.append(queue[:k])
                    del queue[:k]
                batches.append(np.concatenate(picks))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._plan()[self.start:]:
            yield batch.tolist()


class RankSlice(Sampler[list[int]]):
    """This rank's equal slice of every batch another batch sampler draws (torchrun data parallel).

    Every rank draws the same global batches (same seed, epoch, start), so W ranks together see
    exactly what one process would, and resuming at a batch resumes every rank there.
    """

    def __init__(self, batches: Sampler[list[int]], env: DistEnv) -> None:
        self.batches, self.env = batches, env

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            per = len(batch) // self.env.world_size
            yield list(batch[self.env.rank * per : (self.env.rank + 1) * per])
