"""build-index: exact and approximate k-NN queues, recall, duplicates, refusals, a real-face store."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.queues import Queues
from lblctl.core.store import PrototypeStore
from lblctl.data.faces import Preprocess
from lblctl.models.backbones import create_backbone
from lblctl.models.checkpoint import load_backbone, save_backbone
from lblctl.models.embed import embed_paths
from lblctl.stages.duplicates import auto_threshold
from lblctl.stages.index import (
    ArraySource,
    BuildIndexConfig,
    build_index,
    build_store_index,
    choose_index,
    exact_knn,
    finish_rows,
    read_index,
    recall_at_k,
    search_all,
)

from .conftest import LFW, lfw_identities


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int, seed: int, clusters: int, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, d)))
    return _unit(centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d))


def _make_store(folder: Path, vectors: np.ndarray, photos: list[str] | None = None) -> Path:
    names = [f"person_{i:05d}" for i in range(len(vectors))]
    photos = photos if photos is not None else [f"/photos/{n}/id.jpg" for n in names]
    PrototypeStore.create(folder, vectors.shape[1], names, id_photos=photos, vectors=vectors).close()
    return folder


def _brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference k-NN: all pairs, self excluded, by score then lower row, −1 padded."""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    n = len(x)
    ids = np.full((n, k), -1)
    for i in range(n):
        order = np.lexsort((np.arange(n), -sims[i]))[: min(k, n - 1)]
        ids[i, : len(order)] = order
    return ids, sims


def test_flat_queues_equal_exact_knn(tmp_path: Path) -> None:
    x = _unit(np.random.default_rng(0).standard_normal((300, 24)))
    store = _make_store(tmp_path / "store", x)
    summary = build_store_index(BuildIndexConfig(store=store, candidates=12, dominant=5, dup_threshold=None))
    assert summary["index"]["kind"] == "flat" and summary["recall_at_k"] == 1.0
    ref, sims = _brute_force(x, 12)
    with Queues.open(store, expect_rows=300, expect_embedding_size=24) as q:
        cand = q.candidates(np.arange(300))
        assert np.array_equal(cand, ref)
        assert np.array_equal(q.all_dominant(), ref[:, :5])
        np.testing.assert_allclose(q.candidate_scores(np.arange(300)), np.take_along_axis(sims, ref, 1),
                                   atol=1e-5)
        assert q.meta["index"]["kind"] == "flat"
    assert read_index(store / "index.faiss").ntotal == 300
    manifest = json.loads((store / "index_manifest.json").read_text())
    assert manifest["kind"] == "index" and manifest["index"]["kind"] == "flat"
    assert {f["path"] for f in manifest["files"]} == {"index.faiss", "queues.h5", "duplicates.csv"}
    assert json.loads((store / "manifest.json").read_text())["kind"] == "store"  # left alone
    PrototypeStore.open(store).close()  # still opens: its manifest and file list untouched


def test_padding_and_ties(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((5, 8)))
    x[3] = x[1]  # rows 1 and 3 identical: a tie with each other at cosine 1
    x[4] = x[1]
    store = _make_store(tmp_path / "store", x)
    build_store_index(BuildIndexConfig(store=store, candidates=7, dominant=3, dup_threshold=0.99))
    with Queues.open(store) as q:
        cand, scores = q.candidates(np.arange(5)), q.candidate_scores(np.arange(5))
    assert (cand[:, 4:] == -1).all() and np.isnan(scores[:, 4:]).all()  # N−1 = 4 < 7
    for i in range(5):
        assert i not in cand[i] and sorted(cand[i, :4].tolist()) == sorted(set(range(5)) - {i})
    assert cand[1, :2].tolist() == [3, 4] and cand[3, :2].tolist() == [1, 4] and cand[4, :2].tolist() == [1, 3]
    rows = list(csv.DictReader((store / "duplicates.csv").open()))
    assert {(r["identity_a"], r["identity_b"]) for r in rows} == {
        ("person_00001", "person_00003"), ("person_00001", "person_00004"), ("person_00003", "person_00004")}


