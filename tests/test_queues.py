"""The queue file: format, the seed's promotion rule, and crash safety of its updates."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lblctl.core import queues as queues_mod
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.queues import Queues, journal_path


def _write(path: Path, cand: np.ndarray, dq: int, **attrs) -> Path:
    n, cq = cand.shape
    scores = np.where(cand >= 0, 1.0 - 0.01 * np.arange(cq), np.nan).astype(np.float32)
    with Queues.create(path, n, cq, dq, attrs) as w:
        for start in range(0, n, 3):  # several batches
            w.write(start, cand[start : start + 3], scores[start : start + 3])
        w.commit()
    return path


def _ring(n: int, cq: int) -> np.ndarray:
    """Row i's candidates: i+1, i+2, … (mod n), −1 padded when n−1 < cq."""
    cand = np.full((n, cq), -1, dtype=np.int32)
    for i in range(n):
        m = min(cq, n - 1)
        cand[i, :m] = (i + 1 + np.arange(m)) % n
    return cand


def test_roundtrip_and_initial_dominant(tmp_path: Path) -> None:
    cand = _ring(10, 6)
    path = _write(tmp_path / "queues.h5", cand, 3, embedding_size=16, backbone_fingerprint="sha256:x")
    with Queues.open(tmp_path, "r", expect_rows=10, expect_embedding_size=16) as q:
        assert (q.num_rows, q.cq, q.dq) == (10, 6, 3)
        assert np.array_equal(q.candidates(np.arange(10)), cand)
        assert np.array_equal(q.dominant(np.arange(10)), cand[:, :3])
        assert np.array_equal(q.all_dominant(), cand[:, :3])
        # any order, repeats
        assert np.array_equal(q.candidates(np.array([7, 2, 7])), cand[[7, 2, 7]])
        assert q.meta["num_rows"] == 10 and q.meta["backbone_fingerprint"] == "sha256:x"
        assert q.candidate_scores(np.array([0]))[0, 0] == pytest.approx(1.0)
    with h5py.File(path) as f:  # plain h5py reads it
        assert f["candidates"].dtype == np.int32 and f["dominant"].shape == (10, 3)


def test_refuses_mismatch(tmp_path: Path) -> None:
    _write(tmp_path / "queues.h5", _ring(8, 4), 2, embedding_size=16, backbone_fingerprint="sha256:a")
    with pytest.raises(IncompatibleArtifact, match="8 identities"):
        Queues.open(tmp_path / "queues.h5", expect_rows=9)
    with pytest.raises(IncompatibleArtifact, match="embedding size"):
        Queues.open(tmp_path / "queues.h5", expect_embedding_size=32)
    with pytest.raises(IncompatibleArtifact, match="another backbone"):
        Queues.open(tmp_path / "queues.h5", expect_backbone_fingerprint="sha256:b")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(IncompatibleArtifact):
        Queues.open(tmp_path / "bad.h5")
    with pytest.raises(LblError, match="build-index"):
        Queues.open(tmp_path / "none.h5")


def test_incomplete_writer_leaves_nothing(tmp_path: Path) -> None:
    w = Queues.create(tmp_path / "queues.h5", 5, 3, 2)
    w.write(0, _ring(5, 3)[:2], np.zeros((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="incomplete"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_promote_rule(tmp_path: Path) -> None:
    cand = _ring(10, 6)  # row 0: candidates 1..6, dominant 1, 2, 3
    _write(tmp_path / "queues.h5", cand, 3)
    with Queues.open(tmp_path / "queues.h5", "r+") as q:
        assert q.promote([0], [5]) == 1  # in candidates, not dominant: to the front, 3 drops out
        assert q.dominant([0]).tolist() == [[5, 1, 2]]
        assert q.promote([0], [2]) == 1  # already dominant: moves to the front, nothing drops
        assert q.dominant([0]).tolist() == [[2, 5, 1]]
        assert q.promote([0], [2]) == 0  # already at the front
        assert q.promote([0], [9]) == 0  # not a candidate of row 0: ignored
        assert q.promote([0], [0]) == 0  # itself: ignored
        assert q.promote([0, 1, 0], [-1, 7, 4]) == 2  # −1 ignored; pairs apply in order
        assert q.dominant([0, 1]).tolist() == [[4, 2, 5], [7, 2, 3]]
        assert q.pending == 2
    with Queues.open(tmp_path / "queues.h5") as q:  # close flushed
        assert q.dominant([0, 1]).tolist() == [[4, 2, 5], [7, 2, 3]]
        assert np.array_equal(q.dominant(np.arange(2, 10)), cand[2:, :3])
        with pytest.raises(LblError, match="read-only"):
            q.promote([0], [1])


def _reference_promote(dom: list[list[int]], cand: np.ndarray, pairs: list[tuple[int, int]]) -> None:
    for c, x in pairs:
        if x == c or x < 0 or x not in cand[c].tolist():
            continue
        q = dom[c]
        if x in q:
            q.remove(x)
        else:
            q.pop()
        q.insert(0, x)


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 11), st.integers(-1, 11)), max_size=30),
       flush_every=st.integers(1, 10))
