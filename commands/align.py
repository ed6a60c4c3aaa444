"""Detect, landmark and crop every photo to the ArcFace 112×112 template (insightface's norm_crop).

Reads identity folders RAW/IDENTITY/IMAGE (or a CSV identity,image[,kind]) and writes
ALIGNED/IDENTITY/STEM.png in the same layout (file stems, so id* names, are kept), with
ALIGNED/align_report.csv (one row per photo: status, reason, score, box, landmarks),
ALIGNED/faces.csv (identity,image,kind), ALIGNED/_quarantine/ (photos with no usable face:
no_face, low_score, small_face) and ALIGNED/manifest.json. Unreadable files are reported, not copied.

Detectors: scrfd (insightface SCRFD, onnxruntime, CUDA when present) and yunet (OpenCV
FaceDetectorYN) need --model; the shipped ones are shared/models/scrfd_500m.onnx and
shared/models/yunet.onnx. landmarks takes your own CSV image,x1,y1,…,x5,y5 (pixels of the
EXIF-rotated photo; image paths relative to the CSV or to RAW); none resizes crops that are
already aligned.

Example (CPU, about a minute, on the shipped demo faces):

    lblctl align --data examples/data/faces --out aligned --model ../shared/models/scrfd_500m.onnx

Re-running the same command skips photos already done (same size and mtime), so an interrupted
run continues where it stopped; --force redoes everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ._common import Common, Opt, stage_command

ModelOpt = Annotated[Path | None, Opt(help="Detector ONNX file for scrfd/yunet, e.g. "
                                      "../shared/models/scrfd_500m.onnx or ../shared/models/yunet.onnx.")]
MinScoreOpt = Annotated[float | None, Opt(help="Quarantine faces scoring below this "
                                          "(default 0.5 for scrfd, 0.6 for yunet).")]
DetSizeOpt = Annotated[int, Opt(help="Detector input side: 0 = the photo's own size, scaled down to at most "
                                "640; N = SCRFD's square N×N input (insightface's 640 upscales small photos "
                                "and misses tight crops), YuNet's longest side.")]


@stage_command("align")
def main(
    data: Annotated[Path, Opt("--data", help="Raw photos: folders DATA/IDENTITY/IMAGE or a CSV.")],
    out: Annotated[Path, Opt("--out", help="Folder for the aligned crops, report and quarantine.")],
    detector: Annotated[str, Opt(help="scrfd, yunet, landmarks (your CSV) or none (aligned).")] = "scrfd",
    model: ModelOpt = None,
    landmarks: Annotated[Path | None, Opt(help="CSV image,x1,y1,…,x5,y5 for --detector landmarks.")] = None,
    size: Annotated[int, Opt(help="Crop side in pixels (a multiple of 112 or 128).")] = 112,
    fmt: Annotated[str, Opt("--format", help="png (lossless) or jpg (quality 95).")] = "png",
    pick: Annotated[str, Opt(help="Several faces: central (largest near the centre), largest or score.")]
    = "central",
    min_score: MinScoreOpt = None,
    min_size: Annotated[int, Opt(help="Quarantine faces whose box is smaller than this many pixels.")] = 24,
    det_size: DetSizeOpt = 0,
    no_copy: Annotated[bool, Opt("--no-copy", help="List quarantined photos; do not copy them.")] = False,
    workers: Annotated[int, Opt(help="Worker processes, each with its own detector "
                                "(-1 = cores − 1, at most 8, as in every stage; 0 = in this process).")] = -1,
    threads: Annotated[int, Opt(help="onnxruntime/OpenCV threads per worker (0 = cores ÷ workers).")] = 0,
    force: Annotated[bool, Opt("--force", help="Redo every photo, even those already aligned.")] = False,
    *,
    common: Common,
):
    from lblctl.stages.align import AlignConfig, run

    return run(AlignConfig(data=data, out=out, detector=detector, model=model, landmarks=landmarks, size=size,
                           fmt=fmt, pick=pick, min_score=min_score, min_size=min_size, det_size=det_size,
                           copy_quarantine=not no_copy, workers=workers, threads=threads, force=force),
               common.device)