def test_finish_rows_orders_by_score_then_row() -> None:
    ids = np.array([[5, 2, 0, 9, -1]])
    scores = np.array([[0.5, 0.9, 1.0, 0.9, -3e38]], dtype=np.float32)
    out_ids, out_scores = finish_rows(np.array([0]), ids, scores, 6)
    assert out_ids.tolist() == [[2, 9, 5, -1, -1, -1]]
    assert np.isnan(out_scores[0, 3:]).all()


def test_choose_index() -> None:
    assert choose_index(1000, 512, 50).kind == "flat"
    big = choose_index(2_000_000, 512, 50, memory_bytes=64 << 30)
    assert big.kind == "ivf" and big.nlist == round(2 * np.sqrt(2_000_000)) and big.nprobe > 0
    small_mem = choose_index(10_000_000, 512, 50, memory_bytes=16 << 30)  # 19 GiB of vectors
    assert small_mem.kind == "ivfpq" and small_mem.rerank > 50 and 512 % small_mem.pq_m == 0
    assert choose_index(1000, 64, 50, "hnsw").ef_search >= 102
    with pytest.raises(LblError, match="--index"):
        choose_index(10, 8, 5, "annoy")


@pytest.mark.parametrize("kind,bound", [("ivf", 0.9), ("hnsw", 0.9), ("ivfpq", 0.85)])
def test_approximate_recall_20k(kind: str, bound: float) -> None:
    x = _clustered(20_000, 48, seed=2, clusters=200)
    source = ArraySource(x)
    k = 20
    spec = choose_index(len(x), x.shape[1], k, kind, nprobe=16 if kind == "ivf" else 0)
    index = build_index(source, spec, seed=0)
    found = np.zeros((len(x), k), dtype=np.int32)

    def sink(start: int, ids: np.ndarray, scores: np.ndarray) -> None:
        found[start : start + len(ids)] = ids
        assert (np.diff(np.nan_to_num(scores, nan=-9), axis=1) <= 1e-6).all()  # best first

    search_all(index, source, spec, k, sink, batch_size=5000)
    assert not (found == np.arange(len(x))[:, None]).any()  # never itself
    rows = np.random.default_rng(3).choice(len(x), 400, replace=False)
    exact, _ = exact_knn(source, rows, k, chunk_rows=7000)
    recall = recall_at_k(found[rows], exact)
    assert recall >= bound, f"{kind}: recall@{k} {recall:.3f}"
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.full_like(exact, -1), exact) == 0.0


def test_exact_knn_over_chunks_equals_brute_force() -> None:
    x = _unit(np.random.default_rng(4).standard_normal((500, 16)))
    ref, _ = _brute_force(x, 10)
    rows = np.array([0, 17, 499, 250])
    got, _ = exact_knn(ArraySource(x), rows, 10, chunk_rows=64)  # 8 chunks, one of 52 rows
    assert np.array_equal(got, ref[rows])


def test_duplicates_found_when_planted_none_when_clean(tmp_path: Path) -> None:
    x = _clustered(3000, 64, seed=5, clusters=30)
    clean = build_store_index(BuildIndexConfig(store=_make_store(tmp_path / "clean", x), candidates=10,
                                               dominant=4))
    assert clean["duplicates"] == 0 and clean["dup_threshold"] < 0.999
    assert len(list(csv.reader((tmp_path / "clean" / "duplicates.csv").open()))) == 1  # header only

    rng = np.random.default_rng(6)
    y = x.copy()
    planted = [(10, 2000), (55, 2999), (700, 701), (1234, 42), (2500, 3)]
    for a, b in planted:  # the same person enrolled twice: a near-copy of another prototype
        y[b] = _unit(x[a][None] + 0.08 * rng.standard_normal((1, 64)) / 8)[0]
    store = _make_store(tmp_path / "dups", y)
    summary = build_store_index(BuildIndexConfig(store=store, candidates=10, dominant=4, dup_html=True))
    rows = list(csv.DictReader((store / "duplicates.csv").open()))
    found = {(int(r["row_a"]), int(r["row_b"])) for r in rows}
    assert found == {(min(a, b), max(a, b)) for a, b in planted}
    assert summary["duplicates"] == 5 and "MAD" in summary["dup_threshold_rule"]
    r0 = rows[0]
    assert r0["id_photo_a"] == f"/photos/{r0['identity_a']}/id.jpg" and float(r0["score"]) >= summary["dup_threshold"]
    page = (store / "duplicates.html").read_text()
    assert page.count("<tr>") == 6 and page.count('class="missing"') == 10  # photos of made-up paths


