"""``export``: an lblctl backbone as an ONNX model (the work is :func:`lblctl.models.export.export_onnx`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lblctl.core.summary import Summary


@dataclass
class ExportConfig:
    backbone: Path
    out: Path
    opset: int = 17
    batch: int = 0  # 0 = dynamic batch; N = a fixed batch of N
    atol: float = 1e-4
    check_images: list[Path] | None = None  # face photos to check on; None = a fixed random batch


def run(cfg: ExportConfig, device: Any = "cpu") -> Summary:
    """Export and check against PyTorch on the CPU (``device`` is accepted for a uniform signature)."""
    from lblctl.models.export import export_onnx

    paths = [str(p) for p in cfg.check_images] if cfg.check_images else None
    return Summary("export", export_onnx(cfg.backbone, cfg.out, opset=cfg.opset, batch=cfg.batch, atol=cfg.atol,
                                         check_paths=paths))
