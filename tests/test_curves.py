"""Training curves (curves.png, TensorBoard) and eval --compare on real faces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lblctl.core.errors import LblError
from lblctl.core.metrics import roc_curve
from lblctl.stages.compare import ROC_NPZ, compare_reports, thin_roc
from lblctl.stages.evaluate import EvalConfig, run
from lblctl.stages.pretrain import PretrainConfig, pretrain
from lblctl.train.curves import CURVES_PNG, TB_DIR, read_log, series, write_curves
from lblctl.train.engine import CURVES_EVERY_S, LOG_FILE, TrainConfig, Trainer

from .conftest import copy_slice, lfw_identities
from .test_cli import assert_one_line_error, run_cli
from .test_eval import pairs_subset
from .test_export import make_backbone

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_slice(tmp_path_factory.mktemp("faces"), lfw_identities(3, 24), 3)


def _pretrain(data: Path, out: Path, **train) -> dict:
    cfg = PretrainConfig(data=data, out=out, arch="small_cnn", embedding_size=16, input_size=32, center_crop=0.6,
                         arch_kwargs={"width": 8}, batch_size=16, val_fraction=0.2, workers=0, epochs=2,
                         train=TrainConfig(steps=1, lr=0.05, log_every=1, seed=3, **train))
    return pretrain(cfg, CPU)


def test_pretrain_draws_curves_from_its_log(faces: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _pretrain(faces, run)
    records = read_log(run / LOG_FILE)
    for key in ("loss", "lr", "train_accuracy", "samples_per_s", "val_accuracy"):
        assert series(records, key)[1], key  # every panel has data
    assert len(series(records, "val_accuracy")[1]) == 2  # one held-out figure per epoch
    with Image.open(run / CURVES_PNG) as img:
        assert img.format == "PNG" and img.width > 600


def test_curves_are_redrawn_at_checkpoints_at_most_once_a_minute_and_at_the_end(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    trainer = Trainer(TrainConfig(steps=10), CPU, {"m": model}, [{"params": list(model.parameters())}], tmp_path)
    trainer.save_checkpoint(last=True)
    assert not (tmp_path / CURVES_PNG).exists()  # nothing logged yet: nothing to draw
    trainer.log({"step": 1, "epoch": 0, "loss": 2.0, "lr": 0.1})
    trainer.save_checkpoint()
    assert not (tmp_path / CURVES_PNG).exists()  # less than a minute into the run
    trainer._curves_at -= CURVES_EVERY_S  # a minute later
    trainer.save_checkpoint()
    first = (tmp_path / CURVES_PNG).read_bytes()
    trainer.log({"step": 2, "epoch": 0, "loss": 1.0, "lr": 0.1})
    trainer.step = 2
    trainer.save_checkpoint()  # a second drawing within CURVES_EVERY_S: skipped (a drawing costs 0.3-0.6 s)
    assert (tmp_path / CURVES_PNG).read_bytes() == first
    trainer.step = 10
    trainer.save_checkpoint()  # the run's last step: always drawn
    assert (tmp_path / CURVES_PNG).read_bytes() != first
    assert write_curves(tmp_path / "empty") is None


def test_tensorboard_events_mirror_the_log(faces: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _pretrain(faces, run, tensorboard=True)
    acc = EventAccumulator(str(run / TB_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "val_accuracy"} <= tags
    logged = series(read_log(run / LOG_FILE), "loss")
    assert [e.step for e in acc.Scalars("loss")] == logged[0]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(logged[1], rel=1e-6)


def test_tensorboard_without_the_package_is_one_error(faces: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed (import raises ImportError)
    with pytest.raises(LblError, match="lblctl\\[tb\\]"):
        TrainConfig(steps=2, tensorboard=True)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(faces), "--out", str(out), "--arch", "small_cnn",
                           "--steps", "2", "--tensorboard", "--workers", "0")
    assert_one_line_error(code, err, "--tensorboard")
    assert not (out / LOG_FILE).exists()


def test_roc_is_saved_and_compared(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pairs = pairs_subset(tmp_path / "pairs.csv", every=40)
    reports = []
    for seed in (0, 1):
        bb = make_backbone(tmp_path / f"bb{seed}" / "backbone.pt", seed=seed)
        report = tmp_path / f"report{seed}"
        run(EvalConfig(backbone=bb, out=report, pairs=pairs, workers=0), CPU)
        with np.load(report / ROC_NPZ) as z:
            metrics = json.loads((report / "metrics.json").read_text())["verification"]
            assert int(z["genuine"]) + int(z["impostor"]) == metrics["pairs"]
            auc = float(np.sum(np.diff(np.r_[z["far"], 1.0]) * (np.r_[z["tar"], 1.0][1:] + np.r_[z["tar"], 1.0][:-1])
                               / 2))
            assert auc == pytest.approx(metrics["auc"], abs=1e-9)  # the exact ROC (few pairs: not thinned)
        reports.append(report)
    summary = compare_reports(reports, tmp_path / "cmp")
    assert [r["report"] for r in summary["reports"]] == [str(r) for r in reports]
    with Image.open(tmp_path / "cmp" / "roc_compare.png") as img:
        assert img.format == "PNG"
    code, out, err = run_cli(capsys, "eval", "--compare", str(reports[0]), "--compare", str(reports[1]),
                             "--out", str(tmp_path / "cmp2"), "--json")
    assert code == 0, err
    assert len(json.loads(out)["reports"]) == 2
    code, _, err = run_cli(capsys, "eval", "--compare", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "--compare")
    (reports[1] / ROC_NPZ).unlink()
    code, _, err = run_cli(capsys, "eval", "--compare", str(reports[0]), "--compare", str(reports[1]),
                           "--out", str(tmp_path / "cmp3"))
    assert_one_line_error(code, err, "roc.npz")
    assert not (tmp_path / "cmp3").exists()


def test_thin_roc_keeps_ends_and_log_detail() -> None:
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.6, 0.1, 20000), rng.normal(0.1, 0.1, 60000)]
    same = np.r_[np.ones(20000), np.zeros(60000)].astype(int)
    far, tar, thr = roc_curve(scores, same)
    f2, t2, _ = thin_roc(far, tar, thr)
    assert len(f2) < 7000 < len(far)
    assert f2[0] == far[0] and f2[-1] == far[-1] and t2[-1] == tar[-1]
    for target in (1e-4, 1e-3, 1e-2):  # TAR at FAR read off the thinned curve equals the exact one
        assert t2[f2 <= target].max() == tar[far <= target].max()
