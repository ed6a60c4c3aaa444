"""The prototype store: round trip, renormalisation, lookup, append, refusals, crash safety (kill -9)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.journal import read_log, scan
from lblctl.core.store import FILENAME, WAL2_NAME, WAL_KIND, WAL_NAME, PrototypeStore, _normalise, cast

REPO = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows over their norms, computed as the store does (exact comparisons below)."""
    out = _normalise(x)
    np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    return out


def wal_records(path: Path) -> list:
    return read_log(path, WAL_KIND)


def make(folder: Path, n: int = 50, d: int = 8, dtype: str = "float32", seed: int = 0, **kw) -> np.ndarray:
    vecs = np.random.default_rng(seed).normal(size=(n, d))
    with PrototypeStore.create(folder, d, [f"person_{i:04d}" for i in range(n)], dtype=dtype,
                               backbone_fingerprint="sha256:abc", vectors=vecs, **kw):
        pass
    return vecs


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("cache", ["ram", "mmap"])
def test_round_trip_and_plain_h5py(tmp_path: Path, dtype: str, cache: str) -> None:
    vecs = make(tmp_path / "s", dtype=dtype)
    expected = unit(vecs).astype(dtype).astype(np.float32)
    with PrototypeStore.open(tmp_path / "s", cache=cache) as s:
        assert (s.num_rows, s.embedding_size, s.dtype, s.cache) == (50, 8, dtype, cache)
        assert s.backbone_fingerprint == "sha256:abc" and s.committed_step == -1
        rows = np.array([7, 3, 49, 0, 7])
        got = s.gather(rows)
        assert got.dtype == np.float32 and got.shape == (5, 8)
        np.testing.assert_array_equal(got, expected[rows])
        np.testing.assert_array_equal(np.concatenate([c for _, c in s.iter_chunks(16)]), expected)
    with h5py.File(tmp_path / "s" / FILENAME, "r") as f:  # readable without lblctl
        np.testing.assert_array_equal(f["prototypes"][:].astype(np.float32), expected)
        assert f["identities"][3].decode() == "person_0003" and f["prototypes"].dtype == np.dtype(dtype)
        assert f.attrs["embedding_size"] == 8 and f["committed_step"][0] == -1


def test_scatter_renormalises_and_commits(tmp_path: Path) -> None:
    make(tmp_path / "s")
    new = np.array([[3.0, 4.0, 0, 0, 0, 0, 0, 0], [0, 0, 10.0, 0, 0, 0, 0, 0]])
    with PrototypeStore.open(tmp_path / "s", "r+") as s:
        s.scatter([5, 9], new)
        np.testing.assert_allclose(s.gather([5, 9]), [[0.6, 0.8, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]],
                                   atol=1e-7)
        with pytest.raises(ValueError, match="zero or not finite"):
            s.scatter([1], np.zeros((1, 8)))
        s.scatter([5, 5], [new[1], new[0]])  # the last of a repeated row wins
        s.commit(4)
    with PrototypeStore.open(tmp_path / "s") as s:
        assert s.committed_step == 4 and s.recovery == "clean"
        np.testing.assert_allclose(s.gather([5, 9]), [[0.6, 0.8, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]],
                                   atol=1e-7)
        np.testing.assert_array_equal(s.row_steps(np.array([5, 9, 0])), [4, 4, -1])
        np.testing.assert_allclose(np.linalg.norm(s.gather(np.arange(50)), axis=1), 1.0, atol=1e-6)


def test_uncommitted_rows_do_not_reach_the_file(tmp_path: Path) -> None:
    vecs = make(tmp_path / "s")
    s = PrototypeStore.open(tmp_path / "s", "r+", cache="mmap")
    s.scatter([2], np.ones((1, 8)))
    assert s.pending_rows == 1
    with PrototypeStore.open(tmp_path / "s") as reader:
        np.testing.assert_allclose(reader.gather([2])[0], unit(vecs)[2], atol=1e-7)
    s.close()
    with PrototypeStore.open(tmp_path / "s") as reader:
        np.testing.assert_allclose(reader.gather([2])[0], unit(vecs)[2], atol=1e-7)


def test_momentum_kept_beside_prototypes(tmp_path: Path) -> None:
    make(tmp_path / "s", momentum=True)
    with PrototypeStore.open(tmp_path / "s", "r+") as s:
        assert s.has_momentum
        np.testing.assert_array_equal(s.gather_momentum([0, 1]), 0)
        s.scatter([1, 2], np.ones((2, 8)), momentum=np.full((2, 8), 0.5))
        s.scatter_momentum([3], np.full((1, 8), -2.0))
        s.commit(1)
    with PrototypeStore.open(tmp_path / "s") as s:
        np.testing.assert_array_equal(s.gather_momentum([1, 2, 3, 4])[:, 0], [0.5, 0.5, -2.0, 0.0])
    make(tmp_path / "plain")
    with PrototypeStore.open(tmp_path / "plain", "r+") as s, pytest.raises(LblError, match="no momentum"):
        s.gather_momentum([0])


def test_name_lookup_and_duplicates(tmp_path: Path) -> None:
    make(tmp_path / "s", n=300)
    with PrototypeStore.open(tmp_path / "s") as s:
        np.testing.assert_array_equal(s.names.lookup(["person_0299", "nobody", "person_0000", "person_0150"]),
                                      [299, -1, 0, 150])
        assert s.names[42] == "person_0042"
    with pytest.raises(LblError, match="occur twice"):
        PrototypeStore.create(tmp_path / "d", 4, ["a", "b", "a"], vectors=np.ones((3, 4)))


