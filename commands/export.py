"""Write an lblctl backbone as an ONNX model (dynamic batch), checked against PyTorch.

The graph takes N×3×S×S images in [−1, 1] and returns the raw embedding, like insightface's
recognition models; the backbone's preprocessing (input size, centre crop) travels in the
model's metadata, so --backbone model.onnx embeds like the backbone.pt. The export is checked:
onnxruntime must match PyTorch within --atol (default 1e-4) on real face photos
(--check-image, repeatable) or a fixed random batch, else nothing is written. Export runs on the
CPU (the graph does not depend on the device), so it has no --device option.

Example:

    lblctl export --backbone run --out model.onnx
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lblctl.models.export import export_onnx

from ._common import Debug, Json, Quiet, Seed, finish, start

SHORT_HELP = "Export a backbone to ONNX (dynamic batch), checked against PyTorch within 1e-4."


def main(
    backbone: Annotated[Path, typer.Option("--backbone", help="RUN folder or backbone.pt.")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write (model.onnx).")],
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    batch: Annotated[int, typer.Option(help="0 = dynamic batch; N = a fixed batch of N (some runtimes "
                                       "want static shapes).")] = 0,
    atol: Annotated[float, typer.Option(help="Largest allowed difference from PyTorch.")] = 1e-4,
    check_images: Annotated[list[Path] | None, typer.Option("--check-image",
                                                            help="Face photos to check on (repeatable).")] = None,
    seed: Seed = 0,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    start("cpu", seed, quiet)
    summary = export_onnx(backbone, out, opset=opset, batch=batch, atol=atol,
                          check_paths=[str(p) for p in check_images] if check_images else None)
    finish(summary, "export", json_out)
