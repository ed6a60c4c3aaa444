"""Heads and losses on L2-normalised embeddings, as small composable modules.

Margin-softmax heads take their weight matrix from outside (``forward(embeddings, weight,
labels)`` → :class:`HeadOutput`): ``pretrain`` passes its own classifier parameter, ``train-dp``
the K prototypes gathered from the store. The other losses (centre, triplet, contrastive, pair
verification) work on the batch's embeddings and labels alone; :class:`Objective` adds them up the way
``pretrain --loss NAME`` asks, and keeps every piece of state (classifier, centres, pair head) in
modules that the :class:`~lblctl.train.engine.Trainer` checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lblctl.core.errors import LblError


class HeadOutput(NamedTuple):
    loss: torch.Tensor
    cosine: torch.Tensor  # B×K cosines (no margin), for accuracy and queue updates


def cosine_matrix(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """B×K cosines in float32 (AMP-safe), clamped to [−1, 1]."""
    cosine = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(weight.float(), dim=1))
    return cosine.clamp(-1.0, 1.0)


class _MarginHead(nn.Module):
    """Softmax cross-entropy over s·(cosines with the target's logit changed by ``target_logit``)."""

    s: float

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def margin_logits(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        idx = labels.view(-1, 1)
        target = self.target_logit(cosine.gather(1, idx))
        return self.s * cosine.scatter(1, idx, target)

    def forward(self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        cosine = cosine_matrix(embeddings, weight)
        loss = F.cross_entropy(self.margin_logits(cosine, labels), labels)
        return HeadOutput(loss, cosine.detach())


class CosFaceLoss(_MarginHead):
    """AM-softmax / CosFace: softmax over s·(cos θ − m·[target]) (seed default s = 24, m = 0.2)."""

    def __init__(self, s: float = 24.0, m: float = 0.2) -> None:
        super().__init__()
        self.s, self.m = float(s), float(m)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m


class CombinedMarginLoss(_MarginHead):
    """Combined margin (insightface): target logit cos(m1·θ + m2) − m3.

    (1, m, 0) is ArcFace, (1, 0, m) CosFace, (m1, 0, 0) SphereFace-like. Where m1·θ + m2 passes
    π the cosine would turn back up (a wrong-side sample would be rewarded), so beyond that angle
    θ* = (π − m2)/m1 the target logit falls back to cos θ − (π − θ*)·sin θ* − m3: the first-order
    form of the margin at θ*, which for ArcFace is the usual cos θ − m·sin m.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2) -> None:
        super().__init__()
        if m1 <= 0 or not 0.0 <= m2 < math.pi or m3 < 0:
            raise LblError(f"--m1 {m1} --m2 {m2} --m3 {m3}: need m1 > 0, 0 ≤ m2 < π and m3 ≥ 0")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        theta_star = (math.pi - self.m2) / self.m1
        self.fallback = theta_star < math.pi
        self.threshold = math.cos(theta_star) if self.fallback else -1.0
        self.shift = (math.pi - theta_star) * math.sin(theta_star) if self.fallback else 0.0

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3
        # arccos has an infinite slope at ±1: the value is exact, the gradient flows through a
        # copy of cos θ kept a hair inside (slope ≤ ~700), so it stays finite
        inner = torch.acos(cos_target.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
        theta = inner + (torch.acos(cos_target.detach()) - inner).detach()
        margin = torch.cos(self.m1 * theta + self.m2)
        if self.fallback:
            margin = torch.where(cos_target > self.threshold, margin, cos_target - self.shift)
        return margin - self.m3


class ArcFaceLoss(CombinedMarginLoss):
    """ArcFace: target logit cos(θ + m), with the usual cos θ − m·sin m once θ + m > π."""

    def __init__(self, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(s=s, m1=1.0, m2=m, m3=0.0)
        self.m = float(m)


class ClassifierWeights(nn.Module):
    """The N×D prototype matrix of an ordinary (all classes on the device) margin softmax."""

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)


class CenterLoss(nn.Module):
    """Centre loss (Wen et al. 2016) on unit embeddings: ½·mean ‖x̂ᵢ − c_yᵢ‖².

    The centres are a buffer, not a parameter: in training mode each forward moves the centres of
    the classes in the batch by c_j += α·Σᵢ(x̂ᵢ − c_j)/(1 + n_j) (the paper's rule, the seed's
    mxnet op), so α is the centres' own learning rate, untouched by the optimiser's schedule.
    """

    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise LblError(f"--center-alpha {alpha}: must be in (0, 1]")
        self.alpha = float(alpha)
        self.register_buffer("centers", torch.zeros(num_classes, embedding_size))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings.float(), dim=1)
        diff = x - self.centers[labels]
        loss = 0.5 * diff.pow(2).sum(1).mean()
        if self.training:
            with torch.no_grad():
                d = diff.detach()
                total = torch.zeros_like(self.centers).index_add_(0, labels, d)
                count = torch.zeros(len(self.centers), device=d.device).index_add_(
                    0, labels, torch.ones_like(labels, dtype=d.dtype))
                self.centers += self.alpha * total / (1.0 + count).unsqueeze(1)
        return loss


class TripletLoss(nn.Module):
    """Triplet loss on unit embeddings with squared L2 distance (FaceNet), mined inside the batch.

    ``semihard`` (FaceNet; TF's ``triplet_semihard_loss``): every anchor-positive pair takes the
    closest negative that is still farther than the positive (the hardest negative that is not
    harder than the positive), or the farthest negative when none is. ``batchhard`` (Hermans et
    al.): every anchor takes its farthest positive and closest negative. The loss is the mean of
    max(d(a,p) − d(a,n) + margin, 0) over the mined triplets; anchors without a positive or a
    negative in the batch add nothing (a P×K batch has both).
    """

    def __init__(self, margin: float = 0.2, mining: str = "semihard") -> None:
        super().__init__()
        if mining not in ("semihard", "batchhard"):
            raise LblError(f"--mining {mining}: choose semihard or batchhard")
        if margin <= 0:
            raise LblError(f"--triplet-margin {margin}: must be positive")
        self.margin, self.mining = float(margin), mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        x = F.normalize(embeddings.float(), dim=1)
        cosine = (x @ x.T).clamp(-1.0, 1.0)
        dist = (2.0 - 2.0 * cosine).clamp_min(0.0)
        same = labels.view(-1, 1) == labels.view(1, -1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos, neg = same & ~eye, ~same
        big = torch.finfo(dist.dtype).max
        if self.mining == "batchhard":
            valid = pos.any(1) & neg.any(1)
            d_ap = dist.masked_fill(~pos, -1.0).amax(1)
            d_an = dist.masked_fill(~neg, big).amin(1)
            losses = F.relu(d_ap - d_an + self.margin)[valid]
        else:
            a, p = pos.nonzero(as_tuple=True)
            d_ap = dist[a, p]
            d_an_all = dist[a]  # (pairs, B): distances from each pair's anchor
            negs = neg[a]
            harder = negs & (d_an_all > d_ap.unsqueeze(1))
            semi = d_an_all.masked_fill(~harder, big).amin(1)
            easiest = d_an_all.masked_fill(~negs, -1.0).amax(1)
            d_an = torch.where(harder.any(1), semi, easiest)
            losses = F.relu(d_ap - d_an + self.margin)[negs.any(1)]
        loss = losses.mean() if len(losses) else dist.sum() * 0.0
        return HeadOutput(loss, cosine.detach())


def batch_hard(cosine: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per anchor: the cosine of its least similar positive and of its most similar negative in
    the batch (the hardest of each, Hermans et al.), and whether it has both."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    hard_pos = cosine.masked_fill(~pos, 2.0).amin(1)
    hard_neg = cosine.masked_fill(~neg, -2.0).amax(1)
    return hard_pos, hard_neg, pos.any(1) & neg.any(1)


def hard_pair_accuracy(cosine: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of anchors whose hardest positive is more similar than their hardest negative:
    a verification accuracy of the batch (1.0 = one threshold would split every genuine pair from
    every impostor pair that touches the anchor)."""
    hard_pos, hard_neg, valid = batch_hard(cosine.detach(), labels)
    return float((hard_pos > hard_neg)[valid].float().mean()) if bool(valid.any()) else 0.0


class ContrastiveLoss(nn.Module):
    """Contrastive (pair) loss on cosine similarities (Hadsell et al.; pytorch-metric-learning's
    ``ContrastiveLoss`` with cosine similarity), hard pairs mined inside the batch.

    A genuine pair is pulled up to cos ≥ ``pos_margin``, an impostor pair pushed down to
    cos ≤ ``neg_margin``: relu(pos_margin − cos(a, p)) + relu(cos(a, n) − neg_margin).
    ``batchhard`` (default): every anchor takes its least similar positive and its most similar
    negative in the batch (with ID + spot batches: the other photos of its identity, and the
    most confusable photo of another identity). ``all``: the mean over every genuine pair plus
    the mean over every impostor pair, no mining (the baseline that mining should beat).
    """

    def __init__(self, pos_margin: float = 0.5, neg_margin: float = 0.2, mining: str = "batchhard") -> None:
        super().__init__()
        if mining not in ("batchhard", "all"):
            raise LblError(f"--mining {mining}: choose batchhard or all for --loss contrastive")
        if not -1.0 <= neg_margin < pos_margin <= 1.0:
            raise LblError(f"--pos-margin {pos_margin} --neg-margin {neg_margin}: need −1 ≤ neg < pos ≤ 1 "
                           "(cosine similarities)")
        self.pos_margin, self.neg_margin, self.mining = float(pos_margin), float(neg_margin), mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        x = F.normalize(embeddings.float(), dim=1)
        cosine = (x @ x.T).clamp(-1.0, 1.0)
        if self.mining == "batchhard":
            hard_pos, hard_neg, valid = batch_hard(cosine, labels)
            losses = (F.relu(self.pos_margin - hard_pos) + F.relu(hard_neg - self.neg_margin))[valid]
            loss = losses.mean() if len(losses) else cosine.sum() * 0.0
        else:
            i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
            same, c = labels[i] == labels[j], cosine[i, j]
            parts = [F.relu(self.pos_margin - c[same]).mean()] if bool(same.any()) else []
            parts += [F.relu(c[~same] - self.neg_margin).mean()] if bool((~same).any()) else []
            loss = torch.stack(parts).sum() if parts else cosine.sum() * 0.0
        return HeadOutput(loss, cosine.detach())


class PairVerificationLoss(nn.Module):
    """Same/different binary head over a pair's embeddings (the seed's multi-loss).

    The pair's feature is the element-wise squared difference (x̂ᵢ − x̂ⱼ)² of its unit embeddings;
    a linear layer maps it to two logits (different, same). Every pair in the batch takes part;
    the loss is the mean cross-entropy over genuine pairs plus that over impostor pairs, halved,
    so the scarce genuine pairs weigh as much as the many impostors.
    """

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_size, 2)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc((F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).pow(2))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
        same = (labels[i] == labels[j]).long()
        ce = F.cross_entropy(self.logits(embeddings[i], embeddings[j]), same, reduction="none")
        parts = [ce[same == k].mean() for k in (1, 0) if bool((same == k).any())]
        return torch.stack(parts).mean() if parts else ce.sum() * 0.0


# ----------------------------------------------------------------------------- objectives

MARGIN_HEADS = ("cosface", "arcface", "combined")
LOSSES = (*MARGIN_HEADS, "center", "triplet", "pair", "contrastive")
NEEDS_PK = ("triplet", "pair", "contrastive")
METRIC_LOSSES = ("triplet", "contrastive")  # no classifier: the batch's embeddings and labels alone

# defaults per margin head (cosface: the seed's AM-softmax; arcface/combined: insightface's)
HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "cosface": {"s": 24.0, "m": 0.2},
    "arcface": {"s": 64.0, "m": 0.5},
    "combined": {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
}
EXTRA_DEFAULTS: dict[str, dict[str, Any]] = {
    "center": {"head": "cosface", "center_alpha": 0.5, "center_weight": 0.1},
    "pair": {"head": "cosface", "pair_weight": 0.5},
    "triplet": {"triplet_margin": 0.2, "mining": "semihard"},
    "contrastive": {"pos_margin": 0.5, "neg_margin": 0.2, "mining": "batchhard"},
}
FLAGS = {"s": "--scale", "m": "--margin", "m1": "--m1", "m2": "--m2", "m3": "--m3", "head": "--head",
         "center_alpha": "--center-alpha", "center_weight": "--center-weight",
         "triplet_margin": "--triplet-margin", "mining": "--mining", "pair_weight": "--pair-weight",
         "pos_margin": "--pos-margin", "neg_margin": "--neg-margin"}


def resolve_loss_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The full option set of loss ``name``: defaults filled in, options it does not use refused."""
    if name not in LOSSES:
        raise LblError(f"--loss {name}: unknown loss; choose one of {', '.join(LOSSES)}")
    given = {k: v for k, v in options.items() if v is not None}
    extra = EXTRA_DEFAULTS.get(name, {})
    head = name if name in MARGIN_HEADS else given.get("head", extra.get("head"))
    if head is not None and head not in MARGIN_HEADS:
        raise LblError(f"--head {head}: choose one of {', '.join(MARGIN_HEADS)}")
    allowed = {**(HEAD_DEFAULTS[head] if head else {}), **extra}
    for key in given:
        if key not in allowed:
            flag = FLAGS.get(key, key)
            raise LblError(f"{flag}: not an option of --loss {name}"
                           + (f" with --head {head}" if name in EXTRA_DEFAULTS and head else "")
                           + f"; it takes {', '.join(FLAGS.get(k, k) for k in allowed) or 'no options'}")
    return {**allowed, **given}


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """A margin-softmax head by name: cosface (s, m), arcface (s, m) or combined (s, m1, m2, m3)."""
    name = "cosface" if name in ("am-softmax", "amsoftmax") else name
    if name not in MARGIN_HEADS:
        raise LblError(f"--loss {name}: unknown margin head; choose one of {', '.join(MARGIN_HEADS)}")
    opts = resolve_loss_options(name, kwargs)
    cls = {"cosface": CosFaceLoss, "arcface": ArcFaceLoss, "combined": CombinedMarginLoss}[name]
    return cls(**opts)


class ObjectiveOutput(NamedTuple):
    loss: torch.Tensor
    metrics: dict[str, float]


class Objective(nn.Module):
    """What ``pretrain`` minimises: a margin head (+ λ·centre or + w·pair), or a triplet or
    contrastive loss on the batch alone (no classifier: the V stage of CVC).

    Its state (classifier, centres, pair head) is handed out by :meth:`state_modules`, so that the
    trainer checkpoints it and the optimiser sees the trainable parts.
    """

    def __init__(self, name: str, num_classes: int, embedding_size: int, options: dict[str, Any]) -> None:
        super().__init__()
        opts = resolve_loss_options(name, options)
        self.name, self.options = name, opts
        self.head: nn.Module | None = None
        self.classifier: ClassifierWeights | None = None
        self.center: CenterLoss | None = None
        self.pair: PairVerificationLoss | None = None
        self.triplet: TripletLoss | None = None
        self.contrastive: ContrastiveLoss | None = None
        self.center_weight = float(opts.get("center_weight", 0.0))
        self.pair_weight = float(opts.get("pair_weight", 0.0))
        if name == "triplet":
            self.triplet = TripletLoss(opts["triplet_margin"], opts["mining"])
            return
        if name == "contrastive":
            self.contrastive = ContrastiveLoss(opts["pos_margin"], opts["neg_margin"], opts["mining"])
            return
        head = name if name in MARGIN_HEADS else opts["head"]
        self.head = build_loss(head, **{k: opts[k] for k in HEAD_DEFAULTS[head]})
        self.classifier = ClassifierWeights(num_classes, embedding_size)
        if name == "center":
            if self.center_weight <= 0:
                raise LblError(f"--center-weight {self.center_weight}: must be positive")
            self.center = CenterLoss(num_classes, embedding_size, opts["center_alpha"])
        if name == "pair":
            if self.pair_weight <= 0:
                raise LblError(f"--pair-weight {self.pair_weight}: must be positive")
            self.pair = PairVerificationLoss(embedding_size)

    def state_modules(self) -> dict[str, nn.Module]:
        """Checkpointed pieces by name (``head`` is the classifier, as before the zoo existed)."""
        named = {"head": self.classifier, "center": self.center, "pair": self.pair}
        return {k: m for k, m in named.items() if m is not None}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> ObjectiveOutput:
        metric = self.triplet if self.triplet is not None else self.contrastive
        if metric is not None:
            out = metric(embeddings, labels)
            return ObjectiveOutput(out.loss, {f"{self.name}_loss": float(out.loss.detach()),
                                              "train_accuracy": hard_pair_accuracy(out.cosine, labels)})
        assert self.head is not None and self.classifier is not None
        out = self.head(embeddings, self.classifier.weight, labels)
        metrics = {"train_accuracy": float((out.cosine.argmax(1) == labels).float().mean()),
                   "softmax_loss": float(out.loss.detach())}
        loss = out.loss
        if self.center is not None:
            c = self.center(embeddings, labels)
            metrics["center_loss"] = float(c.detach())
            loss = loss + self.center_weight * c
        if self.pair is not None:
            p = self.pair(embeddings, labels)
            metrics["pair_loss"] = float(p.detach())
            loss = loss + self.pair_weight * p
        return ObjectiveOutput(loss, metrics)
