"""Face data: identity folders or CSVs, robust image loading, a DataLoader helper (pairs: :mod:`.pairs`).

The identity index is compact (numpy arrays + one byte buffer per string column), so that
10M identities × 2–5 images fit in a few hundred MB. An image that cannot be read becomes a
:class:`Problem` record, never a crash.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from lblctl.core.errors import LblError
from lblctl.core.strings import StringArray, StringArrayBuilder

# the one list of photo types every stage takes from identity folders (all decoded by Pillow)
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".pgm", ".ppm", ".pbm", ".tif", ".tiff",
                        ".webp"})

Image.MAX_IMAGE_PIXELS = 200_000_000  # very large scans are fine; decompression bombs are not


@dataclass
class Problem:
    """One input item that could not be used, and why."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class ProblemLog:
    """Collects per-item problems; keeps the first ``keep`` in full and counts the rest."""

    keep: int = 10_000
    items: list[Problem] = field(default_factory=list)
    count: int = 0

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        if len(self.items) < self.keep:
            self.items.append(Problem(str(path), reason))

    def extend(self, problems: list[Problem]) -> None:
        for p in problems:
            self.add(p.path, p.reason)

    def summary(self, show: int = 20) -> dict[str, Any]:
        return {"count": self.count, "items": [p.as_dict() for p in self.items[:show]]}

    def write_csv(self, path: str | os.PathLike) -> None:
        from lblctl.core.artifacts import atomic_open

        with atomic_open(path, "w") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "reason"])
            for p in self.items:
                w.writerow([p.path, p.reason])


class ImageProblem(Exception):
    """An image that cannot be decoded; ``str(exc)`` is the reason."""


