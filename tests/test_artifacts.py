"""Manifests, atomic writes and refusal of incompatible or truncated artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lblctl.core.artifacts import (
    atomic_open,
    atomic_write_json,
    fingerprint_file,
    read_manifest,
    write_manifest,
)
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.data.faces import Preprocess
from lblctl.models.backbones import create_backbone
from lblctl.models.checkpoint import load_backbone, save_backbone


def test_atomic_write_keeps_old_file_on_crash(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as fh:
        fh.write('{"v": 2, "half')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_manifest_roundtrip_and_checks(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x" * 1000)
    m = write_manifest(tmp_path, "store", params={"k": 3}, inputs={"data": {"path": "/d"}},
                       files=["weights.bin"], embedding_size=128, backbone_fingerprint="sha256:abc",
                       command=["lblctl", "imprint"])
    assert m["files"][0] == {"path": "weights.bin", "bytes": 1000,
                             "fingerprint": fingerprint_file(tmp_path / "weights.bin")}
    for key in ("kind", "lblctl_version", "created_utc", "command", "params", "inputs", "embedding_size",
                "backbone_fingerprint", "files"):
        assert key in m
    assert read_manifest(tmp_path, kind="store", embedding_size=128)["params"] == {"k": 3}
    with pytest.raises(IncompatibleArtifact, match="'store' artifact, expected backbone"):
        read_manifest(tmp_path, kind="backbone")
    with pytest.raises(IncompatibleArtifact, match="embedding size 128 does not match the expected 512"):
        read_manifest(tmp_path, embedding_size=512)
    with pytest.raises(IncompatibleArtifact, match="another backbone"):
        read_manifest(tmp_path, backbone_fingerprint="sha256:def")
    (tmp_path / "weights.bin").write_bytes(b"x" * 400)  # truncated
    with pytest.raises(IncompatibleArtifact, match="truncated"):
        read_manifest(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(IncompatibleArtifact, match="missing"):
        read_manifest(tmp_path)


def test_manifest_missing_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(LblError, match="no such folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(IncompatibleArtifact, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(IncompatibleArtifact, match="unreadable manifest"):
        read_manifest(tmp_path)


def test_backbone_artifact_roundtrip_and_truncation(tmp_path: Path) -> None:
    model = create_backbone("small_cnn", 64, 32, width=8).eval()
    fp = save_backbone(tmp_path / "backbone.pt", model, arch="small_cnn", embedding_size=64,
                       preprocess=Preprocess(32, 0.6), arch_kwargs={"width": 8})
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)  # safe loading works
    assert state["arch"] == "small_cnn" and state["preprocess"] == {"input_size": 32, "center_crop": 0.6}
    bb = load_backbone(tmp_path, "cpu")  # a run folder works as well as the file
    assert bb.fingerprint == fp and bb.embedding_size == 64 and bb.preprocess.input_size == 32
    x = torch.randn(3, 3, 32, 32)
    e = bb.embed(x)
    assert e.shape == (3, 64) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(x), dim=1)
    assert torch.allclose(e, ref, atol=1e-5)
    with pytest.raises(IncompatibleArtifact, match="embedding size 64, expected 128"):
        load_backbone(tmp_path, "cpu", expect_embedding_size=128)
    data = (tmp_path / "backbone.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompatibleArtifact, match="not a readable lblctl backbone"):
        load_backbone(tmp_path / "cut.pt")
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(IncompatibleArtifact, match="not an lblctl backbone"):
        load_backbone(tmp_path / "other.pt")
    with pytest.raises(LblError, match="no such file"):
        load_backbone(tmp_path / "missing.pt")
