"""The training engine: schedules, a real pretrain run whose loss falls, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.runtime import seed_everything
from lblctl.models.checkpoint import load_backbone
from lblctl.stages.pretrain import PretrainConfig, pretrain
from lblctl.train.engine import StepResult, TrainConfig, Trainer, load_checkpoint, lr_factor

from .conftest import copy_slice, lfw_identities


def test_lr_schedules() -> None:
    cos = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(cos, 0) == pytest.approx(0.1) and lr_factor(cos, 9) == pytest.approx(1.0)
    assert lr_factor(cos, 10) == pytest.approx(1.0) and lr_factor(cos, 55) == pytest.approx(0.5)
    assert lr_factor(cos, 100) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(steps=100, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(step, s) for s in (0, 49, 50, 75)] == pytest.approx([1, 1, 0.1, 0.01])
    with pytest.raises(LblError, match="--optimizer"):
        TrainConfig(steps=5, optimizer="lion").validate()


def _fit_regression(tmp_path: Path, amp: str) -> tuple[list[torch.dtype], list[float], Trainer]:
    """30 steps of a 16→1 linear regression through the engine; the forward's dtype and the losses."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 16, generator=g), torch.randn(16, 1, generator=g)
    y = x @ w
    model = torch.nn.Linear(16, 1)
    trainer = Trainer(TrainConfig(steps=30, lr=0.05, amp=amp, schedule="constant", weight_decay=0.0, log_every=1),
                      torch.device("cpu"), {"model": model}, [{"params": list(model.parameters())}], tmp_path)
    dtypes: list[torch.dtype] = []

    def compute(batch: tuple[torch.Tensor, torch.Tensor]) -> StepResult:
        with trainer.autocast():
            pred = model(batch[0])
        dtypes.append(pred.dtype)
        return StepResult(torch.nn.functional.mse_loss(pred.float(), batch[1]), len(batch[0]))

    trainer.fit(lambda epoch, start: [(x, y)] * (10 - start), compute, steps_per_epoch=10)
    return dtypes, list(_losses(tmp_path).values()), trainer


def test_amp_bf16_on_cpu(tmp_path: Path) -> None:
    """--amp bf16 on CPU runs the forward in bfloat16 (CPU autocast); the weights stay float32 and train."""
    dtypes, losses, trainer = _fit_regression(tmp_path / "bf16", "bf16")
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.modules["model"].parameters())
    assert losses[-1] < 0.1 * losses[0], losses
    dtypes, losses32, _ = _fit_regression(tmp_path / "auto", "auto")  # auto: CPU stays in float32
    assert set(dtypes) == {torch.float32}
    assert losses32[-1] < 0.1 * losses32[0] and losses32 != losses


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real LFW identities × 3 photos."""
    return copy_slice(tmp_path_factory.mktemp("faces"), lfw_identities(3, 40), 3)


def _cfg(data: Path, out: Path, steps: int, **train) -> PretrainConfig:
    return PretrainConfig(
        data=data, out=out, arch="small_cnn", embedding_size=32, input_size=32, center_crop=0.6,
        arch_kwargs={"width": 8}, batch_size=24, val_fraction=0.15, workers=0,
        train=TrainConfig(steps=steps, lr=0.1, log_every=1, seed=5, **train),
    )


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_pretrain_loss_falls_and_writes_artifacts(faces: Path, tmp_path: Path) -> None:
    seed_everything(5)
    cfg = _cfg(faces, tmp_path / "run", steps=40, schedule="constant")
    cfg.flip_augment = False
    summary = pretrain(cfg, torch.device("cpu"))
    losses = _losses(tmp_path / "run")
    first, last = sum(list(losses.values())[:5]) / 5, sum(list(losses.values())[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert summary["steps"] == 40 and 0.0 <= summary["val_accuracy"] <= 1.0 and summary["val_pairs"] > 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["kind"] == "backbone" and manifest["embedding_size"] == 32
    assert manifest["backbone_fingerprint"] == summary["backbone_fingerprint"]
    assert {f["path"] for f in manifest["files"]} >= {"backbone.pt", "log.jsonl"}
    bb = load_backbone(tmp_path / "run")
    assert bb.fingerprint == summary["backbone_fingerprint"] and bb.preprocess.center_crop == 0.6


def test_exact_resume_reproduces_losses(faces: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    seed_everything(5)
    pretrain(_cfg(faces, full, steps=8, checkpoint_every=4, keep_checkpoints=5), torch.device("cpu"))
    # a run "killed" right after its step-4 checkpoint: only that checkpoint and the log up to it
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000004.pt", part / "checkpoints")
    lines = [ln for ln in (full / "log.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 6]
    (part / "log.jsonl").write_text("\n".join(lines) + "\n")  # includes lines past the checkpoint
    seed_everything(123)  # the checkpoint, not the process seed, must drive the rest
    with pytest.raises(LblError, match="--resume"):
        pretrain(_cfg(faces, part, steps=8, checkpoint_every=4), torch.device("cpu"))
    cfg = _cfg(faces, part, steps=8, checkpoint_every=4)
    cfg.resume = True
    summary = pretrain(cfg, torch.device("cpu"))
    assert summary["steps_this_run"] == 4
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    sa = load_checkpoint(full / "checkpoints" / "step_00000008.pt")["modules"]["backbone"]
    sb = load_checkpoint(part / "checkpoints" / "step_00000008.pt")["modules"]["backbone"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


def test_resume_refuses_other_options(faces: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    pretrain(_cfg(faces, run, steps=2), torch.device("cpu"))
    cfg = _cfg(faces, run, steps=2)
    cfg.train.lr = 0.5
    cfg.resume = True
    with pytest.raises(IncompatibleArtifact, match="lr=0.1"):
        pretrain(cfg, torch.device("cpu"))
