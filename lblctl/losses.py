"""Margin-softmax losses on L2-normalised embeddings and prototypes.

The weight matrix comes from outside (``forward(embeddings, weight, labels)``): ``pretrain``
passes its own classifier parameter, ``train-dp`` the K prototypes gathered from the store.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class HeadOutput(NamedTuple):
    loss: torch.Tensor
    cosine: torch.Tensor  # B×K cosines (no margin), for accuracy and queue updates


class CosFaceLoss(nn.Module):
    """AM-softmax / CosFace: softmax over s·(cos θ − m·[target]) (seed default s = 24, m = 0.2)."""

    def __init__(self, s: float = 24.0, m: float = 0.2) -> None:
        super().__init__()
        self.s, self.m = float(s), float(m)

    def margin_logits(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        return self.s * (cosine - self.m * one_hot)

    def forward(self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        cosine = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(weight.float(), dim=1))
        cosine = cosine.clamp(-1.0, 1.0)
        loss = F.cross_entropy(self.margin_logits(cosine, labels), labels)
        return HeadOutput(loss, cosine.detach())


class ClassifierWeights(nn.Module):
    """The N×D prototype matrix of an ordinary (all classes on the device) margin softmax."""

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)


def build_loss(name: str, **kwargs: float) -> nn.Module:
    from .errors import LblError

    if name in ("cosface", "am-softmax", "amsoftmax"):
        return CosFaceLoss(**kwargs)
    raise LblError(f"--loss {name}: unknown loss; choose cosface")
