"""Defects a new user met in the first hour (issue 14), each pinned by a test that failed before its fix."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.cli import main
from lblctl.core.queues import Queues
from lblctl.core.store import PrototypeStore

from .conftest import MODELS, copy_slice, imprinted_world, lfw_identities
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


# --------------------------------------------------------------------------- 9, 11: train-dp / build-index values


@pytest.fixture(scope="module")
def dp_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 real LFW identities × 3 photos, an untrained small CNN (32 px), an imprinted store (no queues)."""
    return imprinted_world(tmp_path_factory.mktemp("dpw"))[0]


def indexed_store(capsys: pytest.CaptureFixture, dp_world: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(dp_world["store"], dest)
    code, _, err = run_cli(capsys, "build-index", "--store", str(dest), "--candidates", "8", "--dominant", "4",
                           "--json")
    assert code == 0, err
    return dest


def train_dp_args(dp_world: dict[str, Path], store: Path, out: Path, *extra: str) -> list[str]:
    return ["train-dp", "--data", str(dp_world["faces"]), "--backbone", str(dp_world["backbone"]),
            "--store", str(store), "--out", str(out), "--workers", "0", "--device", "cpu", "--json", *extra]


def test_clamped_sizes_are_reported(capsys: pytest.CaptureFixture, dp_world: dict[str, Path],
                                    tmp_path: Path) -> None:
    """Item 9: K/S and queue widths larger than N are cut with a warning, and the summary holds what was used."""
    store = tmp_path / "store"
    shutil.copytree(dp_world["store"], store)
    code, out, err = run_cli(capsys, "build-index", "--store", str(store), "--candidates", "50", "--dominant", "20",
                             "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["candidates"], summary["dominant"]) == (39, 20)
    assert "using --candidates 39" in " ".join(err.split())
    with Queues.open(store, "r") as q:
        assert q.dominant(np.arange(3)).shape[1] == 20
    code, out, err = run_cli(capsys, *train_dp_args(dp_world, store, tmp_path / "run2", "--classes", "1024",
                                                    "--sampled", "256", "--steps", "1"))
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["classes"], summary["sampled"]) == (40, 40)
    assert "using --classes 40 --sampled 40" in " ".join(err.split())


def test_each_loss_gets_its_own_defaults(capsys: pytest.CaptureFixture, dp_world: dict[str, Path],
                                         tmp_path: Path) -> None:
    """Item 11: train-dp --loss arcface trains with s = 64, m = 0.5 unless given (not cosface's 24 / 0.2)."""
    store = indexed_store(capsys, dp_world, tmp_path / "store")
    base = train_dp_args(dp_world, store, tmp_path / "a", "--classes", "8", "--sampled", "2", "--steps", "1",
                         "--out-store")
    code, out, err = run_cli(capsys, *base, str(tmp_path / "sa"), "--loss", "arcface")
    assert code == 0, err
    assert json.loads(out)["loss"] == {"name": "arcface", "s": 64.0, "m": 0.5}
    base[base.index("--out") + 1] = str(tmp_path / "b")
    code, out, err = run_cli(capsys, *base, str(tmp_path / "sb"), "--loss", "arcface", "-m", "0.3")
    assert code == 0, err
    assert json.loads(out)["loss"] == {"name": "arcface", "s": 64.0, "m": 0.3}
    base[base.index("--out") + 1] = str(tmp_path / "c")
    code, out, err = run_cli(capsys, *base, str(tmp_path / "sc"))
    assert code == 0, err
    assert json.loads(out)["loss"] == {"name": "cosface", "s": 24.0, "m": 0.2}


# ------------------------------------------------------------------ 5: Ctrl-C / SIGTERM save, say how to resume


def interrupt_when(cmd: list[str], ready: Path, sig: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``lblctl`` ARGS, send ``sig`` once ``ready`` exists (no fixed sleeps), return the finished process."""
    proc = subprocess.Popen([sys.executable, "-m", "lblctl.cli", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def resume_command(err: str) -> list[str]:
    lines = err.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("interrupted: saved checkpoint"))
    cmd = shlex.split(lines[i + 1])
    assert cmd[0] == "lblctl" and cmd[-1] == "--resume"
    return cmd[1:]


def saved_step(err: str) -> int:
    line = next(ln for ln in err.splitlines() if ln.startswith("interrupted: saved checkpoint"))
    return int(line.split("(step ")[1].split(" ")[0])


def test_interrupted_train_dp_checkpoints_and_prints_the_resume_command(
        capsys: pytest.CaptureFixture, dp_world: dict[str, Path], tmp_path: Path) -> None:
    """Item 5: SIGINT after the first checkpoint → a checkpoint at the current step, the store committed at
    it, the exact --resume command printed; that command resumes from there and SIGTERM saves again."""
    store = indexed_store(capsys, dp_world, tmp_path / "store")
    out = tmp_path / "run2"
    args = train_dp_args(dp_world, store, out, "--classes", "8", "--sampled", "2", "--steps", "100000",
                         "--checkpoint-every", "3")
    proc = interrupt_when(args, out / "checkpoints" / "step_00000003.pt", signal.SIGINT)
    assert proc.returncode == 130, proc.stderr
    step = saved_step(proc.stderr)
    assert step >= 3 and (out / "checkpoints" / f"step_{step:08d}.pt").exists()
    with PrototypeStore.open(store, "r") as st:
        assert st.committed_step == step  # every step up to the checkpoint written back, none after
    again = resume_command(proc.stderr)
    assert again == [*args, "--resume"]
    later = out / "checkpoints" / f"step_{(step // 3 + 1) * 3:08d}.pt"
    proc2 = interrupt_when(again, later, signal.SIGTERM)
    assert proc2.returncode == 130, proc2.stderr
    assert f"resuming train-dp from step {step}" in proc2.stderr
    assert saved_step(proc2.stderr) > step


def test_interrupted_imprint_keeps_finished_identities(tmp_path: Path, dp_world: dict[str, Path]) -> None:
    """Item 5 (imprint): an interrupt between batches commits the identities done; --resume finishes the
    store with the same prototypes as an uninterrupted run."""
    from lblctl.stages.imprint import ImprintConfig, imprint
    from lblctl.train.engine import Interrupted

    def cfg(out: Path, resume: bool = False) -> ImprintConfig:
        return ImprintConfig(out=out, data=dp_world["faces"], backbone=dp_world["backbone"], photos="all",
                             batch_size=8, checkpoint_identities=4, resume=resume)

    with pytest.raises(Interrupted, match=r"of 40\) in"):
        imprint(cfg(tmp_path / "s"), CPU, on_checkpoint=lambda done: os.kill(os.getpid(), signal.SIGINT))
    summary = imprint(cfg(tmp_path / "s", resume=True), CPU)
    assert summary["resumed_from"] > 0 and summary["imprinted"] == 40
    imprint(cfg(tmp_path / "ref"), CPU)
    with PrototypeStore.open(tmp_path / "s", "r") as a, PrototypeStore.open(tmp_path / "ref", "r") as b:
        np.testing.assert_allclose(a.gather(np.arange(40)), b.gather(np.arange(40)), atol=1e-6)


# --------------------------------------------------------------------------- 4: a finished train-dp given --resume


def test_finished_train_dp_with_resume_reports_complete(capsys: pytest.CaptureFixture, dp_world: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Item 4: --resume on a finished run exits 0 with the same summary; a different length says how to
    continue from it; neither touches the trained store nor advises re-imprinting."""
    store = indexed_store(capsys, dp_world, tmp_path / "store")
    out = tmp_path / "run2"
    args = train_dp_args(dp_world, store, out, "--classes", "8", "--sampled", "2", "--steps", "3")
    code, first, err = run_cli(capsys, *args)
    assert code == 0, err
    with PrototypeStore.open(store, "r") as st:
        trained = st.gather(np.arange(40)).copy()
    code, again, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    a, b = json.loads(first), json.loads(again)
    assert b.pop("already_complete") is True and a == b
    code, _, err = run_cli(capsys, *args)
    line = one_error_line(err)
    assert code == 2 and "finished" in line and f"--backbone {out}" in line and "imprint" not in line
    code, _, err = run_cli(capsys, *args[:-1], "6", "--resume")
    line = one_error_line(err)
    assert code == 2 and "--out NEW_FOLDER" in line and "imprint" not in line
    with PrototypeStore.open(store, "r") as st:
        np.testing.assert_array_equal(st.gather(np.arange(40)), trained)
    nxt = train_dp_args(dp_world, store, tmp_path / "run3", "--classes", "8", "--sampled", "2", "--steps", "2")
    code, _, err = run_cli(capsys, *nxt)  # the trained store with the backbone it started from
    line = one_error_line(err)
    assert code == 2 and "--backbone RUN2" in line and "re-imprint the" not in line
    code, _, err = run_cli(capsys, "eval", "--backbone", str(dp_world["backbone"]), "--store", str(store), "--data",
                           str(dp_world["faces"]), "--out", str(tmp_path / "rep"), "--device", "cpu")
    line = one_error_line(err)
    assert code == 2 and "--backbone RUN2" in line and "re-imprint the" not in line
    nxt[nxt.index("--backbone") + 1] = str(out)
    code, _, err = run_cli(capsys, *nxt)  # the advice works: train further from RUN2
    assert code == 0, err


# ------------------------------------------------------------------- 7: every image mode decodes to the face


def _modes(src: Path) -> dict[str, object]:
    from PIL import Image

    rgb = Image.open(src).convert("RGB")
    gray = rgb.convert("L")
    g16 = np.asarray(gray, dtype=np.uint16) * 257
    opaque = Image.new("L", gray.size, 255)
    return {
        "I;16.png": Image.fromarray(g16),
        "I;16B.tif": Image.fromarray(g16).convert("I").convert("I;16B"),
        "I.tif": Image.fromarray(g16.astype(np.int32)),
        "F.tif": Image.fromarray(g16.astype(np.float32) / 65535.0),
        "LA.png": Image.merge("LA", (gray, opaque)),
        "P+transparency.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=255),
        "1.png": gray.convert("1"),
        "P.gif": rgb.convert("P"),
    }


def test_every_image_mode_decodes_to_the_face(tmp_path: Path) -> None:
    """Item 7: 16-bit, 32-bit, float, grey + alpha, palette + alpha and 1-bit photos decode to the face
    (scaled to 8 bits), never to a white or black image."""
    from PIL import Image

    from lblctl.data.faces import load_image

    src = Path(lfw_identities(1, 1)[0])
    from .conftest import LFW

    src = LFW / src / sorted(os.listdir(LFW / src))[0]
    ref = np.asarray(Image.open(src).convert("L"), dtype=np.float64)
    for name, img in _modes(src).items():
        path = tmp_path / f"face_{name}"
        img.save(path, **({"transparency": 255} if "transparency" in name else {}))
        got = np.asarray(load_image(path).convert("L"), dtype=np.float64)
        corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
        assert corr > {"1": 0.4, "P": 0.9}.get(name[0], 0.97), (name, Image.open(path).mode, corr)
        assert 20 < got.mean() < 235, (name, got.mean())


# ------------------------------------------------------------ 8: one list of image types, skipped files reported


def test_align_takes_gif_and_reports_files_it_skips(capsys: pytest.CaptureFixture, faces: Path,
                                                    tmp_path: Path) -> None:
    """Item 8: a .gif photo is aligned like the others (verify-pair scores it too); a file that is not an
    image type is listed with its reason, never dropped silently."""
    from PIL import Image

    person = sorted(p for p in faces.iterdir())[0]
    jpg = sorted(person.iterdir())[0]
    Image.open(jpg).convert("P").save(person / "spot_gif.gif")
    (person / "notes.txt").write_text("not a photo")
    code, out, err = run_cli(capsys, "align", "--data", str(faces), "--out", str(tmp_path / "al"), "--detector",
                             "none", "--json", "--workers", "1")
    assert code == 0, err
    with open(tmp_path / "al" / "align_report.csv", newline="") as fh:
        report = {r["image"]: r for r in csv.DictReader(fh)}
    assert report[f"{person.name}/spot_gif.gif"]["status"] == "aligned"
    assert json.loads(out)["skipped_files"] == 1
    skipped = [r for r in report.values() if r["status"] == "skipped"]
    assert [r["image"] for r in skipped] == [f"{person.name}/notes.txt"]
    assert skipped[0]["reason"].startswith("not an image type")
    # a second run reads its own report back: the skipped row is reported again, nothing is re-aligned
    code, out, err = run_cli(capsys, "align", "--data", str(faces), "--out", str(tmp_path / "al"), "--detector",
                             "none", "--json", "--workers", "1")
    assert code == 0, err
    assert json.loads(out)["this_run"]["processed"] == 0 and json.loads(out)["skipped_files"] == 1


# ---------------------------------------------------------------------- 10: reasons never round across the limit


def test_small_face_reason_reads_below_the_limit(capsys: pytest.CaptureFixture, faces: Path,
                                                 tmp_path: Path) -> None:
    """Item 10: a face of 23.58 px is reported as 23.6 px < --min-size 24, not 24 px < 24 (real YuNet boxes)."""
    import math

    yunet = ["--detector", "yunet", "--model", str(MODELS / "yunet.onnx"), "--workers", "1", "--quiet"]
    code, _, err = run_cli(capsys, "align", "--data", str(faces), "--out", str(tmp_path / "a"), *yunet)
    assert code == 0, err
    with open(tmp_path / "a" / "align_report.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["box"]]
    sides = {r["image"]: min(b[2] - b[0], b[3] - b[1]) for r in rows
             for b in [[float(v) for v in r["box"].split()]]}
    image, side = next((k, v) for k, v in sides.items() if v % 1 >= 0.5)  # a side that rounds up
    one = tmp_path / "one" / image.split("/")[0]
    one.mkdir(parents=True)
    shutil.copyfile(faces / image, one / Path(image).name)
    limit = math.floor(side) + 1
    code, _, err = run_cli(capsys, "align", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "b"),
                           "--min-size", str(limit), *yunet)
    assert code == 0, err
    with open(tmp_path / "b" / "align_report.csv", newline="") as fh:
        reason = next(csv.DictReader(fh))["reason"]
    assert reason.startswith("small_face (") and f"< --min-size {limit})" in reason, reason
    assert float(reason.split("(")[1].split(" px")[0]) < limit, reason


# --------------------------------------------------------------------------- 14, 16: flags, dead code, help


def test_flags_mean_what_they_say(capsys: pytest.CaptureFixture, dp_world: dict[str, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 14: export has no --device to ignore; seeding leaves PYTHONHASHSEED alone (it acts only at start-up);
    align's --workers 0 works in this process as elsewhere; --out-store keeps index_manifest.json; dead code gone."""
    import lblctl.core.artifacts as artifacts
    import lblctl.core.queues as queues
    import lblctl.stages.align as align
    import lblctl.stages.index as index
    from lblctl.core.runtime import seed_everything

    code, _, err = run_cli(capsys, "export", "--backbone", str(dp_world["backbone"]), "--out",
                           str(tmp_path / "m.onnx"), "--device", "cuda")
    assert code == 2 and "--device" in one_error_line(err)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    seed_everything(3)
    assert "PYTHONHASHSEED" not in os.environ
    for module, name in ((artifacts, "fingerprint_tree"), (align, "config_dict"), (queues, "PAD"), (index, "_null")):
        assert not hasattr(module, name), name
    code, out, err = run_cli(capsys, "align", "--data", str(dp_world["faces"]), "--out", str(tmp_path / "al"),
                             "--detector", "none", "--workers", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["workers"] == 1 and "1 worker(s)" in " ".join(err.split())
    store = indexed_store(capsys, dp_world, tmp_path / "store")
    code, _, err = run_cli(capsys, *train_dp_args(dp_world, store, tmp_path / "r", "--classes", "8", "--sampled",
                                                  "2", "--steps", "1", "--out-store", str(tmp_path / "copy")))
    assert code == 0, err
    assert (tmp_path / "copy" / "index_manifest.json").read_bytes() == (store / "index_manifest.json").read_bytes()


def test_help_texts(capsys: pytest.CaptureFixture) -> None:
    """Item 16: no machine paths, option names as they are, readable type column, a top-level example."""
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "Example" in out and "quickstart.sh" in out
    for name in ("eval", "export", "verify-pair", "train-dp", "align"):
        code, out, _ = run_cli(capsys, name, "--help")
        assert code == 0
        assert "/work/" not in out and "<bool>" not in out and "list[" not in out, name
    code, out, _ = run_cli(capsys, "export", "--help")
    assert "--check-images" not in out and "--check-image" in out
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert "../shared/data/lfw_pairs_dev.csv" in " ".join(out.split()).replace(" ", "")\
        or "../shared/data/lfw_pairs_dev.csv" in out
