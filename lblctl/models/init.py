"""``pretrain --init``: start from an existing backbone's weights (backbone.pt, a RUN folder, or ONNX).

The init fixes the architecture, the embedding size and the input size; options that name other
ones are refused before any data is read, instead of silently training something else.
"""

from __future__ import annotations

from typing import Any

import torch

from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.models.checkpoint import Backbone, load_backbone

DEFAULT_ARCH = "small_cnn"
DEFAULT_EMBEDDING = 512


def apply_init(cfg: Any, device: torch.device | str) -> Backbone | None:
    """Load ``cfg.init`` and fill ``cfg.arch``/``embedding_size``/``input_size``/``arch_kwargs`` from it.

    Without an init, an empty arch, a zero embedding size or centre crop become the defaults (small_cnn,
    512, 1.0).
    """
    if cfg.init is None:
        cfg.arch = cfg.arch or DEFAULT_ARCH
        cfg.embedding_size = cfg.embedding_size or DEFAULT_EMBEDDING
        cfg.center_crop = cfg.center_crop or 1.0
        return None
    where = f"--init {cfg.init}"
    try:
        bb = load_backbone(cfg.init, device)
    except IncompatibleArtifact as exc:  # the loader names the file as --backbone; here it is --init
        raise IncompatibleArtifact(str(exc).replace(f"--backbone {cfg.init}", where, 1)) from None
    if cfg.arch and cfg.arch != bb.arch:
        raise LblError(f"{where}: is a {bb.arch} backbone, not --arch {cfg.arch}; leave out --arch to "
                       "fine-tune it as it is")
    if cfg.embedding_size and int(cfg.embedding_size) != bb.embedding_size:
        raise LblError(f"{where}: embedding size {bb.embedding_size}, not --embedding-size {cfg.embedding_size}; "
                       "leave out --embedding-size (a store made with the other size needs re-imprinting)")
    if cfg.input_size and int(cfg.input_size) != bb.preprocess.input_size:
        raise LblError(f"{where}: takes {bb.preprocess.input_size}px inputs, not --input-size {cfg.input_size}")
    cfg.arch, cfg.embedding_size = bb.arch, bb.embedding_size
    cfg.input_size = bb.preprocess.input_size
    cfg.center_crop = cfg.center_crop or bb.preprocess.center_crop  # 0 = the init's (its training data's)
    cfg.arch_kwargs = dict(bb.meta.get("arch_kwargs", {}))
    return bb


def manifest_arch_kwargs(arch_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``arch_kwargs`` for a manifest: an ONNX graph is named by its length, not copied."""
    return {k: (f"<ONNX graph, {len(v)} base64 chars>" if k == "onnx_graph" else v) for k, v in arch_kwargs.items()}
