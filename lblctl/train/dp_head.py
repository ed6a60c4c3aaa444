"""The DP head: the K prototypes of one train-dp step, on the device, with their own SGD.

In the spirit of arcface_torch's ``PartialFC_V2``: a module that owns its (here: gathered) class
weights and their optimiser state, so the training loop only calls ``load`` → ``forward`` →
(engine backward + step) → ``rows``. The backbone keeps the engine's optimiser; the head's
:class:`HeadSGD` is stepped, clipped, loss-scaled and scheduled beside it by the engine
(:class:`lblctl.train.engine.Trainer` ``extra_optimizers``), but its momentum is a buffer of the
head, loaded with the rows' stored momentum each step, never state borrowed from another optimiser.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lblctl.models.losses import HeadOutput


class HeadSGD(torch.optim.Optimizer):
    """SGD with momentum (no weight decay) whose momentum buffer is the head's ``momentum``.

    ``buf ← μ·buf + g; w ← w − lr·buf``: with the buffer loaded from the store this is exactly
    torch's SGD continuing from the rows' saved state (and from zero, its first step).
    """

    def __init__(self, head: DPHead, lr: float, momentum: float) -> None:
        super().__init__([head.weight], {"lr": float(lr), "momentum": float(momentum)})
        self._buffer = head.momentum

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's Optimizer signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._buffer.mul_(group["momentum"]).add_(p.grad)
                p.add_(self._buffer, alpha=-group["lr"])
        return None


class DPHead(nn.Module):
    """K×D prototypes of the current step (``weight``) and their SGD momentum (``momentum``).

    ``margin`` is a margin-softmax head from :mod:`lblctl.models.losses` (CosFace, ArcFace, …),
    called with this step's weights; labels are positions in the step's class list.
    """

    def __init__(self, classes: int, embedding_size: int, margin: nn.Module, lr: float, momentum: float = 0.9,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes, embedding_size, device=device))
        self.register_buffer("momentum", torch.zeros(classes, embedding_size, device=device), persistent=False)
        self.margin = margin
        self.optimizer = HeadSGD(self, lr, momentum)

    @torch.no_grad()
    def load(self, vectors: np.ndarray, momentum: np.ndarray | None) -> None:
        """Take the step's rows (K×D) and their momentum (None: start from zero, a fresh buffer)."""
        self.weight.copy_(torch.from_numpy(vectors))
        if momentum is None:
            self.momentum.zero_()
        else:
            self.momentum.copy_(torch.from_numpy(momentum))
        self.weight.grad = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        return self.margin(embeddings.float(), self.weight, labels)

    @torch.no_grad()
    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The trained rows and their momentum as float32 host arrays (copies), for the store."""
        return (self.weight.detach().float().cpu().numpy().copy(),
                self.momentum.detach().float().cpu().numpy().copy())
