"""reshard: plain ↔ sharded ↔ sharded, bit for bit (rows, momentum, steps, names, queues), crash-safe, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lblctl.core.errors import LblError
from lblctl.core.queues import Queues
from lblctl.core.shards import ShardedStoreView, read_layout, shard_dir
from lblctl.core.store import PrototypeStore
from lblctl.stages.index import BuildIndexConfig, build_store_index
from lblctl.stages.reshard import reshard, temp_dir

from .conftest import imprinted_world


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 40-identity LFW store, indexed, then changed as train-dp changes one: some rows rewritten
    at step 7 with non-zero momentum, some dominant queues promoted."""
    paths, vectors = imprinted_world(tmp_path_factory.mktemp("reshard"))
    store = paths["store"]
    build_store_index(BuildIndexConfig(store=store, candidates=8, dominant=4))
    rng = np.random.default_rng(3)
    with PrototypeStore.open(store, "r+") as s:
        rows = np.arange(0, 40, 3)
        s.scatter(rows, vectors[rows] + 0.1 * rng.standard_normal((len(rows), vectors.shape[1])),
                  momentum=rng.standard_normal((len(rows), vectors.shape[1])).astype(np.float32))
        s.commit(7)
    with Queues.open(store, "r+") as q:
        cand = q.candidates(np.arange(40))
        assert q.promote(np.arange(40), cand[:, -1]) > 0  # the last candidate jumps to the front
    return store


def _contents(store: Path) -> dict[str, object]:
    """Everything a store holds, by global row, through the plain or sharded reader."""
    view = ShardedStoreView(store) if read_layout(store) is not None else PrototypeStore.open(store)
    rows = np.arange(view.num_rows)
    with view:
        out: dict[str, object] = {
            "vec": view.gather(rows), "mom": view.gather_momentum(rows), "steps": view.row_steps(rows),
            "names": list(view.names), "photos": list(view.id_photos), "dtype": view.dtype,
            "fp": view.backbone_fingerprint, "committed": view.committed_step}
    layout = read_layout(store)
    folders = [shard_dir(store, r, layout.world_size) for r in range(layout.world_size)] if layout else [store]
    cand, score, dom = [], [], []
    for f in folders:
        with Queues.open(f) as q:
            local = np.arange(q.num_rows)
            cand.append(q.candidates(local))
            score.append(q.candidate_scores(local))
            dom.append(q.dominant(local))
    w = len(folders)
    order = np.argsort(np.concatenate([np.arange(r, view.num_rows, w) for r in range(w)]), kind="stable")
    out.update(cand=np.concatenate(cand)[order], score=np.concatenate(score)[order],
               dom=np.concatenate(dom)[order])
    return out


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bit for bit (NaN equals NaN)
        else:
            assert a[key] == b[key], key


