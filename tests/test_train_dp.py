"""train-dp on real faces: loss falls, rows touched, queue updates, overlap = serial, resume, head-only."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lblctl.core.errors import LblError
from lblctl.core.queues import Queues
from lblctl.core.store import PrototypeStore
from lblctl.data.faces import Preprocess, open_face_set
from lblctl.models.backbones import create_backbone
from lblctl.models.checkpoint import load_backbone, save_backbone
from lblctl.stages.train_dp import TrainDPConfig, train_dp
from lblctl.train.dp_data import ImageSource
from lblctl.train.engine import TrainConfig, checkpoint_step

from .conftest import exact_queues, imprinted_world

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The loss figures below depend on how torch splits its sums over threads: pinned, as in test_models.
    (Run alone with torch's 2 threads, the 40-step loss ratio was 0.90 where < 0.85 is asked; with 1 thread,
    and in the whole suite, it passed.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 real LFW identities × 3 photos, an untrained small CNN, an imprinted store, exact queues."""
    paths, vectors = imprinted_world(tmp_path_factory.mktemp("dp"))
    exact_queues(paths["store"], vectors, cq=10, dq=4)
    return paths


def fresh_store(world: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(world["store"], dest)
    return dest


def cfg_for(world: dict[str, Path], store: Path, out: Path, steps: int, **kw) -> TrainDPConfig:
    train = TrainConfig(steps=steps, lr=0.05, weight_decay=0.0, schedule="constant", log_every=1, seed=3,
                        checkpoint_every=kw.pop("checkpoint_every", 0))
    return TrainDPConfig(store=store, out=out, data=world["faces"], backbone=world["backbone"], classes=12,
                         sampled=4, photos_per_class=2, workers=1, train=train, **kw)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if "loss" in r}


def test_bisample_batches_and_label_positions(world: dict[str, Path]) -> None:
    index = open_face_set(world["faces"])
    with PrototypeStore.open(world["store"]) as store:
        src = ImageSource(index, store.names, Preprocess(32, 0.6), workers=1)
    rows = np.array([5, 17, 2])
    items, labels = src.choose(rows, 3, np.random.default_rng(0))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # positions in the step's class list
    for pos, r in enumerate(rows):
        mine = items[labels == pos]
        assert index.is_id[mine[0]] and not index.is_id[mine[1:]].any()  # ID photo first, then spot photos
        assert (index.image_identity[mine] == index.names.index(str(src.index.names[src.ident_of_row[r]]))).all()
    x, y = src.load(items, labels)
    assert x.shape == (9, 3, 32, 32) and y.tolist() == labels.tolist()
    src.close()


def test_few_steps_lower_loss_touch_rows_and_update_queues(world: dict[str, Path], tmp_path: Path) -> None:
    store = fresh_store(world, tmp_path / "store")
    with PrototypeStore.open(store) as s:
        before = s.gather(np.arange(s.num_rows))
    with Queues.open(store) as q:
        dom_before, cand = q.all_dominant(), q.candidates(np.arange(q.num_rows))
    summary = train_dp(cfg_for(world, store, tmp_path / "run", steps=40, head_lr=0.5), CPU)
    ls = list(losses(tmp_path / "run").values())
    assert np.mean(ls[-10:]) < 0.85 * np.mean(ls[:10]), ls
    with PrototypeStore.open(store) as s:
        after = s.gather(np.arange(s.num_rows))
        written = s.row_steps(np.arange(s.num_rows)) >= 1
        assert s.committed_step == 40
    changed = np.abs(after - before).max(1) > 1e-6
    assert summary["store_rows_touched"] == written.sum() and (changed <= written).all()
    assert np.allclose(np.linalg.norm(after, axis=1), 1, atol=1e-5)
    with Queues.open(store) as q:
        dom_after = q.all_dominant()
    moved = (dom_after != dom_before).any(1)
    assert summary["queue_changes"] > 0 and moved.any()
    for r in np.flatnonzero(moved):  # promotions come from the row's candidate queue, self never
        assert set(dom_after[r][dom_after[r] >= 0]) <= set(cand[r]) and r not in dom_after[r]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["kind"] == "backbone" and manifest["backbone_fingerprint"] == summary["backbone_fingerprint"]
    # the store now belongs to the fine-tuned backbone: it opens with it, not with the old one
    with PrototypeStore.open(store, expect_backbone_fingerprint=summary["backbone_fingerprint"]):
        pass
    with pytest.raises(LblError, match="another backbone"):
        PrototypeStore.open(store, expect_backbone_fingerprint=load_backbone(world["backbone"]).fingerprint)