def test_promote_matches_reference(tmp_path_factory: pytest.TempPathFactory, pairs: list[tuple[int, int]],
                                   flush_every: int) -> None:
    folder = tmp_path_factory.mktemp("q")
    rng = np.random.default_rng(len(pairs))
    cand = np.stack([rng.permutation(np.delete(np.arange(12), i))[:5] for i in range(12)]).astype(np.int32)
    _write(folder / "queues.h5", cand, 3)
    ref = [cand[i, :3].tolist() for i in range(12)]
    with Queues.open(folder / "queues.h5", "r+") as q:
        for i in range(0, len(pairs), flush_every):
            chunk = pairs[i : i + flush_every]
            q.promote([c for c, _ in chunk], [x for _, x in chunk])
            _reference_promote(ref, cand, chunk)
            if i % 2:
                q.flush()
        assert q.all_dominant().tolist() == ref
    with Queues.open(folder / "queues.h5") as q:
        assert q.all_dominant().tolist() == ref
        # the invariants train-dp relies on: never itself, always from the candidates, no repeats
        for i, row in enumerate(q.all_dominant()):
            assert i not in row and set(row.tolist()) <= set(cand[i].tolist()) and len(set(row.tolist())) == 3


def test_unflushed_promotions_are_lost_not_half_written(tmp_path: Path) -> None:
    cand = _ring(10, 6)
    _write(tmp_path / "queues.h5", cand, 3)
    q = Queues.open(tmp_path / "queues.h5", "r+")
    q.promote([0, 1], [4, 5])
    q.h5.close()  # the process dies before flush
    with Queues.open(tmp_path / "queues.h5") as q2:
        assert np.array_equal(q2.all_dominant(), cand[:, :3])


def test_crash_during_flush_replays_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cand = _ring(10, 6)
    _write(tmp_path / "queues.h5", cand, 3)
    q = Queues.open(tmp_path / "queues.h5", "r+")
    q.promote([0, 7], [4, 9])

    def die_midway(ds, rows, values):  # the journal is written; the in-place write never happens
        raise KeyboardInterrupt

    monkeypatch.setattr(queues_mod, "_write_rows", die_midway)
    with pytest.raises(KeyboardInterrupt):
        q.flush()
    q.h5.close()
    monkeypatch.undo()
    assert journal_path(tmp_path / "queues.h5").is_file()
    with Queues.open(tmp_path / "queues.h5") as q2:  # replayed on open
        assert q2.dominant([0, 7]).tolist() == [[4, 1, 2], [9, 8, 0]]
    assert not journal_path(tmp_path / "queues.h5").exists()


def test_flush_journal_torn_record_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while the journal record was being written: the file keeps the last flush."""
    cand = _ring(10, 6)
    _write(tmp_path / "queues.h5", cand, 3)
    q = Queues.open(tmp_path / "queues.h5", "r+")
    q.promote([0], [4])
    monkeypatch.setattr(queues_mod, "_write_rows", lambda ds, rows, values: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        q.flush()
    q.h5.close()
    monkeypatch.undo()
    jp = journal_path(tmp_path / "queues.h5")
    jp.write_bytes(jp.read_bytes()[:-3])
    with Queues.open(tmp_path / "queues.h5") as q2:
        assert np.array_equal(q2.all_dominant(), cand[:, :3])


def test_new_file_drops_old_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "queues.h5", _ring(10, 6), 3)
    q = Queues.open(path, "r+")
    q.promote([0], [4])
    monkeypatch.setattr(queues_mod, "_write_rows", lambda ds, rows, values: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        q.flush()  # leaves a whole journal record behind
    q.h5.close()
    monkeypatch.undo()
    assert journal_path(path).is_file()
    cand = _ring(10, 6)
    _write(path, cand, 3)  # build-index again: a stale journal must not apply to the new queues
    with Queues.open(path) as q:
        assert np.array_equal(q.all_dominant(), cand[:, :3])


def test_restore_puts_checkpoint_values_back(tmp_path: Path) -> None:
    cand = _ring(10, 6)
    _write(tmp_path / "queues.h5", cand, 3)
    with Queues.open(tmp_path / "queues.h5", "r+") as q:
        saved = q.dominant([0, 1])
        q.promote([0, 1], [5, 6])
        q.flush()
        q.promote([0], [4])
        # rows may repeat: the first (oldest) value wins
        assert q.restore(np.array([0, 1, 0]), np.concatenate([saved, [[9, 9, 9]]])) == 2
        assert np.array_equal(q.dominant([0, 1]), saved)
    with Queues.open(tmp_path / "queues.h5") as q:
        assert np.array_equal(q.all_dominant(), cand[:, :3])
