"""lblctl eval on real shared faces: the report's keys and figures, identification three ways."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.metrics import verification_metrics
from lblctl.data.faces import load_image, open_face_set
from lblctl.models.checkpoint import load_backbone
from lblctl.stages.evaluate import EvalConfig
from lblctl.stages.evaluate import run as evaluate

from .conftest import SHARED
from .test_export import make_backbone

CPU = torch.device("cpu")
PAIRS = SHARED / "data" / "lfw_pairs_dev.csv"
VER_KEYS = ["accuracy", "accuracy_std", "auc", "eer", "tar_at_far", "threshold_at_far", "pairs", "genuine",
            "impostor", "folds"]
ID_KEYS = ["top1", "top5", "gallery_size", "probes"]


def pairs_subset(dest: Path, every: int = 25) -> Path:
    """Every ``every``-th pair of the shared LFW pairs (all 10 folds), paths made absolute."""
    with open(PAIRS, newline="") as fh:
        rows = list(csv.DictReader(fh))[::every]
    for r in rows:
        r["id_image"] = str(PAIRS.parent / r["id_image"])
        r["spot_image"] = str(PAIRS.parent / r["spot_image"])
    with open(dest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dest


def embed_direct(bb, paths: list[str]) -> np.ndarray:
    x = torch.stack([bb.preprocess(load_image(p)) for p in paths])
    return bb.embed(x).numpy()


def test_eval_pairs_on_real_lfw(tmp_path):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    pairs = pairs_subset(tmp_path / "pairs.csv")
    summary = evaluate(EvalConfig(backbone=bb_path, out=tmp_path / "report", pairs=pairs), CPU)
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert list(written) == ["verification"] and list(written["verification"]) == VER_KEYS
    v = written["verification"]
    with open(pairs, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert v["pairs"] == len(rows) == v["genuine"] + v["impostor"]
    assert v["impostor"] < 1000
    assert v["tar_at_far"]["1e-1"] is not None and v["tar_at_far"]["1e-3"] is None
    assert v["threshold_at_far"]["1e-3"] is None and "impostor pairs" in summary["null_reasons"]["1e-3"]
    # the same figures from embeddings computed here, one image at a time, with the CSV's folds
    bb = load_backbone(bb_path)
    a = embed_direct(bb, [r["id_image"] for r in rows])
    b = embed_direct(bb, [r["spot_image"] for r in rows])
    scores = (a * b).sum(1)
    same = np.array([int(r["same"]) for r in rows])
    want, _ = verification_metrics(scores, same, np.array([int(r["fold"]) for r in rows]))
    for key in ("accuracy", "accuracy_std", "auc", "eer"):
        assert v[key] == pytest.approx(want[key], abs=1e-4)
    assert summary["folds"] == "from CSV"
    for png in ("roc.png", "scores_hist.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((tmp_path / "report" / "manifest.json").read_text())
    assert manifest["kind"] == "eval-report" and manifest["backbone_fingerprint"] == bb.fingerprint
    assert {f["path"] for f in manifest["files"]} == {"metrics.json", "roc.png", "scores_hist.png", "roc.npz"}


def _brute_force_topk(bb, faces) -> tuple[float, float, int]:
    index = open_face_set(faces)
    ids = index.select_images("id")
    gal = embed_direct(bb, [index.path(r) for r in ids])
    spots = index.select_images("spot")
    probes = embed_direct(bb, [index.path(r) for r in spots])
    order = np.argsort(-(probes @ gal.T), axis=1)
    truth = index.image_identity[spots]
    gal_ident = index.image_identity[ids]
    ranked = gal_ident[order]
    return float(np.mean(ranked[:, 0] == truth)), float(np.mean((ranked[:, :5] == truth[:, None]).any(1))), len(spots)


def test_identification_from_id_photos_matches_brute_force(tmp_path, lfw_slice):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    metrics = evaluate(EvalConfig(backbone=bb_path, out=tmp_path / "r", data=lfw_slice, batch_size=7), CPU)
    ident = metrics["identification"]
    assert list(ident) == ID_KEYS
    top1, top5, probes = _brute_force_topk(load_backbone(bb_path), lfw_slice)
    assert (ident["gallery_size"], ident["probes"]) == (12, probes) == (12, 36)
    assert ident["top1"] == pytest.approx(top1) and ident["top5"] == pytest.approx(top5)
    assert list(json.loads((tmp_path / "r" / "metrics.json").read_text())) == ["identification"]
    assert not (tmp_path / "r" / "roc.png").exists()


def test_gallery_and_probe_csvs(tmp_path, lfw_slice):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    index = open_face_set(lfw_slice)
    with open(tmp_path / "gallery.csv", "w") as g, open(tmp_path / "probes.csv", "w") as p:
        g.write("identity,image\n")
        p.write("identity,image\n")
        for i in range(index.num_identities):
            rows = index.images_of(i)
            g.write(f"{index.names[i]},{index.path(rows[0])}\n")
            for r in rows[1:]:
                p.write(f"{index.names[i]},{index.path(r)}\n")
        p.write(f"Somebody_Else,{index.path(0)}\n")  # not in the gallery: left out
    summary = metrics = evaluate(EvalConfig(backbone=bb_path, out=tmp_path / "r", gallery=tmp_path / "gallery.csv",
                                              probes=tmp_path / "probes.csv"), CPU)
    top1, top5, probes = _brute_force_topk(load_backbone(bb_path), lfw_slice)
    ident = metrics["identification"]
    assert ident["probes"] == probes and summary["probes_not_in_gallery"] == 1
    assert ident["top1"] == pytest.approx(top1) and ident["top5"] == pytest.approx(top5)


def test_identification_against_a_store(tmp_path, lfw_slice):
    from lblctl.core.store import PrototypeStore

    bb_path = make_backbone(tmp_path / "backbone.pt")
    bb = load_backbone(bb_path)
    index = open_face_set(lfw_slice)
    ids = index.select_images("id")
    vectors = embed_direct(bb, [index.path(r) for r in ids])
    names = [index.names[int(i)] for i in index.image_identity[ids]]
    # the store lists identities in another order than the folders: rows map by name
    order = np.arange(len(names))[::-1]
    with PrototypeStore.create(tmp_path / "store", bb.embedding_size, [names[k] for k in order],
                               backbone_fingerprint=bb.fingerprint, vectors=vectors[order]):
        pass
    metrics = evaluate(EvalConfig(backbone=bb_path, out=tmp_path / "r", store=tmp_path / "store",
                                        data=lfw_slice), CPU)
    top1, top5, probes = _brute_force_topk(bb, lfw_slice)
    ident = metrics["identification"]
    assert (ident["gallery_size"], ident["probes"]) == (12, probes)
    assert ident["top1"] == pytest.approx(top1) and ident["top5"] == pytest.approx(top5)
    other = make_backbone(tmp_path / "other.pt", seed=1)
    with pytest.raises(IncompatibleArtifact, match="another backbone"):
        evaluate(EvalConfig(backbone=other, out=tmp_path / "r2", store=tmp_path / "store", data=lfw_slice), CPU)


def test_option_errors(tmp_path, lfw_slice):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    cases = [
        (EvalConfig(backbone=bb_path, out=tmp_path / "r"), "nothing to evaluate"),
        (EvalConfig(backbone=bb_path, out=tmp_path / "r", gallery=tmp_path / "g.csv"), "needs --probes"),
        (EvalConfig(backbone=bb_path, out=tmp_path / "r", probes=tmp_path / "p.csv"), "needs a gallery"),
        (EvalConfig(backbone=bb_path, out=tmp_path / "r", store=tmp_path), "needs probes"),
        (EvalConfig(backbone=bb_path, out=tmp_path / "r", pairs=tmp_path / "none.csv"), "no such file"),
    ]
    for cfg, message in cases:
        with pytest.raises(LblError, match=message):
            evaluate(cfg, CPU)
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(f"id_image,spot_image\n{lfw_slice}/a.jpg,{lfw_slice}/b.jpg\n")
    with pytest.raises(LblError, match="no 'same' column"):
        evaluate(EvalConfig(backbone=bb_path, out=tmp_path / "r", pairs=unlabelled), CPU)
    assert not (tmp_path / "r").exists()  # refused before writing anything


@pytest.mark.slow
def test_cli_eval_end_to_end(tmp_path, lfw_slice):
    make_backbone(tmp_path / "run" / "backbone.pt")
    pairs = pairs_subset(tmp_path / "pairs.csv", every=40)
    proc = subprocess.run([sys.executable, "-m", "lblctl.cli", "eval", "--backbone", str(tmp_path / "run"),
                           "--pairs", str(pairs), "--data", str(lfw_slice), "--out", str(tmp_path / "report"),
                           "--flip", "--workers", "1"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "TAR @ FAR 1e-3" in proc.stderr and "top-5" in proc.stderr  # the rich table
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert list(metrics) == ["verification", "identification"]
    assert list(metrics["verification"]) == VER_KEYS and list(metrics["identification"]) == ID_KEYS
    proc = subprocess.run([sys.executable, "-m", "lblctl.cli", "eval", "--backbone", str(tmp_path / "run"),
                           "--gallery", str(pairs), "--out", str(tmp_path / "r2"), "--json"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --gallery G.csv needs --probes")
    assert proc.stdout == "" and not (tmp_path / "r2").exists()