def test_overlap_loses_no_update(world: dict[str, Path], tmp_path: Path) -> None:
    """With K close to N most rows are in consecutive steps: the overlapped pipeline must give
    exactly what a serial gather-after-write-back gives."""
    runs = {}
    for overlap in (True, False):
        store = fresh_store(world, tmp_path / f"s{overlap}")
        cfg = cfg_for(world, store, tmp_path / f"r{overlap}", steps=6, overlap=overlap)
        cfg.classes, cfg.sampled = 30, 10
        train_dp(cfg, CPU)
        with PrototypeStore.open(store) as s:
            runs[overlap] = (losses(tmp_path / f"r{overlap}"), s.gather(np.arange(s.num_rows)))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    assert np.allclose(runs[True][1], runs[False][1], atol=1e-6)


def test_refusals(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LblError, match="exactly one of"):
        train_dp(TrainDPConfig(store=world["store"], out=tmp_path / "o"), CPU)
    other = create_backbone("small_cnn", 16, 32, width=8)
    save_backbone(tmp_path / "b16.pt", other, arch="small_cnn", embedding_size=16, preprocess=Preprocess(32, 0.6),
                  arch_kwargs={"width": 8})
    cfg = cfg_for(world, world["store"], tmp_path / "o", steps=1)
    cfg.backbone = tmp_path / "b16.pt"
    with pytest.raises(LblError, match="embedding size"):
        train_dp(cfg, CPU)


def logged_steps(run: Path) -> list[int]:
    """Steps in a running job's log (a line still being written is skipped)."""
    steps = []
    for line in (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").exists() else []:
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line).get("step", -1))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("cache_rows", [0, 8], ids=["in-cache", "spilling"])
def test_kill9_resume_rolls_back_and_matches(world: dict[str, Path], tmp_path: Path, cache_rows: int) -> None:
    """Killed between checkpoints, with the store ahead of the run's checkpoint: its steps' rows in the
    write-back cache only (in-cache) or, with an 8-row cache, partly in the data file (spilling, undo
    logged); --resume must give the uninterrupted run's losses, prototypes and queues."""
    def cmd(store: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "lblctl.cli", "train-dp", "--data", str(world["faces"]), "--backbone",
                str(world["backbone"]), "--store", str(store), "--out", str(out), "--classes", "12", "--sampled",
                "4", "--steps", "24", "--checkpoint-every", "4", "--log-every", "1", "--lr", "0.05",
                "--workers", "1", "--device", "cpu", "--seed", "3", "--quiet", "--store-cache-rows", str(cache_rows)]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref_store, run_store = fresh_store(world, tmp_path / "ref_store"), fresh_store(world, tmp_path / "run_store")
    subprocess.run(cmd(ref_store, tmp_path / "ref"), check=True, env=env, timeout=300)
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd(run_store, out), env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # kill once a checkpoint ≥ 8 exists and the run is two steps past its last checkpoint
        done = [checkpoint_step(p) for p in (out / "checkpoints").glob("step_*.pt")]
        steps = logged_steps(out)
        if done and max(done) >= 8 and steps and max(steps) % 4 == 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([*cmd(run_store, out), "--resume"], check=True, env=env, timeout=300)
    a, b = losses(tmp_path / "ref"), losses(out)
    assert sorted(b) == list(range(1, 25))
    assert all(b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6) for s in a)
    with PrototypeStore.open(ref_store) as s1, PrototypeStore.open(run_store) as s2:
        rows = np.arange(s1.num_rows)
        assert np.allclose(s1.gather(rows), s2.gather(rows), atol=1e-5)
        assert s1.committed_step == s2.committed_step == 24
    with Queues.open(ref_store) as q1, Queues.open(run_store) as q2:
        assert np.array_equal(q1.all_dominant(), q2.all_dominant())


