"""train-dp across the ranks of a ``torchrun`` job, over a store sharded by rank (:mod:`lblctl.core.shards`).

Every rank runs the same deterministic selection of a step's K global rows (the dominant-queue entries
of the step's seeds are read by each seed's owner and summed over ranks, non-owners adding zeros), so
the K classes are those of the 1-rank run. The K positions are reordered by owner (stably): rank r's
head slice is the contiguous block of positions whose rows it owns, gathered from and written back to
its own shard only. Embeddings and labels are all-gathered; the margin softmax over K is normalised
with all-reduced max and sum (the Partial FC code of :mod:`lblctl.models.partial_fc`); the hardest
wrong class of every sample is the global one, and its promotion is applied by the owner of the
sample's class row.

Collectives of the selection and of the head run on their own process group (DDP's gradient hooks use
the default one), always from the main thread, in the same order on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lblctl.core.dist import DistEnv
from lblctl.core.shards import ShardedStoreView, ShardLayout
from lblctl.core.strings import StringArray
from lblctl.models.losses import cosine_matrix
from lblctl.models.partial_fc import _AllGather, _DistCrossEntropy, _gather_padded
from lblctl.train.dp_head import DPHead


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class StepPlan:
    """Where a step's K global rows live: ``order`` lists the K positions grouped by owner (stably),
    rank r's head slice is ``order[start:stop]``, ``slot[p]`` is position p's place in ``order``."""

    rows: np.ndarray  # K global rows, in the sampler's order (labels are positions in it)
    order: np.ndarray
    slot: np.ndarray
    start: int
    stop: int

    @property
    def local_positions(self) -> np.ndarray:
        return self.order[self.start:self.stop]


class Shards:
    """This rank's view of a sharded train-dp job: the layout, the plans of the steps in flight, the
    collectives of the selection."""

    def __init__(self, env: DistEnv, layout: ShardLayout, device: torch.device | str = "cpu") -> None:
        self.env, self.layout = env, layout
        self.device = torch.device(device)  # NCCL reduces device tensors only
        self.group = _dist().new_group() if env.active else None
        self.plans: dict[int, StepPlan] = {}

    # ------------------------------------------------------------------ rows
    def plan(self, step: int, rows: np.ndarray) -> StepPlan:
        """Record (and return) where step ``step``'s global rows live."""
        rows = np.asarray(rows, dtype=np.int64)
        owner = self.layout.owner(rows)
        order = np.argsort(owner, kind="stable")
        sizes = np.bincount(owner, minlength=self.env.world_size)
        start = int(sizes[: self.env.rank].sum())
        slot = np.empty(len(rows), dtype=np.int64)
        slot[order] = np.arange(len(rows))
        plan = StepPlan(rows, order, slot, start, start + int(sizes[self.env.rank]))
        self.plans[int(step)] = plan
        for old in [s for s in self.plans if s < step - 3]:
            del self.plans[old]
        return plan

    def local_rows(self, plan: StepPlan) -> np.ndarray:
        """This rank's rows of the step, as rows of its shard, in head-slice order."""
        return self.layout.local(plan.rows[plan.local_positions])

    def dominant_of(self, dominant: Callable[[np.ndarray], np.ndarray], dq: int) -> Callable[[np.ndarray], np.ndarray]:
        """``dominant_of(seeds)`` for the sampler: each seed's owner reads its queue (global rows),
        the others add zeros, and one all-reduce gives every rank the same S×dq block."""

        def read(seeds: np.ndarray) -> np.ndarray:
            seeds = np.asarray(seeds, dtype=np.int64)
            mine = self.layout.owner(seeds) == self.env.rank
            block = np.zeros((len(seeds), dq), dtype=np.int64)
            if mine.any():
                block[mine] = dominant(self.layout.local(seeds[mine]))
            t = torch.from_numpy(block).to(self.device)
            _dist().all_reduce(t, group=self.group)
            return t.cpu().numpy()

        return read

    def batch_slice(self, n: int) -> tuple[int, int]:
        """This rank's equal slice of a global batch of ``n`` photos (the first ``n % W`` ranks one more)."""
        base, extra = divmod(int(n), self.env.world_size)
        r = self.env.rank
        start = r * base + min(r, extra)
        return start, start + base + (1 if r < extra else 0)

    def sizes(self, count: int) -> list[int]:
        """Every rank's number of photos this step."""
        t = torch.tensor([int(count)], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.env.world_size)]
        _dist().all_gather(parts, t, group=self.group)
        return [int(p) for p in parts]

    def total(self, value: float | int) -> float:
        """Sum over ranks (summaries)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        _dist().all_reduce(t, group=self.group)
        return float(t)

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        _dist().broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        _dist().barrier(group=self.group)


@dataclass
class ShardedStep:
    """The step's loss and, for the whole global batch, labels and hardest wrong classes."""

    loss: torch.Tensor
    labels: torch.Tensor  # global batch: positions in K
    hardest: torch.Tensor  # global batch: hardest wrong class, positions in K
    accuracy: torch.Tensor