def test_append_adds_a_segment_without_rewriting(tmp_path: Path) -> None:
    vecs = make(tmp_path / "s", n=40)
    path = tmp_path / "s" / FILENAME
    with h5py.File(path, "r") as f:
        first_offset = f["_segments/0/prototypes"].id.get_offset()
    size_before = path.stat().st_size
    more = np.random.default_rng(1).normal(size=(25, 8))
    with PrototypeStore.open(tmp_path / "s", "r+", cache="mmap") as s:
        s.scatter([1], np.ones((1, 8)), step=1)
        rows = s.append([f"new_{i}" for i in range(25)], more,
                        id_photos=[f"/photos/new_{i}/id.jpg" for i in range(25)])
        np.testing.assert_array_equal(rows, np.arange(40, 65))
        assert s.num_rows == 65 and s.names.lookup(["new_24", "person_0001"]).tolist() == [64, 1]
        s.scatter([0, 60], np.ones((2, 8)))  # writes reach both segments
        s.commit(2)
        with pytest.raises(LblError, match="already in the store"):
            s.append(["person_0003"], np.ones((1, 8)))
    with PrototypeStore.open(tmp_path / "s", expect_embedding_size=8) as s:
        got = s.gather(np.arange(65))
        np.testing.assert_allclose(got[40:60], unit(more)[:20], atol=1e-7)
        np.testing.assert_allclose(got[[0, 1, 60]], np.full((3, 8), 8 ** -0.5), atol=1e-7)
        np.testing.assert_allclose(got[2:40], unit(vecs)[2:40], atol=1e-7)
        assert s.id_photos[64] == "/photos/new_24/id.jpg" and s.id_photos[0] == ""
    with h5py.File(path, "r") as f:
        assert f["_segments/0/prototypes"].id.get_offset() == first_offset
        assert f["prototypes"].shape == (65, 8) and f["identities"].shape == (65,)
        np.testing.assert_allclose(f["prototypes"][40:60], unit(more)[:20], atol=1e-7)
    assert path.stat().st_size - size_before < 25 * 8 * 4 * 3 + 64 * 1024  # new rows + metadata, not a copy


def test_read_only_and_single_writer(tmp_path: Path) -> None:
    make(tmp_path / "s")
    readers = [PrototypeStore.open(tmp_path / "s") for _ in range(3)]
    with pytest.raises(LblError, match="read-only"):
        readers[0].scatter([0], np.ones((1, 8)))
    with pytest.raises(LblError, match="read-only"):
        readers[1].append(["x"], np.ones((1, 8)))
    writer = PrototypeStore.open(tmp_path / "s", "r+")
    with pytest.raises(LblError, match="another process has this store open for writing"):
        PrototypeStore.open(tmp_path / "s", "r+")
    writer.close()
    PrototypeStore.open(tmp_path / "s", "r+").close()  # the lock went with the writer
    for r in readers:
        assert r.gather([0]).shape == (1, 8)
        r.close()


def test_refuses_mismatched_or_broken_stores(tmp_path: Path) -> None:
    make(tmp_path / "s")
    with pytest.raises(IncompatibleArtifact, match="embedding size 8 does not match the expected 512"):
        PrototypeStore.open(tmp_path / "s", expect_embedding_size=512)
    with pytest.raises(IncompatibleArtifact, match="made by another backbone"):
        PrototypeStore.open(tmp_path / "s", expect_backbone_fingerprint="sha256:other")
    PrototypeStore.open(tmp_path / "s", expect_embedding_size=8,
                        expect_backbone_fingerprint="sha256:abc").close()
    # never completed (the manifest comes last): refused
    s = PrototypeStore.create(tmp_path / "half", 8, ["a", "b"])
    s.close(complete=False)
    with pytest.raises(IncompatibleArtifact, match="never completed"):
        PrototypeStore.open(tmp_path / "half")
    with pytest.raises(LblError, match="1 row\\(s\\) never written"), \
            PrototypeStore.create(tmp_path / "half", 8, ["a", "b"], overwrite=True) as s:
        s.fill(0, np.ones((1, 8)))
    with pytest.raises(IncompatibleArtifact, match="never completed"):
        PrototypeStore.open(tmp_path / "half")
    # truncated file: refused by the manifest's size check
    path = tmp_path / "s" / FILENAME
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(IncompatibleArtifact, match="truncated"):
        PrototypeStore.open(tmp_path / "s")
    with pytest.raises(LblError, match="no prototypes.h5"):
        PrototypeStore.open(tmp_path / "nothing")


DIE_AFTER_COMMITS = """
import os, sys
import numpy as np
from lblctl.core.store import PrototypeStore
s = PrototypeStore.open(sys.argv[1], "r+", cache="mmap")
for step, rows in enumerate(sys.argv[2:], start=int(s.committed_step) + 1):
    rows = [int(r) for r in rows.split(",")]
    s.scatter(rows, np.ones((len(rows), 8)), step=step)
os._exit(0)  # dies like a kill: no flush, no close
"""


