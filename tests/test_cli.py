"""The CLI frame: help, version, one-line errors with exit 2, --json, and kill -9 + --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lblctl import __version__
from lblctl.cli import STAGES, main

from .conftest import LFW, copy_slice, lfw_identities


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_help_lists_stages_and_version(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in STAGES:
        assert name in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"lblctl {__version__}"
    for name in STAGES:
        code, out, _ = run_cli(capsys, name, "--help")
        assert code == 0 and "Example" in out and f"lblctl {name}" in out and "--json" in out


HEAVY = ("torch", "faiss", "h5py", "cv2")


def test_help_imports_nothing_heavy() -> None:
    """`lblctl --help` and every `lblctl STAGE --help` render without torch, faiss, h5py or cv2 (a fast CLI)."""
    script = "\n".join([
        "import sys",
        "from lblctl.cli import STAGES, main",
        "for args in [['--help'], *[[n, '--help'] for n in STAGES]]:",
        "    try:",
        "        main(args)",
        "    except SystemExit as e:",
        "        assert not e.code, (args, e.code)",
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))",
    ])
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout.splitlines()[-1]
    assert "--seed" in res.stdout and "verify-pair" in res.stdout  # the help was really rendered


def test_python_m_lblctl() -> None:
    res = subprocess.run([sys.executable, "-m", "lblctl", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"lblctl {__version__}", res.stderr


def test_pretrain_help_names_every_backbone(capsys: pytest.CaptureFixture) -> None:
    from lblctl.models.backbones import list_backbones

    code, out, _ = run_cli(capsys, "pretrain", "--help")
    assert code == 0
    assert all(name in out for name in list_backbones()), out


def test_user_errors_are_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "nope", "no such folder")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no identity folders")
    (tmp_path / "text" / "bob").mkdir(parents=True)
    (tmp_path / "text" / "bob" / "a.txt").write_text("x")
    code, _, err = run_cli(capsys, "pretrain", "--data", str(tmp_path / "text"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no identity folders")
    code, _, err = run_cli(capsys, "pretrain", "--data", str(LFW), "--out", str(tmp_path / "o"), "--bogus")
    assert_one_line_error(code, err, "--bogus")
    code, _, err = run_cli(capsys, "pretrain", "--data", str(LFW), "--out", str(tmp_path / "o"), "--arch", "vit")
    assert_one_line_error(code, err, "--arch vit", "small_cnn")
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "pretrain", "--data", str(LFW), "--out", str(tmp_path / "o"),
                               "--device", "cuda")
        assert_one_line_error(code, err, "--device cuda", "no CUDA")


def test_error_text_with_brackets_is_printed_as_is(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """A path (or a gloo message) holding ``[/…]`` is text, not rich markup (it raised MarkupError)."""
    odd = tmp_path / "faces[/b]" / "nope"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(odd), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "faces[/b]", "no such folder")


def test_debug_shows_traceback(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from lblctl.core.errors import LblError

    with pytest.raises(LblError):
        main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--debug"])


def test_json_summary_and_bad_image_report(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    faces = copy_slice(tmp_path / "faces", lfw_identities(3, 16), 3)
    victim = sorted((faces / sorted(os.listdir(faces))[0]).iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:500])  # a truncated JPEG among good ones
    code, out, err = run_cli(capsys, "pretrain", "--data", str(faces), "--out", str(tmp_path / "run"),
                             "--input-size", "32", "--width", "8", "--embedding-size", "16", "--batch-size", "16",
                             "--steps", "4", "--workers", "0", "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)  # stdout is exactly one JSON object
    assert summary["steps"] == 4 and summary["problems"]["count"] == 1
    assert summary["problems"]["items"][0]["path"].endswith(victim.name)
    assert "truncated" in summary["problems"]["items"][0]["reason"]
    report = (tmp_path / "run" / "problems.csv").read_text()
    assert victim.name in report


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    faces = copy_slice(tmp_path / "faces", lfw_identities(3, 30), 3)
    base = [sys.executable, "-m", "lblctl.cli", "pretrain", "--data", str(faces), "--input-size", "32",
            "--width", "8", "--embedding-size", "16", "--batch-size", "16", "--steps", "24", "--log-every", "1",
            "--checkpoint-every", "5", "--workers", "0", "--device", "cpu", "--seed", "3", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    subprocess.run([*base, "--out", str(ref)], check=True, env=env, timeout=300)
    run = tmp_path / "run"
    proc = subprocess.Popen([*base, "--out", str(run)], env=env)

    def logged_past_checkpoint() -> bool:
        """A checkpoint is on disk and the log has gone 2 steps beyond it: killed now, the resume must redo steps."""
        ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
        if not ckpts or not (run / "log.jsonl").is_file():
            return False
        done = int(ckpts[-1].stem.split("_")[1])
        steps = [json.loads(ln).get("step", 0) for ln in (run / "log.jsonl").read_text().splitlines()
                 if ln.endswith("}")]
        return max(steps, default=0) >= done + 2

    deadline = time.time() + 120
    while not logged_past_checkpoint() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)  # polling, not a fixed wait: the kill follows the files, not the clock
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([*base, "--out", str(run), "--resume"], check=True, env=env, timeout=300)

    def losses(p: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (p / "log.jsonl").read_text().splitlines())
                if "loss" in r}

    a, b = losses(ref), losses(run)
    assert sorted(b) == list(range(1, 25))
    assert all(b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7) for s in a)
