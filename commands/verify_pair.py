"""Score (ID photo, spot photo) pairs from a CSV and decide same / different.

Reads PAIRS.csv (id_image,spot_image[,same], extra columns kept; relative paths resolve against
the CSV's folder) as a stream and writes SCORES.csv: every input row plus score (cosine),
same_pred (1/0) and error (empty, or why that row could not be scored). A bad row never stops
the run. Each distinct image is embedded once while it stays in the cache (--cache-size).
--align scrfd|yunet --align-model PATH aligns raw photos on the fly with the align stage's
detector and ArcFace crop (a photo without a face becomes that row's error). The threshold is
given (--threshold) or taken from an eval report at a false-accept rate
(--far 1e-3 --calibration REPORT/metrics.json, made with the same backbone).
--backbone takes an lblctl RUN / backbone.pt or an ONNX recognition model.

Exit status: 0 when every row was scored, 3 when any row failed (SCORES.csv is still written, with
the reason in its error column), 2 on a user error.

Example (CPU):

    lblctl verify-pair --backbone run --pairs pairs.csv --out scores.csv --far 1e-2 --calibration report/metrics.json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from lblctl.core.errors import LblError
from lblctl.core.runtime import default_workers
from lblctl.models.checkpoint import open_backbone
from lblctl.stages.verify import (
    ROWS_FAILED_EXIT,
    backbone_identities,
    check_scores_out,
    make_dataset_factory,
    threshold_from_calibration,
    verify_pairs,
    write_scores_manifest,
)

from ._common import Debug, Device, Json, Quiet, Seed, finish, start

SHORT_HELP = "Score a CSV of ID/spot photo pairs: cosine, same/different at a threshold or FAR."


def main(
    backbone: Annotated[Path, typer.Option("--backbone", help="RUN folder, backbone.pt or an ONNX model.")],
    pairs: Annotated[Path, typer.Option("--pairs", help="Pairs CSV id_image,spot_image[,same].")],
    out: Annotated[Path, typer.Option("--out", help="Scores CSV to write.")],
    threshold: Annotated[float | None, typer.Option(help="Cosine threshold: score >= T is 'same'.")] = None,
    far: Annotated[float | None, typer.Option(help="Pick the threshold at this FAR (1e-1 … 1e-6) "
                                              "from --calibration.")] = None,
    calibration: Annotated[Path | None, typer.Option(help="REPORT/metrics.json of lblctl eval "
                                                     "with this backbone.")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Average each embedding with its mirror image.")] = False,
    center_crop: Annotated[float | None, typer.Option(help="Override the backbone's centre crop "
                                                      "(ONNX models default to 1.0).")] = None,
    align: Annotated[str | None, typer.Option(help="Align raw photos on the fly: scrfd or yunet "
                                              "(for backbones trained on aligned 112×112 crops).")] = None,
    align_model: Annotated[Path | None, typer.Option(help="The detector's ONNX file for --align.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    chunk_rows: Annotated[int, typer.Option(help="CSV rows read, scored and written at a time.")] = 8192,
    cache_size: Annotated[int, typer.Option(help="Embeddings kept (LRU) across chunks; 0 = no cache.")] = 50_000,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes (-1 = cores − 1).")] = -1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    dev = start(device, seed, quiet)
    if (threshold is None) == (far is None):
        raise LblError("give either --threshold T or --far F with --calibration REPORT/metrics.json")
    if far is not None and calibration is None:
        raise LblError("--far needs --calibration REPORT/metrics.json (an eval report made with this backbone)")
    if not pairs.is_file():
        raise LblError(f"--pairs {pairs}: no such file")
    check_scores_out(out, overwrite)
    bb = open_backbone(backbone, dev)
    if center_crop is not None:
        bb.preprocess = replace(bb.preprocess, center_crop=center_crop)
    factory = make_dataset_factory(align, align_model, bb.preprocess)
    if threshold is None:
        threshold = threshold_from_calibration(calibration, far, backbone_identities(bb), flip)
    summary = verify_pairs(bb, pairs, out, threshold, flip=flip, batch_size=batch_size,
                           workers=default_workers(workers), chunk_rows=chunk_rows,
                           cache_size=cache_size, dataset_factory=factory, overwrite=overwrite)
    params = {"threshold": threshold, "far": far, "calibration": str(calibration) if calibration else None,
              "flip": flip, "align": align, "align_model": str(align_model) if align_model else None,
              "center_crop": 1.0 if factory else bb.preprocess.center_crop, "input_size": bb.preprocess.input_size}
    write_scores_manifest(out, bb, pairs, params, summary)
    if far is not None:
        summary["threshold_from"] = f"FAR {far:g} in {calibration}"
        summary["far_requested"] = far
    finish(summary, "verify-pair", json_out)
    if summary["failed"]:
        raise typer.Exit(ROWS_FAILED_EXIT)
