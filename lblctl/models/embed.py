"""Batch embedding of images: DataLoader workers decode while the model runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lblctl.core import ui
from lblctl.data.faces import PathDataset, ProblemLog, make_loader
from lblctl.models.checkpoint import Backbone


@dataclass
class Embeddings:
    vectors: np.ndarray  # M×D float32, unit rows; zero rows where ``ok`` is False
    ok: np.ndarray  # bool M
    problems: ProblemLog


def embed_paths(backbone: Backbone, paths: list[str], *, batch_size: int = 64, workers: int = 0,
                flip: bool = False, description: str = "embed") -> Embeddings:
    """Embed every path once; unreadable images are problems (``ok`` False), never a crash."""
    vectors = np.zeros((len(paths), backbone.embedding_size), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    problems = ProblemLog()
    loader = make_loader(PathDataset(paths, backbone.preprocess), batch_size=batch_size, workers=workers)
    with ui.progress() as bar:
        task = bar.add_task(description, total=len(paths))
        for batch in loader:
            problems.extend(batch.problems)
            if len(batch):
                idx = batch.rows.numpy()
                vectors[idx] = backbone.embed(batch.images, flip=flip).numpy()
                ok[idx] = True
            bar.advance(task, len(batch) + len(batch.problems))
    return Embeddings(vectors, ok, problems)
