"""``align``: detect, landmark and crop every photo to the ArcFace 112×112 template.

Recognition models are trained on crops made by one similarity transform from 5 landmarks to a
fixed template (insightface's ``norm_crop``); spot and ID photos must be cropped the same way or
the embeddings drift. This module turns a raw face set into that form:

- ``ALIGNED/<identity>/<stem>.png`` per usable photo (file stems, so ``id*`` names, kept);
- ``ALIGNED/_quarantine/<identity>/…`` copies of photos with no usable face, with the reason;
- ``ALIGNED/align_report.csv`` one row per input photo (status, reason, score, box, landmarks, and
  the source size + mtime that make a re-run skip finished work);
- ``ALIGNED/faces.csv`` (identity,image,kind) so CSV-given ID/spot kinds survive;
- ``ALIGNED/manifest.json`` (kind ``aligned``).

Rows are journaled as they finish (``.align_journal``: one checksummed record per report line, in
the record log of :mod:`lblctl.core.journal`), so a killed run loses nothing and a line cut short
by the kill is ignored; crops are written atomically (temp + fsync + rename); the report is rebuilt
atomically from report + journal at the end. Per-row resume state
is kept in numpy arrays (≈ 40 bytes per photo), not Python objects, so millions of photos fit.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lblctl.core import ui
from lblctl.core.artifacts import atomic_open, atomic_write_json, fingerprint_file, write_manifest
from lblctl.core.errors import LblError
from lblctl.core.journal import RecordLog, atomic_write_bytes, scan
from lblctl.core.runtime import default_workers
from lblctl.core.strings import StringArrayBuilder
from lblctl.core.summary import Summary
from lblctl.data.faces import FaceIndex, ImageProblem, load_image, open_face_set, skipped_files
from lblctl.models.detectors import Face, make_detector, onnx_cuda_available, usable_cores

REPORT = "align_report.csv"
JOURNAL = ".align_journal"
JOURNAL_KIND = b"align"
LINE = 1  # journal record type: one report line
PARAMS = ".align_params.json"
LOCK = ".align.lock"
FACES_CSV = "faces.csv"
QUARANTINE = "_quarantine"
COLUMNS = ["image", "identity", "kind", "output", "status", "reason", "det_score", "faces", "box",
           "landmarks", "width", "height", "src_bytes", "src_mtime_ns"]
HEADER = (",".join(COLUMNS) + "\n").encode()

DETECTORS = ("scrfd", "yunet", "landmarks", "none")
PICKS = ("largest", "central", "score")
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg"}
DEFAULT_MIN_SCORE = {"scrfd": 0.5, "yunet": 0.6, "landmarks": 0.0, "none": 0.0}
DETECT_FLOOR = 0.3  # detections down to this score are kept to tell "weak face" from "no face"
STATUS_CODE = {"aligned": 1, "quarantined": 2, "failed": 3}

# ArcFace 5-point template at 112×112 (insightface's arcface_dst)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


@dataclass
class AlignConfig:
    data: Path
    out: Path
    detector: str = "scrfd"
    model: Path | None = None
    landmarks: Path | None = None
    size: int = 112
    fmt: str = "png"
    pick: str = "central"
    min_score: float | None = None
    min_size: int = 24
    det_size: int = 0  # 0: the photo's own size (≤ 640); insightface's 640 misses tight crops (ORL, Yale B)
    copy_quarantine: bool = True
    workers: int = -1  # -1: cores − 1 (at most 8; this process for small jobs); 0 or 1: this process
    threads: int = 0  # onnx/OpenCV threads per worker; 0: cores // workers
    force: bool = False
    use_cuda: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its own detector and write crops (picklable)."""

    detector: str
    model: str | None
    threads: int
    use_cuda: bool
    det_size: int
    size: int
    ext: str
    pick: str
    min_score: float
    min_size: int
    out: str
    copy_quarantine: bool


# --------------------------------------------------------------------------- one image


