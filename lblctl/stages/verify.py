"""Pair scoring: an embedding cache and ``verify-pair``'s streaming pass over a pairs CSV.

Pairs files repeat images thousands of times, so each distinct image is embedded once (batched
through the DataLoader helper) and kept in a bounded LRU cache. The CSV is read and written in
chunks of rows: a file of 10M rows never needs 10M rows in memory. A bad row (missing file,
unreadable image, empty path, bad ``same``) gets its reason in the ``error`` column and the run
goes on.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lblctl.core import ui
from lblctl.core.artifacts import MANIFEST, atomic_open, describe_input, read_manifest, write_manifest
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.metrics import far_key
from lblctl.core.summary import Summary
from lblctl.data.faces import (
    ImageProblem,
    PathDataset,
    Preprocess,
    Problem,
    load_rgb_array,
    make_loader,
)
from lblctl.data.pairs import PairsFile

ADDED_COLUMNS = ("score", "same_pred", "error")
ROWS_FAILED_EXIT = 3  # verify-pair's exit status when any row could not be scored (documented in --help)


class AlignedPathDataset(PathDataset):
    """Raw photos aligned on the fly with the align stage's detector and ArcFace crop.

    Each DataLoader worker builds its own detector on first use. A photo without a usable face is
    a problem (``no face found …``), like an unreadable one. The crop is already aligned, so it is
    only resized to the backbone's input (no centre crop).
    """

    def __init__(self, paths: list[str], preprocess: Preprocess, detector: str, model: str | os.PathLike,
                 min_score: float | None = None) -> None:
        from lblctl.stages.align import DEFAULT_MIN_SCORE

        super().__init__(paths, Preprocess(preprocess.input_size, 1.0))
        self.detector_name, self.model = detector, str(model)
        self.min_score = DEFAULT_MIN_SCORE[detector] if min_score is None else float(min_score)
        self._detector: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_detector": None, "_pid": -1}

    def detector(self) -> Any:
        if self._pid != os.getpid():
            from lblctl.models.detectors import make_detector
            from lblctl.stages.align import DETECT_FLOOR

            self._detector = make_detector(self.detector_name, Path(self.model), threads=1, det_size=0,
                                           floor=min(DETECT_FLOOR, self.min_score))
            self._pid = os.getpid()
        return self._detector

    def __getitem__(self, i: int):
        from PIL import Image

        from lblctl.stages.align import norm_crop, pick_face

        path = self.paths[i]
        try:
            rgb = load_rgb_array(path)
        except ImageProblem as exc:
            return Problem(path, str(exc))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        try:
            faces = [f for f in self.detector().detect(bgr) if f.score >= self.min_score]
        except Exception as exc:  # noqa: BLE001 - one odd photo must not stop the run
            return Problem(path, f"detector error: {type(exc).__name__}: {exc}")
        if not faces:
            return Problem(path, f"no face found ({self.detector_name}, score >= {self.min_score})")
        face = pick_face(faces, bgr.shape[1], bgr.shape[0], "central")
        crop = norm_crop(bgr, face.landmarks, 112)
        return self.preprocess(Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1]))), i, i


def make_dataset_factory(align: str | None, align_model: str | os.PathLike | None,
                         preprocess: Preprocess) -> Callable[[list[str]], PathDataset] | None:
    """``None`` (plain photos) or a factory of aligning datasets; the detector is loaded once here
    so that a bad ``--align-model`` stops the run before any work."""
    if align is None or align == "none":
        return None
    if align not in ("scrfd", "yunet"):
        raise LblError(f"--align {align}: expected scrfd or yunet")
    if align_model is None:
        shipped = "scrfd_500m" if align == "scrfd" else "yunet"
        raise LblError(f"--align {align} needs --align-model PATH (the shipped one is shared/models/{shipped}.onnx)")
    probe = AlignedPathDataset([], preprocess, align, align_model)
    probe.detector()
    return lambda paths: AlignedPathDataset(paths, preprocess, align, align_model)


class EmbeddingCache:
    """Unit embeddings by image path; each distinct image is embedded once while it stays cached.

    ``capacity`` bounds the number of cached images (vectors + failures) with LRU eviction;
    ``None`` keeps everything (eval), ``0`` turns caching off: every occurrence of an image is
    embedded again (the benchmark's baseline).
    """

    def __init__(self, backbone: Any, *, batch_size: int = 64, workers: int = 0, flip: bool = False,
                 capacity: int | None = 50_000,
                 dataset_factory: Callable[[list[str]], PathDataset] | None = None) -> None:
        if capacity is not None and capacity < 0:
            raise LblError(f"--cache-size {capacity}: 0 (off) or a positive number of images")
        self.backbone, self.batch_size, self.workers, self.flip = backbone, batch_size, workers, flip
        self.capacity = capacity
        self.dataset_factory = dataset_factory or (lambda paths: PathDataset(paths, backbone.preprocess))
        self.dim = int(backbone.embedding_size)
        self._vectors = np.zeros((max(1, min(capacity or 1024, 1 << 16)), self.dim), dtype=np.float32)
        self._entries: OrderedDict[str, int | str] = OrderedDict()  # path → slot, or the failure reason
        self._free: list[int] = []
        self._next = 0
        self.embedded = 0  # images run through the backbone
        self.failed = 0  # images that could not be read
        self.hits = 0
        self.requests = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next == len(self._vectors):
            grown = np.zeros((len(self._vectors) * 2, self.dim), dtype=np.float32)
            grown[: len(self._vectors)] = self._vectors
            self._vectors = grown
        self._next += 1
        return self._next - 1

    def _evict(self, room: int) -> None:
        while self.capacity and len(self._entries) > max(0, self.capacity - room):
            _, value = self._entries.popitem(last=False)
            if isinstance(value, int):
                self._free.append(value)

    def ensure(self, paths: Iterable[str], advance: Callable[[int], None] | None = None) -> None:
        """Embed the paths not cached yet; afterwards every one of them can be looked up.

        Never evicts any of ``paths`` itself, so a chunk may hold up to ``capacity`` distinct images.
        """
        wanted = list(paths)
        self.requests += len(wanted)
        if self.capacity == 0:
            self._entries.clear()
            self._free, self._next = [], 0
            missing = wanted
        else:
            distinct = list(dict.fromkeys(wanted))
            if self.capacity is not None and len(distinct) > self.capacity:
                raise LblError(f"--cache-size {self.capacity}: smaller than the {len(distinct)} distinct images "
                               "of one chunk; raise it or lower --chunk-rows")
            missing = []
            for p in distinct:
                if p in self._entries:
                    self._entries.move_to_end(p)
                else:
                    missing.append(p)
            self.hits += len(wanted) - len(missing)
            self._evict(len(missing))
        if not missing:
            return
        loader = make_loader(self.dataset_factory(missing), batch_size=self.batch_size, workers=self.workers)
        for batch in loader:
            for prob in batch.problems:
                self._entries[prob.path] = prob.reason
            self.failed += len(batch.problems)
            if len(batch):
                vecs = self.backbone.embed(batch.images, flip=self.flip).numpy()
                for row, vec in zip(batch.rows.tolist(), vecs, strict=True):
                    path = missing[row]
                    old = self._entries.get(path)
                    slot = old if isinstance(old, int) else self._slot()
                    self._vectors[slot] = vec
                    self._entries[path] = slot
                self.embedded += len(batch)
            if advance is not None:
                advance(len(batch) + len(batch.problems))

    def get(self, path: str) -> np.ndarray | str:
        """The unit vector of a cached image, or the reason it could not be embedded."""
        value = self._entries.get(path)
        if value is None:
            return "not embedded (cache too small for its chunk)"
        return self._vectors[value] if isinstance(value, int) else value

    def stats(self) -> dict[str, Any]:
        return {"embedded": self.embedded, "unreadable": self.failed, "lookups": self.requests,
                "cache_hits": self.hits, "cache_size": self.capacity if self.capacity is not None else "unbounded"}


# --------------------------------------------------------------------------- thresholds


def backbone_identities(backbone: Any) -> list[str]:
    """Fingerprints that stand for this backbone's weights: its file's, and for an ONNX model
    exported by lblctl (parity-checked) the ``backbone.pt`` it came from."""
    ids = [backbone.fingerprint]
    source = getattr(backbone, "meta", {}).get("onnx_meta", {}).get("source_fingerprint")
    if source:
        ids.append(source)
    return ids


def threshold_from_calibration(calibration: str | os.PathLike, far: float,
                               backbone_fingerprint: str | list[str] | None = None,
                               flip: bool | None = None) -> float:
    """The threshold at ``far`` from an eval report's ``metrics.json`` made with the same backbone
    (``backbone_fingerprint``: one fingerprint, or several that all stand for it)."""
    if not math.isfinite(far) or not 0 < far < 1:
        raise LblError(f"--far {far}: a false-accept rate is between 0 and 1 (exclusive); use 1e-1 … 1e-6")
    path = Path(calibration)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise LblError(f"--calibration {calibration}: no such file; give REPORT/metrics.json written by lblctl eval")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        table = metrics["verification"]["threshold_at_far"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LblError(f"--calibration {path}: no verification.threshold_at_far; "
                       "give the metrics.json of an lblctl eval run with --pairs") from None
    try:
        key = far_key(far)
    except ValueError:
        raise LblError(f"--far {far}: use a power of ten between 1e-1 and 1e-6") from None
    if key not in table:
        raise LblError(f"--far {far}: {path} has thresholds at FAR {', '.join(table)} only")
    if table[key] is None:
        have = [k for k, v in table.items() if v is not None]
        raise LblError(f"--far {far}: {path} has no threshold at FAR {key} (too few impostor pairs in its "
                       f"evaluation); use {' or '.join(have) or 'a larger evaluation set'}")
    if (path.parent / MANIFEST).is_file():
        manifest = read_manifest(path.parent, kind="eval-report", verify_files=False)
        made_by = manifest.get("backbone_fingerprint")
        accepted = [backbone_fingerprint] if isinstance(backbone_fingerprint, str) else (backbone_fingerprint or [])
        if accepted and made_by and made_by not in accepted:
            raise IncompatibleArtifact(
                f"--calibration {path}: made with another backbone ({made_by[:19]}…, this one is "
                f"{accepted[0][:19]}…); run lblctl eval with this backbone to calibrate it")
        made_flip = manifest.get("params", {}).get("flip")
        if flip is not None and made_flip is not None and bool(made_flip) != flip:
            ui.warn(f"--calibration {path} was made with flip={made_flip}, this run uses flip={flip}; "
                    "scores differ slightly")
    else:
        ui.warn(f"--calibration {path}: no manifest beside it; cannot check it was made with this backbone")
    return float(table[key])


# --------------------------------------------------------------------------- streaming verify-pair


@dataclass
class VerifyResult:
    rows: int = 0
    scored: int = 0
    failed: int = 0
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)


class PairStream(PairsFile):
    """The pairs CSV (:class:`lblctl.data.pairs.PairsFile`'s parser) and the scores CSV's header: the input
    columns, less any old score/same_pred/error, then ours."""

    def __init__(self, csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        super().__init__(csv_path, root)
        self.keep = [i for i, c in enumerate(self.fieldnames) if c not in ADDED_COLUMNS]
        self.out_header = [self.fieldnames[i] for i in self.keep] + list(ADDED_COLUMNS)


def _side_error(which: str, value: np.ndarray | str) -> str:
    return f"{which}: {value}" if isinstance(value, str) else ""


def check_scores_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an earlier SCORES.csv unless asked (as every other stage refuses its --out)."""
    if not overwrite and Path(out).exists():
        raise LblError(f"--out {out}: already exists; add --overwrite to replace it or choose a new file")


def verify_pairs(backbone: Any, pairs: str | os.PathLike, out: str | os.PathLike, threshold: float, *,
                 flip: bool = False, batch_size: int = 64, workers: int = 0, chunk_rows: int = 8192,
                 cache_size: int | None = 50_000, root: str | os.PathLike | None = None,
                 dataset_factory: Callable[[list[str]], PathDataset] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Score every row of ``pairs`` into ``out`` (input columns + score, same_pred, error)."""
    if chunk_rows < 1:
        raise LblError(f"--chunk-rows {chunk_rows}: must be at least 1")
    if not math.isfinite(threshold):
        raise LblError(f"--threshold {threshold}: must be a finite cosine in [-1, 1]")
    stream = PairStream(pairs, root)
    out = Path(out)
    if out.resolve() == stream.path.resolve():
        raise LblError(f"--out {out}: is the --pairs file; write the scores to another file")
    check_scores_out(out, overwrite)
    if cache_size and cache_size < 2 * chunk_rows:
        cache_size = 2 * chunk_rows  # a chunk's own images must fit
    cache = EmbeddingCache(backbone, batch_size=batch_size, workers=workers, flip=flip, capacity=cache_size,
                           dataset_factory=dataset_factory)
    res = VerifyResult()
    t0 = time.perf_counter()
    total_rows = _count_rows(stream.path)
    with atomic_open(out, "w") as fh, ui.progress("img") as bar:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(stream.out_header)
        task = bar.add_task("verify", total=total_rows, img=0)
        for chunk in stream.chunks(chunk_rows):
            paths = [p for r in chunk if not r.error for p in (r.id_image, r.spot_image)]
            cache.ensure(paths, advance=lambda _n: bar.update(task, img=cache.embedded + cache.failed))
            for r in chunk:
                score_txt, pred_txt = "", ""
                if not r.error:
                    a, b = cache.get(r.id_image), cache.get(r.spot_image)
                    r.error = _side_error("id_image", a) or _side_error("spot_image", b)
                    if not r.error:
                        score = float(np.dot(a, b))
                        pred = int(score >= threshold)
                        score_txt, pred_txt = f"{score:.6f}", str(pred)
                        res.scored += 1
                        if r.same is not None:
                            if r.same:
                                res.tp += pred
                                res.fn += 1 - pred
                            else:
                                res.fp += pred
                                res.tn += 1 - pred
                if r.error:
                    res.failed += 1
                    kind = r.error.split(" (")[0]
                    res.errors[kind] = res.errors.get(kind, 0) + 1
                    if len(res.examples) < 5:
                        res.examples.append({"row": res.rows + 1, "error": r.error})
                res.rows += 1
                writer.writerow([r.values[i] for i in stream.keep] + [score_txt, pred_txt, r.error])
            bar.update(task, completed=res.rows, img=cache.embedded + cache.failed)
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "out": str(out), "rows": res.rows, "scored": res.scored, "failed": res.failed,
        "threshold": threshold, "seconds": round(seconds, 3),
        "pairs_per_s": round(res.rows / seconds, 1) if seconds > 0 else None,
        **cache.stats(),
    }
    labelled = res.tp + res.fn + res.fp + res.tn
    if stream.has_same and labelled:
        summary.update({
            "labelled": labelled,
            "accuracy": (res.tp + res.tn) / labelled,
            "tar": res.tp / (res.tp + res.fn) if res.tp + res.fn else None,
            # the rate measured on this file's labels (the --far asked for is ``far_requested``)
            "far_measured": res.fp / (res.fp + res.tn) if res.fp + res.tn else None,
            "genuine": res.tp + res.fn, "impostor": res.fp + res.tn,
        })
    if res.failed:
        summary["errors"] = dict(sorted(res.errors.items(), key=lambda kv: -kv[1])[:10])
        summary["error_examples"] = res.examples
    return summary


def _count_rows(path: Path) -> int | None:
    """Lines after the header (for the progress bar only); ``None`` above 1 GB (not worth a pass)."""
    if path.stat().st_size > 1 << 30:
        return None
    with open(path, "rb") as fh:
        return max(0, sum(1 for _ in fh) - 1)


def write_scores_manifest(out: str | os.PathLike, backbone: Any, pairs: str | os.PathLike,
                          params: dict[str, Any], summary: dict[str, Any]) -> Path:
    """``SCORES.manifest.json`` beside the CSV (a file artifact; the folder may hold other stages)."""
    out = Path(out)
    path = out.with_name(out.stem + ".manifest.json")
    write_manifest(out.parent, "verify-scores", params=params,
                   inputs={"backbone": describe_input(backbone.path), "pairs": describe_input(pairs)},
                   files=[out.name], embedding_size=backbone.embedding_size,
                   backbone_fingerprint=backbone.fingerprint,
                   extra={"summary": {k: v for k, v in summary.items() if k not in ("error_examples",)}},
                   filename=path.name)
    return path



# --------------------------------------------------------------------------- the stage


@dataclass
class VerifyConfig:
    backbone: Path
    pairs: Path
    out: Path
    threshold: float | None = None  # give this, or far + calibration
    far: float | None = None
    calibration: Path | None = None  # REPORT/metrics.json of an eval run with this backbone
    flip: bool = False
    center_crop: float | None = None
    align: str | None = None  # scrfd or yunet: align raw photos on the fly
    align_model: Path | None = None
    batch_size: int = 64
    chunk_rows: int = 8192
    cache_size: int = 50_000
    workers: int = 0
    overwrite: bool = False  # replace an existing --out


def run(cfg: VerifyConfig, device: Any = "auto") -> Summary:
    """Score the pairs CSV into ``cfg.out`` with its manifest; the threshold given or taken at a FAR."""
    from dataclasses import replace

    from lblctl.core.runtime import as_device
    from lblctl.models.checkpoint import open_backbone

    if (cfg.threshold is None) == (cfg.far is None):
        raise LblError("give either --threshold T or --far F with --calibration REPORT/metrics.json")
    if cfg.far is not None and cfg.calibration is None:
        raise LblError("--far needs --calibration REPORT/metrics.json (an eval report made with this backbone)")
    if not Path(cfg.pairs).is_file():
        raise LblError(f"--pairs {cfg.pairs}: no such file")
    check_scores_out(cfg.out, cfg.overwrite)
    bb = open_backbone(cfg.backbone, as_device(device))
    if cfg.center_crop is not None:
        bb.preprocess = replace(bb.preprocess, center_crop=cfg.center_crop)
    factory = make_dataset_factory(cfg.align, cfg.align_model, bb.preprocess)
    threshold = cfg.threshold
    if threshold is None:
        threshold = threshold_from_calibration(cfg.calibration, cfg.far, backbone_identities(bb), cfg.flip)
    summary = verify_pairs(bb, cfg.pairs, cfg.out, threshold, flip=cfg.flip, batch_size=cfg.batch_size,
                           workers=cfg.workers, chunk_rows=cfg.chunk_rows, cache_size=cfg.cache_size,
                           dataset_factory=factory, overwrite=cfg.overwrite)
    params = {"threshold": threshold, "far": cfg.far, "calibration": str(cfg.calibration) if cfg.calibration else None,
              "flip": cfg.flip, "align": cfg.align, "align_model": str(cfg.align_model) if cfg.align_model else None,
              "center_crop": 1.0 if factory else bb.preprocess.center_crop, "input_size": bb.preprocess.input_size}
    write_scores_manifest(cfg.out, bb, cfg.pairs, params, summary)
    if cfg.far is not None:
        summary["threshold_from"] = f"FAR {cfg.far:g} in {cfg.calibration}"
        summary["far_requested"] = cfg.far
    return Summary("verify-pair", summary, exit_code=ROWS_FAILED_EXIT if summary["failed"] else 0)
