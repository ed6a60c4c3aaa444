"""``pack``: identity folders (or a CSV, or another ``.rec``) → an insightface ``.rec`` set.

Writes ``OUT/train.rec``, ``OUT/train.idx`` and ``OUT/property`` in the layout insightface's and
arcface_torch's readers expect (record 0 = header, images ``1…M`` with their identity as label,
one record per identity with its image range), plus ``problems.csv`` (unreadable images, left
out) and ``manifest.json``. JPEG and PNG files are stored byte for byte by default, so reading
the set back gives the same pixels; other formats become PNG (lossless).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lblctl.core import ui
from lblctl.core.artifacts import MANIFEST, describe_input, write_manifest
from lblctl.core.errors import LblError
from lblctl.core.summary import Summary
from lblctl.data.faces import ImageProblem, ProblemLog, open_face_set
from lblctl.data.recordio import (
    IDX,
    PROPERTY,
    REC,
    IRHeader,
    RecordWriter,
    header_record,
    image_payload,
    pack_record,
    write_property,
)

ENCODINGS = ("keep", "png", "jpg")


@dataclass
class PackConfig:
    data: Path
    out: Path
    encode: str = "keep"  # keep JPEG/PNG bytes, others → PNG | png | jpg
    quality: int = 95
    min_images: int = 1


def run(cfg: PackConfig, device: torch.device | str = "cpu") -> Summary:
    """Pack ``cfg.data`` into ``cfg.out``; unreadable images are problems, never a crash."""
    if cfg.encode not in ENCODINGS:
        raise LblError(f"--encode {cfg.encode}: expected keep, png or jpg")
    if not 1 <= cfg.quality <= 100:
        raise LblError(f"--quality {cfg.quality}: expected 1…100")
    out = Path(cfg.out)
    if (out / REC).exists() or (out / MANIFEST).exists():
        raise LblError(f"--out {out}: already holds a packed set; choose a new --out or remove it")
    index = open_face_set(cfg.data, min_images=cfg.min_images)
    problems = ProblemLog()
    writer = RecordWriter(out)
    try:
        header_offset = writer.write(0, header_record(0, 0))
        ranges: list[tuple[str, int, int, int]] = []  # name, first key, end key, ID photos
        key = 1
        height_width: tuple[int, int] | None = None
        with ui.progress() as bar:
            task = bar.add_task("pack", total=index.num_images)
            for ident in range(index.num_identities):
                first, n_id = key, 0
                label = float(len(ranges))
                for row in index.images_of(ident):
                    path = index.path(int(row))
                    try:
                        payload, hw = image_payload(path, cfg.encode, cfg.quality)
                    except ImageProblem as exc:
                        problems.add(path, str(exc))
                        bar.advance(task)
                        continue
                    height_width = height_width or hw
                    writer.write(key, pack_record(IRHeader(0, label, key, 0), payload))
                    n_id += int(index.is_id[row])
                    key += 1
                    bar.advance(task)
                if key > first:
                    ranges.append((index.names[ident], first, key, n_id))
        num_images = key - 1
        if not ranges:
            raise LblError(f"--data {cfg.data}: no readable image to pack ({problems.count} unreadable)")
        for j, (name, a, b, n_id) in enumerate(ranges):
            writer.write(num_images + 1 + j, pack_record(IRHeader(3, (float(a), float(b), float(n_id)),
                                                                  num_images + 1 + j, 0), name.encode("utf-8")))
        writer.rewrite(header_offset, header_record(num_images, len(ranges)))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    h, w = height_width or (112, 112)
    write_property(out, len(ranges), h, w)
    problems.write_csv(out / "problems.csv")
    summary = {
        "out": str(out),
        "identities": len(ranges),
        "images": num_images,
        "left_out_images": problems.count,
        "rec_bytes": (out / REC).stat().st_size,
        "encode": cfg.encode,
        "problems": problems.summary(),
    }
    write_manifest(out, "recordio", params={k: str(v) for k, v in asdict(cfg).items()},
                   inputs={"data": describe_input(cfg.data)}, files=[REC, IDX, PROPERTY, "problems.csv"],
                   extra={"summary": {k: v for k, v in summary.items() if k != "problems"}})
    return Summary("pack", summary)
