"""Measure a backbone: verification on labelled pairs, identification against a gallery.

Verification (--pairs, a CSV id_image,spot_image,same[,fold]): 10-fold accuracy (the CSV's
fold column when present, as LFW's protocol), ROC, AUC, EER, TAR and threshold at FAR 1e-1 …
1e-6 (null, with the reason, when there are fewer impostor pairs than 1/FAR). Identification:
top-1 / top-5 of spot photos against ID photos (--data IDS), a gallery CSV (--gallery G.csv
--probes P.csv, columns identity,image), or the prototypes of a store (--store STORE), searched
with faiss. --backbone takes an lblctl RUN / backbone.pt or an ONNX recognition model.

Writes OUT/metrics.json, OUT/roc.png, OUT/roc.npz (the curve), OUT/scores_hist.png and
OUT/manifest.json. --compare REPORT (repeatable) overlays earlier reports' ROCs in
OUT/roc_compare.png, e.g. before/after a training stage:

    lblctl eval --compare report_before --compare report_after --out compare

Example (CPU, on the shared LFW pairs):

    lblctl eval --backbone run --pairs /work/shared/data/lfw_pairs_dev.csv --data examples/data/faces --out report
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lblctl.core import ui
from lblctl.core.errors import LblError
from lblctl.core.runtime import default_workers
from lblctl.stages.compare import compare_reports
from lblctl.stages.evaluate import EvalConfig, evaluate, metrics_table

from ._common import Debug, Device, Json, Quiet, Seed, finish, start

SHORT_HELP = "Verification (TAR@FAR, EER, 10-fold) and identification (top-1/5) figures."


def main(
    backbone: Annotated[Path | None, typer.Option("--backbone", help="RUN folder, backbone.pt or an ONNX model "
                                                  "(optional with --compare).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Report folder to write (metrics.json, roc.png, …).")] = ...,
    pairs: Annotated[Path | None, typer.Option(help="Labelled pairs CSV id_image,spot_image,same[,fold].")] = None,
    data: Annotated[Path | None, typer.Option(help="Identity folders (or CSV): ID photos = gallery, "
                                              "spot photos = probes.")] = None,
    gallery: Annotated[Path | None, typer.Option(help="Gallery CSV identity,image.")] = None,
    probes: Annotated[Path | None, typer.Option(help="Probe CSV identity,image.")] = None,
    store: Annotated[Path | None, typer.Option(help="Prototype store as the gallery.")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Average each embedding with its mirror image.")] = False,
    center_crop: Annotated[float | None, typer.Option(help="Override the backbone's centre crop "
                                                      "(ONNX models default to 1.0).")] = None,
    folds: Annotated[int, typer.Option(help="Folds when the pairs CSV has no fold column.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes (-1 = cores − 1).")] = -1,
    compare: Annotated[list[Path] | None, typer.Option("--compare", help="Earlier REPORT folder(s) whose ROC "
                                                       "to overlay in OUT/roc_compare.png (repeat the option); "
                                                       "with --backbone, this run's ROC is added last.")] = None,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    dev = start(device, seed, quiet)
    if backbone is None:
        if not compare:
            raise LblError("eval needs --backbone (or only --compare REPORT … --out DIR to overlay reports)")
        finish(compare_reports(list(compare), out), "eval --compare", json_out)
        return
    cfg = EvalConfig(backbone=backbone, out=out, pairs=pairs, data=data, gallery=gallery, probes=probes,
                     store=store, flip=flip, batch_size=batch_size,
                     workers=default_workers(workers), center_crop=center_crop,
                     folds=folds, seed=seed)
    summary, metrics, reasons = evaluate(cfg, dev)
    if json_out:
        finish(summary, "eval", True)
        return
    if not quiet:
        ui.console.print(metrics_table(metrics, reasons))
        ui.info(f"report: {out}/metrics.json" + (", roc.png, scores_hist.png" if "verification" in metrics else ""))
        if summary["problems"]["count"]:
            ui.warn(f"{summary['problems']['count']} unreadable images or skipped rows; see {out}/problems.csv")
    if compare:
        shown = compare_reports([*compare, out], out)
        ui.info(f"ROC of {len(shown['reports'])} reports: {shown['out']}")
