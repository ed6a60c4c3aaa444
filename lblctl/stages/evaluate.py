"""``lblctl eval``: verification figures from labelled pairs, identification against a gallery.

Verification embeds each distinct image of the pairs once and reports 10-fold accuracy (the
CSV's ``fold`` column when present, as LFW's protocol), ROC, AUC, EER and TAR / threshold at
FAR 1e-1 … 1e-6. Identification searches probe (spot) photos against a gallery with faiss: one
template per identity (the mean of its ID photos), or the prototypes of a store. Probes stream
through in batches, so neither side needs more memory than the gallery index itself.
"""

from __future__ import annotations

import io
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lblctl.core import ui
from lblctl.core.artifacts import atomic_open, atomic_write_json, describe_input, write_manifest
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.metrics import FAR_TARGETS, roc_curve, verification_metrics
from lblctl.core.runtime import as_device
from lblctl.core.summary import Summary
from lblctl.data.faces import (
    FaceIndex,
    PathDataset,
    ProblemLog,
    make_loader,
    open_face_set,
    read_identity_csv,
)
from lblctl.data.pairs import PairsFile
from lblctl.models.checkpoint import open_backbone
from lblctl.models.embed import embed_paths
from lblctl.stages.compare import ROC_NPZ, save_roc
from lblctl.stages.verify import backbone_identities

METRICS = "metrics.json"
ROC_PNG = "roc.png"
HIST_PNG = "scores_hist.png"
PROBLEMS = "problems.csv"


@dataclass
class EvalConfig:
    backbone: Path
    out: Path
    pairs: Path | None = None
    data: Path | None = None
    gallery: Path | None = None
    probes: Path | None = None
    store: Path | None = None
    flip: bool = False
    batch_size: int = 64
    workers: int = 0
    center_crop: float | None = None
    folds: int = 10
    seed: int = 0
    overwrite: bool = False  # replace an earlier report in ``out`` (else refuse, as the other stages do)


def _check_options(cfg: EvalConfig) -> None:
    """Refuse impossible combinations before any work."""
    if cfg.pairs is None and cfg.data is None and cfg.gallery is None and cfg.probes is None and cfg.store is None:
        raise LblError("nothing to evaluate: give --pairs PAIRS.csv and/or --data IDS, --gallery G.csv "
                       "--probes P.csv, or --store STORE with --data/--probes")
    if cfg.gallery is not None and (cfg.data is not None or cfg.store is not None):
        raise LblError("--gallery: give either --gallery G.csv --probes P.csv, or --data IDS, or --store STORE")
    if cfg.gallery is not None and cfg.probes is None:
        raise LblError("--gallery G.csv needs --probes P.csv (the spot photos to search for)")
    if cfg.probes is not None and cfg.gallery is None and cfg.store is None:
        raise LblError("--probes P.csv needs a gallery: --gallery G.csv or --store STORE")
    if cfg.probes is not None and cfg.data is not None:
        raise LblError("--probes and --data both give probes; use one")
    if cfg.store is not None and cfg.data is None and cfg.probes is None:
        raise LblError("--store STORE needs probes: --data IDS (its spot photos) or --probes P.csv")
    if cfg.folds < 2:
        raise LblError(f"--folds {cfg.folds}: need at least 2")
    for opt, p in (("--pairs", cfg.pairs), ("--gallery", cfg.gallery), ("--probes", cfg.probes)):
        if p is not None and not Path(p).is_file():
            raise LblError(f"{opt} {p}: no such file")
    for opt, p in (("--data", cfg.data), ("--store", cfg.store)):
        if p is not None and not Path(p).exists():
            raise LblError(f"{opt} {p}: no such file or folder")
    out = Path(cfg.out)
    if not cfg.overwrite and (out / METRICS).exists():
        raise LblError(f"--out {out}: already holds an eval report; add --overwrite to replace it "
                       "or choose a new --out")


# --------------------------------------------------------------------------- verification


