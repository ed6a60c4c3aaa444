"""The backbone artifact: ``backbone.pt`` = architecture name + config + preprocessing + weights.

It loads with ``torch.load(weights_only=True)`` (plain dicts of tensors and numbers), and its
fingerprint (the file's content hash) ties stores and reports to the exact weights.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lblctl import __version__
from lblctl.core.artifacts import atomic_open, fingerprint_file
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.data.faces import Preprocess
from lblctl.models.backbones import create_backbone

FORMAT = "lblctl-backbone/1"
FILENAME = "backbone.pt"


def save_backbone(path: str | os.PathLike, model: nn.Module, *, arch: str, embedding_size: int,
                  preprocess: Preprocess, arch_kwargs: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> str:
    """Write the backbone atomically; return its fingerprint."""
    state = {
        "format": FORMAT,
        "lblctl_version": __version__,
        "arch": arch,
        "embedding_size": int(embedding_size),
        "arch_kwargs": dict(arch_kwargs or {}),
        "preprocess": preprocess.as_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
    return fingerprint_file(path)


@dataclass
class Backbone:
    """A loaded embedding model: ``embed`` takes preprocessed images and returns unit vectors."""

    model: nn.Module
    arch: str
    embedding_size: int
    preprocess: Preprocess
    fingerprint: str
    path: Path
    device: torch.device
    meta: dict[str, Any] = field(default_factory=dict)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Unit embeddings (float32, on CPU) of a batch; ``flip`` averages with the mirrored image."""
        self.model.eval()
        x = images.to(self.device, non_blocking=True)
        out = self.model(x).float()
        if flip:
            out = out + self.model(torch.flip(x, dims=[3])).float()
        return F.normalize(out, dim=1).cpu()


EXPECTED = "give an lblctl RUN folder, RUN/backbone.pt or an ONNX recognition model"


def _folder_kind(folder: Path) -> str:
    """What an lblctl folder holds, from its manifest (for error messages)."""
    import json

    try:
        kind = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind:
        return f"an lblctl '{kind}' folder"
    if (folder / "prototypes.h5").exists():
        return "a prototype store folder"
    return "a folder"


def resolve_backbone_path(path: str | os.PathLike) -> Path:
    """RUN folder → RUN/backbone.pt; a folder without one, or a missing path, is named as what it is."""
    p = Path(path)
    if p.is_dir():
        if not (p / FILENAME).exists():
            raise LblError(f"--backbone {path}: is {_folder_kind(p)} without {FILENAME}; {EXPECTED}")
        p = p / FILENAME
    if not p.exists():
        raise LblError(f"--backbone {path}: no such file or folder; {EXPECTED}")
    return p


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _not_a_backbone(p: Path) -> str | None:
    """A one-line description of a file that is clearly not a backbone.pt (by its first bytes)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if head == HDF5_SIGNATURE:
        return f"--backbone {p}: is an HDF5 file (a prototype store or features), not a backbone; {EXPECTED}"
    if not head:
        return f"--backbone {p}: is an empty file; {EXPECTED}"
    return None


def read_backbone_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a ``backbone.pt`` safely (``weights_only=True``)."""
    p = resolve_backbone_path(path)
    what = _not_a_backbone(p)
    if what is not None:
        raise IncompatibleArtifact(what)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise IncompatibleArtifact(
            f"--backbone {p}: not a readable lblctl backbone (truncated or another format: "
            f"{str(exc).splitlines()[0][:120]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise IncompatibleArtifact(f"--backbone {p}: not an lblctl backbone file (format {FORMAT} expected)")
    return state


def load_backbone(path: str | os.PathLike, device: torch.device | str = "cpu",
                  expect_embedding_size: int | None = None) -> Backbone:
    """Rebuild the architecture from the file and load its weights onto ``device``.

    An ``.onnx`` file becomes a trainable module (:mod:`lblctl.models.onnx_torch`, needs onnx2torch).
    """
    if Path(path).suffix.lower() == ".onnx":
        from lblctl.models.onnx_torch import load_onnx_trainable

        return load_onnx_trainable(path, device, expect_embedding_size)
    p = resolve_backbone_path(path)
    state = read_backbone_state(p)
    if expect_embedding_size is not None and state["embedding_size"] != expect_embedding_size:
        raise IncompatibleArtifact(
            f"--backbone {p}: embedding size {state['embedding_size']}, expected {expect_embedding_size}"
        )
    pre = Preprocess(**state["preprocess"])
    model = create_backbone(state["arch"], state["embedding_size"], pre.input_size, **state["arch_kwargs"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise IncompatibleArtifact(f"--backbone {p}: weights do not fit architecture {state['arch']}: "
                                   f"{str(exc).splitlines()[0][:160]}") from None
    device = torch.device(device)
    model.to(device).eval()
    return Backbone(model, state["arch"], int(state["embedding_size"]), pre, fingerprint_file(p), p, device,
                    {"arch_kwargs": state["arch_kwargs"], "extra": state.get("extra", {})})


def open_backbone(path: str | os.PathLike, device: torch.device | str = "cpu",
                  expect_embedding_size: int | None = None) -> Any:
    """``--backbone`` as given: an ONNX model (``*.onnx``) or an lblctl ``backbone.pt`` / run folder.

    Both kinds have ``embed(images, flip)``, ``preprocess``, ``embedding_size`` and ``fingerprint``.
    """
    if Path(path).suffix.lower() == ".onnx":
        from lblctl.models.onnx import load_onnx_backbone

        return load_onnx_backbone(path, device, expect_embedding_size)
    return load_backbone(path, device, expect_embedding_size)