def test_auto_threshold_rule() -> None:
    s = np.array([0.40, 0.42, 0.44, 0.46, 0.48, np.nan])
    t = auto_threshold(s)
    assert t.value == pytest.approx(0.44 + 6 * 1.4826 * 0.02)
    assert auto_threshold(np.full(10, 0.9999)).value == 0.999  # capped: identical prototypes always reported


def test_refuses_what_is_not_a_whole_store(tmp_path: Path) -> None:
    with pytest.raises(LblError, match="no prototypes.h5"):
        build_store_index(BuildIndexConfig(store=tmp_path))
    store = _make_store(tmp_path / "store", _unit(np.random.default_rng(7).standard_normal((50, 8))))
    with pytest.raises(LblError, match="--dominant"):
        build_store_index(BuildIndexConfig(store=store, candidates=5, dominant=6))
    with pytest.raises(LblError, match="--index"):
        build_store_index(BuildIndexConfig(store=store, index="annoy"))
    h5 = store / "prototypes.h5"
    os.truncate(h5, h5.stat().st_size // 2)
    with pytest.raises(IncompatibleArtifact):
        build_store_index(BuildIndexConfig(store=store))
    assert not (store / "queues.h5").exists() and not (store / "index.faiss").exists()


def test_queues_of_another_store_refused(tmp_path: Path) -> None:
    a = _make_store(tmp_path / "a", _unit(np.random.default_rng(8).standard_normal((40, 8))))
    build_store_index(BuildIndexConfig(store=a, candidates=5, dominant=2))
    with PrototypeStore.open(a) as s:
        n = s.num_rows
    with pytest.raises(IncompatibleArtifact, match="40 identities"):
        Queues.open(a, expect_rows=n + 1)
    with pytest.raises(IncompatibleArtifact, match="embedding size"):
        Queues.open(a, expect_embedding_size=16)


@pytest.mark.slow
def test_cli_on_real_faces_store(tmp_path: Path) -> None:
    """A store imprinted from real LFW ID photos by an (untrained) small_cnn, through the CLI."""
    torch.manual_seed(0)
    names = lfw_identities(1, 60)
    photos = [str(LFW / n / sorted(os.listdir(LFW / n))[0]) for n in names]
    pre = Preprocess(input_size=32, center_crop=0.6)
    model = create_backbone("small_cnn", embedding_size=32, input_size=32, width=8)
    save_backbone(tmp_path / "backbone.pt", model, arch="small_cnn", embedding_size=32, preprocess=pre,
                  arch_kwargs={"width": 8})
    backbone = load_backbone(tmp_path / "backbone.pt", torch.device("cpu"))
    emb = embed_paths(backbone, photos, batch_size=32)
    assert emb.ok.all()
    store = tmp_path / "store"
    PrototypeStore.create(store, 32, names, id_photos=photos, vectors=emb.vectors,
                          backbone_fingerprint=backbone.fingerprint).close()
    cmd = [sys.executable, "-m", "lblctl.cli", "build-index", "--store", str(store), "--candidates", "8",
           "--dominant", "3", "--dup-html", "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["identities"] == 60 and summary["index"]["kind"] == "flat"
    ref, _ = _brute_force(_unit(emb.vectors), 8)
    with Queues.open(store, expect_rows=60, expect_backbone_fingerprint=backbone.fingerprint) as q:
        cand = q.candidates(np.arange(60))
    assert (cand >= 0).all() and not (cand == np.arange(60)[:, None]).any()
    assert (cand[:, 0] == ref[:, 0]).mean() > 0.9  # float16/32 rounding may swap near-ties only
    rows = list(csv.DictReader((store / "duplicates.csv").open()))
    assert len(rows) == summary["duplicates"]
    for r in rows:
        assert Path(r["id_photo_a"]).is_file() and Path(r["id_photo_b"]).is_file()
    page = (store / "duplicates.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 * min(len(rows), 500)  # real photos, side by side
    # not a store: one line, exit 2
    bad = subprocess.run([sys.executable, "-m", "lblctl.cli", "build-index", "--store", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error:" in bad.stderr and "imprint" in bad.stderr