# --------------------------------------------------------------------------- image loading


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).clip(0, 255).astype(np.uint8), mode="L")
    elif mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open any image as RGB uint8 with its EXIF orientation applied; raise :class:`ImageProblem`."""
    if ".rec#" in os.fspath(path):  # an image record of an insightface .rec set: DIR/train.rec#<offset>
        from lblctl.data import recordio

        if recordio.split_record_path(path) is not None:
            return recordio.load_record_image(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageProblem("empty file")
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except ImageProblem:
        raise
    except FileNotFoundError:
        raise ImageProblem("missing file") from None
    except IsADirectoryError:
        raise ImageProblem("is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageProblem("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageProblem(f"too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            msg = "truncated image"
        raise ImageProblem(f"unreadable image: {msg}") from None


def load_rgb_array(path: str | os.PathLike) -> np.ndarray:
    """``load_image`` as an H×W×3 uint8 array."""
    return np.asarray(load_image(path), dtype=np.uint8)


# --------------------------------------------------------------------------- identity index


@dataclass
class FaceIndex:
    """All images of a face set, grouped by identity, in compact arrays.

    Images of identity ``i`` are rows ``offsets[i]:offsets[i+1]``; ``is_id`` marks ID photos.
    ``paths`` are relative to ``root`` unless absolute.
    """

    root: Path
    names: StringArray
    paths: StringArray
    offsets: np.ndarray  # int64, N+1
    is_id: np.ndarray  # bool, M
    source: str = "folders"

    @property
    def num_identities(self) -> int:
        return len(self.names)

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def image_identity(self) -> np.ndarray:
        """Identity row of every image (int32, M)."""
        counts = np.diff(self.offsets)
        return np.repeat(np.arange(len(counts), dtype=np.int32), counts)

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def path(self, image: int) -> str:
        p = self.paths[int(image)]
        return p if os.path.isabs(p) else str(self.root / p)

    def images_of(self, identity: int, kind: str = "all") -> np.ndarray:
        rows = np.arange(self.offsets[identity], self.offsets[identity + 1])
        if kind == "id":
            return rows[self.is_id[rows]]
        if kind == "spot":
            return rows[~self.is_id[rows]]
        return rows

    def select_images(self, kind: str = "all", identities: np.ndarray | None = None) -> np.ndarray:
        """Image rows of ``kind`` (id|spot|all), optionally only of the given identities."""
        mask = np.ones(self.num_images, dtype=bool)
        if kind == "id":
            mask = self.is_id.copy()
        elif kind == "spot":
            mask = ~self.is_id
        elif kind != "all":
            raise LblError(f"photo kind '{kind}': expected id, spot or all")
        if identities is not None:
            keep = np.zeros(self.num_identities, dtype=bool)
            keep[identities] = True
            mask &= keep[self.image_identity]
        return np.flatnonzero(mask)

    def summary(self) -> dict[str, Any]:
        return {
            "identities": self.num_identities,
            "images": self.num_images,
            "id_photos": int(self.is_id.sum()),
            "spot_photos": int((~self.is_id).sum()),
        }


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def is_id_name(name: str) -> bool:
    """A file whose name starts with ``id`` (``id.jpg``, ``id_2.png``) is an ID photo."""
    return name.lower().startswith("id")


def skipped_files(index: FaceIndex) -> list[tuple[str, str]]:
    """Files in the identity folders of ``index`` that are not taken as photos, with the reason
    (so that a stage can report them instead of dropping them silently)."""
    if index.source != "folders":
        return []
    root, out = Path(index.root), []
    for ident in index.names:
        with os.scandir(root / str(ident)) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_file() and not e.name.startswith(".") and not _is_image_name(e.name):
                    out.append((f"{ident}/{e.name}", f"skipped: not an image type ({', '.join(sorted(IMAGE_EXTS))})"))
    return out


def scan_folders(root: str | os.PathLike, *, min_images: int = 1) -> FaceIndex:
    """Index ``root/<identity>/<image>``; raise :class:`LblError` when nothing usable is there."""
    root = Path(root)
    if not root.exists():
        raise LblError(f"--data {root}: no such folder")
    if not root.is_dir():
        raise LblError(f"--data {root}: is a file; give a folder of identity folders or a CSV ending in .csv")
    names, paths = StringArrayBuilder(), StringArrayBuilder()
    offsets = [0]
    is_id: list[bool] = []
    with os.scandir(root) as it:
        folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith((".", "_")))
    for ident in folders:
        with os.scandir(root / ident) as it:
            files = sorted(e.name for e in it if e.is_file() and _is_image_name(e.name))
        if len(files) < min_images:
            continue
        ids = [is_id_name(f) for f in files]
        if not any(ids):
            ids[0] = True
        # ID photos first so that images_of(i, "id") and the first row agree
        order = sorted(range(len(files)), key=lambda k: (not ids[k], files[k]))
        for k in order:
            paths.append(f"{ident}/{files[k]}")
            is_id.append(ids[k])
        names.append(ident)
        offsets.append(len(paths))
    if len(names) == 0:
        raise LblError(
            f"--data {root}: no identity folders with images found; expected {root}/<identity>/<image>.jpg"
        )
    return FaceIndex(root, names.build(), paths.build(), np.asarray(offsets, dtype=np.int64),
                     np.asarray(is_id, dtype=bool), "folders")


def read_identity_csv(csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> FaceIndex:
    """Index a CSV ``identity,image[,kind]`` (kind id|spot); paths relative to the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LblError(f"--data {csv_path}: no such file")
    base = Path(root) if root is not None else csv_path.parent
    groups: dict[str, list[tuple[str, bool | None]]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "identity" not in cols or "image" not in cols:
            raise LblError(f"{csv_path}: header must name columns identity,image[,kind]; found {cols or 'none'}")
        reader.fieldnames = cols
        for lineno, row in enumerate(reader, start=2):
            ident, image = (row.get("identity") or "").strip(), (row.get("image") or "").strip()
            if not ident or not image:
                raise LblError(f"{csv_path}:{lineno}: empty identity or image")
            kind = (row.get("kind") or "").strip().lower()
            if kind not in ("", "id", "spot"):
                raise LblError(f"{csv_path}:{lineno}: kind '{kind}' must be id or spot")
            groups.setdefault(ident, []).append((image, None if not kind else kind == "id"))
    if not groups:
        raise LblError(f"{csv_path}: no rows")
    names, paths = StringArrayBuilder(), StringArrayBuilder()
    offsets, is_id = [0], []
    for ident in sorted(groups):
        items = sorted(groups[ident])
        ids = [k if k is not None else is_id_name(os.path.basename(p)) for p, k in items]
        if not any(ids):
            ids[0] = True
        for k in sorted(range(len(items)), key=lambda k: (not ids[k], items[k][0])):
            p = items[k][0]
            paths.append(p if os.path.isabs(p) else str(Path(os.path.normpath(base / p)).relative_to(base)))
            is_id.append(ids[k])
        names.append(ident)
        offsets.append(len(paths))
    return FaceIndex(base, names.build(), paths.build(), np.asarray(offsets, dtype=np.int64),
                     np.asarray(is_id, dtype=bool), "csv")


def open_face_set(data: str | os.PathLike, *, min_images: int = 1) -> FaceIndex:
    """Identity folders, a CSV or an insightface ``.rec`` folder, by what ``data`` is."""
    p = Path(data)
    if p.suffix.lower() == ".rec" or (p / "train.rec").is_file():
        from lblctl.data.recordio import open_rec_index

        return open_rec_index(p.parent if p.suffix.lower() == ".rec" else p)
    if p.suffix.lower() == ".csv":
        return read_identity_csv(p)
    index = scan_folders(p, min_images=min_images)
    return index


def split_identities(index: FaceIndex, fraction: float, seed: int,
                     min_images: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Split identity rows into (train, held-out); held-out ones have ≥ ``min_images`` photos."""
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(index.counts() >= min_images)
    n_val = int(round(len(eligible) * fraction)) if fraction > 0 else 0
    val = np.sort(rng.permutation(eligible)[:n_val])
    train = np.setdiff1d(np.arange(index.num_identities), val)
    return train, val


# --------------------------------------------------------------------------- tensors and loaders


@dataclass(frozen=True)
class Preprocess:
    """Image → float tensor 3×S×S in [−1, 1] (insightface's (x − 127.5) / 127.5).

    ``center_crop`` keeps the central fraction of the image first (for un-aligned sets such as
    LFW-a, where the face fills the middle ~55 %); 1.0 keeps everything.
    """

    input_size: int = 112
    center_crop: float = 1.0

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.center_crop < 1.0:
            w, h = img.size
            cw, ch = max(1, round(w * self.center_crop)), max(1, round(h * self.center_crop))
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        if img.size != (self.input_size, self.input_size):
            img = img.resize((self.input_size, self.input_size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)
        return torch.from_numpy((arr - 127.5) / 127.5).permute(2, 0, 1).contiguous()

    def as_dict(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "center_crop": self.center_crop}


class FaceDataset(Dataset):
    """Images by row of a :class:`FaceIndex`, with a label per item; bad images yield a problem."""

    def __init__(self, index: FaceIndex, rows: np.ndarray, labels: np.ndarray | None,
                 preprocess: Preprocess) -> None:
        self.index = index
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else self.rows
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        path = self.index.path(row)
        try:
            return self.preprocess(load_image(path)), int(self.labels[i]), row
        except ImageProblem as exc:
            return Problem(path, str(exc))


class PathDataset(Dataset):
    """Images given by path (pairs, galleries); bad images yield a problem."""

    def __init__(self, paths: list[str], preprocess: Preprocess) -> None:
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.preprocess(load_image(self.paths[i])), i, i
        except ImageProblem as exc:
            return Problem(self.paths[i], str(exc))


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    problems: list[Problem]

    def __len__(self) -> int:
        return len(self.labels)


def collate_faces(items: list) -> Batch:
    """Stack good items, set bad ones aside as problems (a batch may end up smaller or empty)."""
    good = [x for x in items if not isinstance(x, Problem)]
    problems = [x for x in items if isinstance(x, Problem)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), problems)
    return Batch(
        torch.stack([g[0] for g in good]),
        torch.tensor([g[1] for g in good], dtype=torch.long),
        torch.tensor([g[2] for g in good], dtype=torch.long),
        problems,
    )


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches whose order depends only on (seed, epoch): a resumed run sees the same ones.

    ``start`` skips that many batches of the first epoch without loading them.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, start: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start, self.shuffle, self.drop_last = epoch, start, shuffle, drop_last

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        for b in range(self.start, self.batches_per_epoch()):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def make_loader(dataset: Dataset, *, batch_size: int | None = None, batch_sampler: Sampler | None = None,
                workers: int = 0, shuffle: bool = False) -> DataLoader:
    """A DataLoader whose workers decode while the model runs and whose collate drops bad items."""
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": collate_faces,
        "pin_memory": torch.cuda.is_available(),
    }
    if workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=4)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size or 64, shuffle=shuffle, **kwargs)