def _die_after_commits(folder: Path, *row_lists: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", DIE_AFTER_COMMITS, str(folder), *row_lists], check=True, env=env)


def test_recovery_of_each_crash_point(tmp_path: Path) -> None:
    """The two states a kill can leave: whole commits only in the log, and a record cut short."""
    vecs = make(tmp_path / "s")
    _die_after_commits(tmp_path / "s", "3", "4,5")  # commits 0 and 1 exist only in the write-ahead log
    with h5py.File(tmp_path / "s" / FILENAME, "r") as f:  # the data file was never touched
        np.testing.assert_allclose(f["prototypes"][3:6], unit(vecs)[3:6], atol=1e-7)
        assert f["committed_step"][0] == -1
    with PrototypeStore.open(tmp_path / "s") as r:  # a reader sees step 1 without changing the file
        assert r.committed_step == 1 and "read the commit of step 1" in r.recovery
        np.testing.assert_allclose(r.gather([3, 4, 5]), np.full((3, 8), 8 ** -0.5), atol=1e-7)
        np.testing.assert_array_equal(r.row_steps(np.array([3, 4, 5, 6])), [0, 1, 1, -1])
    with PrototypeStore.open(tmp_path / "s", "r+") as w:
        assert w.committed_step == 1 and "completed the commit of step 1" in w.recovery
    with h5py.File(tmp_path / "s" / FILENAME, "r") as f:  # replayed into the file, the log emptied
        np.testing.assert_allclose(f["prototypes"][3:6], np.full((3, 8), 8 ** -0.5), atol=1e-7)
        assert f["committed_step"][0] == 1
    _die_after_commits(tmp_path / "s", "6")  # commit 2 "killed" while its record was being written
    wal = tmp_path / "s" / WAL_NAME
    _, end = scan(wal.read_bytes(), WAL_KIND)  # where its records end (older epochs' bytes may follow)
    with open(wal, "r+b") as fh:
        fh.truncate(end - 5)
    with PrototypeStore.open(tmp_path / "s", "r+") as w:
        assert w.committed_step == 1 and "discarded an unfinished commit after step 1" in w.recovery
        np.testing.assert_allclose(w.gather([6])[0], unit(vecs)[6], atol=1e-7)
    assert [p.name for p in (tmp_path / "s").glob(WAL_NAME + "*")] == [WAL_NAME]


def test_steps_touch_one_log_and_no_data_page_until_flush(tmp_path: Path) -> None:
    """Issue 18: a commit appends to the one log; rows reach the data file only when the write-back
    cache is full, at flush() or at close(), in one pass; reads see them all along."""
    vecs = make(tmp_path / "s", n=200, momentum=True)
    folder = tmp_path / "s"
    rng = np.random.default_rng(3)
    want = unit(vecs).copy()
    want_mom = np.zeros_like(want)
    with PrototypeStore.open(folder, "r+", cache="mmap", write_cache_rows=40) as s:
        assert s.write_cache_rows == 40
        names = sorted(p.name for p in folder.iterdir())
        inode = (folder / WAL_NAME).stat().st_ino
        for step in range(6):  # 6 × 5 rows ≤ 40: everything stays in the cache
            rows = np.arange(step * 5, step * 5 + 5)
            new = rng.normal(size=(5, 8))
            s.scatter(rows, new, momentum=new * 0.5, step=step)
            want[rows], want_mom[rows] = unit(new), new * 0.5
        assert sorted(p.name for p in folder.iterdir()) == names and (folder / WAL_NAME).stat().st_ino == inode
        with h5py.File(folder / FILENAME, "r") as f:
            np.testing.assert_allclose(f["prototypes"][:30], unit(vecs)[:30], atol=1e-7)
        np.testing.assert_allclose(s.gather(np.arange(200)), want, atol=1e-7)
        assert s.cached_rows == 30
        s.scatter(np.arange(100, 115), rng.normal(size=(15, 8)), step=6)  # 45 > 40: the cache is written back first
        assert s.cached_rows == 15 and s.stats["background_flushes"] == 1  # ... by the flusher thread
        s.wait_write_back()
        assert s.stats["flushes"] == 1
        with h5py.File(folder / FILENAME, "r") as f:
            np.testing.assert_allclose(f["prototypes"][:30], want[:30], atol=1e-7)
            np.testing.assert_allclose(f["momentum"][:30], want_mom[:30], atol=1e-6)
            assert f["committed_step"][0] == 5
        assert wal_records(folder / WAL_NAME) == []  # written back: its log is empty; step 6 is in the other
        assert sorted(p.name for p in folder.iterdir()) == sorted([*names, WAL2_NAME])
        inode2 = (folder / WAL2_NAME).stat().st_ino
        s.flush()
        assert s.cached_rows == 0 and wal_records(folder / WAL_NAME) == wal_records(folder / WAL2_NAME) == []
        with h5py.File(folder / FILENAME, "r") as f:
            assert f["committed_step"][0] == 6 and (f["row_step"][100:115] == 6).all()
        assert (folder / WAL_NAME).stat().st_ino == inode and (folder / WAL2_NAME).stat().st_ino == inode2


def test_background_write_back_while_commits_go_on(tmp_path: Path) -> None:
    """flush(wait=False) returns at once; the flusher writes the frozen rows while new commits go to
    the other log; reads (this writer's, and a reader's in between) see every commit all along."""
    folder = tmp_path / "s"
    vecs = make(folder, n=300, momentum=True)
    want = unit(vecs).copy()
    rng = np.random.default_rng(8)
    with PrototypeStore.open(folder, "r+", cache="mmap", write_cache_rows=64) as s:
        for step in range(40):  # 40 commits of 20 rows through a 64-row cache: many write-backs
            rows = np.sort(rng.choice(300, 20, replace=False))
            new = rng.normal(size=(20, 8))
            s.scatter(rows, new, momentum=new, step=step)
            want[rows] = unit(new)
            if step % 7 == 3:
                s.flush(wait=False)
            np.testing.assert_allclose(s.gather(np.arange(300)), want, atol=1e-6)
            if step == 20:
                with PrototypeStore.open(folder) as r:  # the logs as they are, one of them maybe mid write-back
                    assert r.committed_step == 20
                    np.testing.assert_allclose(r.gather(np.arange(300)), want, atol=1e-6)
        assert s.stats["background_flushes"] >= 10
    with PrototypeStore.open(folder) as r:
        assert r.recovery == "clean" and r.committed_step == 39
        np.testing.assert_allclose(r.gather(np.arange(300)), want, atol=1e-6)
    assert wal_records(folder / WAL_NAME) == wal_records(folder / WAL2_NAME) == []


def test_provisional_commits_count_at_the_checkpoint_and_reach_the_file_on_release(tmp_path: Path) -> None:
    """Issue 18: train-dp's steps commit provisionally (no log record, no file page); checkpoint() makes them one
    commit point, and the rows go to the data file only at the release (flush(wait=False)); until then a run
    that lost its own checkpoint reopens the store at the one before (recover_to)."""
    folder = tmp_path / "s"
    vecs = make(folder, n=200, momentum=True)
    rng = np.random.default_rng(4)
    want = {-1: unit(vecs).copy()}
    with PrototypeStore.open(folder, "r+", cache="mmap") as s:
        for step in range(6):
            rows = np.sort(rng.choice(200, 30, replace=False))
            s.scatter(rows, rng.normal(size=(30, 8)), momentum=rng.normal(size=(30, 8)))
            s.commit(step, provisional=True)
            want[step] = want[step - 1].copy()
            want[step][rows] = s.gather(rows)
            if step == 2:
                assert wal_records(folder / WAL_NAME) == []  # nothing logged per step
                with PrototypeStore.open(folder) as r:  # a reader sees the last commit point: the store as made
                    assert r.committed_step == -1 and np.array_equal(r.gather(np.arange(200)), want[-1])
                s.checkpoint()
                s.flush(wait=False)  # released: written back in the background
                s.wait_write_back()
                with h5py.File(folder / FILENAME, "r") as f:
                    assert f["committed_step"][0] == 2
                    np.testing.assert_array_equal(f["prototypes"][:], want[2])
        s.checkpoint()  # step 5: durable in the log; the caller "dies" before saving its own checkpoint
        with h5py.File(folder / FILENAME, "r") as f:  # not released: the data file is still at step 2
            assert f["committed_step"][0] == 2
            np.testing.assert_array_equal(f["prototypes"][:], want[2])
        with PrototypeStore.open(folder) as r:
            assert r.committed_step == 5 and np.array_equal(r.gather(np.arange(200)), want[5])
        s.scatter(np.arange(3), rng.normal(size=(3, 8)))
        s.commit(6, provisional=True)
    # closed with an unreleased checkpoint and a provisional commit: left as a kill leaves them
    with PrototypeStore.open(folder, "r", recover_to=2) as r:
        assert r.committed_step == 2 and "dropped 1 commit point(s) after step 2" in r.recovery
        np.testing.assert_array_equal(r.gather(np.arange(200)), want[2])
    with PrototypeStore.open(folder, "r+") as w:  # no target: the last commit point
        assert w.committed_step == 5
        np.testing.assert_array_equal(w.gather(np.arange(200)), want[5])


def test_a_checkpoint_of_provisional_commits_does_not_wait_for_the_last_write_back(tmp_path: Path) -> None:
    """With the last checkpoint's write-back still under way, checkpoint() logs the new rows and returns; they stay
    in the cache (logged) for the next write-back, and a run that stops before its next checkpoint is recovered
    to this one."""
    folder = tmp_path / "s"
    make(folder, n=100_000, d=16, dtype="float16")
    rng = np.random.default_rng(0)
    with PrototypeStore.open(folder, "r+", cache="mmap", write_cache_rows=200_000) as s:
        for step in range(3):
            s.scatter(rng.choice(100_000, 30_000, replace=False), rng.normal(size=(30_000, 16)))
            s.commit(step, provisional=True)
        s.checkpoint()
        s.flush(wait=False)
        s.scatter(np.arange(50), rng.normal(size=(50, 16)))
        s.commit(3, provisional=True)
        assert s.flushing  # 90,000 rows take a while to write back
        s.checkpoint()
        assert s.stats["background_flushes"] == 1 and s.stats["flush_wait_s"] == 0 and s.cached_rows == 50
        want = s.gather(np.arange(100_000))
        s.flush(wait=False)  # the release: no second write-back while the first runs
        s.scatter(np.arange(50, 100), rng.normal(size=(50, 16)))
        s.commit(4, provisional=True)  # never checkpointed: the run "stops" here
    with PrototypeStore.open(folder, "r+", recover_to=3) as w:
        assert w.committed_step == 3
        np.testing.assert_array_equal(w.gather(np.arange(100_000)), want)


def test_a_full_cache_spills_provisional_rows_with_undo_records(tmp_path: Path) -> None:
    """When an interval's rows outgrow the cache they go to the data file early, each after an undo record of
    its value at the last commit point, so a kill (or close) before the checkpoint still rolls them back."""
    folder = tmp_path / "s"
    make(folder, n=300, momentum=True, dtype="float16")
    rng = np.random.default_rng(5)
    with PrototypeStore.open(folder, "r+", cache="mmap", write_cache_rows=50) as s:
        s.scatter(np.arange(40), rng.normal(size=(40, 8)), momentum=rng.normal(size=(40, 8)))
        s.commit(0, provisional=True)
        s.checkpoint()
        s.flush(wait=False)
        at_ckpt = (s.gather(np.arange(300)), s.gather_momentum(np.arange(300)), s.row_steps(np.arange(300)))
        for step in range(1, 8):  # 7 × 30 rows through a 50-row cache: spills
            rows = np.sort(rng.choice(300, 30, replace=False))
            s.scatter(rows, rng.normal(size=(30, 8)), momentum=rng.normal(size=(30, 8)))
            s.commit(step, provisional=True)
        assert s.stats["spills"] >= 4
        with h5py.File(folder / FILENAME, "r") as f:  # provisional rows are in the data file ...
            assert not np.array_equal(f["prototypes"][:].astype(np.float32), at_ckpt[0])
            assert f["committed_step"][0] == 0
        ahead = s.gather(np.arange(300))
    for mode, note in (("r", "rolled back"), ("r+", "rolled back"), ("r", "clean")):  # a reader in memory,
        with PrototypeStore.open(folder, mode) as r:  # the writer in the file; then there is nothing to do
            assert r.committed_step == 0 and note in r.recovery
            np.testing.assert_array_equal(r.gather(np.arange(300)), at_ckpt[0])
            np.testing.assert_array_equal(r.gather_momentum(np.arange(300)), at_ckpt[1])
            np.testing.assert_array_equal(r.row_steps(np.arange(300)), at_ckpt[2])
    assert not np.array_equal(ahead, at_ckpt[0])
    with PrototypeStore.open(folder, "r+", write_cache_rows=50) as s:  # the same steps, then a checkpoint: kept
        rng = np.random.default_rng(6)
        for step in range(1, 8):
            rows = np.sort(rng.choice(300, 30, replace=False))
            s.scatter(rows, rng.normal(size=(30, 8)), momentum=rng.normal(size=(30, 8)))
            s.commit(step, provisional=True)
        s.checkpoint()
        s.flush(wait=False)
        kept = s.gather(np.arange(300))
    with PrototypeStore.open(folder) as r:
        assert r.committed_step == 7 and r.recovery == "clean"
        np.testing.assert_array_equal(r.gather(np.arange(300)), kept)


KILL_MID_WRITE_BACK = """
import os, signal, sys
import numpy as np
from lblctl.core.store import PrototypeStore
with PrototypeStore.open(sys.argv[1], "r+", cache="mmap", write_cache_rows=200_000) as s:
    for step in range(3):
        rng = np.random.default_rng(step)
        rows = rng.choice(s.num_rows, 30_000, replace=False)
        s.scatter(rows, rng.normal(size=(len(rows), s.embedding_size)), step=step)
    s.flush(wait=False)
    rng = np.random.default_rng(3)
    rows = rng.choice(s.num_rows, 50, replace=False)
    s.scatter(rows, rng.normal(size=(50, s.embedding_size)), step=3)
    print("flushing" if s.flushing else "done", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_checkpoint_does_not_wait_for_the_last_write_back(tmp_path: Path) -> None:
    """flush(wait=False) while the previous write-back is still under way only makes the log durable:
    no second write-back starts (that would wait for the first), the new rows stay in the cache."""
    folder = tmp_path / "s"
    make(folder, n=100_000, d=16, dtype="float16")
    rng = np.random.default_rng(0)
    with PrototypeStore.open(folder, "r+", cache="mmap", write_cache_rows=200_000) as s:
        for step in range(3):
            rows = rng.choice(100_000, 30_000, replace=False)
            s.scatter(rows, rng.normal(size=(30_000, 16)), step=step)
        s.flush(wait=False)
        s.scatter(np.arange(50), rng.normal(size=(50, 16)), step=3)
        assert s.flushing  # 90,000 rows take a while to write back
        s.flush(wait=False)
        assert s.stats["background_flushes"] == 1 and s.stats["flush_wait_s"] == 0 and s.cached_rows == 50
        want = s.gather(np.arange(100_000))
    with PrototypeStore.open(folder) as r:
        assert r.recovery == "clean" and r.committed_step == 3
        np.testing.assert_array_equal(r.gather(np.arange(100_000)), want)


def test_kill_during_background_write_back_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    vecs = make(folder, n=100_000, d=16, dtype="float16")
    want = unit(vecs).astype(np.float16).astype(np.float32)
    for step, count in enumerate((30_000, 30_000, 30_000, 50)):
        rng = np.random.default_rng(step)
        rows = rng.choice(100_000, count, replace=False)
        want[rows] = unit(rng.normal(size=(count, 16))).astype(np.float16).astype(np.float32)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", KILL_MID_WRITE_BACK, str(folder)], capture_output=True, text=True,
                         env=env)
    assert out.returncode == -signal.SIGKILL and out.stdout.strip() == "flushing"  # killed mid write-back
    assert wal_records(folder / WAL_NAME) and wal_records(folder / WAL2_NAME)  # both hold commits
    with PrototypeStore.open(folder) as r:  # a reader (eval) sees step 3 and changes nothing
        assert r.committed_step == 3
        np.testing.assert_array_equal(r.gather(np.arange(100_000)), want)
    with PrototypeStore.open(folder, "r+") as w:
        assert w.committed_step == 3 and "completed the commit of step 3" in w.recovery
        np.testing.assert_array_equal(w.gather(np.arange(100_000)), want)
    with PrototypeStore.open(folder) as r:
        assert r.recovery == "clean" and r.committed_step == 3
        np.testing.assert_array_equal(r.gather(np.arange(100_000)), want)


# ------------------------------------------------------------------ kill -9 at random moments

N, D, K = 3000, 16, 400

WRITER = f"""
import sys
import numpy as np
from lblctl.core.store import PrototypeStore
N, D, K = {N}, {D}, {K}
cache_rows, every = int(sys.argv[3]), int(sys.argv[4])  # 0: the default cache; every > 0: flush(wait=False) so often
provisional = sys.argv[5] == "1"  # train-dp's way: provisional commits, a checkpoint every `every` steps
with PrototypeStore.open(sys.argv[1], "r+", cache=sys.argv[2], write_cache_rows=cache_rows or None) as s:
    step = s.committed_step
    print("start", step, flush=True)
    while True:
        step += 1
        rng = np.random.default_rng(step)
        rows = rng.choice(N, K, replace=False)
        s.scatter(rows, rng.normal(size=(K, D)), momentum=rng.normal(size=(K, D)))
        s.commit(step, provisional=provisional)
        if every and step % every == 0:
            if provisional:
                s.checkpoint()
                print("checkpoint", step, flush=True)  # the caller's own checkpoint, saved only now
            s.flush(wait=False)
        print(step, flush=True)
"""


def expected_state(initial: np.ndarray, upto: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vec = unit(initial).astype(dtype).astype(np.float32)
    mom = np.zeros_like(vec)
    steps = np.full(N, -1)
    for step in range(0, upto + 1):  # the first writer starts at step 0
        rng = np.random.default_rng(step)
        rows = rng.choice(N, K, replace=False)
        vec[rows] = unit(rng.normal(size=(K, D))).astype(dtype).astype(np.float32)
        mom[rows] = rng.normal(size=(K, D)).astype(np.float32).astype(dtype).astype(np.float32)
        steps[rows] = step
    return vec, mom, steps


@pytest.mark.slow
@pytest.mark.parametrize("cache_rows,every,provisional", [(0, 0, 0), (1000, 2, 0), (1000, 3, 1)],
                         ids=["in-cache", "background-write-backs", "provisional-spilling"])
def test_kill_minus_nine_at_random_moments(tmp_path: Path, cache_rows: int, every: int, provisional: int) -> None:
    """background-write-backs: a 1000-row cache fills every third commit and every second commit is a
    checkpoint-style flush(wait=False), so most kills land while a write-back is under way.
    provisional-spilling (train-dp's way): provisional commits, a checkpoint every third step (1,200 rows an
    interval: the 1000-row cache spills); the store must reopen at the caller's last checkpoint, even when the
    kill came between the store's checkpoint and the caller's."""
    dtype = "float16"
    initial = make(tmp_path / "s", n=N, d=D, dtype=dtype, momentum=True)
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    last, recoveries = -1, []
    for kill in range(16):
        cache = ("ram", "mmap")[kill % 2]
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "s"), cache, str(cache_rows), str(every),
                                 str(provisional)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("start")
        time.sleep(float(rng.uniform(0.0, 0.12)))
        os.kill(proc.pid, signal.SIGKILL)
        lines = proc.stdout.read().splitlines()
        proc.wait()
        printed = [int(x) for x in lines if x.isdigit()]
        done = printed[-1] if printed else last
        target = None
        if provisional:  # the caller's last saved checkpoint
            marks = [int(x.split()[1]) for x in lines if x.startswith("checkpoint ")]
            done = target = marks[-1] if marks else last
        with PrototypeStore.open(tmp_path / "s", "r+", cache="mmap", recover_to=target) as s:
            step = s.committed_step
            recoveries.append(s.recovery)
            if provisional:
                assert step == done, (step, done)
            else:
                assert step in (done, done + 1), (step, done)  # the last reported commit, or the one under way
            assert step >= last
            vec, mom, steps = expected_state(initial, step, dtype)
            np.testing.assert_array_equal(s.gather(np.arange(N)), vec)
            np.testing.assert_array_equal(s.gather_momentum(np.arange(N)), mom)
            np.testing.assert_array_equal(s.row_steps(np.arange(N)), steps)
        last = step
    assert last > 16  # the writers got real work done between kills
    print(f"kill -9 ×16, last step {last}; recoveries: {[r for r in recoveries if r != 'clean']}")


def test_prenormalised_scatter_is_bit_exact_and_fingerprint_can_move(tmp_path: Path) -> None:
    make(tmp_path / "s", dtype="float16")
    v = unit(np.random.default_rng(5).normal(size=(3, 8))).astype(np.float16).astype(np.float32)
    with PrototypeStore.open(tmp_path / "s", "r+") as s:
        s.scatter([0, 1, 2], v, normalised=True, step=1)  # stored as given: the caller knows the bits
        np.testing.assert_array_equal(s.gather([0, 1, 2]), v)
        with pytest.raises(ValueError, match="not unit vectors"):
            s.scatter([0], np.full((1, 8), 3.0), normalised=True)
        s.set_backbone_fingerprint("sha256:tuned")
    with pytest.raises(IncompatibleArtifact, match="made by another backbone"):
        PrototypeStore.open(tmp_path / "s", expect_backbone_fingerprint="sha256:abc")
    with PrototypeStore.open(tmp_path / "s", expect_backbone_fingerprint="sha256:tuned") as s:
        np.testing.assert_array_equal(s.gather([0, 1, 2]), v)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["backbone_fingerprint"] == "sha256:tuned"


def _resident(arr: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``arr`` (all rows when ``rows`` is None): 1 if its first page is in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    rows = np.arange(len(arr)) if rows is None else rows
    out = np.zeros(len(rows), dtype=np.uint8)
    flag = (ctypes.c_ubyte * 1)()
    for i, addr in enumerate((arr.ctypes.data + rows * arr.strides[0]).tolist()):
        assert libc.mincore(ctypes.c_void_p(addr - addr % page), ctypes.c_size_t(page), flag) == 0, ctypes.get_errno()
        out[i] = flag[0] & 1
    return out


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise (Linux)")
def test_prefetch_starts_reading_the_rows_pages(tmp_path: Path) -> None:
    """Issue 18: the streamer asks for the rows of steps ahead; their pages are read without a gather."""
    folder = tmp_path / "s"
    make(folder, n=20_000, d=64, momentum=True)  # 20,000 × 256-byte rows: 1,250 pages each of rows, momentum
    fd = os.open(folder / FILENAME, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the page cache: a cold store
    finally:
        os.close(fd)
    with PrototypeStore.open(folder, cache="mmap", populate=False) as s:
        vec, mom = s._segments[0].vec, s._segments[0].mom
        if _resident(vec).mean() > 0.5:
            pytest.skip("the page cache kept the file (it cannot be emptied here)")
        rows = np.arange(0, 20_000, 400)  # 50 rows, far apart
        assert _resident(vec, rows).sum() < len(rows)
        s.prefetch(rows)
        deadline = time.time() + 10
        while time.time() < deadline and not (_resident(vec, rows).all() and _resident(mom, rows).all()):
            time.sleep(0.01)
        assert _resident(vec, rows).all() and _resident(mom, rows).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_row_and_its_momentum_share_one_page(tmp_path: Path, dtype: str) -> None:
    """Issue 18: a cold train-dp step reads each of its K rows with its momentum. Side by side and
    page-aligned (D 512 float32: 2 KB + 2 KB = one 4 KB page), that is one page read per row, not two or
    three (apart, and at HDF5's unaligned offsets, half the rows straddled two pages)."""
    folder = tmp_path / "s"
    vecs = make(folder, n=64, d=512, dtype=dtype, momentum=True)
    with PrototypeStore.open(folder, "r+") as s:
        s.scatter(np.array([3, 40]), vecs[[5, 6]], momentum=np.full((2, 512), 0.5, np.float32))
        s.commit(1)
    page = mmap.PAGESIZE
    with PrototypeStore.open(folder, cache="mmap", populate=False) as s:
        seg = s._segments[0]
        for r in (0, 1, 3, 37, 63):
            spans = [(a // page, (a + row.nbytes - 1) // page)
                     for row in (seg.vec[r], seg.mom[r]) for a in (row.ctypes.data,)]
            assert len({p for span in spans for p in span}) == 1, (r, spans)
        want, want_mom = s.gather(np.arange(64)), s.gather_momentum(np.arange(64))
    with h5py.File(folder / FILENAME, "r") as f:  # a plain h5py reader sees the same two N×D datasets
        assert f.attrs["format"] == "lblctl-store/2"
        np.testing.assert_array_equal(f["prototypes"][:].astype(np.float32), want)
        np.testing.assert_array_equal(f["momentum"][:].astype(np.float32), want_mom)
        assert f["momentum"][3, 0] == 0.5 and f["momentum"][4, 0] == 0


def test_a_store_of_the_earlier_layout_reads_trains_and_grows(tmp_path: Path) -> None:
    """Stores written before the side-by-side layout (``lblctl-store/1``: rows and momentum apart, made by
    commit f6ff900: 12 rows, D 8, rows 2, 5, 9 committed at step 4 with momentum 0.25) keep working as
    they are: read, trained, appended to, and still readable by plain h5py."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "data" / "store_v1", folder)
    with PrototypeStore.open(folder) as s:
        assert s.committed_step == 4 and len(s) == 12 and s.has_momentum
        np.testing.assert_array_equal(s.gather_momentum(np.array([2, 5, 9, 0])),
                                      np.r_[np.full((3, 8), 0.25), np.zeros((1, 8))].astype(np.float32))
        before = s.gather(np.arange(12))
    with h5py.File(folder / FILENAME, "r") as f:
        np.testing.assert_array_equal(f["prototypes"][:], before)
    new = unit(np.random.default_rng(3).normal(size=(2, 8)))
    with PrototypeStore.open(folder, "r+") as s:
        s.scatter(np.array([0, 11]), new, momentum=np.ones((2, 8), np.float32))
        s.commit(5)
        rows = s.append(["late_0", "late_1"], new)
    with PrototypeStore.open(folder) as s:
        assert s.committed_step == 5 and len(s) == 14 and list(rows) == [12, 13]
        got = s.gather(np.arange(14))
        np.testing.assert_allclose(got[[0, 11, 12, 13]], np.r_[new, new], atol=1e-6)
        np.testing.assert_array_equal(got[1:11], before[1:11])
        np.testing.assert_array_equal(s.gather_momentum(np.array([0, 11, 12])),
                                      np.r_[np.ones((2, 8)), np.zeros((1, 8))].astype(np.float32))
    with h5py.File(folder / FILENAME, "r") as f:
        assert f.attrs["format"] == "lblctl-store/1" and "rows" not in f["_segments/1"]
        np.testing.assert_array_equal(f["prototypes"][:], got)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not hasattr(__import__("resource"), "RUSAGE_THREAD"),
                    reason="posix_fadvise, RUSAGE_THREAD (Linux)")
def test_prefetched_rows_are_gathered_without_page_faults(tmp_path: Path) -> None:
    """Issue 18: a page in the page cache but not in the process's page table still costs a fault at the
    first touch (5–30 ms for a 1,024-row gather on a cold 1M store). The read-ahead thread maps the rows
    too, so the gathering thread takes no fault for them."""
    import resource

    folder = tmp_path / "s"
    make(folder, n=4_000, d=512, momentum=True)
    rows = np.arange(0, 4_000, 10)  # 400 rows, each in its own page

    def faults(fn) -> int:
        before = resource.getrusage(resource.RUSAGE_THREAD)
        fn()
        after = resource.getrusage(resource.RUSAGE_THREAD)
        return (after.ru_minflt - before.ru_minflt) + (after.ru_majflt - before.ru_majflt)

    with PrototypeStore.open(folder, cache="mmap", populate=False) as s:
        s.prefetch(rows)
        deadline = time.time() + 10
        while s._reads_queued and time.time() < deadline:
            time.sleep(0.01)
        first = faults(lambda: (s.gather(rows), s.gather_momentum(rows)))
        again = faults(lambda: (s.gather(rows), s.gather_momentum(rows)))  # the output arrays' own faults
    assert first - again < len(rows) // 10, (first, again)


def test_cast_through_torch_is_numpys_cast_bit_for_bit() -> None:
    """float16 rows are cast through torch where it is loaded (~8× faster here): the same bits as numpy's."""
    import torch  # noqa: F401 - loaded: cast takes the torch path

    rng = np.random.default_rng(0)
    v = (rng.normal(size=(64, 128)) * 10.0 ** rng.integers(-9, 6, size=(64, 1))).astype(np.float32)
    v[0, :6] = [np.inf, -np.inf, 65519.0, 65520.0, 6e-8, -2.9e-8]  # overflow, rounding at the top, subnormals
    half = cast(v, np.float16)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(half.view(np.uint16), v.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(cast(half, np.float32), half.astype(np.float32))
    assert cast(v, np.float32) is v


def test_a_checkpoint_logged_in_cache_order_recovers_every_row(tmp_path: Path) -> None:
    """Issue 18: a checkpoint logs the cache in slot order (views of it, no gather into row order: 0.35 s of a
    0.95 s checkpoint at 1M); recovery sorts each record's rows before it replays them."""
    folder = tmp_path / "s"
    vecs = make(folder, n=300, momentum=True)
    rng = np.random.default_rng(7)
    want = unit(vecs).copy()
    with PrototypeStore.open(folder, "r+", cache="mmap") as s:
        for step, rows in enumerate([np.arange(250, 290), np.arange(0, 40), np.arange(100, 300, 5)]):
            s.scatter(rows, rng.normal(size=(len(rows), 8)), momentum=rng.normal(size=(len(rows), 8)))
            s.commit(step, provisional=True)
            want[rows] = s.gather(rows)
        mom = s.gather_momentum(np.arange(300))
        s.checkpoint()  # not released: the rows are in the log alone, as a kill would leave them
    logged = [s._parse_record(t, memoryview(p)) for t, p in wal_records(folder / WAL_NAME)]
    rows = np.concatenate([rec[2][0] for rec in logged if rec is not None and rec[2] is not None])
    every = np.unique(np.concatenate([np.arange(250, 290), np.arange(0, 40), np.arange(100, 300, 5)]))
    assert len(rows) == len(every) and np.array_equal(np.sort(rows), every)
    assert (np.diff(rows) < 0).any()  # not in row order
    with PrototypeStore.open(folder) as r:  # a reader replays the log in memory
        assert r.committed_step == 2
        np.testing.assert_array_equal(r.gather(np.arange(300)), want)
        np.testing.assert_array_equal(r.gather_momentum(np.arange(300)), mom)
    with PrototypeStore.open(folder, "r+") as w:  # a writer replays it into the file
        np.testing.assert_array_equal(w.gather(np.arange(300)), want)
    with h5py.File(folder / FILENAME, "r") as f:
        np.testing.assert_array_equal(f["prototypes"][:], want)


def test_the_write_back_does_not_write_through_the_stores_own_mapping(tmp_path: Path) -> None:
    """Issue 18: a page written through the store's long-lived mapping stays mapped writable there, so the fsync
    that cleans it must flush the TLB of every core: one interprocessor interrupt per page, ~10% of a 1M-row
    run's CPU in a VM. The write-back writes with pwrite, through no mapping: here the store's own maps are
    read-only, and the rows still reach the file."""
    folder = tmp_path / "s"
    make(folder, n=2_000, d=512, momentum=True)
    rows = np.arange(3, 2_000, 7)
    rng = np.random.default_rng(8)
    with PrototypeStore.open(folder, "r+", cache="mmap") as s:
        for seg in s._segments:
            for name in ("vec", "mom", "step"):
                view = getattr(seg, name).view()
                view.flags.writeable = False
                setattr(seg, name, view)
        s.scatter(rows, rng.normal(size=(len(rows), 512)), momentum=rng.normal(size=(len(rows), 512)))
        s.commit(0, provisional=True)
        after, mom = s.gather(rows), s.gather_momentum(rows)
        s.checkpoint()
        s.flush(wait=False)  # the background write-back, as train-dp releases it
        s.wait_write_back()
        assert s.cached_rows == 0
    with h5py.File(folder / FILENAME, "r") as f:
        assert f["committed_step"][0] == 0
    with PrototypeStore.open(folder) as r:
        assert r.recovery == "clean"
        np.testing.assert_array_equal(r.gather(rows), after)
        np.testing.assert_array_equal(r.gather_momentum(rows), mom)


def _device_written(path: Path) -> int | None:
    """Bytes written so far by the block device that holds ``path`` (its /sys counters); None without one."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    if os.major(dev) == 0 or not stat.is_file():
        return None
    return int(stat.read_text().split()[6]) * 512


def test_a_write_back_writes_its_rows_not_the_folios_around_them(tmp_path: Path) -> None:
    """Issue 18: the page cache holds a file the kernel read or wrote sequentially (imprint's writes, a scan,
    read-ahead) in large folios, and a page written through a shared mapping is written back a whole folio at
    a time: 10,000 random rows of a 1M-row store made the disk write all 4.2 GB of it. Here a 64 MB store is
    read through once, then 256 random rows (1 MB) are committed and written back: the disk must write a
    small part of the file (the rows, their log record, the file system's journal), not the file."""
    folder = tmp_path / "s"
    make(folder, n=16_000, d=512, momentum=True)  # 4 KB a row with its momentum: 64 MB
    path = folder / FILENAME
    if _device_written(path) is None:
        pytest.skip("no block device under tmp_path (tmpfs or an overlay): nothing to count")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf, offset = bytearray(8 << 20), 0
        while got := os.preadv(fd, [buf], offset):  # one sequential pass: read-ahead, large folios
            offset += got
    finally:
        os.close(fd)
    rng = np.random.default_rng(9)
    rows = np.sort(rng.choice(16_000, 256, replace=False))
    with PrototypeStore.open(folder, "r+", cache="mmap") as s:
        before = _device_written(path)
        s.scatter(rows, rng.normal(size=(256, 512)), momentum=rng.normal(size=(256, 512)))
        s.commit(0, provisional=True)
        s.checkpoint()
        s.flush()  # written back and fsynced
        written = _device_written(path) - before
        new, mom = s.gather(rows), s.gather_momentum(rows)
    assert written < 16 << 20, f"{written / 2**20:.0f} MB written for 1 MB of rows"
    with PrototypeStore.open(folder) as r:
        np.testing.assert_array_equal(r.gather(rows), new)
        np.testing.assert_array_equal(r.gather_momentum(rows), mom)
