"""Dominant-prototype pieces: the class sampler, the hard-negative signal, the undo journal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lblctl.train.dp import DominantSampler, UndoJournal, hardest_wrong


def _queues(n: int, dq: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = np.stack([rng.choice(np.setdiff1d(np.arange(n), [i]), dq, replace=False) for i in range(n)])
    q[::7, -2:] = -1  # some short queues
    return q


def test_sampler_takes_queue_members_hardest_first() -> None:
    n, dq = 200, 6
    q = _queues(n, dq)
    s = DominantSampler(n, np.arange(n), classes=40, sampled=10, seed=1)
    rows = s.select(3, lambda r: q[r])
    seeds = rows[:10]
    assert len(rows) == 40 and len(np.unique(rows)) == 40
    assert np.array_equal(seeds, s.seeds(3))
    # every seed's first (hardest) queue entry is in, unless it is a seed itself
    for r in seeds:
        assert q[r, 0] in rows
    # the rest are queue members, taken column by column
    members = set(q[seeds].ravel().tolist()) - {-1}
    assert set(rows[10:].tolist()) <= members
    assert rows.tolist() == s.select(3, lambda r: q[r]).tolist()  # deterministic per step


def test_sampler_epoch_visits_everyone_once_and_fills_short_queues() -> None:
    n = 50
    trainable = np.arange(0, n, 2)  # only even rows have photos
    s = DominantSampler(n, trainable, classes=12, sampled=5, seed=4)
    assert s.steps_per_epoch == 5
    seen = np.concatenate([s.seeds(t) for t in range(5)])
    assert sorted(seen.tolist()) == trainable.tolist()
    empty = np.full((n, 3), -1)
    rows = s.select(0, lambda r: empty[r])
    assert len(rows) == 12 and len(set(rows.tolist())) == 12  # topped up with random rows
    rnd = DominantSampler(n, trainable, classes=12, sampled=5, seed=4, mode="random").select(0, None)
    assert len(set(rnd.tolist())) == 12 and np.array_equal(rnd[:5], s.seeds(0))
    full = DominantSampler(n, trainable, classes=12, sampled=5, seed=4, mode="full").select(0, None)
    assert sorted(full.tolist()) == list(range(n)) and np.array_equal(full[:5], s.seeds(0))


def test_hardest_wrong_is_the_best_other_class() -> None:
    cos = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.1, 0.7, 0.6]])
    labels = torch.tensor([0, 2, 2])
    # sample 0 right (best wrong: 2); sample 1 right (best wrong: 1); sample 2 wrong (predicted 1)
    assert hardest_wrong(cos, labels).tolist() == [2, 1, 1]


def test_undo_journal_roundtrip_and_torn_tail(tmp_path: Path) -> None:
    j = UndoJournal(tmp_path / "undo.bin", num_rows=100)
    j.reset(7)
    rows = np.array([5, 3, 5, 9])
    new = j.first_touch("prot", rows)
    assert new.tolist() == [3, 5, 9]
    assert j.first_touch("prot", np.array([3, 11])).tolist() == [11]  # 3 already saved
    assert j.first_touch("queu", np.array([3])).tolist() == [3]  # tables are separate
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    j.record("prot", new, v)
    j.record("queu", np.array([3]), np.array([[1, 2, -1]], dtype=np.int32))
    j.close()
    step, recs = UndoJournal.read(tmp_path / "undo.bin")
    assert step == 7 and [r[0] for r in recs] == ["prot", "queu"]
    assert np.array_equal(recs[0][1], new) and np.array_equal(recs[0][2], v)
    assert recs[1][2].dtype == np.int32 and recs[1][2].tolist() == [[1, 2, -1]]
    data = (tmp_path / "undo.bin").read_bytes()
    (tmp_path / "torn.bin").write_bytes(data[:-5])  # killed in the middle of the last record
    step, recs = UndoJournal.read(tmp_path / "torn.bin")
    assert step == 7 and [r[0] for r in recs] == ["prot"]
    j2 = UndoJournal(tmp_path / "undo.bin", num_rows=100)
    j2.reset(9)  # a new checkpoint empties it
    assert UndoJournal.read(tmp_path / "undo.bin") == (9, [])
    assert j2.first_touch("prot", np.array([3])).tolist() == [3]
    j2.close()
