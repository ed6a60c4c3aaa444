"""Suspected duplicate identities: pairs of prototypes so close that they are likely one person
enrolled twice (at ID-document scale every data set has some).

The pairs come from the candidate queues (no second search): a pair is reported when either row
has the other in its queue with cosine ≥ the threshold. The default threshold is a robust outlier
rule on the nearest-neighbour scores of all rows: median + 6 × 1.4826 × MAD (a robust z-score of
6), capped at 0.999 so that identical prototypes are always reported.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lblctl.core.artifacts import atomic_open
from lblctl.data.faces import ImageProblem, load_image

DUPLICATES_CSV = "duplicates.csv"
DUPLICATES_HTML = "duplicates.html"
ROBUST_Z = 6.0
THRESHOLD_CAP = 0.999
COLUMNS = ["identity_a", "identity_b", "score", "id_photo_a", "id_photo_b", "row_a", "row_b"]


@dataclass
class Threshold:
    value: float
    rule: str
    median: float | None = None
    mad: float | None = None


def auto_threshold(nn_scores: np.ndarray, robust_z: float = ROBUST_Z,
                   cap: float = THRESHOLD_CAP) -> Threshold:
    """The outlier rule on nearest-neighbour scores (NaN = a row with no neighbour, ignored)."""
    s = np.asarray(nn_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return Threshold(cap, "no neighbour scores; cap")
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med)))
    value = min(cap, med + robust_z * 1.4826 * mad)
    rule = (f"median {med:.4f} + {robust_z:g} × 1.4826 × MAD {mad:.4f} of the nearest-neighbour scores"
            f"{' (capped)' if value == cap else ''}")
    return Threshold(float(value), rule, med, mad)


def find_pairs(chunks: Iterable[tuple[int, np.ndarray, np.ndarray]], threshold: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b) with score ≥ threshold from ``(start, candidates, scores)`` chunks, best first."""
    a_parts, b_parts, s_parts = [], [], []
    for start, cand, scores in chunks:
        hit = (cand >= 0) & (np.nan_to_num(scores, nan=-np.inf) >= threshold)
        r, c = np.nonzero(hit)
        if r.size == 0:
            continue
        rows = r.astype(np.int64) + start
        other = cand[r, c].astype(np.int64)
        a_parts.append(np.minimum(rows, other))
        b_parts.append(np.maximum(rows, other))
        s_parts.append(scores[r, c].astype(np.float32))
    if not a_parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float32)
    a, b, s = np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(s_parts)
    order = np.lexsort((b, a, -s))  # best first; for a pair seen from both sides keep the first
    a, b, s = a[order], b[order], s[order]
    key = np.stack([a, b], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    first = np.sort(first)
    return a[first], b[first], s[first]


def _rows(a: np.ndarray, b: np.ndarray, s: np.ndarray, names, photos) -> Iterator[list]:
    for i, j, score in zip(a.tolist(), b.tolist(), s.tolist(), strict=True):
        yield [names[i], names[j], f"{score:.6f}", photos[i] if photos is not None else "",
               photos[j] if photos is not None else "", i, j]


def write_csv(path: str | os.PathLike, a: np.ndarray, b: np.ndarray, s: np.ndarray, names, photos) -> Path:
    """``duplicates.csv`` (header only when there are none), written atomically."""
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(_rows(a, b, s, names, photos))
    return Path(path)


def _thumbnail(path: str, side: int = 128) -> str:
    if not path:
        return '<div class="missing">no ID photo recorded</div>'
    try:
        img = load_image(path)
    except ImageProblem as exc:
        return f'<div class="missing">{html.escape(path)}<br>({html.escape(str(exc))})</div>'
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{data}" title="{html.escape(path)}" alt="{html.escape(path)}">'


def write_html(path: str | os.PathLike, a: np.ndarray, b: np.ndarray, s: np.ndarray, names, photos, *,
               threshold: Threshold, limit: int = 500) -> Path:
    """A self-contained page (thumbnails embedded) with the ID photos of each pair side by side."""
    shown = min(len(a), limit)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>lblctl: suspected duplicate identities</title>",
        "<style>body{font-family:sans-serif}td{padding:4px 10px;vertical-align:middle;text-align:center}"
        "img{max-width:128px;max-height:128px}.missing{color:#a00;font-size:small;max-width:160px}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body>",
        f"<h1>Suspected duplicate identities: {len(a)}</h1>",
        f"<p>Cosine ≥ {threshold.value:.4f} ({html.escape(threshold.rule)}).",
        f" Showing the {shown} closest pairs.</p>" if shown < len(a) else "</p>",
        "<table><tr><th>#</th><th>identity A</th><th>ID photo A</th><th>ID photo B</th><th>identity B</th>"
        "<th>cosine</th></tr>",
    ]
    for n, (i, j, score) in enumerate(zip(a[:shown].tolist(), b[:shown].tolist(), s[:shown].tolist(),
                                          strict=True)):
        pa = photos[i] if photos is not None else ""
        pb = photos[j] if photos is not None else ""
        parts.append(f"<tr><td>{n + 1}</td><td>{html.escape(names[i])}</td><td>{_thumbnail(pa)}</td>"
                     f"<td>{_thumbnail(pb)}</td><td>{html.escape(names[j])}</td><td>{score:.4f}</td></tr>")
    parts.append("</table></body></html>\n")
    with atomic_open(path, "w") as fh:
        fh.write("\n".join(parts))
    return Path(path)