def test_round_trip_plain_2_3_plain_is_bit_exact(trained_store: Path, tmp_path: Path) -> None:
    original = _contents(trained_store)
    assert original["committed"] == 7 and np.abs(original["mom"]).sum() > 0  # the fixture did change them
    s = reshard(trained_store, tmp_path / "w2", 2, chunk_rows=7)  # a chunk not a multiple of the world
    assert (s["from_layout"], s["world"], s["rows"], s["queues"]) == ("plain", 2, 40, True)
    layout = read_layout(tmp_path / "w2")
    assert (layout.world_size, layout.num_rows) == (2, 40)
    with PrototypeStore.open(shard_dir(tmp_path / "w2", 1, 2)) as shard:  # rank 1 owns the odd rows
        assert list(shard.names) == original["names"][1::2]
        np.testing.assert_array_equal(shard.gather(np.arange(20)), original["vec"][1::2])
    with Queues.open(shard_dir(tmp_path / "w2", 1, 2)) as q:  # global ids inside
        np.testing.assert_array_equal(q.dominant(np.arange(20)), original["dom"][1::2])
    _assert_same(original, _contents(tmp_path / "w2"))
    manifest = json.loads((tmp_path / "w2" / "index_manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["index.faiss", "shard-00000-of-00002/queues.h5",
                                                      "shard-00001-of-00002/queues.h5", "duplicates.csv"]
    reshard(tmp_path / "w2", tmp_path / "w3", 3, chunk_rows=5)
    assert [p.name for p in sorted((tmp_path / "w3").glob("shard-*"))] == \
        [f"shard-0000{r}-of-00003" for r in range(3)]
    _assert_same(original, _contents(tmp_path / "w3"))
    s = reshard(tmp_path / "w3", tmp_path / "plain", 1)
    assert (s["from_world"], s["layout"]) == (3, "plain") and read_layout(tmp_path / "plain") is None
    _assert_same(original, _contents(tmp_path / "plain"))
    for name in ("index.faiss", "duplicates.csv"):  # global row ids: copied as they are
        assert (tmp_path / "plain" / name).read_bytes() == (trained_store / name).read_bytes()
    manifest = json.loads((tmp_path / "plain" / "index_manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["index.faiss", "queues.h5", "duplicates.csv"]


def test_float16_without_momentum_or_queues(tmp_path: Path, trained_store: Path) -> None:
    with PrototypeStore.open(trained_store) as s:
        vec, names = s.gather(np.arange(40)), list(s.names)
    PrototypeStore.create(tmp_path / "h", vec.shape[1], names, "float16", vectors=vec).close()
    reshard(tmp_path / "h", tmp_path / "h4", 4)
    assert not (shard_dir(tmp_path / "h4", 0, 4) / "queues.h5").exists()
    reshard(tmp_path / "h4", tmp_path / "h1", 1)
    with PrototypeStore.open(tmp_path / "h") as a, PrototypeStore.open(tmp_path / "h1") as b:
        assert (b.dtype, b.has_momentum, list(b.names)) == ("float16", False, names)
        np.testing.assert_array_equal(a.gather(np.arange(40)), b.gather(np.arange(40)))


def test_refusals_and_overwrite(trained_store: Path, tmp_path: Path) -> None:
    with pytest.raises(LblError, match="--world 0"):
        reshard(trained_store, tmp_path / "x", 0)
    with pytest.raises(LblError, match="outside --store"):
        reshard(trained_store, trained_store / "inner", 2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(LblError, match="add --overwrite"):
        reshard(trained_store, tmp_path / "taken", 2)
    reshard(trained_store, tmp_path / "taken", 2, overwrite=True)
    assert read_layout(tmp_path / "taken").world_size == 2
    reshard(tmp_path / "taken", tmp_path / "taken2", 1)
    reshard(trained_store, tmp_path / "taken2", 3, overwrite=True)  # a plain OUT replaced by a sharded one
    assert read_layout(tmp_path / "taken2").world_size == 3 and not (tmp_path / "taken2" / "prototypes.h5").exists()


def test_shards_at_different_steps_are_refused(trained_store: Path, tmp_path: Path) -> None:
    reshard(trained_store, tmp_path / "w2", 2)
    with PrototypeStore.open(shard_dir(tmp_path / "w2", 0, 2), "r+") as s:  # rank 0 committed step 8, rank 1 did not
        s.scatter(np.array([0]), s.gather(np.array([1])), momentum=np.zeros((1, 32), np.float32))
        s.commit(8)
    with pytest.raises(LblError, match=r"different steps \(\[7, 8\]\)"):
        reshard(tmp_path / "w2", tmp_path / "m", 1)


def test_killed_reshard_leaves_out_untouched_and_reruns_to_the_same(trained_store: Path, tmp_path: Path) -> None:
    """kill -9 in the middle of the copy: OUT does not exist (only the temp folder); the same command
    again removes the leftovers and gives exactly the store an uninterrupted run gives."""
    reshard(trained_store, tmp_path / "ref", 2)
    code = ("import os, signal, lblctl.core.store as st\n"
            "from lblctl.stages.reshard import reshard\n"
            "orig = st.PrototypeStore.fill_exact\n"
            "calls = [0]\n"
            "def fill(self, *a, **k):\n"
            "    orig(self, *a, **k); calls[0] += 1\n"
            "    if calls[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
            "st.PrototypeStore.fill_exact = fill\n"
            f"reshard({str(trained_store)!r}, {str(tmp_path / 'out')!r}, 2, chunk_rows=8)\n")
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists() and temp_dir(tmp_path / "out").is_dir()
    cli = subprocess.run([sys.executable, "-m", "lblctl", "reshard", "--store", str(trained_store), "--world", "2",
                          "--out", str(tmp_path / "out"), "--json", "--quiet"], capture_output=True,
                         text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["world"] == 2
    assert not temp_dir(tmp_path / "out").exists()
    _assert_same(_contents(tmp_path / "ref"), _contents(tmp_path / "out"))


def test_cli_refuses_existing_out_in_one_line(trained_store: Path, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    cli = subprocess.run([sys.executable, "-m", "lblctl", "reshard", "--store", str(trained_store), "--world", "2",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert cli.returncode == 2
    assert "error:" in cli.stdout + cli.stderr and "--overwrite" in cli.stdout + cli.stderr


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_build_index_on_a_sharded_store_equals_plain_then_reshard(trained_store: Path, tmp_path: Path,
                                                                  kind: str) -> None:
    """build-index reads a sharded store through its shards and writes each shard's queues (global ids):
    the same as indexing the plain store and re-sharding it; the index and duplicate report stay on top."""
    reshard(trained_store, tmp_path / "plain", 1)
    reshard(trained_store, tmp_path / "w3", 3)
    cfg = {"candidates": 6, "dominant": 3, "index": kind, "nlist": 4 if kind == "ivf" else 0, "batch_size": 7}
    plain = build_store_index(BuildIndexConfig(store=tmp_path / "plain", **cfg))
    sharded = build_store_index(BuildIndexConfig(store=tmp_path / "w3", **cfg))
    assert (plain["layout"], sharded["layout"]) == ("plain", "sharded for 3")
    assert sharded["duplicates"] == plain["duplicates"] and sharded["recall_at_k"] == plain["recall_at_k"]
    reshard(tmp_path / "plain", tmp_path / "ref", 3)
    got, ref = _contents(tmp_path / "w3"), _contents(tmp_path / "ref")
    _assert_same(ref, got)
    np.testing.assert_array_equal(got["dom"], got["cand"][:, :3])  # fresh queues: the first dq candidates
    assert not (tmp_path / "w3" / "queues.h5").exists()
    for name in ("index.faiss", "duplicates.csv"):
        assert (tmp_path / "w3" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    manifest = json.loads((tmp_path / "w3" / "index_manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["index.faiss", *[f"shard-0000{r}-of-00003/queues.h5"
                                                                      for r in range(3)], "duplicates.csv"]


def test_eval_reads_a_sharded_store_as_its_merge(trained_store: Path, tmp_path: Path) -> None:
    """eval --store takes a sharded store through its shards: the same identification figures as the merge."""
    import torch

    from lblctl.stages.evaluate import EvalConfig
    from lblctl.stages.evaluate import run as evaluate

    root = trained_store.parent  # conftest.imprinted_world: faces/, run/backbone.pt, store/
    reshard(trained_store, tmp_path / "w2", 2)
    reshard(tmp_path / "w2", tmp_path / "merged", 1)
    got = {}
    for name in ("w2", "merged"):
        got[name] = evaluate(EvalConfig(backbone=root / "run", out=tmp_path / f"r-{name}", store=tmp_path / name,
                                        data=root / "faces"), torch.device("cpu"))["identification"]
    assert got["w2"]["gallery_size"] == 40 and got["w2"]["probes"] > 0
    assert got["w2"] == got["merged"]


def test_build_index_refuses_to_run_under_torchrun(trained_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One process builds the index (using every GPU itself): W ranks would write the same files."""
    from lblctl.stages.index import run

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(LblError, match="runs in one process"):
        run(BuildIndexConfig(store=trained_store), "cpu")


def test_take_and_interleave_strings_chunk_by_chunk() -> None:
    """The names of a shard are taken a chunk at a time (bounded scratch memory) and equal plain indexing,
    multi-byte utf-8 and empty names included; interleaving shards gives back the global order."""
    from lblctl.core.shards import ShardLayout, interleave_strings, take_strings
    from lblctl.core.strings import StringArray

    rng = np.random.default_rng(0)
    items = ["".join(chr(97 + x) for x in rng.integers(0, 26, rng.integers(0, 12))) + ("é" if i % 7 == 0 else "")
             for i in range(5000)]
    strings = StringArray.from_iter(items)
    rows = rng.integers(0, len(items), 3001)
    assert list(take_strings(strings, rows, chunk_rows=97)) == [items[r] for r in rows]
    layout = ShardLayout(3, len(items), 8)
    parts = [take_strings(strings, layout.rows_of(r), chunk_rows=50) for r in range(3)]
    assert list(interleave_strings(parts, layout)) == items


def test_a_store_open_for_writing_is_refused(trained_store: Path, tmp_path: Path) -> None:
    """A store a writer holds (train-dp running) would be copied half old, half new: refused in one line."""
    with PrototypeStore.open(trained_store, "r+"), pytest.raises(LblError, match="is open for writing"):
        reshard(trained_store, tmp_path / "w2", 2)
    assert not (tmp_path / "w2").exists()
    reshard(trained_store, tmp_path / "w2", 2)  # the writer has gone
