"""verify-pair: the embedding cache, streaming with bad rows, ONNX backbones, calibration."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.data.faces import load_image
from lblctl.models.checkpoint import load_backbone, open_backbone
from lblctl.models.export import export_onnx
from lblctl.stages.evaluate import EvalConfig
from lblctl.stages.evaluate import run as evaluate
from lblctl.stages.verify import EmbeddingCache, backbone_identities, threshold_from_calibration, verify_pairs

from .conftest import copy_slice, lfw_identities
from .test_export import make_backbone


@pytest.fixture()
def faces(tmp_path) -> Path:
    """8 real LFW identities × 3 photos."""
    return copy_slice(tmp_path / "faces", lfw_identities(3, 8), 3)


def _photos(faces: Path) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(faces / d)) for d in sorted(os.listdir(faces))}


def write_pairs(faces: Path, path: Path, bad: bool = True) -> list[dict[str, str]]:
    """Genuine and impostor pairs (relative paths, an extra column), plus bad rows when asked."""
    photos = _photos(faces)
    names = list(photos)
    rows = []
    for k, name in enumerate(names):
        a, b, c = (f"faces/{name}/{f}" for f in photos[name])
        other = names[(k + 1) % len(names)]
        rows += [{"id_image": a, "spot_image": b, "same": "1", "note": f"g{k}"},
                 {"id_image": a, "spot_image": c, "same": "1", "note": f"g{k}b"},
                 {"id_image": a, "spot_image": f"faces/{other}/{photos[other][1]}", "same": "0", "note": f"i{k}"}]
    if bad:
        (path.parent / "faces" / "empty.jpg").write_bytes(b"")
        rows += [{"id_image": "faces/nobody/missing.jpg", "spot_image": rows[0]["spot_image"], "same": "1",
                  "note": "m"},
                 {"id_image": rows[0]["id_image"], "spot_image": "faces/empty.jpg", "same": "0", "note": "e"},
                 {"id_image": "", "spot_image": rows[0]["spot_image"], "same": "1", "note": "blank"},
                 {"id_image": rows[0]["id_image"], "spot_image": rows[0]["spot_image"], "same": "perhaps", "note": "s"}]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id_image", "spot_image", "same", "note"])
        w.writeheader()
        w.writerows(rows)
    return rows


def read_scores(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def direct_score(bb, root: Path, a: str, b: str) -> float:
    x = np.stack([bb.preprocess(load_image(root / a)).numpy(), bb.preprocess(load_image(root / b)).numpy()])
    import torch

    e = bb.embed(torch.from_numpy(x)).numpy()
    return float(e[0] @ e[1])


def test_cache_embeds_each_distinct_image_once(tmp_path, faces):
    bb = load_backbone(make_backbone(tmp_path / "bb.pt"))
    paths = [str(faces / d / f) for d, fs in _photos(faces).items() for f in fs]
    cache = EmbeddingCache(bb, batch_size=5, capacity=None)
    cache.ensure(paths * 3 + [str(tmp_path / "missing.jpg")] * 2)
    assert cache.embedded == len(paths) and cache.failed == 1
    assert cache.get(str(tmp_path / "missing.jpg")) == "missing file"
    for p in paths[:4]:
        np.testing.assert_allclose(cache.get(p), bb.embed(bb.preprocess(load_image(p))[None]).numpy()[0], atol=1e-6)
    cache.ensure(paths)  # all cached: nothing new runs
    assert cache.embedded == len(paths) and cache.hits >= 2 * len(paths)


def test_lru_cache_is_bounded_and_reembeds_evicted(tmp_path, faces):
    bb = load_backbone(make_backbone(tmp_path / "bb.pt"))
    paths = [str(faces / d / f) for d, fs in _photos(faces).items() for f in fs][:9]
    cache = EmbeddingCache(bb, batch_size=4, capacity=4)
    cache.ensure(paths[:4])
    first = cache.get(paths[0]).copy()
    cache.ensure(paths[1:3])  # touched: now the most recent
    cache.ensure(paths[4:6])  # evicts the two least recent: paths[0] and paths[3]
    assert len(cache) == 4 and cache.embedded == 6
    assert isinstance(cache.get(paths[0]), str) and isinstance(cache.get(paths[3]), str)
    assert not isinstance(cache.get(paths[1]), str)
    cache.ensure([paths[0]])
    assert cache.embedded == 7
    np.testing.assert_allclose(cache.get(paths[0]), first, atol=1e-6)
    with pytest.raises(LblError, match="cache-size 4"):
        cache.ensure(paths[:5])
    off = EmbeddingCache(bb, capacity=0)
    off.ensure(paths[:2] * 3)
    assert off.embedded == 6  # no cache: every occurrence runs


def test_verify_pairs_streams_bad_rows_and_matches_direct_scores(tmp_path, faces):
    bb = load_backbone(make_backbone(tmp_path / "bb.pt"))
    rows = write_pairs(faces, tmp_path / "pairs.csv")
    out = tmp_path / "scores.csv"
    summary = verify_pairs(bb, tmp_path / "pairs.csv", out, threshold=0.9, chunk_rows=5, cache_size=12,
                           batch_size=4)
    got = read_scores(out)
    assert len(got) == len(rows) and list(got[0]) == ["id_image", "spot_image", "same", "note", "score",
                                                      "same_pred", "error"]
    assert [g["note"] for g in got] == [r["note"] for r in rows]  # every row, in order, extra column kept
    by_note = {g["note"]: g for g in got}
    assert by_note["m"]["error"] == "id_image: missing file" and by_note["m"]["score"] == ""
    assert by_note["e"]["error"] == "spot_image: empty file"
    assert by_note["blank"]["error"] == "empty id_image"
    assert "perhaps" in by_note["s"]["error"]
    good = [g for g in got if not g["error"]]
    assert len(good) == 24 and summary["scored"] == 24 and summary["failed"] == 4 and summary["rows"] == 28
    for g in good[:6]:
        assert float(g["score"]) == pytest.approx(direct_score(bb, tmp_path, g["id_image"], g["spot_image"]), abs=2e-6)
        assert g["same_pred"] == str(int(float(g["score"]) >= 0.9))
    labelled = [(int(g["same"]), int(g["same_pred"])) for g in good]
    tp = sum(1 for s, p in labelled if s and p)
    fp = sum(1 for s, p in labelled if not s and p)
    assert summary["tar"] == pytest.approx(tp / 16) and summary["far_measured"] == pytest.approx(fp / 8)
    assert summary["accuracy"] == pytest.approx(np.mean([s == p for s, p in labelled]))
    # a single chunk with an unbounded cache gives the same file; the small chunks re-embedded evicted images
    out2 = tmp_path / "scores2.csv"
    summary2 = verify_pairs(bb, tmp_path / "pairs.csv", out2, threshold=0.9, chunk_rows=1000, cache_size=None)
    one, many = read_scores(out2), got
    assert [{k: v for k, v in r.items() if k != "score"} for r in one] == \
        [{k: v for k, v in r.items() if k != "score"} for r in many]
    assert all(abs(float(a["score"] or 0) - float(b["score"] or 0)) < 1e-5 for a, b in zip(one, many, strict=True))
    assert summary2["embedded"] == 24  # 8 × 3 distinct readable photos, each once
    assert summary["embedded"] >= summary2["embedded"]


def test_old_result_columns_are_replaced(tmp_path, faces):
    bb = load_backbone(make_backbone(tmp_path / "bb.pt"))
    write_pairs(faces, tmp_path / "pairs.csv", bad=False)
    verify_pairs(bb, tmp_path / "pairs.csv", tmp_path / "s1.csv", threshold=0.5)
    (tmp_path / "again.csv").write_text((tmp_path / "s1.csv").read_text().replace("faces/", str(tmp_path) + "/faces/"))
    verify_pairs(bb, tmp_path / "again.csv", tmp_path / "s2.csv", threshold=2.0)
    got = read_scores(tmp_path / "s2.csv")
    assert list(got[0]) == ["id_image", "spot_image", "same", "note", "score", "same_pred", "error"]
    assert all(g["same_pred"] == "0" for g in got)
    with pytest.raises(LblError, match="is the --pairs file"):
        verify_pairs(bb, tmp_path / "again.csv", tmp_path / "again.csv", threshold=0.5)
    (tmp_path / "nohead.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LblError, match="header lacks id_image, spot_image"):
        verify_pairs(bb, tmp_path / "nohead.csv", tmp_path / "x.csv", threshold=0.5)


@pytest.mark.parametrize("batch", [0, 1])
def test_onnx_backbone_through_verify_pair(tmp_path, faces, batch):
    bb_path = make_backbone(tmp_path / "bb.pt")
    export_onnx(bb_path, tmp_path / "m.onnx", batch=batch)
    write_pairs(faces, tmp_path / "pairs.csv")
    torch_out, onnx_out = tmp_path / "t.csv", tmp_path / "o.csv"
    verify_pairs(load_backbone(bb_path), tmp_path / "pairs.csv", torch_out, threshold=0.95, batch_size=8)
    onnx_bb = open_backbone(tmp_path / "m.onnx")
    s = verify_pairs(onnx_bb, tmp_path / "pairs.csv", onnx_out, threshold=0.95, batch_size=8)
    assert s["scored"] == 24 and s["failed"] == 4
    t, o = read_scores(torch_out), read_scores(onnx_out)
    assert [r["error"] for r in t] == [r["error"] for r in o]
    for a, b in zip(t, o, strict=True):
        if a["score"]:
            assert float(a["score"]) == pytest.approx(float(b["score"]), abs=2e-5)


def test_threshold_from_calibration(tmp_path, faces):
    bb_path = make_backbone(tmp_path / "bb.pt")
    rows = write_pairs(faces, tmp_path / "pairs.csv", bad=False)
    # 24 impostor pairs make FAR 1e-1 measurable: all ID photos against another identity's spot photo
    photos = _photos(faces)
    names = list(photos)
    extra = [{"id_image": f"faces/{n}/{photos[n][0]}", "spot_image": f"faces/{m}/{photos[m][2]}", "same": "0",
              "note": "x"} for i, n in enumerate(names) for m in names[i + 2 : i + 4]]
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id_image", "spot_image", "same", "note"])
        w.writeheader()
        w.writerows(rows + extra)
    metrics = evaluate(EvalConfig(backbone=bb_path, out=tmp_path / "report",
                                              pairs=tmp_path / "pairs.csv"), device=__import__("torch").device("cpu"))
    assert metrics["verification"]["impostor"] >= 10
    t = threshold_from_calibration(tmp_path / "report" / "metrics.json", 0.1,
                                   load_backbone(bb_path).fingerprint)
    assert t == metrics["verification"]["threshold_at_far"]["1e-1"]
    s = verify_pairs(load_backbone(bb_path), tmp_path / "pairs.csv", tmp_path / "s.csv", threshold=t)
    assert s["far_measured"] <= 0.1 and s["tar"] == pytest.approx(metrics["verification"]["tar_at_far"]["1e-1"])
    with pytest.raises(LblError, match="no threshold at FAR 1e-3"):
        threshold_from_calibration(tmp_path / "report" / "metrics.json", 1e-3)
    with pytest.raises(LblError, match="power of ten"):
        threshold_from_calibration(tmp_path / "report" / "metrics.json", 0.05)
    other = load_backbone(make_backbone(tmp_path / "other.pt", seed=1))
    with pytest.raises(IncompatibleArtifact, match="made with another backbone"):
        threshold_from_calibration(tmp_path / "report", 0.1, other.fingerprint)
    # an ONNX export of the same weights may use the report (its metadata names the source backbone)
    export_onnx(bb_path, tmp_path / "m.onnx")
    onnx_bb = open_backbone(tmp_path / "m.onnx")
    assert threshold_from_calibration(tmp_path / "report", 0.1, backbone_identities(onnx_bb)) == t
    with pytest.raises(IncompatibleArtifact, match="made with another backbone"):
        threshold_from_calibration(tmp_path / "report", 0.1, onnx_bb.fingerprint)


def test_align_on_the_fly_with_scrfd(tmp_path, faces):
    from PIL import Image

    from lblctl.stages.verify import make_dataset_factory

    from .conftest import MODELS

    bb = load_backbone(make_backbone(tmp_path / "bb.pt", center_crop=1.0))
    write_pairs(faces, tmp_path / "pairs.csv", bad=False)
    Image.new("RGB", (200, 200), (128, 128, 128)).save(tmp_path / "faces" / "blank.png")
    with open(tmp_path / "pairs.csv", "a") as fh:
        fh.write(f"faces/blank.png,{read_scores(tmp_path / 'pairs.csv')[0]['id_image']},0,blank\n")
    factory = make_dataset_factory("scrfd", MODELS / "scrfd_500m.onnx", bb.preprocess)
    s = verify_pairs(bb, tmp_path / "pairs.csv", tmp_path / "aligned.csv", threshold=0.5, dataset_factory=factory)
    verify_pairs(bb, tmp_path / "pairs.csv", tmp_path / "raw.csv", threshold=0.5)
    aligned, raw = read_scores(tmp_path / "aligned.csv"), read_scores(tmp_path / "raw.csv")
    assert s["scored"] == 24 and aligned[-1]["error"].startswith("id_image: no face found (scrfd")
    assert raw[-1]["error"] == ""  # without alignment the blank photo is just a photo
    assert any(abs(float(a["score"]) - float(r["score"])) > 1e-3 for a, r in zip(aligned[:-1], raw[:-1], strict=True))
    with pytest.raises(LblError, match="needs --align-model"):
        make_dataset_factory("yunet", None, bb.preprocess)


@pytest.mark.slow
def test_cli_verify_pair_with_onnx(tmp_path, faces):
    bb_path = make_backbone(tmp_path / "bb.pt")
    export_onnx(bb_path, tmp_path / "m.onnx", batch=1)
    write_pairs(faces, tmp_path / "pairs.csv")
    cmd = [sys.executable, "-m", "lblctl.cli", "verify-pair", "--backbone", str(tmp_path / "m.onnx"), "--pairs",
           str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "scores.csv"), "--threshold", "0.9", "--json",
           "--workers", "1", "--flip"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stderr  # rows failed: documented exit status 3
    summary = json.loads(proc.stdout)
    assert (summary["rows"], summary["scored"], summary["failed"]) == (28, 24, 4)
    assert len(read_scores(tmp_path / "scores.csv")) == 28
    manifest = json.loads((tmp_path / "scores.manifest.json").read_text())
    assert manifest["kind"] == "verify-scores" and manifest["params"]["flip"] is True
    proc = subprocess.run(cmd[:10] + ["--far", "1e-3"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "needs --calibration" in proc.stderr
