"""insightface RecordIO face sets (``train.rec`` + ``train.idx`` + ``property``), without mxnet.

The format is MXNet's indexed RecordIO as insightface packs MS1M, Glint360K or WebFace:

* every record is ``magic 0xced7230a`` (uint32 LE), ``lrec`` (uint32: 3 bits continuation flag,
  29 bits length), the payload, zero padding to 4 bytes. A payload that contains the magic at a
  4-byte boundary is split there into continuation parts (dmlc-core's rule; the magic is implied
  between parts);
* a payload starts with an ``IRHeader`` (``struct 'IfQQ'``: flag, label, id, id2). ``flag > 0``
  means ``flag`` float32 labels follow the header (and the scalar label is 0);
* ``train.idx`` lines are ``key<TAB>byte offset``;
* record 0 is the header: ``flag > 0`` and ``label = [first identity key, end of identity keys]``.
  Records ``1 … label[0]-1`` are images (scalar label = identity), records
  ``label[0] … label[1]-1`` are one per identity, ``label = [first image key, end image key)``.
  That is how arcface_torch's ``MXFaceDataset`` reads it. When record 0 has ``flag == 0``
  every key is an image and identities come from the image labels.

lblctl's writer adds two things insightface's readers ignore: an identity record carries a third
label (how many of its first images are ID photos) and the identity's name as its payload.

Images of a ``.rec`` set appear in a :class:`~lblctl.data.faces.FaceIndex` as paths
``DIR/train.rec#<byte offset>``; :func:`lblctl.data.faces.load_image` hands such a path to
:func:`load_record_image`. Each process (each DataLoader worker) opens its own file descriptor
lazily and reads with ``os.pread``, so nothing is shared across ``fork`` and memory does not grow
with the file: only the ``.idx`` offsets are held.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lblctl.core.errors import LblError
from lblctl.core.strings import StringArrayBuilder

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
REC, IDX, PROPERTY = "train.rec", "train.idx", "property"
_FIRST_READ = 64 * 1024
_REC_PATH = re.compile(r"^(.*\.rec)#(\d+)$", re.DOTALL)


class RecordProblem(Exception):
    """One record that cannot be read (bad magic, cut short); ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class IRHeader:
    """insightface/MXNet image record header; ``label`` is a float or a tuple of floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack_record(header: IRHeader, payload: bytes = b"") -> bytes:
    """``mx.recordio.pack``: the header (+ array label) followed by the payload."""
    if isinstance(header.label, (tuple, list, np.ndarray)):
        labels = np.asarray(header.label, dtype="<f4")
        head = struct.pack(_IR_FORMAT, len(labels), 0.0, header.id, header.id2) + labels.tobytes()
    else:
        head = struct.pack(_IR_FORMAT, 0, float(header.label), header.id, header.id2)
    return head + payload


def unpack_record(data: bytes) -> tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: (header, payload)."""
    if len(data) < _IR_SIZE:
        raise RecordProblem(f"record too short for a header ({len(data)} bytes)")
    flag, label, id1, id2 = struct.unpack_from(_IR_FORMAT, data)
    rest = data[_IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordProblem(f"record header names {flag} labels but holds {len(rest) // 4}")
        labels = tuple(float(x) for x in np.frombuffer(rest[: 4 * flag], dtype="<f4"))
        return IRHeader(flag, labels, id1, id2), rest[4 * flag:]
    return IRHeader(flag, float(label), id1, id2), rest


def encode_frames(payload: bytes) -> bytes:
    """One payload as RecordIO bytes, split at aligned magic words as dmlc-core's writer does."""
    n = len(payload)
    if n >= (1 << 29):
        raise LblError(f"a record of {n} bytes is over RecordIO's 512 MiB limit")
    out = bytearray()
    start = 0
    for i in range(0, (n >> 2) << 2, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            out += _MAGIC_BYTES + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start))
            out += payload[start:i]
            start = i + 4
    out += _MAGIC_BYTES + struct.pack("<I", ((3 if start else 0) << 29) | (n - start))
    out += payload[start:]
    out += b"\0" * ((-n) % 4)
    return bytes(out)


