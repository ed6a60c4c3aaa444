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

from pathlib import Path
from typing import Annotated

from ._common import AnyBackbone, BatchSize, CenterCrop, Common, Flip, Opt, Workers, stage_command


@stage_command("verify-pair")
def main(
    backbone: AnyBackbone,
    pairs: Annotated[Path, Opt("--pairs", help="Pairs CSV id_image,spot_image[,same].")],
    out: Annotated[Path, Opt("--out", help="Scores CSV to write.")],
    threshold: Annotated[float | None, Opt(help="Cosine threshold: score >= T is 'same'.")] = None,
    far: Annotated[float | None, Opt(help="Pick the threshold at this FAR (1e-1 … 1e-6) from --calibration.")]
    = None,
    calibration: Annotated[Path | None, Opt(help="REPORT/metrics.json of lblctl eval with this backbone.")] = None,
    flip: Flip = False,
    center_crop: CenterCrop = None,
    align: Annotated[str | None, Opt(help="Align raw photos on the fly: scrfd or yunet "
                                     "(for backbones trained on aligned 112×112 crops).")] = None,
    align_model: Annotated[Path | None, Opt(help="The detector's ONNX file for --align.")] = None,
    batch_size: BatchSize = 64,
    chunk_rows: Annotated[int, Opt(help="CSV rows read, scored and written at a time.")] = 8192,
    cache_size: Annotated[int, Opt(help="Embeddings kept (LRU) across chunks; 0 = no cache.")] = 50_000,
    workers: Workers = -1,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace --out if it exists.")] = False,
    *,
    common: Common,
):
    from lblctl.core.runtime import default_workers
    from lblctl.stages.verify import VerifyConfig, run

    return run(VerifyConfig(backbone=backbone, pairs=pairs, out=out, threshold=threshold, far=far,
                            calibration=calibration, flip=flip, center_crop=center_crop, align=align,
                            align_model=align_model, batch_size=batch_size, chunk_rows=chunk_rows,
                            cache_size=cache_size, workers=default_workers(workers), overwrite=overwrite),
               common.device)
