"""``lblctl export``: an lblctl backbone as an ONNX model, checked against PyTorch.

The graph takes N×3×S×S images in [−1, 1] (our :class:`~lblctl.data.faces.Preprocess`) and returns the
raw embedding, like insightface's recognition models. The backbone's preprocessing and
provenance go into the ONNX metadata (``lblctl.*`` keys), so ``--backbone model.onnx`` embeds
exactly as the ``backbone.pt`` did.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lblctl import __version__
from lblctl.core.artifacts import atomic_open, fingerprint_file
from lblctl.core.errors import LblError
from lblctl.data.faces import load_image
from lblctl.models.checkpoint import load_backbone
from lblctl.models.onnx import META_PREFIX, load_onnx_backbone


def _export_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int, dynamic: bool) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if dynamic:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "embedding": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(model, (example,), buf, input_names=["input"], output_names=["embedding"],
                          opset_version=opset, do_constant_folding=True, dynamo=False, **kwargs)
    return buf.getvalue()


def check_images(size: int, paths: list[str] | None, preprocess) -> torch.Tensor:
    """Check inputs: real face photos when given, else a fixed random batch in [−1, 1]."""
    if paths:
        return torch.stack([preprocess(load_image(p)) for p in paths])
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, size, size, generator=g) * 2 - 1


def export_onnx(backbone: str | os.PathLike, out: str | os.PathLike, *, opset: int = 17, batch: int = 0,
                atol: float = 1e-4, check_paths: list[str] | None = None) -> dict[str, Any]:
    """Export ``backbone`` to ``out`` (``batch`` 0 = dynamic, else that fixed batch size).

    Raises :class:`LblError` when onnxruntime's output differs from PyTorch's by more than
    ``atol`` (on raw embeddings, relative to their magnitude when that exceeds 1); the file is
    then not written.
    """
    import onnx

    src = Path(backbone)
    if src.suffix.lower() == ".onnx":
        raise LblError(f"--backbone {src}: already an ONNX model; export takes an lblctl RUN or backbone.pt")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise LblError(f"--out {out}: give a file name ending in .onnx")
    if batch < 0:
        raise LblError(f"--batch {batch}: 0 (dynamic) or a fixed positive batch size")
    bb = load_backbone(src, "cpu")
    model = bb.model.eval()
    size = bb.preprocess.input_size
    images = check_images(size, check_paths, bb.preprocess)
    example = images[: (batch or 2)]
    if len(example) < (batch or 2):
        example = torch.cat([example] * (batch or 2))[: (batch or 2)]
    data = _export_bytes(model, example, opset, dynamic=batch == 0)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    meta = {
        "format": "lblctl-onnx/1",
        "lblctl_version": __version__,
        "arch": bb.arch,
        "embedding_size": str(bb.embedding_size),
        "input_size": str(size),
        "center_crop": str(bb.preprocess.center_crop),
        "source_fingerprint": bb.fingerprint,
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, str(v)
    proto.producer_name = "lblctl"
    with atomic_open(out, "wb") as fh:
        fh.write(proto.SerializeToString())
    try:
        diff, cos = _parity(out, model, images, batch)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if diff > atol:
        out.unlink(missing_ok=True)
        raise LblError(f"export of {src}: onnxruntime differs from PyTorch by {diff:.2e} (> {atol:g}); "
                       f"try another --opset")
    return {
        "out": str(out), "bytes": out.stat().st_size, "fingerprint": fingerprint_file(out),
        "source": str(bb.path), "source_fingerprint": bb.fingerprint, "arch": bb.arch,
        "input_size": size, "embedding_size": bb.embedding_size, "opset": opset,
        "batch": "dynamic" if batch == 0 else batch, "max_abs_diff": diff, "min_cosine": cos,
        "checked_images": len(images),
    }


@torch.inference_mode()
def _parity(path: Path, model: torch.nn.Module, images: torch.Tensor, batch: int) -> tuple[float, float]:
    """Largest (scaled) raw-output difference and smallest cosine between ONNX and PyTorch."""
    onnx_bb = load_onnx_backbone(path, "cpu", probe=False)
    want = model(images).float().numpy()
    sizes = [batch] if batch else [1, len(images)]
    diff, cos = 0.0, 1.0
    for n in sizes:
        got = np.concatenate([onnx_bb.session.run(None, {onnx_bb.input_name: images[i : i + n].numpy()})[0]
                              for i in range(0, len(images) - n + 1, n)])
        ref = want[: len(got)]
        scale = max(1.0, float(np.abs(ref).max()))
        diff = max(diff, float(np.abs(got - ref).max()) / scale)
        c = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
        cos = min(cos, float(c.min()))
    return diff, cos