def test_head_only_at_100k_identities(tmp_path: Path) -> None:
    n, d, k = 100_000, 32, 256
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    names = [f"person_{i:06d}" for i in range(n)]
    feats = np.repeat(centres, 2, axis=0) + 0.3 * rng.standard_normal((2 * n, d)).astype(np.float32)
    with h5py.File(tmp_path / "feats.h5", "w") as f:
        f["features"] = feats
        f["identities"] = np.repeat(np.array(names, dtype=object), 2).astype(h5py.string_dtype())
    noisy = centres + 0.8 * rng.standard_normal((n, d)).astype(np.float32)
    PrototypeStore.create(tmp_path / "store", d, names, vectors=noisy / np.linalg.norm(noisy, axis=1, keepdims=True),
                          momentum=True).close()
    w = Queues.create(tmp_path / "store" / "queues.h5", n, 8, 4)
    cand = (np.arange(n)[:, None] + rng.integers(1, n, size=(n, 8))) % n  # a valid (not nearest) queue
    w.write(0, cand.astype(np.int32), np.zeros((n, 8), np.float32))
    w.commit()
    cfg = TrainDPConfig(store=tmp_path / "store", out=tmp_path / "run", features=tmp_path / "feats.h5",
                        classes=k, sampled=64, photos_per_class=2, workers=1,
                        train=TrainConfig(steps=40, lr=0.5, weight_decay=0.0, schedule="constant", log_every=5,
                                          seed=1))
    summary = train_dp(cfg, CPU)
    assert summary["identities"] == n and summary["classes"] == k
    assert summary["store_rows_touched"] <= 40 * k
    ls = list(losses(tmp_path / "run").values())
    assert ls[-1] < ls[0]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_backbone(path).model.state_dict().items()}


def test_head_random_trains_without_touching_the_queues(world: dict[str, Path], tmp_path: Path) -> None:
    store = fresh_store(world, tmp_path / "store")
    with Queues.open(store) as q:
        dom_before = q.all_dominant()
    summary = train_dp(cfg_for(world, store, tmp_path / "run", steps=6, head="random"), CPU)
    assert summary["head"] == "random" and summary["classes"] == 12 and summary["queue_changes"] == 0
    with Queues.open(store) as q:
        assert np.array_equal(q.all_dominant(), dom_before)  # the baseline neither reads nor learns queues
    with PrototypeStore.open(store) as s:
        written = (s.row_steps(np.arange(s.num_rows)) >= 1).sum()
        assert s.committed_step == 6 and written == summary["store_rows_touched"]
    assert summary["store_rows_touched"] > 12  # more than one step's classes: each step draws its own


def test_head_full_trains_every_prototype_each_step(world: dict[str, Path], tmp_path: Path) -> None:
    store = fresh_store(world, tmp_path / "store")
    with PrototypeStore.open(store) as s:
        n, before = s.num_rows, s.gather(np.arange(s.num_rows))
    summary = train_dp(cfg_for(world, store, tmp_path / "run", steps=3, head="full"), CPU)
    assert summary["classes"] == n and summary["batch_classes"] == 4  # all N on the device, photos of S
    with PrototypeStore.open(store) as s:
        after = s.gather(np.arange(n))
        assert (s.row_steps(np.arange(n)) == 3).all()  # every row written by the last step
    assert (np.abs(after - before).max(1) > 1e-6).all()  # negatives move too: the full softmax
    assert summary["store_rows_touched"] == n and summary["queue_changes"] == 0


def test_freeze_backbone_trains_prototypes_only(world: dict[str, Path], tmp_path: Path) -> None:
    store = fresh_store(world, tmp_path / "store")
    with PrototypeStore.open(store) as s:
        before = s.gather(np.arange(s.num_rows))
    summary = train_dp(cfg_for(world, store, tmp_path / "run", steps=5, freeze_backbone=True, head_lr=0.5), CPU)
    old, new = _weights(world["backbone"]), _weights(tmp_path / "run" / "backbone.pt")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)  # BN statistics too
    with PrototypeStore.open(store, expect_backbone_fingerprint=summary["backbone_fingerprint"]) as s:
        after = s.gather(np.arange(s.num_rows))
    assert (np.abs(after - before).max(1) > 1e-4).sum() >= 12
    ls = list(losses(tmp_path / "run").values())
    assert ls[-1] < ls[0]


