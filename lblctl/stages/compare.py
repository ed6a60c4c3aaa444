"""``eval --compare``: several eval reports' ROC curves in one picture, and their figures side by side.

``eval`` saves its ROC as ``REPORT/roc.npz`` (far, tar, thresholds; thinned on a log-FAR grid so
that millions of pairs stay a few hundred kB). Comparing reads only those files and
``metrics.json``, so before/after a training stage is one look without embedding anything again.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from lblctl.core.artifacts import atomic_open, atomic_write_json
from lblctl.core.errors import LblError
from lblctl.core.metrics import roc_curve

ROC_NPZ = "roc.npz"
COMPARE_PNG = "roc_compare.png"
COMPARE_JSON = "compare.json"
_MAX_POINTS = 6000


def thin_roc(far: np.ndarray, tar: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most ~``_MAX_POINTS`` points of an exact ROC, dense on a log FAR axis, ends kept."""
    if len(far) <= _MAX_POINTS:
        return far, tar, thr
    positive = far[far > 0]
    grid = np.r_[np.logspace(np.log10(positive.min()), 0.0, _MAX_POINTS * 2 // 3), np.linspace(0, 1, _MAX_POINTS // 3)]
    idx = np.unique(np.r_[0, np.clip(np.searchsorted(far, grid, side="right") - 1, 0, len(far) - 1), len(far) - 1])
    return far[idx], tar[idx], thr[idx]


def save_roc(scores: np.ndarray, same: np.ndarray, path: Path) -> None:
    """``roc.npz`` with the (thinned) exact ROC and the pair counts, written atomically."""
    far, tar, thr = thin_roc(*roc_curve(scores, same))
    buf = io.BytesIO()
    np.savez(buf, far=far.astype(np.float64), tar=tar.astype(np.float64), thresholds=thr.astype(np.float64),
             genuine=int((same == 1).sum()), impostor=int((same == 0).sum()))
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())


def _read_report(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise LblError(f"--compare {folder}: no such report folder")
    npz = folder / ROC_NPZ
    if not npz.is_file():
        raise LblError(f"--compare {folder}: no {ROC_NPZ} (not a pairs evaluation, or made before lblctl saved "
                       "ROC data); re-run eval with --pairs into it")
    try:
        with np.load(npz) as z:
            far, tar = np.asarray(z["far"]), np.asarray(z["tar"])
            impostor = int(z["impostor"])
    except (OSError, KeyError, ValueError) as exc:
        raise LblError(f"--compare {folder}: unreadable {ROC_NPZ} ({exc})") from None
    metrics: dict[str, Any] = {}
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        metrics = json.loads((folder / "metrics.json").read_text()).get("verification", {}) or {}
    return {"far": far, "tar": tar, "impostor": impostor, "metrics": metrics}


def compare_reports(reports: list[Path], out: Path, title: str | None = None) -> dict[str, Any]:
    """Overlay the reports' ROCs in ``out/roc_compare.png``; their figures in ``out/compare.json``."""
    if len(reports) < 1:
        raise LblError("--compare needs at least one REPORT folder")
    loaded = [(Path(r), _read_report(Path(r))) for r in reports]  # every input checked before drawing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(p) for p, _ in loaded]
    if len({p.name for p, _ in loaded}) == len(loaded):
        names = [p.name for p, _ in loaded]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    floor = 1.0
    rows = []
    for name, (path, rep) in zip(names, loaded, strict=True):
        far, tar = rep["far"], rep["tar"]
        floor = min(floor, 1.0 / max(1, rep["impostor"]))
        keep = far > 0
        m = rep["metrics"]
        tar3 = (m.get("tar_at_far") or {}).get("1e-3")
        label = name + (f" (AUC {m['auc']:.3f}" if "auc" in m else " (") + \
            (f", TAR@1e-3 {tar3:.3f})" if tar3 is not None else ")")
        ax.step(far[keep], tar[keep], where="post", label=label.replace(" ()", ""))
        rows.append({"report": str(path), "accuracy": m.get("accuracy"), "auc": m.get("auc"), "eer": m.get("eer"),
                     "tar_at_far": m.get("tar_at_far")})
    ax.set_xscale("log")
    ax.set_xlim(min(floor, 1e-1) / 1.5, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title or f"ROC of {len(loaded)} reports")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    with atomic_open(out / COMPARE_PNG, "wb") as fh:
        fh.write(buf.getvalue())
    atomic_write_json(out / COMPARE_JSON, {"reports": rows})
    return {"out": str(out / COMPARE_PNG), "reports": rows}
