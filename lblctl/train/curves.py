"""Training curves from ``RUN/log.jsonl``: ``RUN/curves.png`` and, optionally, TensorBoard events.

The engine calls :func:`write_curves` at checkpoints (at most once a minute) and at the end, so a run that lasts
hours shows its loss, learning rate, train accuracy, held-out accuracy (per epoch) and samples/s
in one picture while it runs. matplotlib (Agg) is imported only when drawing. TensorBoard is an
optional extra (``pip install lblctl[tb]``): :class:`TensorBoardLog` mirrors every log record.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from lblctl.core.artifacts import atomic_open
from lblctl.core.errors import LblError

CURVES_PNG = "curves.png"
TB_DIR = "tensorboard"

# (record key, panel title, per-epoch record?) in drawing order
PANELS: list[tuple[str, str, bool]] = [
    ("loss", "training loss", False),
    ("lr", "learning rate", False),
    ("train_accuracy", "train accuracy (batch)", False),
    ("val_accuracy", "held-out accuracy (per epoch)", True),
    ("samples_per_s", "samples / s", False),
]


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a line cut by a crash is skipped."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[int]]:
    """(steps, values, epochs) of every record that has a finite number under ``key``."""
    steps, values, epochs = [], [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and v == v:
            steps.append(int(r["step"]))
            values.append(float(v))
            epochs.append(int(r.get("epoch", 0)))
    return steps, values, epochs


def write_curves(run_dir: str | os.PathLike, title: str | None = None) -> Path | None:
    """Draw ``run_dir/curves.png`` from ``run_dir/log.jsonl``; None when the log has nothing yet."""
    run_dir = Path(run_dir)
    records = read_log(run_dir / "log.jsonl")
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    flat = axes.ravel()
    for ax, (key, label, per_epoch) in zip(flat, PANELS, strict=False):
        steps, values, epochs = series(records, key)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        if per_epoch:
            ax.plot([e + 1 for e in epochs], values, marker="o")
            ax.set_xlabel("epoch")
        else:
            ax.plot(steps, values, lw=1.2)
            ax.set_xlabel("step")
        if key == "lr" and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
    flat[-1].axis("off")
    last: dict[str, Any] = {}
    for r in records:  # the latest value of every field (step and epoch records interleave)
        last.update(r)
    flat[-1].text(0.0, 0.9, "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                       for k, v in last.items()), va="top", family="monospace", fontsize=9)
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    path = run_dir / CURVES_PNG
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def require_tensorboard() -> None:
    """Raise one clear error when ``--tensorboard`` is asked for without the package."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise LblError("--tensorboard needs the optional 'tensorboard' package: pip install 'lblctl[tb]' "
                       "(or leave out --tensorboard; RUN/curves.png is written anyway)") from None


class TensorBoardLog:
    """Every numeric field of every log record as a TensorBoard scalar under ``RUN/tensorboard``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR))

    def add(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for k, v in record.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, float(v), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