@dataclass
class PairScores:
    scores: np.ndarray
    same: np.ndarray
    folds: np.ndarray | None
    skipped: int


def labelled_pairs_file(pairs: Path) -> PairsFile:
    pf = PairsFile(pairs)
    if not pf.has_same:
        raise LblError(f"--pairs {pairs}: no 'same' column; eval needs labelled pairs "
                       "(use lblctl verify-pair to score unlabelled ones)")
    return pf


def score_pairs(backbone: Any, pairs: Path, *, flip: bool, batch_size: int, workers: int,
                problems: ProblemLog) -> PairScores:
    """Cosine score of every labelled pair; each distinct image is embedded once."""
    pf = labelled_pairs_file(pairs)
    has_fold = "fold" in pf.fieldnames
    slot: dict[str, int] = {}
    # compact columns: 10M pairs take ~250 MB here, not gigabytes of Python ints
    a_idx, b_idx, same, folds = array("q"), array("q"), array("b"), array("q")
    unlabelled = 0
    for row in pf:
        if row.error.startswith("same="):
            raise LblError(f"{pairs}:{row.line}: {row.error}")
        if row.error:
            problems.add(f"{pairs}:{row.line}", f"{row.error}; pair skipped")
            unlabelled += 1
            continue
        if row.same is None:
            unlabelled += 1
            problems.add(f"{pairs}:{row.line}", "empty 'same'; pair skipped")
            continue
        if has_fold:
            try:
                folds.append(int(row.get("fold")))
            except ValueError:
                raise LblError(f"{pairs}:{row.line}: fold='{row.get('fold')}' is not a whole number") from None
        a_idx.append(slot.setdefault(row.id_image, len(slot)))
        b_idx.append(slot.setdefault(row.spot_image, len(slot)))
        same.append(row.same)
    if not a_idx:
        raise LblError(f"--pairs {pairs}: no labelled pairs")
    if same.count(1) in (0, len(same)):
        raise LblError(f"--pairs {pairs}: needs both same (1) and different (0) pairs; "
                       f"all {len(same)} labelled pairs are {'same' if same[0] else 'different'}")
    emb = embed_paths(backbone, list(slot), batch_size=batch_size, workers=workers, flip=flip,
                      description="embed pairs")
    problems.extend(emb.problems.items)
    a, b = np.asarray(a_idx, dtype=np.int64), np.asarray(b_idx, dtype=np.int64)
    good = emb.ok[a] & emb.ok[b]
    a, b = a[good], b[good]
    scores = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), 1 << 16):
        e = s + (1 << 16)
        scores[s:e] = np.einsum("ij,ij->i", emb.vectors[a[s:e]], emb.vectors[b[s:e]])
    fold_arr = np.asarray(folds, dtype=np.int64)[good] if has_fold else None
    return PairScores(scores, np.asarray(same, dtype=np.int64)[good], fold_arr, int((~good).sum()) + unlabelled)


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())