def read_frames(fd: int, offset: int, size: int) -> bytes:
    """The payload of the record at ``offset`` (continuation parts joined); raise :class:`RecordProblem`."""
    parts: list[bytes] = []
    pos = offset
    while True:
        chunk = os.pread(fd, _FIRST_READ, pos)  # header + a face image in one system call, usually
        if len(chunk) < 8:
            raise RecordProblem(f"record cut short at byte {pos} (file ends at {size})")
        magic, lrec = struct.unpack_from("<II", chunk)
        if magic != MAGIC:
            raise RecordProblem(f"bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        body = chunk[8:8 + length] if len(chunk) >= 8 + length else os.pread(fd, length, pos + 8)
        if len(body) < length:
            raise RecordProblem(f"record cut short at byte {pos}: {len(body)} of {length} bytes")
        if cflag == 0:
            return body
        if cflag == 1 and parts or cflag != 1 and not parts:
            raise RecordProblem(f"broken continuation flags at byte {pos}")
        parts.append(body)
        if cflag == 3:
            return _MAGIC_BYTES.join(parts)
        pos += 8 + length + (-length) % 4


# ---------------------------------------------------------------------- per-process handles

_HANDLES: dict[str, tuple[int, int, int]] = {}  # path → (pid, fd, size)


def _handle(path: str) -> tuple[int, int]:
    """This process's descriptor (and the file size) for ``path``; a forked worker opens its own."""
    pid = os.getpid()
    entry = _HANDLES.get(path)
    if entry is None or entry[0] != pid:
        fd = os.open(path, os.O_RDONLY)
        entry = (pid, fd, os.fstat(fd).st_size)
        _HANDLES[path] = entry
    return entry[1], entry[2]


def read_record(rec_path: str | os.PathLike, offset: int) -> tuple[IRHeader, bytes]:
    """Header and payload of the record at ``offset`` in ``rec_path``."""
    fd, size = _handle(str(rec_path))
    return unpack_record(read_frames(fd, int(offset), size))


def split_record_path(path: str | os.PathLike) -> tuple[str, int] | None:
    """``DIR/train.rec#123`` → (``DIR/train.rec``, 123); None for an ordinary path."""
    m = _REC_PATH.match(str(path))
    return (m.group(1), int(m.group(2))) if m else None


def decode_image(payload: bytes) -> Image.Image:
    """Pillow-decode an image payload as RGB (EXIF orientation applied)."""
    from lblctl.data.faces import ImageProblem, _to_rgb

    if not payload:
        raise ImageProblem("empty image record")
    try:
        with Image.open(io.BytesIO(payload)) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageProblem("record holds no image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"unreadable image record: {exc or type(exc).__name__}") from None


def load_record_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``DIR/train.rec#offset``; raise :class:`~lblctl.data.faces.ImageProblem`."""
    from lblctl.data.faces import ImageProblem

    split = split_record_path(path)
    if split is None:
        raise ImageProblem("not a record path")
    try:
        _, payload = read_record(*split)
    except RecordProblem as exc:
        raise ImageProblem(str(exc)) from None
    except FileNotFoundError:
        raise ImageProblem("missing .rec file") from None
    return decode_image(payload)


# ---------------------------------------------------------------------- reading a set


def is_rec_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / REC).is_file()


class RecIndex:
    """``train.idx`` as two sorted int64 arrays (keys, byte offsets): 16 bytes a record, no Python dict."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys, self.offsets = keys[order], offsets[order]
        n = len(self.keys)
        self._dense = bool(n) and self.keys[0] == 0 and self.keys[-1] == n - 1  # keys 0…n-1 (the usual case)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, found) for an array of keys."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense:
            found = (keys >= 0) & (keys < len(self.keys))
            return self.offsets[np.where(found, keys, 0)], found
        pos = np.clip(np.searchsorted(self.keys, keys), 0, max(0, len(self.keys) - 1))
        found = self.keys[pos] == keys if len(self.keys) else np.zeros(len(keys), dtype=bool)
        return self.offsets[pos], found

    def __contains__(self, key: int) -> bool:
        return bool(self.lookup(np.array([key]))[1][0])

    def __getitem__(self, key: int) -> int:
        off, found = self.lookup(np.array([key]))
        if not found[0]:
            raise KeyError(key)
        return int(off[0])


def read_idx(idx_path: str | os.PathLike, chunk_lines: int = 1 << 20) -> RecIndex:
    """Parse ``train.idx`` (``key<TAB>offset`` lines) in chunks into a :class:`RecIndex`."""
    keys_parts, offs_parts = [], []
    with open(idx_path, "rb") as fh:
        while True:
            lines = fh.readlines(chunk_lines * 16)
            if not lines:
                break
            try:
                arr = np.array(b" ".join(lines).split(), dtype=np.int64)
            except ValueError:
                bad = next((ln for ln in lines if len(ln.split()) != 2 or not all(x.isdigit() for x in ln.split())),
                           lines[0])
                raise LblError(f"{idx_path}: a line is not 'key<TAB>offset' ({bad[:60]!r})") from None
            if len(arr) % 2:
                raise LblError(f"{idx_path}: a line is not 'key<TAB>offset' (odd number of fields)")
            keys_parts.append(arr[0::2])
            offs_parts.append(arr[1::2])
    keys = np.concatenate(keys_parts) if keys_parts else np.zeros(0, np.int64)
    offs = np.concatenate(offs_parts) if offs_parts else np.zeros(0, np.int64)
    return RecIndex(keys, offs)


def read_property(folder: str | os.PathLike) -> dict[str, int] | None:
    """``property``: ``num_classes,height,width`` (None when absent or unreadable)."""
    p = Path(folder) / PROPERTY
    try:
        n, h, w = (int(x) for x in p.read_text().strip().split(",")[:3])
    except (OSError, ValueError):
        return None
    return {"num_classes": n, "height": h, "width": w}


@dataclass
class RecSet:
    """What :func:`scan_rec` found: identities with their image offsets, and unreadable records."""

    names: list[str]
    offsets: np.ndarray  # int64 M: byte offsets of the images, identity by identity
    bounds: np.ndarray  # int64 N+1: identity i's images are offsets[bounds[i]:bounds[i+1]]
    id_counts: np.ndarray  # int64 N: how many of an identity's first images are ID photos (≥ 1)
    problems: list[tuple[str, str]]  # (where, reason) of records skipped while indexing (first 1000)
    problem_count: int  # ranges: image keys missing from the .idx; labels: unreadable records
    layout: str  # "ranges" (identity records) or "labels" (grouped by image labels)


_KEEP_PROBLEMS = 1000


def _header_at(fd: int, offset: int, size: int, with_payload: bool = False) -> tuple[IRHeader, bytes]:
    if with_payload:
        return unpack_record(read_frames(fd, offset, size))
    head = os.pread(fd, 8 + _IR_SIZE + 64, offset)
    if len(head) < 8:
        raise RecordProblem(f"record cut short at byte {offset} (file ends at {size})")
    magic, lrec = struct.unpack_from("<II", head)
    if magic != MAGIC:
        raise RecordProblem(f"bad magic 0x{magic:08x} at byte {offset} (expected 0x{MAGIC:08x})")
    if lrec >> 29 not in (0, 1):
        raise RecordProblem(f"record at byte {offset} starts with a continuation part")
    length = lrec & _LEN_MASK
    return unpack_record(head[8:8 + min(length, _IR_SIZE + 64)])[0], b""


def scan_rec(folder: str | os.PathLike) -> RecSet:
    """Index a ``.rec`` folder: identity ranges from the header (or image labels), never the images."""
    folder = Path(folder)
    rec, idx = folder / REC, folder / IDX
    if not rec.is_file():
        raise LblError(f"--data {folder}: no {REC}")
    if not idx.is_file():
        raise LblError(f"--data {folder}: {REC} without {IDX}; random access needs the index file "
                       "(rebuild it with insightface's/MXNet's tools, or re-pack with lblctl pack)")
    keys = read_idx(idx)
    if not len(keys):
        raise LblError(f"--data {folder}: {IDX} is empty")
    fd, size = _handle(str(rec))
    problems: list[tuple[str, str]] = []
    first_key = int(keys.keys[0])
    try:
        h0, _ = _header_at(fd, keys[first_key], size)
    except RecordProblem as exc:
        raise LblError(f"--data {folder}: header record {first_key} unreadable: {exc}") from None
    if first_key == 0 and h0.flag > 0 and isinstance(h0.label, tuple) and len(h0.label) >= 2:
        img_end, id_end = int(h0.label[0]), int(h0.label[1])
        try:
            return _scan_ranges(rec, fd, size, keys, img_end, id_end, problems)
        except RecordProblem as exc:
            problems = [(f"{rec}#identity-records", f"{exc}; identities taken from image labels")]
        image_keys = keys.keys[(keys.keys >= 1) & (keys.keys < img_end)]
    else:
        image_keys = keys.keys
    return _scan_labels(rec, fd, size, keys, image_keys, problems)


def _scan_ranges(rec: Path, fd: int, size: int, keys: RecIndex, img_end: int, id_end: int,
                 problems: list[tuple[str, str]]) -> RecSet:
    names: list[str] = []
    parts: list[np.ndarray] = []
    bounds = [0]
    id_counts: list[int] = []
    missing = 0
    id_offsets, id_found = keys.lookup(np.arange(img_end, id_end))
    for j, k in enumerate(range(img_end, id_end)):
        if not id_found[j]:
            raise RecordProblem(f"identity record {k} missing from {IDX}")
        h, payload = _header_at(fd, int(id_offsets[j]), size, with_payload=True)
        if not isinstance(h.label, tuple) or len(h.label) < 2:
            raise RecordProblem(f"identity record {k} has no image range")
        a, b = int(h.label[0]), int(h.label[1])
        offs, found = keys.lookup(np.arange(a, b))
        if not found.all():
            missing += int((~found).sum())
            if len(problems) < _KEEP_PROBLEMS:
                problems.append((f"{rec}#identity{k}", f"{int((~found).sum())} image keys of {a}…{b - 1} "
                                 f"missing from {IDX}"))
            offs = offs[found]
        if not len(offs):
            continue
        n_id = int(h.label[2]) if len(h.label) >= 3 else 1
        try:
            name = payload.decode("utf-8") if payload else ""
        except UnicodeDecodeError:
            name = ""
        names.append(name or str(k - img_end))
        parts.append(offs)
        bounds.append(bounds[-1] + len(offs))
        id_counts.append(min(max(n_id, 1), len(offs)))
    offsets = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return RecSet(names, offsets, np.asarray(bounds, np.int64), np.asarray(id_counts, np.int64), problems,
                  missing, "ranges")


def _scan_labels(rec: Path, fd: int, size: int, keys: RecIndex, image_keys: np.ndarray,
                 problems: list[tuple[str, str]]) -> RecSet:
    offs, _ = keys.lookup(image_keys)
    labels = np.full(len(offs), -1, dtype=np.int64)
    count = len(problems)
    for i, off in enumerate(offs.tolist()):
        try:
            h, _ = _header_at(fd, off, size)
        except RecordProblem as exc:
            count += 1
            if len(problems) < _KEEP_PROBLEMS:
                problems.append((f"{rec}#{off}", str(exc)))
            continue
        labels[i] = int(h.label[0] if isinstance(h.label, tuple) else h.label)
    good = labels >= 0
    offs, labels = offs[good], labels[good]
    order = np.argsort(labels, kind="stable")
    offs, labels = offs[order], labels[order]
    uniq, starts = np.unique(labels, return_index=True)
    bounds = np.r_[starts, len(labels)].astype(np.int64)
    return RecSet([str(int(u)) for u in uniq], offs, bounds, np.ones(len(uniq), np.int64), problems, count,
                  "labels")


def open_rec_index(folder: str | os.PathLike):
    """A :class:`~lblctl.data.faces.FaceIndex` over a ``.rec`` folder (paths ``train.rec#offset``).

    Records skipped while indexing (cut short, bad magic) are kept in ``index.rec_problems``
    and reported as a warning, never a crash.
    """
    from lblctl.core import ui
    from lblctl.data.faces import FaceIndex

    folder = Path(folder)
    found = scan_rec(folder)
    names, paths = StringArrayBuilder(), StringArrayBuilder()
    for name in found.names:
        names.append(name)
    for off in found.offsets.tolist():
        paths.append(f"{REC}#{off}")
    position = np.arange(len(found.offsets)) - np.repeat(found.bounds[:-1], np.diff(found.bounds))
    is_id = position < np.repeat(found.id_counts, np.diff(found.bounds))
    offsets = found.bounds
    if len(names) == 0:
        raise LblError(f"--data {folder}: {REC} holds no readable image records")
    index = FaceIndex(folder, names.build(), paths.build(), offsets, is_id.astype(bool), "rec")
    index.rec_problems = found.problems  # type: ignore[attr-defined]
    if found.problems:
        where, reason = found.problems[0]
        ui.warn(f"{folder}: {found.problem_count} problem(s) while indexing (first: {where}: {reason})")
    return index


# ---------------------------------------------------------------------- writing a set


class RecordWriter:
    """Write ``train.rec`` + ``train.idx`` (under temporary names; :meth:`close` renames them)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rec_tmp = self.folder / f".{REC}.tmp"
        self._idx_tmp = self.folder / f".{IDX}.tmp"
        self._rec = open(self._rec_tmp, "wb")  # noqa: SIM115 (closed by close/abort)
        self._idx: list[tuple[int, int]] = []

    def write(self, key: int, record: bytes) -> int:
        """Append one packed record under ``key``; returns its byte offset."""
        pos = self._rec.tell()
        self._rec.write(encode_frames(record))
        self._idx.append((key, pos))
        return pos

    def rewrite(self, offset: int, record: bytes) -> None:
        """Overwrite a record in place with one of the same encoded size (the header record)."""
        data = encode_frames(record)
        end = self._rec.tell()
        self._rec.seek(offset)
        self._rec.write(data)
        self._rec.seek(end)

    def close(self) -> None:
        self._rec.flush()
        os.fsync(self._rec.fileno())
        self._rec.close()
        with open(self._idx_tmp, "w", encoding="ascii") as fh:
            for key, pos in sorted(self._idx):
                fh.write(f"{key}\t{pos}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self._rec_tmp, self.folder / REC)
        os.replace(self._idx_tmp, self.folder / IDX)

    def abort(self) -> None:
        self._rec.close()
        for p in (self._rec_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)


def image_payload(path: str, encode: str, quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """Bytes to store for an image file and its (height, width); raise ImageProblem if unreadable.

    ``keep``: JPEG and PNG files are stored byte for byte (pixel-identical on reading), other formats
    as PNG (lossless). ``png``/``jpg``: everything re-encoded (jpg is lossy, at ``quality``).
    """
    from lblctl.data.faces import load_image

    img = load_image(path)  # validates (and gives the size with EXIF orientation applied)
    size = (img.height, img.width)
    if encode == "keep":
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:3] == b"\xff\xd8\xff" or raw[:8] == b"\x89PNG\r\n\x1a\n":
            return raw, size
        encode = "png"
    with Image.open(path) as src:
        if src.mode in ("L", "1", "I;16", "I", "F"):  # gray stays gray (a third of the bytes)
            img = img.convert("L")
    buf = io.BytesIO()
    if encode == "png":
        img.save(buf, format="PNG")
    elif encode == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise LblError(f"--encode {encode}: expected keep, png or jpg")
    return buf.getvalue(), size


def header_record(num_images: int, num_identities: int) -> bytes:
    """Record 0: ``label = [first identity key, end of identity keys]`` (insightface's layout)."""
    return pack_record(IRHeader(2, (float(num_images + 1), float(num_images + 1 + num_identities)), 0, 0))


def write_property(folder: str | os.PathLike, num_classes: int, height: int, width: int) -> None:
    from lblctl.core.artifacts import atomic_write_text

    atomic_write_text(Path(folder) / PROPERTY, f"{num_classes},{height},{width}\n")


def pack_summary(folder: str | os.PathLike) -> dict[str, Any]:
    p = Path(folder)
    return {"rec_bytes": (p / REC).stat().st_size, "property": read_property(p)}
