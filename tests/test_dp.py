"""Dominant-prototype pieces: the class sampler, the hard-negative signal, the undo journal."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.core.errors import LblError
from lblctl.core.store import PrototypeStore
from lblctl.train.dp import DominantSampler, UndoJournal, hardest_wrong
from lblctl.train.streamer import StoreStreamer, as_stored


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


def test_sampler_hard_fraction_caps_queue_members_and_tops_up_with_random_rows() -> None:
    n, dq = 200, 6
    q = _queues(n, dq)
    members_of = lambda s, rows: set(q[rows[:10]].ravel().tolist()) - {-1}  # noqa: E731
    full_q = DominantSampler(n, np.arange(n), classes=40, sampled=10, seed=1)  # 1.0: every slot from the queues
    half = DominantSampler(n, np.arange(n), classes=40, sampled=10, seed=1, hard_fraction=0.5)
    none = DominantSampler(n, np.arange(n), classes=40, sampled=10, seed=1, hard_fraction=0.0)
    a, b, c = (x.select(3, lambda r: q[r]) for x in (full_q, half, none))
    assert np.array_equal(a[:10], b[:10]) and np.array_equal(a[:10], c[:10])  # the same sampled identities
    assert len(np.unique(b)) == 40 and len(np.unique(c)) == 40
    assert set(a[10:].tolist()) <= members_of(full_q, a)
    # half of the 30 other slots: the hardest queue members, in the order fraction 1 takes them ...
    assert b[10:25].tolist() == a[10:25].tolist()
    # ... the other half random rows (drawn as a short queue's top-up is), not the queues' next members
    assert b[25:].tolist() != a[25:40].tolist()
    assert len(set(b[25:].tolist()) - members_of(half, b)) > 0
    assert len(set(c[10:].tolist()) - members_of(none, c)) > 10
    assert b.tolist() == half.select(3, lambda r: q[r]).tolist()  # deterministic per step


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


def test_sampler_epoch_order_is_a_keyed_permutation_computed_per_step() -> None:
    trainable = np.arange(3, 3 + 3 * 97, 3)  # 97 rows with photos, 4 per step: 24 steps, one row left over
    s = DominantSampler(400, trainable, classes=8, sampled=4, seed=9)
    assert s.steps_per_epoch == 24
    for epoch in (0, 1):
        seen = np.concatenate([s.seeds(epoch * 24 + t) for t in range(24)])
        assert len(set(seen.tolist())) == 96 and set(seen.tolist()) <= set(trainable.tolist())
    assert not np.array_equal(s.seeds(0), s.seeds(24))  # each epoch its own order
    resumed = DominantSampler(400, trainable, classes=8, sampled=4, seed=9)  # a resumed run starts mid-epoch
    assert [resumed.seeds(t).tolist() for t in (37, 5, 36)] == [s.seeds(t).tolist() for t in (37, 5, 36)]
    assert not np.array_equal(DominantSampler(400, trainable, 8, 4, seed=10).seeds(5), s.seeds(5))
    # a step's cost does not grow with N: no per-epoch table of all rows (10^12 of them would not fit in memory)
    huge = np.lib.stride_tricks.as_strided(np.arange(1, dtype=np.int64), shape=(10**12,), strides=(0,))
    big = DominantSampler(10**12, huge, classes=64, sampled=16, seed=0)
    assert big.seeds(123_456_789).shape == (16,)


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
    half = np.array([[0.1, -2.0]], dtype=np.float16)  # a float16 store's rows are journalled as they are stored
    j3 = UndoJournal(tmp_path / "half.bin", num_rows=100)
    j3.reset(1)
    j3.record("mome", np.array([4]), half)
    j3.close()
    _, recs = UndoJournal.read(tmp_path / "half.bin")
    assert recs[0][2].dtype == np.float16 and np.array_equal(recs[0][2], half)
    j2 = UndoJournal(tmp_path / "undo.bin", num_rows=100)
    j2.reset(9)  # a new checkpoint empties it
    assert UndoJournal.read(tmp_path / "undo.bin") == (9, [])
    assert j2.first_touch("prot", np.array([3])).tolist() == [3]
    j2.close()


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _streamer(tmp_path: Path, overlap: bool, photos=None) -> tuple[StoreStreamer, PrototypeStore]:
    n, d = 20, 8
    PrototypeStore.create(tmp_path / "store", d, [f"p{i}" for i in range(n)],
                          vectors=_unit(np.random.default_rng(0), n, d), momentum=True).close()
    store = PrototypeStore.open(tmp_path / "store", "r+")

    def no_photos(step: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(rows), 3), torch.arange(len(rows))

    def select(step: int) -> np.ndarray:
        return (np.arange(6) + 3 * step) % n  # consecutive steps share 3 rows

    return StoreStreamer(store, select, photos or no_photos, overlap=overlap), store


@pytest.mark.parametrize("overlap", [True, False])
def test_streamer_hands_out_fresh_rows_and_commits_them_provisionally(tmp_path: Path, overlap: bool) -> None:
    st, store = _streamer(tmp_path, overlap)
    original = store.gather(np.arange(20))
    st.start(0, st.select(0))
    trained = {}
    for step in range(4):
        data = st.next()
        assert data.step == step and np.array_equal(data.rows, st.select(step))
        assert np.array_equal(st.next_rows, st.select(step + 1))
        # every row as the previous steps left it (the overlap gathered before they were written)
        expect = np.array([trained.get(int(r), original[r]) for r in data.rows])
        assert np.array_equal(data.vectors, expect), step
        new = _unit(np.random.default_rng(step + 1), 6, 8)
        st.write_back(data, new, np.full((6, 8), step + 1.0, np.float32), commit_as=step + 1)
        stored = as_stored(new, store.dtype, True)  # renormalised in float32, as the store keeps them
        trained.update({int(r): v for r, v in zip(data.rows, stored, strict=True)})
    st.drain()
    assert store.committed_step == 4
    assert np.array_equal(store.gather(np.array(sorted(trained))), np.array([trained[r] for r in sorted(trained)]))
    assert np.array_equal(store.gather_momentum(np.array([12, 13, 14])), np.full((3, 8), 4.0))
    st.close()
    with PrototypeStore.open(tmp_path / "store") as seen:  # provisional: in no log until a checkpoint
        assert seen.committed_step == -1 and np.array_equal(seen.gather(np.arange(20)), original)
    store.checkpoint()
    with PrototypeStore.open(tmp_path / "store") as seen:  # the checkpoint: one commit point for all four steps
        assert seen.committed_step == 4
        assert np.array_equal(seen.gather(np.array(sorted(trained))), np.array([trained[r] for r in sorted(trained)]))
    store.close()


def test_streamer_reraises_thread_errors_in_the_caller(tmp_path: Path) -> None:
    def photos(step: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if step == 1:
            raise OSError("disk gone while decoding")
        return torch.zeros(len(rows), 3), torch.arange(len(rows))

    st, store = _streamer(tmp_path, True, photos)
    st.start(0, st.select(0))
    data = st.next()
    with pytest.raises(OSError, match="disk gone"):
        st.next()
    st.close()
    store.close()
    ro = PrototypeStore.open(tmp_path / "store")  # a writer error (read-only store) surfaces at drain()
    st2 = StoreStreamer(ro, st.select, photos, overlap=True)
    st2.write_back(data, data.vectors, data.momentum, commit_as=1)
    with pytest.raises(LblError, match="read-only"):
        st2.drain()
    st2.close()
    ro.close()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch running more than one thread")
def test_streamer_thread_runs_torch_single_threaded(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    st, store = _streamer(tmp_path, True)
    assert st._pool.submit(torch.get_num_threads).result() == 1  # no second OpenMP team beside the step's
    assert torch.get_num_threads() == threads
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [threads]  # threads started afterwards keep the default
    st.close()
    store.close()


def test_streamer_chooses_rows_of_steps_ahead_for_the_store_to_prefetch(tmp_path: Path) -> None:
    """Issue 18: with lookahead d, step t+1+d's rows are chosen (in the background thread) when step t+1 is
    handed out, and handed to the store's prefetch, so that a cold gather finds its pages already read."""
    st, store = _streamer(tmp_path, True)
    asked: list[tuple[str, int]] = []
    select = st.select
    st.select = lambda step: asked.append((threading.current_thread().name[:12], step)) or select(step)
    st.lookahead = 3
    st.start(0, select(0))
    for step in range(3):
        data = st.next()
        st.write_back(data, data.vectors, data.momentum, commit_as=step + 1)
    st.drain()
    st.close()  # the thread's queued work is done
    assert [s for t, s in asked if t == "MainThread"] == [1, 2, 3]  # the step after the one handed out
    # read-ahead: the steps between at the start, then t+1+3 whenever step t+1 is handed out
    assert sorted(s for t, s in asked if t == "lblctl-store") == [2, 3, 4, 5, 6]
    store.close()