def pick_face(faces: list[Face], width: int, height: int, how: str) -> Face:
    """``largest`` box area; ``score``; ``central``: area − 2·(distance to the centre)², which keeps
    the big face near the middle over a bigger one at the edge (insightface's default ranking)."""
    if how == "score":
        return max(faces, key=lambda f: f.score)
    if how == "largest":
        return max(faces, key=lambda f: f.width * f.height)
    cx, cy = width / 2.0, height / 2.0

    def central(f: Face) -> float:
        fx, fy = (f.box[0] + f.box[2]) / 2.0, (f.box[1] + f.box[3]) / 2.0
        return f.width * f.height - 2.0 * float((fx - cx) ** 2 + (fy - cy) ** 2)

    return max(faces, key=central)


def _fmt(values: np.ndarray | list[float]) -> str:
    return " ".join(f"{float(v):.2f}" for v in np.asarray(values).ravel())


def norm_crop(bgr: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """insightface's ``norm_crop``, quiet about the scikit-image deprecation it triggers (same result)."""
    from insightface.utils.face_align import norm_crop as _norm_crop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _norm_crop(bgr, landmarks, image_size=size)


def landmark_fit_error(landmarks: np.ndarray, size: int = 112) -> float:
    """Mean distance (crop pixels) between the landmarks after ``norm_crop``'s transform and the template."""
    from insightface.utils.face_align import estimate_norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = estimate_norm(np.asarray(landmarks, np.float32).reshape(5, 2), size)
    mapped = np.asarray(landmarks, np.float64).reshape(5, 2) @ m[:, :2].T + m[:, 2]
    return float(np.linalg.norm(mapped - ARCFACE_TEMPLATE * (size / 112.0), axis=1).mean())


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def quarantine_name(out_rel: str, src: str) -> str:
    """``_quarantine/<identity>/<crop stem><source extension>`` (unique as crop names are)."""
    stem = os.path.splitext(out_rel)[0]
    return f"{QUARANTINE}/{stem}{os.path.splitext(src)[1].lower()}"


class Aligner:
    """Aligns one photo at a time; each worker process holds one (and so one detector)."""

    def __init__(self, spec: WorkerSpec) -> None:
        import cv2

        cv2.setNumThreads(max(1, spec.threads))
        self.spec = spec
        self.detector = None
        if spec.detector in ("scrfd", "yunet"):
            model = Path(spec.model) if spec.model else None
            self.detector = make_detector(spec.detector, model, threads=spec.threads, use_cuda=spec.use_cuda,
                                          det_size=spec.det_size, floor=min(DETECT_FLOOR, spec.min_score))
        self._made_dirs: set[str] = set()

    def _mkdir(self, folder: str) -> None:
        if folder not in self._made_dirs:
            os.makedirs(folder, exist_ok=True)
            self._made_dirs.add(folder)

    def __call__(self, job: tuple[int, str, str, tuple[float, ...] | None]) -> dict[str, Any]:
        row, src, out_rel, given = job
        res: dict[str, Any] = {"row": row, "output": "", "status": "", "reason": "", "det_score": "",
                               "faces": "", "box": "", "landmarks": "", "width": "", "height": ""}
        try:
            rgb = np.asarray(load_image(src), dtype=np.uint8)
        except ImageProblem as exc:
            res.update(status="failed", reason=str(exc))
            return res
        try:
            res["height"], res["width"] = rgb.shape[:2]
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            crop, reason = self._crop(bgr, given, res)
        except Exception as exc:  # noqa: BLE001 - one odd image must not stop a million-photo run
            res.update(status="failed", reason=f"detector error: {type(exc).__name__}: {exc}")
            return res
        out = self.spec.out
        if crop is None:
            res.update(status="quarantined", reason=reason)
            if self.spec.copy_quarantine:
                qrel = quarantine_name(out_rel, src)
                self._mkdir(os.path.dirname(f"{out}/{qrel}"))
                shutil.copyfile(src, f"{out}/{qrel}.{os.getpid()}.tmp")
                os.replace(f"{out}/{qrel}.{os.getpid()}.tmp", f"{out}/{qrel}")
                res["output"] = qrel
            return res
        import cv2

        jpg = self.spec.ext == ".jpg"
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if jpg else [cv2.IMWRITE_PNG_COMPRESSION, 3]
        ok, buf = cv2.imencode(self.spec.ext, crop, params)
        if not ok:
            res.update(status="failed", reason="could not encode the crop")
            return res
        self._mkdir(os.path.dirname(f"{out}/{out_rel}"))
        atomic_write_bytes(f"{out}/{out_rel}", buf.tobytes())
        res.update(status="aligned", output=out_rel)
        return res

    def _crop(self, bgr: np.ndarray, given: tuple[float, ...] | None,
              res: dict[str, Any]) -> tuple[np.ndarray | None, str]:
        import cv2

        spec, (h, w) = self.spec, bgr.shape[:2]
        if spec.detector == "none":
            if abs(w - h) > 0.1 * max(w, h):
                return None, f"not_square ({w}x{h}; not an aligned crop)"
            if min(w, h) < spec.min_size:
                return None, f"small_face ({min(w, h)} px < --min-size {spec.min_size})"
            if (w, h) == (spec.size, spec.size):
                return bgr, ""
            interp = cv2.INTER_AREA if min(w, h) > spec.size else cv2.INTER_CUBIC
            return cv2.resize(bgr, (spec.size, spec.size), interpolation=interp), ""
        if spec.detector == "landmarks":
            if given is None:
                return None, "no_landmarks (image not in the --landmarks CSV)"
            pts = np.asarray(given, np.float32).reshape(5, 2)
            res["landmarks"] = _fmt(pts)
            eye = float(np.linalg.norm(pts[1] - pts[0]))
            inside = (pts[:, 0] > -w) & (pts[:, 0] < 2 * w) & (pts[:, 1] > -h) & (pts[:, 1] < 2 * h)
            if not np.isfinite(pts).all() or eye < 2.0 or not inside.all():
                return None, "bad_landmarks (degenerate or far outside the image)"
            res["box"] = _fmt([*pts.min(0), *pts.max(0)])
            return norm_crop(bgr, pts, spec.size), ""
        assert self.detector is not None
        faces = self.detector.detect(bgr)
        if not faces:
            res["faces"] = 0
            return None, "no_face"
        good = [f for f in faces if f.score >= spec.min_score]
        res["faces"] = len(good)
        if not good:
            best = max(faces, key=lambda f: f.score)
            res.update(det_score=f"{best.score:.4f}", box=_fmt(best.box), landmarks=_fmt(best.landmarks))
            return None, f"low_score ({shown_below(best.score, spec.min_score, 3)} < --min-score {spec.min_score})"
        big = [f for f in good if min(f.width, f.height) >= spec.min_size]
        if not big:
            best = max(good, key=lambda f: f.width * f.height)
            res.update(det_score=f"{best.score:.4f}", box=_fmt(best.box), landmarks=_fmt(best.landmarks))
            size = shown_below(min(best.width, best.height), spec.min_size, 0)
            return None, f"small_face ({size} px < --min-size {spec.min_size})"
        face = pick_face(big, w, h, spec.pick)
        res.update(det_score=f"{face.score:.4f}", box=_fmt(face.box), landmarks=_fmt(face.landmarks))
        return norm_crop(bgr, face.landmarks, spec.size), ""


_WORKER: dict[str, Aligner] = {}


def _init_worker(spec: WorkerSpec) -> None:
    _WORKER["aligner"] = Aligner(spec)


def _run_worker(job: tuple[int, str, str, tuple[float, ...] | None]) -> dict[str, Any]:
    return _WORKER["aligner"](job)


# --------------------------------------------------------------------------- report, journal, resume


def _csv_line(values: list[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if v is None else v for v in values])
    return buf.getvalue().encode("utf-8")


def _parse_line(line: bytes) -> list[str] | None:
    try:
        rows = list(csv.reader([line.decode("utf-8").rstrip("\r\n")]))
    except (UnicodeDecodeError, csv.Error):
        return None
    return rows[0] if rows and len(rows[0]) == len(COLUMNS) else None


class ReportState:
    """Where each photo's latest report line is, and what it recorded, in compact arrays.

    Sources, later overriding earlier: ``align_report.csv`` (file 0), the journal (file 1).
    """

    def __init__(self, out: Path, index: FaceIndex) -> None:
        m = index.num_images
        self.out, self.index = out, index
        self.files = [out / REPORT, out / JOURNAL]
        self.file = np.full(m, -1, np.int8)
        self.offset = np.zeros(m, np.int64)
        self.status = np.zeros(m, np.int8)
        self.src_bytes = np.full(m, -2, np.int64)
        self.src_mtime = np.zeros(m, np.int64)
        self.out_index = np.full(m, -1, np.int64)
        self._outputs = StringArrayBuilder()
        self.orphans: list[str] = []  # outputs of rows whose photo left the input
        for fid, path in enumerate(self.files):
            if path.is_file():
                self._read(fid, path)
        self.outputs = self._outputs.build()

    def _read(self, fid: int, path: Path) -> None:
        lines = _journal_lines(path) if fid == 1 else _report_lines(path)
        while True:
            chunk: list[tuple[int, list[str]]] = []
            for pos, line in itertools.islice(lines, 65536):
                fields = _parse_line(line)
                if fields is not None and fields[4] in STATUS_CODE:
                    chunk.append((pos, fields))
            if not chunk:
                break
            rows = self.index.paths.lookup([f[0] for _, f in chunk])
            for row, (pos, f) in zip(rows.tolist(), chunk, strict=True):
                if row < 0:
                    if f[3]:
                        self.orphans.append(f[3])
                    continue
                self.file[row], self.offset[row] = fid, pos
                self.status[row] = STATUS_CODE[f[4]]
                self.src_bytes[row] = int(f[12] or -2)
                self.src_mtime[row] = int(f[13] or 0)
                self.out_index[row] = self._outputs.append(f[3])

    def recorded_output(self, row: int) -> str:
        k = int(self.out_index[row])
        return self.outputs[k] if k >= 0 else ""

    def forget_all(self) -> list[str]:
        """--force: drop every recorded row; return their outputs so they can be deleted."""
        outputs = [self.recorded_output(r) for r in np.flatnonzero(self.file >= 0)] + self.orphans
        self.file[:] = -1
        self.status[:] = 0
        self.orphans = []
        return [o for o in outputs if o]


def _report_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` of a finished ``align_report.csv`` (after its header)."""
    with open(path, "rb") as fh:
        if fh.readline() != HEADER:
            raise LblError(f"{path}: not an lblctl align report (header differs); "
                           "use a fresh --out or delete the file")
        while True:
            pos = fh.tell()
            line = fh.readline()
            if not line.endswith(b"\n"):
                return
            yield pos, line


def _journal_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(record offset, line)`` of the journal's whole records (a record cut by a kill is not one)."""
    records, _ = scan(path.read_bytes(), JOURNAL_KIND)
    for rtype, payload, pos in records:
        if rtype == LINE:
            yield pos, bytes(payload)


class Journal:
    """The finished rows of this run, one record each, appended as they come (a killed run loses none)."""

    def __init__(self, path: Path) -> None:
        self.log = RecordLog(path, JOURNAL_KIND, keep_records=False)  # cuts off a torn last record

    def write(self, line: bytes) -> int:
        return self.log.append(LINE, line)

    def read_at(self, offset: int) -> bytes:
        return self.log.read_at(offset)[1]

    def close(self) -> None:
        if not self.log.closed:
            self.log.sync()
            self.log.close()


# --------------------------------------------------------------------------- planning


def _safe_dir(name: str) -> str:
    """An identity name as a folder name: no separators, not hidden, not ``_quarantine``."""
    name = name.replace("/", "_").replace("\\", "_").strip() or "unnamed"
    return "x" + name if name.startswith((".", "_")) else name


def read_landmarks_csv(path: Path, data_root: Path) -> dict[str, tuple[float, ...]]:
    """``image,x1,y1,…,x5,y5`` → {absolute path: 10 floats}; paths relative to the CSV's
    folder, or to the data root when the file is there instead."""
    if not path.is_file():
        raise LblError(f"--landmarks {path}: no such file")
    want = ["image"] + [f"{a}{i}" for i in range(1, 6) for a in ("x", "y")]
    table: dict[str, tuple[float, ...]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in want if c not in header]
        if missing:
            raise LblError(f"--landmarks {path}: header must have {','.join(want)}; "
                           f"missing {','.join(missing)}")
        cols = [header.index(c) for c in want]
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                image = row[cols[0]].strip()
                values = tuple(float(row[c]) for c in cols[1:])
            except (IndexError, ValueError):
                raise LblError(f"--landmarks {path}:{lineno}: expected an image and 10 numbers") from None
            key = os.path.abspath(image if os.path.isabs(image) else path.parent / image)
            if not os.path.exists(key) and not os.path.isabs(image):
                alt = os.path.abspath(data_root / image)
                key = alt if os.path.exists(alt) else key
            table[key] = values
    return table


@dataclass
class Plan:
    rows: np.ndarray  # image rows to (re)do
    outputs: list[str]  # their output paths relative to OUT
    src_bytes: np.ndarray  # per image, −1 when missing
    src_mtime: np.ndarray


def _plan(index: FaceIndex, state: ReportState, out: Path, ext: str) -> Plan:
    """Which photos still need work, and a crop name for each that no other photo already holds."""
    m = index.num_images
    sizes = np.full(m, -1, np.int64)
    mtimes = np.zeros(m, np.int64)
    todo: list[int] = []
    names: list[str] = []
    for ident in range(index.num_identities):
        folder = _safe_dir(index.names[ident])
        rows = index.images_of(ident)
        used: set[str] = set()
        pending: list[int] = []
        for r in rows.tolist():
            try:
                st = os.stat(index.path(r))
                sizes[r], mtimes[r] = st.st_size, st.st_mtime_ns
            except OSError:
                pass
            recorded = state.recorded_output(r) if state.file[r] >= 0 else ""
            done = (state.file[r] >= 0 and state.src_bytes[r] == sizes[r] and state.src_mtime[r] == mtimes[r]
                    and (state.status[r] != STATUS_CODE["aligned"] or (out / recorded).is_file()))
            if done:
                if state.status[r] == STATUS_CODE["aligned"]:
                    used.add(recorded.lower())
            else:
                pending.append(r)
        for r in pending:
            recorded = state.recorded_output(r) if state.file[r] >= 0 else ""
            stem = os.path.splitext(os.path.basename(index.paths[r]))[0]
            src_ext = os.path.splitext(index.paths[r])[1].lstrip(".").lower()
            candidates = [f"{folder}/{stem}{ext}", f"{folder}/{stem}_{src_ext}{ext}"]
            if recorded.endswith(ext) and not recorded.startswith(QUARANTINE + "/"):
                candidates.insert(0, recorded)
            name = next((c for c in candidates if c.lower() not in used), None)
            k = 2
            while name is None:
                c = f"{folder}/{stem}_{k}{ext}"
                name, k = (c if c.lower() not in used else None), k + 1
            used.add(name.lower())
            todo.append(r)
            names.append(name)
    return Plan(np.asarray(todo, np.int64), names, sizes, mtimes)


# --------------------------------------------------------------------------- the stage


def _params(cfg: AlignConfig, min_score: float) -> dict[str, Any]:
    model_fp = fingerprint_file(cfg.model) if cfg.model and Path(cfg.model).is_file() else None
    p = {"detector": cfg.detector, "model_fingerprint": model_fp, "size": cfg.size,
         "format": FORMATS[cfg.fmt], "pick": cfg.pick, "min_score": min_score, "min_size": cfg.min_size,
         "det_size": cfg.det_size}
    if cfg.detector in ("landmarks", "none"):
        p.pop("model_fingerprint")
        p.pop("det_size")
        p.pop("pick")
    return p


def _validate(cfg: AlignConfig) -> None:
    if cfg.detector not in DETECTORS:
        raise LblError(f"--detector {cfg.detector}: expected {', '.join(DETECTORS)}")
    if cfg.pick not in PICKS:
        raise LblError(f"--pick {cfg.pick}: expected {', '.join(PICKS)}")
    if cfg.fmt not in FORMATS:
        raise LblError(f"--format {cfg.fmt}: expected png or jpg")
    if cfg.size <= 0 or (cfg.size % 112 and cfg.size % 128):
        raise LblError(f"--size {cfg.size}: the ArcFace template scales to multiples of 112 or 128 "
                       "(112, 224, 128…)")
    if cfg.detector == "landmarks" and cfg.landmarks is None:
        raise LblError("--detector landmarks needs --landmarks CSV with columns image,x1,y1,…,x5,y5")
    if cfg.min_size < 0 or cfg.det_size < 0:
        raise LblError("--min-size and --det-size must be ≥ 0")
    if cfg.det_size and cfg.det_size % 32:
        raise LblError(f"--det-size {cfg.det_size}: must be a multiple of 32 (e.g. 320, 640), "
                       "or 0 for the photo's own size")
    data = Path(cfg.data).resolve()
    out = Path(cfg.out).resolve()
    if data.is_dir() and (out == data or data in out.parents):
        raise LblError(f"--out {cfg.out}: is inside --data {cfg.data}; its crops would be read as new "
                       "identities next time. Put --out beside the data")
    if out.exists() and not out.is_dir():
        raise LblError(f"--out {cfg.out}: is a file; give a folder")


def _check_params(out: Path, params: dict[str, Any], force: bool) -> None:
    path = out / PARAMS
    if not path.is_file() or force:
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    diffs = [f"{k} {old.get(k)!r}→{v!r}" for k, v in params.items() if old.get(k) != v]
    if diffs:
        raise LblError(f"--out {out}: already holds crops made with other settings ({'; '.join(diffs)}); "
                       "use a new --out, or add --force to redo them all")


def _pool_context() -> Any:
    """Workers come from a clean forkserver (or spawn), never a plain fork of this process: a fork
    inherits OpenCV's and onnxruntime's thread pools in whatever state they are, and hangs."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # imported once in the server, so each worker starts with them loaded (no sessions, no threads yet)
        ctx.set_forkserver_preload(["lblctl.stages.align", "cv2", "onnxruntime", "insightface.model_zoo.scrfd",
                                    "insightface.utils.face_align"])
        return ctx
    return mp.get_context("spawn")


def _blocks(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while True:
        block = list(itertools.islice(it, size))
        if not block:
            return
        yield block


def _tree_fingerprint(index: FaceIndex, sizes: np.ndarray, mtimes: np.ndarray) -> str:
    h = hashlib.sha256()
    for r in range(index.num_images):
        h.update(f"{index.paths[r]}\0{int(sizes[r])}\0{int(mtimes[r])}\n".encode())
    return "tree:" + h.hexdigest()


def align(cfg: AlignConfig) -> dict[str, Any]:
    """Align every photo of ``cfg.data`` into ``cfg.out`` (skipping finished ones); return a summary.

    With ``workers > 1`` the workers start from a forkserver, so a script calling this needs the
    usual ``if __name__ == "__main__":`` guard.
    """
    _validate(cfg)
    index = open_face_set(cfg.data)
    out = Path(cfg.out)
    min_score = DEFAULT_MIN_SCORE[cfg.detector] if cfg.min_score is None else float(cfg.min_score)
    landmarks: dict[str, tuple[float, ...]] = {}
    if cfg.detector == "landmarks":
        landmarks = read_landmarks_csv(Path(cfg.landmarks), index.root)  # type: ignore[arg-type]
    if cfg.detector in ("scrfd", "yunet"):  # a bad model fails here, once, not in every worker
        make_detector(cfg.detector, cfg.model, threads=1, use_cuda=False, det_size=cfg.det_size,
                      floor=min(DETECT_FLOOR, min_score))
    params = _params(cfg, min_score)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _align_locked(cfg, index, out, params, min_score, landmarks)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One ``align`` per output folder at a time (two would interleave the journal)."""
    import fcntl

    with open(out / LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LblError(f"--out {out}: another lblctl align is writing there; wait for it or use "
                           "another --out") from None
        yield


def _align_locked(cfg: AlignConfig, index: FaceIndex, out: Path, params: dict[str, Any], min_score: float,
                  landmarks: dict[str, tuple[float, ...]]) -> dict[str, Any]:
    ext = FORMATS[cfg.fmt]
    _check_params(out, params, cfg.force)

    use_cuda = cfg.use_cuda and cfg.detector == "scrfd"
    if use_cuda and not onnx_cuda_available():
        ui.warn("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); SCRFD runs on CPU")
        use_cuda = False
    state = ReportState(out, index)
    if cfg.force:
        for rel in state.forget_all():
            _unlink(str(out / rel))
        for name in (REPORT, JOURNAL):
            _unlink(str(out / name))
        state = ReportState(out, index)
    atomic_write_json(out / PARAMS, params)
    if state.orphans:  # photos that left the input: their crops go too, unless a live row holds the name
        live = {state.recorded_output(r) for r in np.flatnonzero(state.file >= 0).tolist()}
        for rel in state.orphans:
            if rel not in live:
                _unlink(str(out / rel))

    plan = _plan(index, state, out, ext)
    todo = len(plan.rows)
    cores = usable_cores()
    # --workers as in every stage: N processes, -1 = cores − 1 (at most 8), 0 (or 1) = this process
    workers = default_workers(cfg.workers) if cfg.workers >= 0 or todo >= 64 else 1
    workers = max(1, min(workers, max(1, todo)))
    threads = cfg.threads if cfg.threads > 0 else max(1, cores // workers)
    spec = WorkerSpec(cfg.detector, str(cfg.model) if cfg.model else None, threads, use_cuda, cfg.det_size,
                      cfg.size, ext, cfg.pick, min_score, cfg.min_size, str(out), cfg.copy_quarantine)
    ui.info(f"align: {index.num_images} photos of {index.num_identities} identities; {todo} to do, "
            f"{index.num_images - todo} already done; {cfg.detector}, {workers} worker(s) × "
            f"{threads} thread(s)" + (" on CUDA" if use_cuda else ""))

    def jobs() -> Iterator[tuple[int, str, str, tuple[float, ...] | None]]:
        for k, r in enumerate(plan.rows.tolist()):
            src = index.path(r)
            yield r, src, plan.outputs[k], landmarks.get(os.path.abspath(src)) if landmarks else None

    journal = Journal(out / JOURNAL)
    identity = index.image_identity
    started = running = time.perf_counter()
    done = 0
    pool = None
    try:
        if workers > 1:
            pool = _pool_context().Pool(workers, initializer=_init_worker, initargs=(spec,))
            blocks = _blocks(jobs(), 256 * workers)  # bounded: a million jobs are never all queued
            results: Iterator[dict[str, Any]] = (
                res for block in blocks for res in pool.imap_unordered(_run_worker, block, chunksize=4))
        elif todo:
            aligner = Aligner(spec)
            results = (aligner(job) for job in jobs())
        else:
            results = iter(())
        running = time.perf_counter()  # images/s leaves out the one-off start of workers and detectors
        with ui.progress("img/s") as bar:
            task = bar.add_task("align", total=todo, **{"img/s": "-"})
            for res in results:
                r = res.pop("row")
                old = state.recorded_output(r) if state.file[r] >= 0 else ""
                if old and old != res["output"]:  # a re-done photo: its previous crop/copy is stale
                    _unlink(str(out / old))
                kind = "id" if index.is_id[r] else "spot"
                line = _csv_line([index.paths[r], index.names[int(identity[r])], kind,
                                  *(res[c] for c in COLUMNS[3:12]),
                                  int(plan.src_bytes[r]), int(plan.src_mtime[r])])
                state.offset[r] = journal.write(line)
                state.file[r] = 1
                state.status[r] = STATUS_CODE[res["status"]]
                done += 1
                rate = done / max(1e-9, time.perf_counter() - running)
                bar.update(task, advance=1, **{"img/s": f"{rate:.1f}"})
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        journal.close()
    ended = time.perf_counter()
    timing = {"seconds": round(ended - started, 2), "startup_s": round(running - started, 2),
              "images_per_s": round(done / (ended - running), 2) if done and ended > running else 0.0}

    skipped = skipped_files(index)
    counts = _write_report(out, index, state, skipped)
    (out / JOURNAL).unlink(missing_ok=True)
    summary = _summary(index, counts, todo, done, timing, cfg, workers, threads, use_cuda, min_score, out)
    summary["skipped_files"] = len(skipped)
    if skipped:
        ui.warn(f"{len(skipped)} files are not an image type and were skipped (e.g. {skipped[0][0]}); they are "
                f"the rows with status 'skipped' in {out / REPORT}")
    tree = _tree_fingerprint(index, plan.src_bytes, plan.src_mtime)
    inputs: dict[str, Any] = {"data": {"path": str(Path(cfg.data).resolve()), "fingerprint": tree}}
    if cfg.model and cfg.detector in ("scrfd", "yunet"):
        inputs["model"] = {"path": str(Path(cfg.model).resolve()),
                           "fingerprint": params.get("model_fingerprint")}
    if cfg.landmarks and cfg.detector == "landmarks":
        inputs["landmarks"] = {"path": str(Path(cfg.landmarks).resolve()),
                               "fingerprint": fingerprint_file(cfg.landmarks)}
    write_manifest(out, "aligned", params=params, inputs=inputs, files=[REPORT, FACES_CSV],
                   extra={"summary": {k: summary[k] for k in ("images", "aligned", "quarantined", "failed")}})
    return summary


def shown_below(value: float, limit: float, digits: int) -> str:
    """``value`` with the fewest decimals (from ``digits``) that still read below ``limit``: a reason
    never says ``24 px < --min-size 24`` for a 23.58 px face."""
    for d in range(digits, 7):
        text = f"{value:.{d}f}"
        if float(text) < limit:
            return text
    return repr(float(value))


def reason_group(reason: str) -> str:
    """``low_score (0.41 < …)`` → ``low_score``; ``unreadable image: truncated image`` → ``truncated image``."""
    return reason.removeprefix("unreadable image: ").split(" (")[0].split(":")[0].strip()


def _write_report(out: Path, index: FaceIndex, state: ReportState,
                  skipped: list[tuple[str, str]]) -> dict[str, Counter[str]]:
    """Rebuild ``align_report.csv`` (input order, then the ``skipped`` files that are not photos, status
    ``skipped``) and ``faces.csv`` from the report + journal lines."""
    counts: dict[str, Counter[str]] = {"status": Counter(), "quarantined": Counter(), "failed": Counter()}
    handles = [open(state.files[0], "rb") if state.files[0].is_file() else None,  # noqa: SIM115 - closed below
               Journal(state.files[1]) if state.files[1].is_file() else None]
    try:
        with atomic_open(out / REPORT, "wb") as rep, atomic_open(out / FACES_CSV, "w") as faces:
            rep.write(HEADER)
            fw = csv.writer(faces, lineterminator="\n")
            fw.writerow(["identity", "image", "kind"])
            for r in np.flatnonzero(state.file >= 0).tolist():
                fh = handles[int(state.file[r])]
                assert fh is not None
                if isinstance(fh, Journal):
                    line = fh.read_at(int(state.offset[r]))
                else:
                    fh.seek(int(state.offset[r]))
                    line = fh.readline()
                rep.write(line)
                f = _parse_line(line)
                if f is None:
                    continue
                counts["status"][f[4]] += 1
                if f[4] == "aligned":
                    fw.writerow([f[1], f[3], f[2]])
                else:
                    counts[f[4]][reason_group(f[5])] += 1
            for image, reason in skipped:  # never read back as a photo's state (not a status of STATUS_CODE)
                rep.write(_csv_line([image, image.split("/", 1)[0], "", "", "skipped",
                                     reason.removeprefix("skipped: ")] + [""] * (len(COLUMNS) - 6)))
    finally:
        for fh in handles:
            if fh is not None:
                fh.close()
    return counts


def _summary(index: FaceIndex, counts: dict[str, Counter[str]], todo: int, done: int, timing: dict[str, float],
             cfg: AlignConfig, workers: int, threads: int, use_cuda: bool, min_score: float,
             out: Path) -> dict[str, Any]:
    aligned, failed = counts["status"]["aligned"], counts["status"]["failed"]
    readable = index.num_images - failed
    return {
        "images": index.num_images,
        "identities": index.num_identities,
        "aligned": aligned,
        "quarantined": counts["status"]["quarantined"],
        "failed": failed,
        "found_rate": round(aligned / readable, 4) if readable else 0.0,
        "quarantined_by_reason": dict(counts["quarantined"]),
        "failed_by_reason": dict(counts["failed"]),
        "this_run": {"processed": done, "skipped": index.num_images - todo, **timing},
        "detector": cfg.detector,
        "min_score": min_score,
        "workers": workers,
        "threads_per_worker": threads,
        "provider": "CUDA" if use_cuda else "CPU",
        "out": str(out),
        "report": str(out / REPORT),
    }


def run(cfg: AlignConfig, device: Any = "auto") -> Summary:
    """The align stage: detectors run on CUDA (onnxruntime) when ``device`` is a GPU."""
    from lblctl.core.runtime import as_device

    return Summary("align", align(replace(cfg, use_cuda=as_device(device).type == "cuda")))
