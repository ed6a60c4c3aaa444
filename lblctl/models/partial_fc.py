"""A margin-softmax classifier split across the ranks of a ``torchrun`` job (the Partial FC scheme).

Each rank holds the contiguous rows [start, stop) of the N×D class matrix. A step all-gathers the
batch's embeddings and labels, every rank scores the whole global batch against its own rows,
and the softmax is normalised with an all-reduced max and sum, so no rank ever holds N logits per
sample, let alone N rows. With one process the same code is an ordinary margin softmax: the
1-rank and the W-rank runs compute the same loss and the same gradients (up to float rounding).

Gradients: the loss is the mean over the *global* batch. An embedding's gradient is summed over
every rank's rows (the backward of :class:`_AllGather`) and multiplied by W, because DDP then
averages the backbone's gradients over the W ranks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lblctl.core.dist import DistEnv, shard_range
from lblctl.core.errors import LblError
from lblctl.models.losses import (
    HEAD_DEFAULTS,
    MARGIN_HEADS,
    ObjectiveOutput,
    _MarginHead,
    build_loss,
    resolve_loss_options,
)

INIT_CHUNK = 4096  # rows per seeded block of the initial weights: the same rows on any world size


def _dist():
    import torch.distributed as dist

    return dist


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's batch (sizes may differ); backward: the summed gradient of my rows × W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:  # noqa: ANN001
        ctx.group, ctx.world = group, len(sizes)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat(_gather_padded(x, sizes, group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        grad = grad.contiguous()
        _dist().all_reduce(grad, group=ctx.group)
        return grad[ctx.start : ctx.stop] * ctx.world, None, None, None


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:  # noqa: ANN001
    """Every rank's ``x`` (rows ``sizes[r]``), padded to the largest for the collective, then cut back."""
    most = max(sizes)
    pad = torch.zeros((most - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = [torch.empty((most, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in sizes]
    _dist().all_gather(parts, torch.cat([x.detach(), pad]).contiguous(), group=group)
    return [p[:n] for p, n in zip(parts, sizes, strict=True)]


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits whose columns are spread over the ranks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, start: int, world: int,  # noqa: ANN001
                group) -> torch.Tensor:  # noqa: ANN001
        stop = start + logits.shape[1]
        top = logits.detach().amax(1)
        if world > 1:
            _dist().all_reduce(top, op=_dist().ReduceOp.MAX, group=group)
        exp = torch.exp(logits.detach() - top.unsqueeze(1))
        total = exp.sum(1)
        local = (labels >= start) & (labels < stop)
        col = (labels - start).clamp(0, logits.shape[1] - 1)
        target = torch.where(local, logits.detach().gather(1, col.unsqueeze(1)).squeeze(1),
                             torch.zeros_like(top))
        if world > 1:
            both = torch.stack([total, target])
            _dist().all_reduce(both, group=group)
            total, target = both[0], both[1]
        ctx.save_for_backward(exp / total.unsqueeze(1), local, col)
        return (torch.log(total) + top - target).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        prob, local, col = ctx.saved_tensors
        grad = prob.clone()
        rows = local.nonzero(as_tuple=True)[0]
        grad[rows, col[rows]] -= 1.0
        return grad * (grad_out / prob.shape[0]), None, None, None, None


class ShardedOutput(NamedTuple):
    loss: torch.Tensor
    accuracy: torch.Tensor  # top-1 over all N classes on the global batch (a 0-d tensor, no sync)


class ShardedMarginSoftmax(nn.Module):
    """This rank's rows of an N-class margin softmax (CosFace, ArcFace, combined margins).

    ``forward(local_embeddings, local_labels)`` takes this rank's part of the batch and returns
    the global batch's loss and accuracy, identical on every rank.
    """

    def __init__(self, head: _MarginHead, num_classes: int, embedding_size: int, env: DistEnv | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.head, self.env = head, env or DistEnv()
        self.num_classes = int(num_classes)
        self.start, self.stop = shard_range(num_classes, self.env.rank, self.env.world_size)
        self.weight = nn.Parameter(initial_rows(self.start, self.stop, embedding_size, seed))
        self.weight.sharded = True  # its gradient norm is summed over ranks when clipping (the engine)
        # its own process group: collectives issued from autograd (here) and by DDP's gradient
        # hooks on one group could be ordered differently on two ranks and deadlock
        self.group = _dist().new_group() if self.env.active else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> ShardedOutput:
        """``embeddings``/``labels``: this rank's part of the batch (ranks may hold different counts)."""
        world, rank = self.env.world_size, self.env.rank
        if world > 1:
            count = torch.tensor([embeddings.shape[0]], device=embeddings.device)
            counts = [torch.empty_like(count) for _ in range(world)]
            _dist().all_gather(counts, count, group=self.group)
            sizes = [int(c) for c in counts]  # one small sync per step: batches may lose unreadable images
            embeddings = _AllGather.apply(embeddings.float(), sizes, rank, self.group)
            labels = torch.cat(_gather_padded(labels, sizes, self.group))
        cosine = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        cosine = cosine.clamp(-1.0, 1.0)
        local = (labels >= self.start) & (labels < self.stop)
        rows = local.nonzero(as_tuple=True)[0]
        cols = labels[rows] - self.start
        logits = self.head.s * cosine.index_put((rows, cols), self.head.target_logit(cosine[rows, cols]))
        loss = _DistCrossEntropy.apply(logits, labels, self.start, world, self.group)
        return ShardedOutput(loss, self._accuracy(cosine.detach(), labels))

    def _accuracy(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        best, where = cosine.max(1)
        if self.env.world_size == 1:
            return (where == labels).float().mean()
        top = best.clone()
        _dist().all_reduce(top, op=_dist().ReduceOp.MAX, group=self.group)
        right = ((best == top) & (where + self.start == labels)).float()
        _dist().all_reduce(right, group=self.group)
        return right.clamp(max=1.0).mean()


def initial_rows(start: int, stop: int, embedding_size: int, seed: int) -> torch.Tensor:
    """N(0, 0.01²) rows [start, stop) of the initial class matrix, the same on any world size."""
    out = torch.empty(stop - start, embedding_size)
    for chunk in range(start // INIT_CHUNK, (stop - 1) // INIT_CHUNK + 1 if stop > start else 0):
        lo = chunk * INIT_CHUNK
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), chunk]).generate_state(1)[0]))
        block = torch.randn(INIT_CHUNK, embedding_size, generator=gen) * 0.01
        a, b = max(start, lo), min(stop, lo + INIT_CHUNK)
        out[a - start : b - start] = block[a - lo : b - lo]
    return out


class ShardedObjective(nn.Module):
    """``pretrain``'s objective for a plain margin softmax (cosface, arcface, combined), on any world size.

    The same interface as :class:`lblctl.models.losses.Objective`; its classifier is checkpointed
    as ``head`` (this rank's rows), as the single-process classifier always was.
    """

    def __init__(self, name: str, num_classes: int, embedding_size: int, options: dict[str, Any],
                 env: DistEnv | None = None, seed: int = 0) -> None:
        super().__init__()
        if name not in MARGIN_HEADS:
            raise LblError(f"--loss {name}: under torchrun only {', '.join(MARGIN_HEADS)} shard their classifier")
        opts = resolve_loss_options(name, options)
        self.name, self.options = name, opts
        self.classifier = ShardedMarginSoftmax(build_loss(name, **{k: opts[k] for k in HEAD_DEFAULTS[name]}),
                                               num_classes, embedding_size, env, seed)

    def state_modules(self) -> dict[str, nn.Module]:
        return {"head": self.classifier}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> ObjectiveOutput:
        out = self.classifier(embeddings, labels)
        return ObjectiveOutput(out.loss, {"train_accuracy": float(out.accuracy),
                                          "softmax_loss": float(out.loss.detach())})
