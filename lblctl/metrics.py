"""Verification figures from cosine scores."""

from __future__ import annotations

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