def plot_roc(scores: np.ndarray, same: np.ndarray, path: Path, title: str) -> None:
    """TAR against FAR on a log axis down to the smallest measurable FAR (1 / impostors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    far, tar, _ = roc_curve(scores, same)
    floor = 1.0 / max(1, int((same == 0).sum()))
    keep = far > 0
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.step(np.r_[floor, far[keep]], np.r_[tar[keep][0] if keep.any() else 0.0, tar[keep]], where="post")
    ax.set_xscale("log")
    ax.set_xlim(min(floor, 1e-1) / 1.5, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _save_png(fig, path)
    plt.close(fig)


def plot_hist(scores: np.ndarray, same: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo - 1e-3, hi + 1e-3, 61)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.hist(scores[same == 1], bins=bins, alpha=0.6, density=True, label=f"genuine ({int(same.sum())})")
    ax.hist(scores[same == 0], bins=bins, alpha=0.6, density=True, label=f"impostor ({int((same == 0).sum())})")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    _save_png(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- identification


def _gallery_index(source: Any, device: torch.device) -> Any:
    """An exact inner-product faiss index over ``source`` (build-index's builder), on the GPU when ``device`` is."""
    from lblctl.stages.index import IndexSpec, build_index, gpu_count, to_gpu

    index = build_index(source, IndexSpec(kind="flat"))
    if device.type == "cuda" and gpu_count() > 0:
        index = to_gpu(index, device.index or 0)
    return index


@dataclass
class Gallery:
    index: Any  # faiss index, row r ↔ label labels[r]
    labels: np.ndarray  # int64, identity number of each index row
    names: Any  # identity names by number (for mapping probes)
    size: int


def gallery_from_images(backbone: Any, faces: FaceIndex, rows: np.ndarray, *, flip: bool, batch_size: int,
                        workers: int, device: torch.device, problems: ProblemLog) -> Gallery:
    """One template per identity: the normalised mean of its gallery photos' embeddings."""
    ident = faces.image_identity[rows]
    emb = embed_paths(backbone, [faces.path(r) for r in rows], batch_size=batch_size, workers=workers, flip=flip,
                      description="embed gallery")
    problems.extend(emb.problems.items)
    sums = np.zeros((faces.num_identities, backbone.embedding_size), dtype=np.float32)
    np.add.at(sums, ident[emb.ok], emb.vectors[emb.ok])
    norms = np.linalg.norm(sums, axis=1)
    present = np.flatnonzero(norms > 0)
    templates = sums[present] / norms[present, None]
    if len(present) == 0:
        raise LblError("the gallery has no readable photos")
    from lblctl.stages.index import ArraySource

    return Gallery(_gallery_index(ArraySource(templates), device), present.astype(np.int64), faces.names,
                   len(present))


def gallery_from_store(store: Any, device: torch.device) -> Gallery:
    """The store's prototypes (already unit vectors), added chunk by chunk."""
    if store.num_rows == 0:
        raise LblError("--store: the store has no prototypes")
    index = _gallery_index(store, device)
    return Gallery(index, np.arange(index.ntotal, dtype=np.int64), store.names, int(index.ntotal))


def _name_rows(names: Any, query: list[str]) -> np.ndarray:
    if hasattr(names, "lookup"):
        return np.asarray(names.lookup(query), dtype=np.int64)
    where = {n: i for i, n in enumerate(names)}
    return np.asarray([where.get(q, -1) for q in query], dtype=np.int64)


def identify(backbone: Any, gallery: Gallery, probe_paths: list[str], probe_labels: np.ndarray, *,
             flip: bool, batch_size: int, workers: int, problems: ProblemLog) -> dict[str, Any]:
    """Top-1 / top-5 of probes (label = gallery identity number) searched in batches."""
    k = min(5, gallery.size)
    hit1 = hit5 = done = 0
    loader = make_loader(PathDataset(probe_paths, backbone.preprocess), batch_size=batch_size, workers=workers)
    with ui.progress("top1") as bar:
        task = bar.add_task("identify", total=len(probe_paths), top1="-")
        for batch in loader:
            problems.extend(batch.problems)
            if len(batch):
                q = backbone.embed(batch.images, flip=flip).numpy()
                _, found = gallery.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
                found_labels = np.where(found >= 0, gallery.labels[np.clip(found, 0, None)], -1)
                truth = probe_labels[batch.rows.numpy()]
                hit1 += int((found_labels[:, 0] == truth).sum())
                hit5 += int((found_labels == truth[:, None]).any(axis=1).sum())
                done += len(batch)
            bar.update(task, advance=len(batch) + len(batch.problems),
                       top1=f"{hit1 / done:.3f}" if done else "-")
    if done == 0:
        raise LblError("identification: no probe photo could be read")
    return {"top1": hit1 / done, "top5": hit5 / done, "gallery_size": gallery.size, "probes": done}


def _probes(faces: FaceIndex, rows: np.ndarray, gallery_names: Any) -> tuple[list[str], np.ndarray, int]:
    """Probe paths and their gallery identity numbers; probes of identities not in the gallery dropped."""
    names = [faces.names[int(i)] for i in faces.image_identity[rows]]
    labels = _name_rows(gallery_names, names)
    keep = labels >= 0
    return [faces.path(int(r)) for r in rows[keep]], labels[keep], int((~keep).sum())


# --------------------------------------------------------------------------- the stage


def run(cfg: EvalConfig, device: torch.device | str = "auto") -> Summary:
    """Run the evaluation: the figures (metrics.json's sections and null reasons) and a table of them."""
    summary = _run(cfg, as_device(device))
    out = Path(cfg.out)
    notes = [f"report: {out}/metrics.json" + (", roc.png, scores_hist.png" if "verification" in summary else "")]
    warnings = []
    if summary["problems"]["count"]:
        warnings.append(f"{summary['problems']['count']} unreadable images or skipped rows; see {out}/{PROBLEMS}")
    table = metrics_table(summary, summary.get("null_reasons", {}))
    return Summary("eval", summary, table=table, notes=notes, warnings=warnings)


def _run(cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    _check_options(cfg)
    backbone = open_backbone(cfg.backbone, device)
    if cfg.center_crop is not None:
        backbone.preprocess = replace(backbone.preprocess, center_crop=cfg.center_crop)
    store = None
    if cfg.store is not None:
        from lblctl.core.artifacts import check_compatible
        from lblctl.core.shards import ShardedStoreView, is_sharded
        from lblctl.core.store import PrototypeStore

        if is_sharded(cfg.store):  # a store sharded by train-dp under torchrun: read through its shards
            store = ShardedStoreView(cfg.store)
            try:
                check_compatible(f"--store {cfg.store}", {"embedding_size": store.embedding_size},
                                 backbone.embedding_size)
            except BaseException:
                store.close()
                raise
        else:
            store = PrototypeStore.open(cfg.store, mode="r", expect_embedding_size=backbone.embedding_size)
        accepted = backbone_identities(backbone)
        if store.backbone_fingerprint and store.backbone_fingerprint not in accepted:
            made_by, trained = store.backbone_fingerprint, store.committed_step > 0
            store.close()
            advice = ("it was trained by train-dp, so evaluate it with that run's backbone (--backbone RUN2)"
                      if trained else "re-imprint the store with this backbone")
            raise IncompatibleArtifact(f"--store {cfg.store}: made by another backbone ({made_by[:19]}…, expected "
                                       f"{accepted[0][:19]}…); {advice}")
    try:
        return _evaluate(cfg, device, backbone, store)
    finally:
        if store is not None:
            store.close()


def _evaluate(cfg: EvalConfig, device: torch.device, backbone: Any, store: Any) -> dict[str, Any]:
    # read identity inputs before any embedding, so that a bad CSV stops the run early
    faces = open_face_set(cfg.data) if cfg.data is not None else None
    gal_faces = read_identity_csv(cfg.gallery) if cfg.gallery is not None else None
    probe_faces = read_identity_csv(cfg.probes) if cfg.probes is not None else None
    if cfg.pairs is not None:
        labelled_pairs_file(cfg.pairs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = ProblemLog()
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    summary: dict[str, Any] = {"out": str(out), "backbone": str(backbone.path), "arch": backbone.arch}
    files: list[str] = []
    opts = {"flip": cfg.flip, "batch_size": cfg.batch_size, "workers": cfg.workers}

    if cfg.pairs is not None:
        ps = score_pairs(backbone, cfg.pairs, problems=problems, **opts)
        if ps.same.min() == ps.same.max():
            raise LblError(f"--pairs {cfg.pairs}: after unreadable images, only {'same' if ps.same[0] else 'different'}"
                           " pairs are left; fix the images listed in the problems")
        section, reasons = verification_metrics(ps.scores, ps.same, ps.folds, folds=cfg.folds, seed=cfg.seed)
        metrics["verification"] = section
        plot_roc(ps.scores, ps.same, out / ROC_PNG, f"ROC ({len(ps.scores)} pairs)")
        plot_hist(ps.scores, ps.same, out / HIST_PNG, "cosine scores")
        save_roc(ps.scores, ps.same, out / ROC_NPZ)  # the ROC itself, for eval --compare
        files += [ROC_PNG, HIST_PNG, ROC_NPZ]
        summary["pairs_skipped"] = ps.skipped
        summary["folds"] = "from CSV" if ps.folds is not None else f"{cfg.folds} random"

    if faces is not None or gal_faces is not None or store is not None:
        if store is not None:
            gallery = gallery_from_store(store, device)
        elif gal_faces is not None:
            gallery = gallery_from_images(backbone, gal_faces, np.arange(gal_faces.num_images), device=device,
                                          problems=problems, **opts)
        else:
            gallery = gallery_from_images(backbone, faces, faces.select_images("id"), device=device,
                                          problems=problems, **opts)
        src = faces if faces is not None else probe_faces
        rows = src.select_images("spot") if faces is not None else np.arange(src.num_images)
        paths, labels, unknown = _probes(src, rows, gallery.names)
        if unknown:
            ui.warn(f"{unknown} probe photos belong to identities not in the gallery; left out of top-1/top-5")
        if not paths:
            raise LblError("identification: no probe (spot) photo of an identity in the gallery; "
                           "with --data, give identities at least one photo besides the ID photo")
        metrics["identification"] = identify(backbone, gallery, paths, labels, problems=problems, **opts)
        summary["probes_not_in_gallery"] = unknown

    atomic_write_json(out / METRICS, metrics)
    files.insert(0, METRICS)
    if problems.count:
        problems.write_csv(out / PROBLEMS)
        files.append(PROBLEMS)
    for stale in (ROC_PNG, HIST_PNG, ROC_NPZ, PROBLEMS):  # from an earlier run into the same folder
        if stale not in files:
            (out / stale).unlink(missing_ok=True)
    inputs = {"backbone": describe_input(backbone.path)}
    for name in ("pairs", "data", "gallery", "probes", "store"):
        if getattr(cfg, name) is not None:
            inputs[name] = describe_input(getattr(cfg, name))
    write_manifest(out, "eval-report", params={**opts, "folds": cfg.folds, "seed": cfg.seed,
                                               "center_crop": backbone.preprocess.center_crop,
                                               "input_size": backbone.preprocess.input_size},
                   inputs=inputs, files=files, embedding_size=backbone.embedding_size,
                   backbone_fingerprint=backbone.fingerprint, extra={"null_reasons": reasons} if reasons else None)
    summary.update(metrics)
    if reasons:
        summary["null_reasons"] = reasons
    summary["problems"] = problems.summary(show=5)
    return summary


def metrics_table(metrics: dict[str, Any], reasons: dict[str, str]):
    """The report as a rich table: one line per figure, TAR@FAR with its threshold or why it is null."""
    from rich.table import Table

    table = Table(title="eval", title_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note")
    v = metrics.get("verification")
    if v:
        table.add_row("pairs (genuine / impostor)", f"{v['pairs']}", f"{v['genuine']} / {v['impostor']}")
        table.add_row(f"{v.get('folds', 10)}-fold accuracy", f"{v['accuracy']:.4f}", f"± {v['accuracy_std']:.4f}")
        table.add_row("AUC", f"{v['auc']:.4f}", "")
        table.add_row("EER", f"{v['eer']:.4f}", "")
        for key in FAR_TARGETS:
            tar, thr = v["tar_at_far"][key], v["threshold_at_far"][key]
            if tar is None:
                table.add_row(f"TAR @ FAR {key}", "null", reasons.get(key, ""))
            else:
                table.add_row(f"TAR @ FAR {key}", f"{tar:.4f}", f"threshold {thr:.4f}")
    ident = metrics.get("identification")
    if ident:
        table.add_row("top-1", f"{ident['top1']:.4f}", f"{ident['probes']} probes")
        table.add_row("top-5", f"{ident['top5']:.4f}", f"gallery {ident['gallery_size']}")
    return table

