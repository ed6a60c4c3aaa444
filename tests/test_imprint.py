"""``imprint``: prototypes from real LFW photos checked against a direct computation; bad images,
left-out identities, resume, features-based stores and the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lblctl.cli import main as cli_main
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.store import PrototypeStore
from lblctl.data.faces import Preprocess, load_image, open_face_set
from lblctl.models.backbones import create_backbone
from lblctl.models.checkpoint import load_backbone, save_backbone
from lblctl.stages.imprint import STAGING, ImprintConfig, imprint

REPO = Path(__file__).resolve().parents[1]
DIM = 16


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions on a shared 2-core box: one thread avoids OpenMP contention (and restores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def backbone_pt(tmp_path: Path) -> Path:
    """An untrained small_cnn saved as a real backbone.pt (imprinting does not need a trained one)."""
    torch.manual_seed(0)
    model = create_backbone("small_cnn", DIM, 32, width=8).eval()
    path = tmp_path / "run" / "backbone.pt"
    save_backbone(path, model, arch="small_cnn", embedding_size=DIM, preprocess=Preprocess(32, 0.6),
                  arch_kwargs={"width": 8})
    return path


def direct_prototype(backbone, paths: list[str], flip: bool) -> np.ndarray:
    """The imprinting rule computed by hand: unit embeddings, mean, renormalised."""
    x = torch.stack([backbone.preprocess(load_image(p)) for p in paths])
    e = backbone.embed(x, flip=flip).numpy().astype(np.float64)
    m = e.mean(axis=0)
    return m / np.linalg.norm(m)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("photos,flip", [("all", True), ("id", False)])
def test_imprint_matches_direct_computation(lfw_slice: Path, backbone_pt: Path, tmp_path: Path,
                                            photos: str, flip: bool) -> None:
    out = tmp_path / "store"
    summary = imprint(ImprintConfig(out=out, data=lfw_slice, backbone=backbone_pt, photos=photos, flip=flip,
                                    batch_size=5))
    assert summary["imprinted"] == 12 and summary["left_out"] == 0
    assert summary["images_embedded"] == (48 if photos == "all" else 12)
    bb = load_backbone(backbone_pt)
    index = open_face_set(lfw_slice)
    with PrototypeStore.open(out, expect_embedding_size=DIM, expect_backbone_fingerprint=bb.fingerprint) as s:
        assert list(s.names) == list(index.names)
        got = s.gather(np.arange(12))
        for i in range(12):
            paths = [index.path(int(r)) for r in index.images_of(i, photos)]
            np.testing.assert_allclose(got[i], direct_prototype(bb, paths, flip), atol=2e-6)
            assert s.id_photos[i] == os.path.abspath(index.path(int(index.images_of(i, "id")[0])))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "store" and manifest["embedding_size"] == DIM
    assert manifest["backbone_fingerprint"] == bb.fingerprint and manifest["num_rows"] == 12
    assert not (out / STAGING).exists()


def test_bad_images_and_identities_without_a_readable_photo(lfw_slice: Path, backbone_pt: Path,
                                                             tmp_path: Path) -> None:
    index = open_face_set(lfw_slice)
    first = index.names[0]
    broken = sorted(os.listdir(lfw_slice / first))[2]
    (lfw_slice / first / broken).write_bytes(b"not a jpeg at all")
    (lfw_slice / "Zz_unreadable").mkdir()
    (lfw_slice / "Zz_unreadable" / "id.jpg").write_bytes(b"\xff\xd8\xff truncated")
    out = tmp_path / "store"
    summary = imprint(ImprintConfig(out=out, data=lfw_slice, backbone=backbone_pt, photos="all", batch_size=4))
    assert summary["imprinted"] == 12 and summary["left_out"] == 1
    assert summary["left_out_examples"] == ["Zz_unreadable"] and summary["problems"]["count"] == 2
    assert read_csv(out / "left_out.csv") == [{"identity": "Zz_unreadable", "reason": "no readable all photo"}]
    assert {Path(r["path"]).name for r in read_csv(out / "problems.csv")} == {broken, "id.jpg"}
    bb = load_backbone(backbone_pt)
    with PrototypeStore.open(out) as s:
        assert s.num_rows == 12 and s.names.lookup(["Zz_unreadable"])[0] == -1
        good = [str(lfw_slice / first / f) for f in sorted(os.listdir(lfw_slice / first)) if f != broken]
        np.testing.assert_allclose(s.gather([0])[0], direct_prototype(bb, good, False), atol=2e-6)
        assert np.all(np.abs(np.linalg.norm(s.gather(np.arange(12)), axis=1) - 1) < 1e-6)  # no zero rows


def test_spot_photos_leave_out_identities_without_one(lfw_slice: Path, backbone_pt: Path, tmp_path: Path) -> None:
    lone = lfw_slice / "Zz_only_an_id_photo"
    lone.mkdir()
    src = lfw_slice / open_face_set(lfw_slice).names[0]
    (lone / "id.jpg").write_bytes((src / sorted(os.listdir(src))[0]).read_bytes())
    summary = imprint(ImprintConfig(out=tmp_path / "store", data=lfw_slice, backbone=backbone_pt, photos="spot"))
    assert summary["imprinted"] == 12 and summary["images_embedded"] == 36
    assert read_csv(tmp_path / "store" / "left_out.csv")[0]["reason"] == "no spot photo"


def test_interrupted_imprint_resumes_where_it_stopped(lfw_slice: Path, backbone_pt: Path, tmp_path: Path) -> None:
    cfg = ImprintConfig(out=tmp_path / "store", data=lfw_slice, backbone=backbone_pt, photos="all", batch_size=6,
                        checkpoint_identities=3, dtype="float16")

    def interrupt(done: int) -> None:
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imprint(cfg, on_checkpoint=interrupt)
    state = json.loads((tmp_path / "store" / STAGING / "state.json").read_text())
    assert 5 <= state["done"] < 12
    with pytest.raises(LblError, match="add --resume"):
        imprint(cfg)
    with pytest.raises(LblError, match="other inputs or options"):
        imprint(ImprintConfig(**{**cfg.__dict__, "resume": True, "flip": True}))
    resumed = imprint(ImprintConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed["resumed_from"] == state["done"]
    assert resumed["images_embedded"] == 4 * (12 - state["done"])  # only the rest was embedded
    whole = imprint(ImprintConfig(**{**cfg.__dict__, "out": tmp_path / "whole"}))
    with PrototypeStore.open(tmp_path / "store") as a, PrototypeStore.open(tmp_path / "whole") as b:
        assert a.dtype == "float16" and list(a.names) == list(b.names)
        np.testing.assert_array_equal(a.gather(np.arange(12)), b.gather(np.arange(12)))
    assert whole["resumed_from"] == 0
    with pytest.raises(LblError, match="already holds a finished store"):
        imprint(ImprintConfig(**{**cfg.__dict__, "resume": True}))


def test_store_from_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    names = ["carol", "alice", "bob", "alice", "dave", "carol", "alice", "erin"]
    feats = rng.normal(size=(len(names), 6)).astype(np.float32)
    feats[4] = 0.0  # dave's only row is unusable: left out, not a zero row
    feats[6] *= 50.0  # rows are normalised before averaging
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["identities"] = np.array(names, dtype=object).astype(h5py.string_dtype())
    summary = imprint(ImprintConfig(out=tmp_path / "store", features=path, dtype="float32"))
    assert summary["imprinted"] == 4 and summary["left_out"] == 1 and summary["problems"]["count"] == 1
    unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    with PrototypeStore.open(tmp_path / "store", expect_embedding_size=6) as s:
        assert list(s.names) == ["carol", "alice", "bob", "erin"]  # order of first appearance
        assert s.backbone_fingerprint is None and s.id_photos[0] == ""
        for row, name in enumerate(s.names):
            m = unit[[i for i, n in enumerate(names) if n == name]].mean(axis=0)
            np.testing.assert_allclose(s.gather([row])[0], m / np.linalg.norm(m), atol=1e-6)
    assert read_csv(tmp_path / "store" / "left_out.csv") == [{"identity": "dave", "reason": "no usable feature row"}]
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["vectors"] = feats
    with pytest.raises(LblError, match="needs datasets 'features'"):
        imprint(ImprintConfig(out=tmp_path / "s2", features=tmp_path / "bad.h5"))


@pytest.mark.slow
def test_cli_imprint_end_to_end(lfw_slice: Path, backbone_pt: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "lblctl.cli", "imprint", "--data", str(lfw_slice), "--backbone",
           str(backbone_pt.parent), "--out", str(out), "--photos", "all", "--flip", "--workers", "1",
           "--batch-size", "8", "--dtype", "float16", "--json", "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model on a shared 2-core box
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["imprinted"] == 12 and summary["dtype"] == "float16"
    fp = load_backbone(backbone_pt).fingerprint
    with PrototypeStore.open(out, expect_backbone_fingerprint=fp) as s:
        assert s.num_rows == 12 and s.dtype == "float16"
    with pytest.raises(IncompatibleArtifact, match="embedding size"):
        PrototypeStore.open(out, expect_embedding_size=512)
    with pytest.raises(SystemExit) as exit_info:  # the same command again, in-process: one-line refusal
        cli_main(cmd[3:])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1
    assert "already holds a finished store" in err


def test_imprint_from_an_onnx_backbone_matches_and_keeps_momentum(lfw_slice: Path, backbone_pt: Path,
                                                                  tmp_path: Path) -> None:
    from lblctl.models.export import export_onnx

    export_onnx(backbone_pt, tmp_path / "model.onnx")
    imprint(ImprintConfig(out=tmp_path / "a", data=lfw_slice, backbone=backbone_pt, batch_size=8))
    imprint(ImprintConfig(out=tmp_path / "b", data=lfw_slice, backbone=tmp_path / "model.onnx", batch_size=8))
    with PrototypeStore.open(tmp_path / "a") as a, PrototypeStore.open(tmp_path / "b") as b:
        rows = np.arange(a.num_rows)
        np.testing.assert_allclose(a.gather(rows), b.gather(rows), atol=1e-4)
        assert a.has_momentum and not a.gather_momentum(rows).any()  # train-dp's per-class momentum, zero at start
    imprint(ImprintConfig(out=tmp_path / "c", data=lfw_slice, backbone=backbone_pt, momentum=False))
    with PrototypeStore.open(tmp_path / "c") as c:
        assert not c.has_momentum


# ----------------------------------------------------------------------------- under torchrun: a sharded store
@pytest.mark.parametrize("left_out", [False, True], ids=["all-imprinted", "one-left-out"])
def test_imprint_nproc_2_equals_one_process_then_reshard(lfw_slice: Path, backbone_pt: Path, tmp_path: Path,
                                                         left_out: bool) -> None:
    """``imprint --nproc 2`` (torchrun, gloo): each rank embeds every other identity and writes its own shard;
    the result is the 1-process store re-sharded for 2. With an identity left out (its only ID photo
    unreadable) the rows after it change owner, so they move between the ranks."""
    from lblctl.core.shards import ShardedStoreView, read_layout, shard_dir
    from lblctl.stages.reshard import reshard

    if left_out:
        third = open_face_set(lfw_slice).names[3]
        (lfw_slice / third / sorted(os.listdir(lfw_slice / third))[0]).write_bytes(b"not a jpeg at all")
    imprint(ImprintConfig(out=tmp_path / "one", data=lfw_slice, backbone=backbone_pt, batch_size=5))
    reshard(tmp_path / "one", tmp_path / "ref", 2)
    cmd = [sys.executable, "-m", "lblctl", "imprint", "--nproc", "2", "--data", str(lfw_slice), "--backbone",
           str(backbone_pt), "--out", str(tmp_path / "two"), "--batch-size", "5", "--workers", "0",
           "--device", "cpu", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    two = tmp_path / "two"
    assert read_layout(two).world_size == 2 and not (two / STAGING).exists()
    assert sorted(p.name for p in two.glob("shard-*")) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    with ShardedStoreView(two) as got, ShardedStoreView(tmp_path / "ref") as ref:
        rows = np.arange(ref.num_rows)
        assert got.num_rows == ref.num_rows == 12 - left_out
        assert list(got.names) == list(ref.names) and list(got.id_photos) == list(ref.id_photos)
        assert got.backbone_fingerprint == ref.backbone_fingerprint and got.has_momentum
        # each rank embeds its own batches (other photos beside each one): the same rows within float32
        # rounding of a differently shaped batch (measured ≤ 1e-7 here; 1e-6 ≈ 8 float32 ulps of a unit vector)
        np.testing.assert_allclose(got.gather(rows), ref.gather(rows), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got.gather_momentum(rows), 0)
    for r in range(2):  # each shard is a plain store of its own, complete with its manifest
        assert (shard_dir(two, r, 2) / "manifest.json").is_file()
    assert read_csv(two / "left_out.csv") == read_csv(tmp_path / "one" / "left_out.csv")
    assert len(read_csv(two / "problems.csv")) == int(left_out)
    again = subprocess.run(cmd[:4] + cmd[6:], capture_output=True, text=True, timeout=300)  # 1 process, same --out
    assert again.returncode == 2 and "already holds a finished store" in again.stdout + again.stderr


def test_resume_with_another_process_count_is_refused(lfw_slice: Path, backbone_pt: Path, tmp_path: Path) -> None:
    """An imprint interrupted under torchrun (each rank's state in OUT/.imprint/rank-R-of-W/) resumes only
    with the same number of processes: its identities were split by that number."""
    state = tmp_path / "store" / STAGING / "rank-00001-of-00002" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"signature": {}, "done": 3}))
    cfg = ImprintConfig(out=tmp_path / "store", data=lfw_slice, backbone=backbone_pt)
    with pytest.raises(LblError, match="interrupted imprint; add --resume"):
        imprint(cfg)
    with pytest.raises(LblError, match=r"started by 2 process\(es\), this job has 1; resume it with --nproc 2"):
        imprint(ImprintConfig(out=tmp_path / "store", data=lfw_slice, backbone=backbone_pt, resume=True))
