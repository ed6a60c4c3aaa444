"""Defects a new user met in the first hour (issue 14), each pinned by a test that failed before its fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.cli import main
from lblctl.core.store import PrototypeStore

from .conftest import MODELS, copy_slice, lfw_identities

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
