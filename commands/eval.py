"""Measure a backbone: verification on labelled pairs, identification against a gallery.

Verification (--pairs, a CSV id_image,spot_image,same[,fold]): k-fold accuracy (--folds, default
10; the CSV's fold column when present, as LFW's protocol), ROC, AUC, EER, TAR and threshold at FAR 1e-1 …
1e-6 (null, with the reason, when there are fewer impostor pairs than 1/FAR). Identification:
top-1 / top-5 of spot photos against ID photos (--data IDS), a gallery CSV (--gallery G.csv
--probes P.csv, columns identity,image), or the prototypes of a store (--store STORE), searched
with faiss. --backbone takes an lblctl RUN / backbone.pt or an ONNX recognition model.

Writes OUT/metrics.json, OUT/roc.png, OUT/roc.npz (the curve), OUT/scores_hist.png and
OUT/manifest.json. --compare REPORT (repeatable) overlays earlier reports' ROCs in
OUT/roc_compare.png, e.g. before/after a training stage:

    lblctl eval --compare report_before --compare report_after --out compare

Example (CPU, on the shared LFW pairs):

    lblctl eval --backbone run --pairs ../shared/data/lfw_pairs_dev.csv --data examples/data/faces --out report
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ._common import BatchSize, CenterCrop, Common, Flip, Opt, Workers, stage_command


@stage_command("eval")
def main(
    out: Annotated[Path, Opt("--out", help="Report folder to write (metrics.json, roc.png, …).")],
    backbone: Annotated[Path | None, Opt("--backbone", help="RUN folder, backbone.pt or an ONNX model "
                                         "(optional with --compare).")] = None,
    pairs: Annotated[Path | None, Opt(help="Labelled pairs CSV id_image,spot_image,same[,fold].")] = None,
    data: Annotated[Path | None, Opt(help="Identity folders (or CSV): ID photos = gallery, "
                                     "spot photos = probes.")] = None,
    gallery: Annotated[Path | None, Opt(help="Gallery CSV identity,image.")] = None,
    probes: Annotated[Path | None, Opt(help="Probe CSV identity,image.")] = None,
    store: Annotated[Path | None, Opt(help="Prototype store as the gallery.")] = None,
    flip: Flip = False,
    center_crop: CenterCrop = None,
    folds: Annotated[int, Opt(help="Folds when the pairs CSV has no fold column.")] = 10,
    batch_size: BatchSize = 64,
    workers: Workers = -1,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a report already in --out.")] = False,
    compare: Annotated[list[Path] | None, Opt("--compare", help="Earlier REPORT folder(s) whose ROC to overlay in "
                                              "OUT/roc_compare.png (repeat the option); with --backbone, this "
                                              "run's ROC is added last.")] = None,
    *,
    common: Common,
):
    from lblctl.core.errors import LblError
    from lblctl.core.runtime import default_workers
    from lblctl.core.summary import Summary
    from lblctl.stages.compare import compare_reports
    from lblctl.stages.evaluate import EvalConfig, run

    if backbone is None:
        if not compare:
            raise LblError("eval needs --backbone (or only --compare REPORT … --out DIR to overlay reports)")
        return Summary("eval --compare", compare_reports(list(compare), out))
    summary = run(EvalConfig(backbone=backbone, out=out, pairs=pairs, data=data, gallery=gallery, probes=probes,
                          store=store, flip=flip, batch_size=batch_size, workers=default_workers(workers),
                          center_crop=center_crop, folds=folds, seed=common.seed, overwrite=overwrite),
                  common.device)
    if compare:
        shown = compare_reports([*compare, out], out)
        summary.notes.append(f"ROC of {len(shown['reports'])} reports: {shown['out']}")
    return summary
