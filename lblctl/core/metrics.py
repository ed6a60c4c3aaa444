"""Verification figures from cosine scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy of ``score >= t`` and that accuracy (exact, O(n log n))."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order].astype(np.int64)
    n, pos = len(s), int(y.sum())
    # predicting the top-k as "same": correct = TP(k) + TN(k)
    tp = np.concatenate([[0], np.cumsum(y)])
    fp = np.concatenate([[0], np.cumsum(1 - y)])
    correct = tp + ((n - pos) - fp)
    # only cut between distinct scores
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[:-1] != s[1:]
    k = int(np.argmax(np.where(valid, correct, -1)))
    if k == 0:
        t = float(s[0]) + 1e-6
    elif k == n:
        t = float(s[-1])
    else:
        t = float((s[k - 1] + s[k]) / 2)
    return t, float(correct[k]) / n


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = 10, seed: int = 0,
                   fold_ids: np.ndarray | None = None) -> tuple[float, float]:
    """LFW-style accuracy: threshold chosen on k−1 folds, applied to the held-out fold."""
    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=np.int64)
    if fold_ids is None:
        fold_ids = np.random.default_rng(seed).permutation(len(scores)) % folds
    accs = []
    for f in np.unique(fold_ids):
        test = fold_ids == f
        if test.all() or not test.any():
            continue
        t, _ = best_threshold(scores[~test], same[~test])
        accs.append(float(((scores[test] >= t) == (same[test] == 1)).mean()))
    if not accs:
        t, acc = best_threshold(scores, same)
        return acc, 0.0
    return float(np.mean(accs)), float(np.std(accs))


# --------------------------------------------------------------------------- ROC, EER, TAR@FAR

FAR_TARGETS: tuple[str, ...] = ("1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6")


def _split(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same).astype(bool)
    if scores.shape != same.shape or scores.ndim != 1:
        raise ValueError("scores and same must be 1-D arrays of one length")
    return scores[same], scores[~same]


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC of ``score >= t``: (far, tar, thresholds), one point per distinct score, from (0, 0).

    Ties move FAR and TAR together (a diagonal step), so the trapezoid area is the Mann–Whitney
    statistic P(genuine > impostor) + ½ P(genuine = impostor).
    """
    genuine, impostor = _split(scores, same)
    if len(genuine) == 0 or len(impostor) == 0:
        raise ValueError("a ROC needs both genuine and impostor pairs")
    thresholds = np.unique(np.concatenate([genuine, impostor]))[::-1]
    g, i = np.sort(genuine), np.sort(impostor)
    tar = (len(g) - np.searchsorted(g, thresholds, side="left")) / len(g)
    far = (len(i) - np.searchsorted(i, thresholds, side="left")) / len(i)
    top = np.nextafter(thresholds[0], np.inf)
    return np.r_[0.0, far], np.r_[0.0, tar], np.r_[top, thresholds]


def auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under the ROC (trapezoids over the exact curve)."""
    far, tar = np.r_[far, 1.0], np.r_[tar, 1.0]
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def eer(far: np.ndarray, tar: np.ndarray) -> float:
    """Equal error rate: where FAR = FRR (= 1 − TAR), linearly interpolated on the exact ROC."""
    far, frr = np.r_[far, 1.0], 1.0 - np.r_[tar, 1.0]
    d = far - frr  # rises from ≤ 0 at the top threshold to ≥ 0 at the bottom
    k = int(np.argmax(d >= 0))
    if k == 0 or d[k] == 0:
        return float((far[k] + frr[k]) / 2.0)
    # segment k−1 → k crosses zero; FAR and FRR are both linear along it
    w = -d[k - 1] / (d[k] - d[k - 1])
    return float(far[k - 1] + w * (far[k] - far[k - 1]))


@dataclass
class FarPoint:
    """TAR and threshold at one target FAR; ``None`` with ``reason`` when the data cannot say."""

    far: float
    tar: float | None
    threshold: float | None
    reason: str | None = None


def tar_at_far(scores: np.ndarray, same: np.ndarray, targets: tuple[str, ...] = FAR_TARGETS) -> dict[str, FarPoint]:
    """Highest TAR whose measured FAR ≤ target, and its threshold (``score >= t`` is "same").

    A FAR of f is only measurable with at least 1/f impostor pairs; below that it is ``None``
    with the reason. The threshold sits halfway between the highest impostor score that must be
    rejected and the next higher score, so it transfers to new data without a built-in bias.
    """
    genuine, impostor = _split(scores, same)
    imp_desc = np.sort(impostor)[::-1]
    all_sorted = np.unique(np.concatenate([genuine, impostor]))
    out: dict[str, FarPoint] = {}
    for key in targets:
        f = float(key)
        need = int(np.ceil(1.0 / f - 1e-9))
        if len(impostor) < need:
            out[key] = FarPoint(f, None, None, f"only {len(impostor)} impostor pairs; FAR {key} needs at least {need}")
            continue
        if len(genuine) == 0:
            out[key] = FarPoint(f, None, None, "no genuine pairs")
            continue
        allowed = int(np.floor(f * len(impostor) + 1e-9))
        if allowed >= len(impostor):
            t = float(all_sorted[0])
        else:
            reject = imp_desc[allowed]  # this impostor (and every lower one) must score below t
            j = np.searchsorted(all_sorted, reject, side="right")
            t = float((reject + all_sorted[j]) / 2.0) if j < len(all_sorted) else float(np.nextafter(reject, np.inf))
        out[key] = FarPoint(f, float(np.mean(genuine >= t)), t)
    return out


def verification_metrics(scores: np.ndarray, same: np.ndarray, fold_ids: np.ndarray | None = None,
                         folds: int = 10, seed: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``verification`` section of an eval report, and the reasons for any null TAR@FAR."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same).astype(np.int64)
    far, tar, _ = roc_curve(scores, same)
    acc, std = kfold_accuracy(scores, same, folds=folds, seed=seed, fold_ids=fold_ids)
    points = tar_at_far(scores, same)
    section = {
        "accuracy": acc,
        "accuracy_std": std,
        "auc": auc(far, tar),
        "eer": eer(far, tar),
        "tar_at_far": {k: p.tar for k, p in points.items()},
        "threshold_at_far": {k: p.threshold for k, p in points.items()},
        "pairs": int(len(scores)),
        "genuine": int(same.sum()),
        "impostor": int(len(same) - same.sum()),
        "folds": int(len(np.unique(fold_ids))) if fold_ids is not None else int(folds),
    }
    reasons = {k: p.reason for k, p in points.items() if p.reason}
    return section, reasons


def far_key(far: float) -> str:
    """``0.001`` → ``"1e-3"`` (the key format of ``tar_at_far``)."""
    if not np.isfinite(far) or not 0 < far < 1:
        raise ValueError(f"FAR {far} is not a rate between 0 and 1")
    exp = int(round(np.log10(far)))
    if not np.isclose(far, 10.0**exp, rtol=1e-6):
        raise ValueError(f"FAR {far} is not a power of ten")
    return f"1e{exp}"
