"""Defects a new user met in the first hour (issue 14), each pinned by a test that failed before its fix."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.cli import main
from lblctl.core.store import PrototypeStore

from .conftest import MODELS, copy_slice, lfw_identities
from .test_export import make_backbone
from .test_verify import write_pairs

CPU = torch.device("cpu")


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def cli_subprocess(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real ``lblctl`` process (stderr includes what native libraries print)."""
    return subprocess.run([sys.executable, "-m", "lblctl.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


@pytest.fixture()
def faces(tmp_path: Path) -> Path:
    """6 real LFW identities × 3 photos."""
    return copy_slice(tmp_path / "faces", lfw_identities(3, 6), 3)


# --------------------------------------------------------------------------- 1–3: wrong models as --backbone


@pytest.mark.parametrize("detector", ["scrfd_500m.onnx", "yunet.onnx"])
def test_face_detector_is_refused_as_backbone(tmp_path: Path, faces: Path, detector: str) -> None:
    """Item 1/2: a detector is not a recognition model: one readable error line, no ORT log, no store."""
    proc = cli_subprocess("imprint", "--data", str(faces), "--backbone", str(MODELS / detector),
                          "--out", str(tmp_path / "store"), "--device", "cpu")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc.stderr + proc.stdout)
    assert "not a recognition model" in line and "onnxruntime_src" not in line
    assert not (tmp_path / "store" / "prototypes.h5").exists()


def test_onnxruntime_errors_read_as_one_clause() -> None:
    """Item 2: onnxruntime's own message (YuNet run at 112×112) loses its source path and C++ signature."""
    import onnxruntime as ort

    from lblctl.models.onnx import ort_reason

    sess = ort.InferenceSession(str(MODELS / "yunet.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    with pytest.raises(Exception) as info:
        sess.run(None, {name: np.zeros((1, 3, 112, 112), np.float32)})
    reason = ort_reason(info.value)
    assert "onnxruntime_src" not in reason and "[ONNXRuntimeError]" not in reason
    assert "broadcast" in reason and "\n" not in reason


def test_backbone_given_a_store_says_what_it_is(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                 faces: Path) -> None:
    """Item 3: a store file or a store folder as --backbone is named as such, in one line."""
    PrototypeStore.create(tmp_path / "store", 32, ["a", "b"], vectors=np.eye(2, 32, dtype=np.float32)).close()
    code, _, err = run_cli(capsys, "eval", "--backbone", str(tmp_path / "store" / "prototypes.h5"),
                           "--data", str(faces), "--out", str(tmp_path / "r1"), "--device", "cpu")
    line = one_error_line(err)
    assert code == 2 and "HDF5" in line and "not a backbone" in line and "weights_only" not in line
    code, _, err = run_cli(capsys, "eval", "--backbone", str(tmp_path / "store"),
                           "--data", str(faces), "--out", str(tmp_path / "r2"), "--device", "cpu")
    line = one_error_line(err)
    assert code == 2 and "store" in line and "without backbone.pt" in line and "no such file" not in line


# --------------------------------------------------------------------------- 6, 12, 13: eval / verify-pair


@pytest.fixture()
def pairs_world(tmp_path: Path) -> dict[str, Path]:
    """12 real LFW identities × 3 photos, genuine + impostor pairs (+ 4 bad rows), a tiny backbone."""
    faces = copy_slice(tmp_path / "faces", lfw_identities(3, 12), 3)
    write_pairs(faces, tmp_path / "pairs.csv", bad=True)
    with open(tmp_path / "pairs.csv", newline="") as fh:
        good = [r for r in csv.DictReader(fh) if r["note"][0] in "gi"]
    with open(tmp_path / "good.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(good[0]))
        w.writeheader()
        w.writerows(good)
    return {"root": tmp_path, "faces": faces, "pairs": tmp_path / "pairs.csv", "good": tmp_path / "good.csv",
            "backbone": make_backbone(tmp_path / "run" / "backbone.pt")}


def test_eval_names_its_folds_and_refuses_to_overwrite(capsys: pytest.CaptureFixture,
                                                       pairs_world: dict[str, Path]) -> None:
    """Items 13 and 6: the table says 5-fold for --folds 5; a second eval into the same --out is refused
    unless --overwrite."""
    w = pairs_world
    args = ["eval", "--backbone", str(w["backbone"]), "--pairs", str(w["good"]), "--out", str(w["root"] / "rep"),
            "--folds", "5", "--device", "cpu", "--workers", "0"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "5-fold accuracy" in err and "10-fold" not in err
    assert json.loads((w["root"] / "rep" / "metrics.json").read_text())["verification"]["folds"] == 5
    before = (w["root"] / "rep" / "metrics.json").stat().st_mtime_ns
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert (w["root"] / "rep" / "metrics.json").stat().st_mtime_ns == before
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err


def test_verify_pair_far_keys_exit_status_and_overwrite(capsys: pytest.CaptureFixture,
                                                         pairs_world: dict[str, Path]) -> None:
    """Items 12, 13, 6: --far 0 is a user error; the summary names far_requested / far_measured; a row
    that failed makes the exit status 3 (documented in --help); an existing --out is refused."""
    w = pairs_world
    code, _, err = run_cli(capsys, "eval", "--backbone", str(w["backbone"]), "--pairs", str(w["good"]),
                           "--out", str(w["root"] / "rep"), "--device", "cpu", "--workers", "0")
    assert code == 0, err
    cal = str(w["root"] / "rep" / "metrics.json")
    base = ["verify-pair", "--backbone", str(w["backbone"]), "--pairs", str(w["pairs"]), "--calibration", cal,
            "--device", "cpu", "--workers", "0", "--json"]
    for bad in ("0", "1", "-0.1", "nan"):
        code, _, err = run_cli(capsys, *base, "--far", bad, "--out", str(w["root"] / "s0.csv"))
        assert code == 2 and "between 0 and 1" in one_error_line(err), err
    out = w["root"] / "scores.csv"
    code, stdout, err = run_cli(capsys, *base, "--far", "1e-1", "--out", str(out))
    assert code == 3, err  # 4 bad rows
    summary = json.loads(stdout)
    assert summary["failed"] == 4 and summary["far_requested"] == 0.1
    assert "far_measured" in summary and "far" not in summary
    code, _, err = run_cli(capsys, *base, "--far", "1e-1", "--out", str(out))
    assert code == 2 and "--overwrite" in one_error_line(err)
    code, stdout, err = run_cli(capsys, *base[:4], str(w["good"]), *base[5:], "--far", "1e-1", "--out",
                                str(w["root"] / "good_scores.csv"))
    assert code == 0 and json.loads(stdout)["failed"] == 0, err
    code, stdout, _ = run_cli(capsys, "verify-pair", "--help")
    assert code == 0 and "3 when any row failed" in " ".join(stdout.split())
