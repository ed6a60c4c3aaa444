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

from ._common import Common, Opt, stage_command


@stage_command("export", device=False)
def main(
    backbone: Annotated[Path, Opt("--backbone", help="RUN folder or backbone.pt.")],
    out: Annotated[Path, Opt("--out", help="ONNX file to write (model.onnx).")],
    opset: Annotated[int, Opt(help="ONNX opset.")] = 17,
    batch: Annotated[int, Opt(help="0 = dynamic batch; N = a fixed batch of N (some runtimes want static shapes).")]
    = 0,
    atol: Annotated[float, Opt(help="Largest allowed difference from PyTorch.")] = 1e-4,
    check_images: Annotated[list[Path] | None, Opt("--check-image", help="Face photos to check on (repeatable).")]
    = None,
    *,
    common: Common,
):
    from lblctl.stages.export import ExportConfig, run

    return run(ExportConfig(backbone=backbone, out=out, opset=opset, batch=batch, atol=atol,
                            check_images=check_images), common.device)
