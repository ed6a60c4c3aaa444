"""The whole chain through the real CLI, as a user's shell script runs it, on a tiny real slice."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lblctl.core.artifacts import fingerprint_file

from .conftest import REPO, copy_slice, lfw_identities


def lblctl(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "lblctl.cli", *args, "--json", "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"lblctl {args[0]} failed: {res.stderr[-2000:]}"
    return json.loads(res.stdout)


def manifest(folder: Path, name: str = "manifest.json") -> dict:
    return json.loads((folder / name).read_text())


@pytest.mark.slow
def test_chain_align_to_verify(tmp_path: Path) -> None:
    raw = copy_slice(tmp_path / "raw", lfw_identities(4, 16), 4)
    w = tmp_path
    lblctl("align", "--data", str(raw), "--out", str(w / "aligned"), "--detector", "yunet",
           "--model", str(REPO / "examples" / "models" / "yunet.onnx"))
    rows = list(csv.DictReader((w / "aligned" / "faces.csv").read_text().splitlines()))
    names = sorted({r["identity"] for r in rows})
    pre, dp = names[:10], names[10:]
    for fname, keep in (("pre.csv", pre), ("dp.csv", dp)):
        with open(w / "aligned" / fname, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["identity", "image", "kind"])
            out.writerows([r["identity"], r["image"], r["kind"]] for r in rows if r["identity"] in keep)
    with open(w / "aligned" / "pairs.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id_image", "spot_image", "same"])
        first = {n: sorted(r["image"] for r in rows if r["identity"] == n) for n in dp}
        for n in dp:  # each identity's last photo against its own first photo and every other's
            out.writerow([first[n][0], first[n][-1], 1])
            out.writerows([first[m][0], first[n][-1], 0] for m in dp if m != n)
    lblctl("pretrain", "--data", str(w / "aligned" / "pre.csv"), "--out", str(w / "run"), "--input-size", "32",
           "--width", "8", "--embedding-size", "32", "--batch-size", "16", "--steps", "6", "--workers", "0")
    lblctl("imprint", "--data", str(w / "aligned" / "dp.csv"), "--backbone", str(w / "run" / "backbone.pt"),
           "--out", str(w / "store"), "--workers", "0")
    lblctl("build-index", "--store", str(w / "store"), "--candidates", "4", "--dominant", "2")
    store_before_dp = fingerprint_file(w / "store" / "manifest.json")
    t = lblctl("train-dp", "--data", str(w / "aligned" / "dp.csv"), "--backbone", str(w / "run" / "backbone.pt"),
               "--store", str(w / "store"), "--out", str(w / "run2"), "--classes", "4", "--sampled", "2",
               "--steps", "6", "--checkpoint-every", "3", "--workers", "1")
    assert t["steps"] == 6 and t["store_rows_touched"] > 0
    lblctl("eval", "--backbone", str(w / "run2"), "--store", str(w / "store"), "--pairs",
           str(w / "aligned" / "pairs.csv"), "--data", str(w / "aligned" / "dp.csv"), "--out", str(w / "report"))
    v = lblctl("verify-pair", "--backbone", str(w / "run2"), "--pairs", str(w / "aligned" / "pairs.csv"),
               "--out", str(w / "scores.csv"), "--far", "1e-1", "--calibration", str(w / "report" / "metrics.json"))
    assert v["scored"] == len(dp) ** 2 and v["failed"] == 0

    # each artifact's manifest names the artifact it came from, with that artifact's fingerprint
    def came_from(m: dict, key: str, path: Path, fingerprint: str | None = None) -> None:
        entry = m["inputs"][key]
        assert Path(entry["path"]).resolve() == path.resolve(), (key, entry)
        target = path / "manifest.json" if path.is_dir() else path
        if target.is_file():  # an artifact (or input file): its content fingerprint when it was read
            assert entry["fingerprint"] == (fingerprint or fingerprint_file(target)), (key, entry)

    assert manifest(w / "aligned")["kind"] == "aligned"
    came_from(manifest(w / "aligned"), "data", raw)
    came_from(manifest(w / "run"), "data", w / "aligned" / "pre.csv")
    store_m = manifest(w / "store")
    came_from(store_m, "backbone", w / "run" / "backbone.pt")
    came_from(store_m, "data", w / "aligned" / "dp.csv")
    came_from(manifest(w / "store", "index_manifest.json"), "store", w / "store", store_before_dp)
    run2 = manifest(w / "run2")
    came_from(run2, "backbone", w / "run" / "backbone.pt")
    came_from(run2, "store", w / "store", store_before_dp)  # train-dp then updated the store in place
    assert fingerprint_file(w / "store" / "manifest.json") != store_before_dp
    came_from(manifest(w / "report"), "backbone", w / "run2" / "backbone.pt")
    assert manifest(w / "store")["backbone_fingerprint"] == run2["backbone_fingerprint"]  # store follows train-dp
    scores = list(csv.DictReader((w / "scores.csv").read_text().splitlines()))
    assert len(scores) == len(dp) ** 2 and all(r["error"] == "" for r in scores)
