"""Verification metrics against hand-computed cases and brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lblctl.core.metrics import (
    FAR_TARGETS,
    auc,
    best_threshold,
    eer,
    far_key,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
    verification_metrics,
)


def _labels(genuine, impostor):
    scores = np.r_[np.asarray(genuine, float), np.asarray(impostor, float)]
    same = np.r_[np.ones(len(genuine), int), np.zeros(len(impostor), int)]
    return scores, same


def test_perfect_separation():
    scores, same = _labels([0.9, 0.8, 0.7], [0.1, 0.2, 0.3])
    far, tar, _ = roc_curve(scores, same)
    assert auc(far, tar) == pytest.approx(1.0)
    assert eer(far, tar) == pytest.approx(0.0)
    t, acc = best_threshold(scores, same)
    assert acc == 1.0 and 0.3 < t <= 0.7


def test_identical_distributions():
    values = np.linspace(0, 1, 11)
    scores, same = _labels(values, values)
    far, tar, _ = roc_curve(scores, same)
    # every threshold accepts genuine and impostor pairs alike: the diagonal
    np.testing.assert_allclose(far, tar)
    assert auc(far, tar) == pytest.approx(0.5)
    assert eer(far, tar) == pytest.approx(0.5)


def test_known_roc():
    # genuine 0.9 0.6 0.4, impostor 0.8 0.5 0.3 0.1 — worked out by hand
    scores, same = _labels([0.9, 0.6, 0.4], [0.8, 0.5, 0.3, 0.1])
    far, tar, thr = roc_curve(scores, same)
    np.testing.assert_allclose(far, [0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(tar, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(thr[1:], [0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.1])
    assert auc(far, tar) == pytest.approx(9 / 12)  # 9 of 12 (genuine, impostor) pairs ordered right
    # FRR = 1/3 between FAR 0.25 and 0.5: FAR crosses 1/3 there
    assert eer(far, tar) == pytest.approx(1 / 3)


def test_eer_interpolates_between_points():
    # genuine 0.7 0.4, impostor 0.6 0.3: FAR−FRR goes −0.5 → +0.5 on a diagonal segment (tie-free)
    scores, same = _labels([0.7, 0.4], [0.6, 0.3])
    far, tar, _ = roc_curve(scores, same)
    assert eer(far, tar) == pytest.approx(0.5)
    scores, same = _labels([0.7, 0.5], [0.5, 0.1])  # a tie at 0.5: a diagonal step from (0, .5) to (.5, 1)
    far, tar, _ = roc_curve(scores, same)
    assert auc(far, tar) == pytest.approx(0.875)  # 3 wins + ½ tie of 4
    assert eer(far, tar) == pytest.approx(0.25)


def test_tar_at_far_null_rule_and_thresholds():
    rng = np.random.default_rng(0)
    genuine = rng.uniform(0.3, 1.0, 500)
    impostor = rng.permutation(np.arange(999) / 1000.0)  # 999 distinct impostor scores 0 … 0.998
    scores, same = _labels(genuine, impostor)
    points = tar_at_far(scores, same)
    assert set(points) == set(FAR_TARGETS)
    assert points["1e-1"].tar is not None and points["1e-2"].tar is not None
    for key in ("1e-3", "1e-4", "1e-5", "1e-6"):
        assert points[key].tar is None and points[key].threshold is None
        assert "999 impostor" in points[key].reason
    # FAR 1e-1 of 999 impostors allows 99 false accepts: the 100th highest impostor (0.899) must be rejected
    p = points["1e-1"]
    assert (impostor >= p.threshold).sum() == 99
    assert p.tar == pytest.approx(np.mean(genuine >= p.threshold))
    assert 0.899 < p.threshold <= 0.9
    # with 1000 impostors FAR 1e-3 becomes measurable: one false accept allowed
    scores, same = _labels(genuine, np.r_[impostor, 0.999])
    q = tar_at_far(scores, same)["1e-3"]
    assert q.tar is not None and (np.r_[impostor, 0.999] >= q.threshold).sum() == 1


def test_tar_at_far_never_exceeds_target():
    rng = np.random.default_rng(1)
    g, i = rng.normal(0.5, 0.2, 3000), rng.normal(0.0, 0.2, 20_000).round(3)  # many ties
    scores, same = _labels(g, i)
    for key, p in tar_at_far(scores, same).items():
        if p.tar is None:
            assert len(i) < 1 / float(key)
            continue
        assert np.mean(i >= p.threshold) <= float(key) + 1e-12
        # one step lower would break the target (the threshold is as low as allowed)
        lower = i[i < p.threshold].max()
        assert np.mean(i >= lower) > float(key)


def test_kfold_protocol_uses_given_folds():
    """Threshold from 9 folds, accuracy on the 10th: a fold whose scores are shifted fails alone."""
    rng = np.random.default_rng(2)
    folds = np.repeat(np.arange(10), 40)
    same = np.tile(np.r_[np.ones(20, int), np.zeros(20, int)], 10)
    scores = np.where(same == 1, rng.uniform(0.6, 1.0, 400), rng.uniform(0.0, 0.4, 400))
    shifted = folds == 3
    scores[shifted] -= 0.5  # fold 3 genuine land in 0.1–0.5: below any threshold the others pick
    acc, std = kfold_accuracy(scores, same, fold_ids=folds)
    # every other fold is perfect; fold 3 gets its impostors right and its genuine pairs wrong
    t_others = [best_threshold(scores[folds != f], same[folds != f])[0] for f in range(10)]
    per_fold = [float(((scores[folds == f] >= t) == (same[folds == f] == 1)).mean()) for f, t in enumerate(t_others)]
    assert acc == pytest.approx(np.mean(per_fold)) and std == pytest.approx(np.std(per_fold))
    assert per_fold[3] == pytest.approx(0.5) and all(a == 1.0 for f, a in enumerate(per_fold) if f != 3)
    section, _ = verification_metrics(scores, same, folds)
    assert section["accuracy"] == pytest.approx(0.95)


def test_verification_section_keys():
    rng = np.random.default_rng(3)
    scores, same = _labels(rng.normal(0.6, 0.1, 150), rng.normal(0.1, 0.1, 250))
    section, reasons = verification_metrics(scores, same)
    assert set(section) == {"accuracy", "accuracy_std", "auc", "eer", "tar_at_far", "threshold_at_far",
                            "pairs", "genuine", "impostor", "folds"}
    assert set(section["tar_at_far"]) == set(section["threshold_at_far"]) == {f"1e-{k}" for k in range(1, 7)}
    assert (section["pairs"], section["genuine"], section["impostor"]) == (400, 150, 250)
    g, i = scores[same == 1][:, None], scores[same == 0][None, :]
    assert section["auc"] == pytest.approx(((g > i).sum() + 0.5 * (g == i).sum()) / (150 * 250))  # Mann–Whitney
    assert set(reasons) == {"1e-3", "1e-4", "1e-5", "1e-6"}


def test_far_key():
    assert far_key(1e-3) == "1e-3" and far_key(0.1) == "1e-1" and far_key(1e-6) == "1e-6"
    with pytest.raises(ValueError):
        far_key(0.05)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=30), st.lists(st.integers(0, 20), min_size=1, max_size=30))
def test_auc_is_mann_whitney(genuine, impostor):
    scores, same = _labels(np.array(genuine) / 20, np.array(impostor) / 20)
    far, tar, _ = roc_curve(scores, same)
    g, i = np.array(genuine)[:, None], np.array(impostor)[None, :]
    expected = ((g > i).sum() + 0.5 * (g == i).sum()) / (len(genuine) * len(impostor))
    assert auc(far, tar) == pytest.approx(expected)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    assert 0.0 <= eer(far, tar) <= 1.0