def test_unfrozen_backbone_changes(world: dict[str, Path], tmp_path: Path) -> None:
    """The counterpart of the frozen run: the same options without --freeze-backbone move the weights."""
    store = fresh_store(world, tmp_path / "store")
    train_dp(cfg_for(world, store, tmp_path / "run", steps=2), CPU)
    old, new = _weights(world["backbone"]), _weights(tmp_path / "run" / "backbone.pt")
    assert any(not torch.equal(old[k], new[k]) for k in old)


def _feature_world(root: Path, n: int = 60, d: int = 16) -> tuple[Path, Path]:
    """Features of n identities (3 each) around hidden centres, and a store of noisy prototypes."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n, d)).astype(np.float32)
    names = [f"p{i:03d}" for i in range(n)]
    with h5py.File(root / "feats.h5", "w") as f:
        f["features"] = np.repeat(centres, 3, axis=0) + 0.3 * rng.standard_normal((3 * n, d)).astype(np.float32)
        f["identities"] = np.repeat(np.array(names, dtype=object), 3).astype(h5py.string_dtype())
    noisy = centres + rng.standard_normal((n, d)).astype(np.float32)
    PrototypeStore.create(root / "store", d, names, vectors=noisy / np.linalg.norm(noisy, axis=1, keepdims=True),
                          momentum=True).close()
    exact_queues(root / "store", noisy / np.linalg.norm(noisy, axis=1, keepdims=True), cq=8, dq=4)
    return root / "feats.h5", root / "store"


def _feature_cfg(feats: Path, store: Path, out: Path, **kw) -> TrainDPConfig:
    return TrainDPConfig(store=store, out=out, features=feats, classes=16, sampled=4, photos_per_class=2,
                         train=TrainConfig(steps=8, lr=0.1, weight_decay=0.0, schedule="constant", log_every=1,
                                           seed=0), **kw)


def test_projection_learns_a_linear_map_head_only(tmp_path: Path) -> None:
    feats, store = _feature_world(tmp_path)
    plain = train_dp(_feature_cfg(feats, store, tmp_path / "plain"), CPU)
    state = torch.load(plain_ck := sorted((tmp_path / "plain" / "checkpoints").glob("step_*.pt"))[-1],
                       weights_only=True)
    assert "backbone" not in state["modules"], plain_ck  # head-only: nothing but prototypes is trained
    shutil.rmtree(store)
    feats, store = _feature_world(tmp_path)
    proj = train_dp(_feature_cfg(feats, store, tmp_path / "proj", projection=True), CPU)
    state = torch.load(sorted((tmp_path / "proj" / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    w = state["modules"]["backbone"]["weight"]
    assert w.shape == (16, 16) and not torch.allclose(w, torch.eye(16))  # the projection moved off identity
    assert proj["backbone_fingerprint"] is None and plain["steps"] == proj["steps"] == 8
    assert json.loads((tmp_path / "proj" / "manifest.json").read_text())["kind"] == "train-dp"
    assert losses(tmp_path / "proj") != losses(tmp_path / "plain")


def test_out_store_trains_a_copy_and_leaves_the_source(world: dict[str, Path], tmp_path: Path) -> None:
    src = fresh_store(world, tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    dst = tmp_path / "copy"
    summary = train_dp(cfg_for(world, src, tmp_path / "run", steps=4, out_store=dst), CPU)
    assert summary["store"] == str(dst)
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before  # byte for byte
    with PrototypeStore.open(src) as s0, PrototypeStore.open(dst) as s1:
        assert s0.committed_step != 4 and s1.committed_step == 4
        rows = np.arange(s0.num_rows)
        assert (np.abs(s1.gather(rows) - s0.gather(rows)).max(1) > 1e-6).sum() >= 12
    with pytest.raises(LblError, match="already holds a store"):  # never overwritten without --resume
        train_dp(cfg_for(world, src, tmp_path / "run2", steps=4, out_store=dst), CPU)