class ShardedDPHead(DPHead):
    """This rank's slice of a step's K prototypes (at most K rows; the rest are zero and unused)."""

    def __init__(self, classes: int, embedding_size: int, margin: torch.nn.Module, lr: float, momentum: float,
                 device: torch.device | str, shards: Shards) -> None:
        super().__init__(classes, embedding_size, margin, lr, momentum, device)
        self.weight.sharded = True  # its gradient norm is summed over ranks when clipping (the engine)
        self.shards = shards
        self.classes = int(classes)
        self.plan: StepPlan | None = None

    @torch.no_grad()
    def load_slice(self, plan: StepPlan, vectors: np.ndarray, momentum: np.ndarray | None) -> None:
        """The rows this rank owns among the step's K (head-slice order), momentum alike."""
        n = plan.stop - plan.start
        self.plan = plan
        self.weight.zero_()
        self.momentum.zero_()
        if n:
            self.weight[:n].copy_(torch.from_numpy(vectors))
            if momentum is not None:
                self.momentum[:n].copy_(torch.from_numpy(momentum))
        self.weight.grad = None

    def step_forward(self, embeddings: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> ShardedStep:
        """``embeddings``/``labels`` (positions in K): this rank's photos; ``sizes``: every rank's count."""
        assert self.plan is not None, "load_slice() first"
        plan, env, group = self.plan, self.shards.env, self.shards.group
        device = embeddings.device
        n = plan.stop - plan.start
        emb = _AllGather.apply(embeddings.float(), sizes, env.rank, group)
        labels = torch.cat(_gather_padded(labels.to(device), sizes, group))
        slot = torch.from_numpy(plan.slot).to(device)[labels]  # each sample's class, as a slot of the K order
        cosine = cosine_matrix(emb, self.weight[: max(n, 1)])
        local = (slot >= plan.start) & (slot < plan.stop)
        rows = local.nonzero(as_tuple=True)[0]
        cols = slot[rows] - plan.start
        logits = self.margin.s * cosine.index_put((rows, cols), self.margin.target_logit(cosine[rows, cols]))
        if n == 0:  # no class of this step is ours: one column that takes no probability
            logits = logits + float("-inf")
        loss = _DistCrossEntropy.apply(logits, slot, plan.start, env.world_size, group)
        hardest, accuracy = self._hardest(cosine.detach()[:, :n], rows, cols, plan)
        return ShardedStep(loss, labels, hardest, accuracy)

    @torch.no_grad()
    def _hardest(self, cosine: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the highest-scoring wrong class over all K (ties: the lowest position, as
        ``argmax`` on one rank), and the global top-1 accuracy: two small all-reduces."""
        b, k, device = cosine.shape[0], self.classes, cosine.device
        ninf = torch.full((b,), float("-inf"), device=device)
        target = ninf.clone()
        if cosine.shape[1]:
            target[rows] = cosine[rows, cols]
            masked = cosine.clone()
            masked[rows, cols] = float("-inf")
            best_wrong, where = masked.max(1)
            pos = torch.from_numpy(plan.local_positions).to(device)[where]
            best_all = cosine.max(1).values
        else:
            best_wrong, best_all, pos = ninf.clone(), ninf.clone(), torch.full((b,), k, device=device)
        top = torch.stack([best_wrong, best_all, target])
        _dist().all_reduce(top, op=_dist().ReduceOp.MAX, group=self.shards.group)
        pos = torch.where(best_wrong == top[0], pos, torch.full_like(pos, k))
        _dist().all_reduce(pos, op=_dist().ReduceOp.MIN, group=self.shards.group)
        return pos, (top[2] >= top[1]).float().mean()

    @torch.no_grad()
    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        n = 0 if self.plan is None else self.plan.stop - self.plan.start
        return (self.weight[:n].detach().float().cpu().numpy().copy(),
                self.momentum[:n].detach().float().cpu().numpy().copy())


# ----------------------------------------------------------------------------- names
def shard_names(store: Path, layout: ShardLayout) -> StringArray:
    """Every global row's identity name: the shards' names interleaved (row r is shard r % W's row r // W).

    Read-only, before any rank opens its shard for writing; a shard of the wrong size is refused."""
    with ShardedStoreView(store, layout) as view:
        return view.names
