"""The five losses against hand-computed values, their margins, AMP-like inputs, the P×K sampler,
and real training steps on shared faces (directly and through ``pretrain``, with exact resume)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.cli import main
from lblctl.core.errors import LblError
from lblctl.core.runtime import seed_everything
from lblctl.data.faces import Preprocess, load_image, open_face_set
from lblctl.models.backbones import create_backbone
from lblctl.models.losses import (
    ArcFaceLoss,
    CenterLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    Objective,
    PairVerificationLoss,
    TripletLoss,
    build_loss,
    resolve_loss_options,
)
from lblctl.stages.pretrain import PretrainConfig, pretrain
from lblctl.train.engine import TrainConfig, load_checkpoint
from lblctl.train.samplers import PKBatchSampler

from .conftest import copy_slice, lfw_identities


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread avoids oversubscription on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


# ----------------------------------------------------------------------------- margin heads
# Two classes on the unit circle: w0 at 0 rad, w1 at π/2. Sample a at 1.0 rad (class 0), sample
# b at 3.0 rad (class 0, so θ_target = 3.0 and θ + m > π for ArcFace m = 0.5).

W = torch.tensor([unit(0.0), [0.0, 3.0]])  # unnormalised on purpose: heads normalise
E = torch.tensor([unit(1.0), [2 * v for v in unit(3.0)]])  # |b| = 2 on purpose
Y = torch.tensor([0, 0])
COS = [[math.cos(1.0), math.cos(math.pi / 2 - 1.0)], [math.cos(3.0), math.cos(3.0 - math.pi / 2)]]


def test_cosface_hand_computed() -> None:
    s, m = 4.0, 0.35
    out = CosFaceLoss(s, m)(E, W, Y)
    expect = [ce([s * (COS[i][0] - m), s * COS[i][1]], 0) for i in range(2)]
    assert out.loss.item() == pytest.approx(sum(expect) / 2, rel=1e-5)
    assert out.cosine.numpy() == pytest.approx(np.array(COS), abs=1e-6)


def test_arcface_hand_computed_with_fallback() -> None:
    s, m = 4.0, 0.5
    head = ArcFaceLoss(s, m)
    # sample a: θ + m = 1.5 ≤ π → cos(θ + m); sample b: θ + m = 3.5 > π → cos θ − m·sin m
    target = [math.cos(1.0 + m), math.cos(3.0) - m * math.sin(m)]
    expect = [ce([s * target[i], s * COS[i][1]], 0) for i in range(2)]
    assert head(E, W, Y).loss.item() == pytest.approx(sum(expect) / 2, rel=1e-5)


def test_combined_margin_hand_computed() -> None:
    """Target logit against float64 references: cos(m1·θ + m2) − m3 up to θ* = (π − m2)/m1; beyond it,
    cos θ minus the first-order (Taylor) size of the margin at θ*: −d cos/dθ(θ*)·(m1·θ* + m2 − θ*),
    the derivative taken numerically here. ArcFace (m1 = 1) gives the published cos θ − m·sin m."""
    s, m1, m2, m3 = 4.0, 1.2, 0.3, 0.1
    theta_star = (math.pi - m2) / m1
    h = 1e-5
    slope = (math.cos(theta_star + h) - math.cos(theta_star - h)) / (2 * h)
    penalty = -slope * (m1 * theta_star + m2 - theta_star)
    theta = np.linspace(0.02, math.pi - 0.02, 400)
    theta = theta[np.abs(theta - theta_star) > 1e-3]  # float32 may put the boundary itself either side
    ref = np.where(theta < theta_star, np.cos(m1 * theta + m2), np.cos(theta) - penalty) - m3
    head = CombinedMarginLoss(s, m1, m2, m3)
    got = head.target_logit(torch.tensor(np.cos(theta), dtype=torch.float32)).double().numpy()
    assert got == pytest.approx(ref, abs=5e-5)
    arc = CombinedMarginLoss(s, 1.0, 0.5, 0.0).target_logit(torch.tensor([math.cos(3.0)])).item()
    assert arc == pytest.approx(math.cos(3.0) - 0.5 * math.sin(0.5), abs=1e-6)
    # the loss over the two hand-made samples: softmax cross entropy in float64
    cos = np.array(COS)
    target = np.where(np.arccos(cos[:, 0]) < theta_star, np.cos(m1 * np.arccos(cos[:, 0]) + m2),
                      cos[:, 0] - penalty) - m3
    logits = s * np.stack([target, cos[:, 1]], 1)
    expect = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
    assert head(E, W, Y).loss.item() == pytest.approx(expect, rel=1e-5)


def test_margins_change_only_the_target_logit_exactly_as_defined() -> None:
    theta = torch.linspace(0.0, math.pi, 181, dtype=torch.float64)
    cos = torch.stack([torch.cos(theta), torch.full_like(theta, 0.3)], 1).float()
    y = torch.zeros(len(theta), dtype=torch.long)
    t = theta.float()
    cases = [
        (CosFaceLoss(10.0, 0.35), torch.cos(t) - 0.35),
        (ArcFaceLoss(10.0, 0.5),
         torch.where(t + 0.5 <= math.pi, torch.cos(t + 0.5), torch.cos(t) - 0.5 * math.sin(0.5))),
        (CombinedMarginLoss(10.0, 1.0, 0.0, 0.35), torch.cos(t) - 0.35),  # (1, 0, m) is CosFace
        (CombinedMarginLoss(10.0, 1.0, 0.5, 0.0), None),  # (1, m, 0) is ArcFace
        (CombinedMarginLoss(10.0, 1.0, 0.3, 0.2),
         torch.where(t + 0.3 <= math.pi, torch.cos(t + 0.3), torch.cos(t) - 0.3 * math.sin(0.3)) - 0.2),
    ]
    arc = ArcFaceLoss(10.0, 0.5).margin_logits(cos, y)
    for head, target in cases:
        logits = head.margin_logits(cos, y)
        assert torch.equal(logits[:, 1], 10.0 * cos[:, 1]), "non-target logits must stay s·cos θ"
        expect = arc[:, 0] / 10.0 if target is None else target
        assert torch.allclose(logits[:, 0] / 10.0, expect, atol=2e-5), type(head).__name__
        # a margin lowers the target logit everywhere and keeps it non-increasing in θ
        assert (logits[:, 0] < 10.0 * cos[:, 0] + 1e-6).all()
        assert (logits[1:, 0] <= logits[:-1, 0] + 1e-4).all()


def test_bad_margins_are_user_errors() -> None:
    with pytest.raises(LblError, match="--m1"):
        CombinedMarginLoss(m1=0.0)
    with pytest.raises(LblError, match="--mining"):
        TripletLoss(mining="hardest")
    with pytest.raises(LblError, match="--center-alpha"):
        CenterLoss(3, 4, alpha=0.0)


# ----------------------------------------------------------------------------- centre loss


def test_center_loss_hand_computed_and_centre_update() -> None:
    alpha = 0.5
    loss = CenterLoss(2, 2, alpha=alpha)
    x = torch.tensor([unit(0.0), unit(math.pi / 2), unit(math.pi)]) * 3.0  # normalised inside
    y = torch.tensor([0, 0, 1])
    assert loss(x, y).item() == pytest.approx(0.5)  # centres start at 0: ½·mean ‖x̂‖² = ½
    # class 0: Σ(x̂ − 0) = (1, 1) over n = 2 → c0 = α·(1, 1)/3; class 1: c1 = α·(−1, 0)/2
    c0, c1 = [alpha / 3, alpha / 3], [-alpha / 2, 0.0]
    assert loss.centers.numpy() == pytest.approx(np.array([c0, c1]), abs=1e-7)
    d = [(1 - c0[0]) ** 2 + c0[1] ** 2, c0[0] ** 2 + (1 - c0[1]) ** 2, (-1 - c1[0]) ** 2]
    loss.eval()  # eval mode: loss only, centres stay put
    assert loss(x, y).item() == pytest.approx(0.5 * sum(d) / 3, rel=1e-6)
    assert loss.centers.numpy() == pytest.approx(np.array([c0, c1]), abs=1e-7)


# ----------------------------------------------------------------------------- triplet loss
# Four unit vectors at angles 0, 0.4 (identity 0) and 0.6, 2.0 (identity 1); d = 2 − 2 cos Δ.


def _d(a: float, b: float) -> float:
    return 2 - 2 * math.cos(a - b)


ANG = [0.0, 0.4, 0.6, 2.0]
TE = torch.tensor([unit(a) for a in ANG])
TY = torch.tensor([0, 0, 1, 1])


def test_triplet_semihard_hand_computed() -> None:
    a = ANG
    m = 0.2
    # (anchor, positive) → negative: the closest one farther than the positive, else the farthest
    #   (0,1): negatives 2 (0.349) and 3 (2.83) are both beyond d_ap = 0.158 → 2
    #   (1,0): only 3 (2.06) is beyond 0.158 (2 is at 0.040) → 3
    #   (2,3): d_ap = 1.66, no negative beyond it → the farthest, 0 (0.349)
    #   (3,2): both beyond 1.66 → the closer, 1 (2.06)
    chosen = [(0, 1, 2), (1, 0, 3), (2, 3, 0), (3, 2, 1)]
    expect = sum(max(_d(a[i], a[p]) - _d(a[i], a[n]) + m, 0.0) for i, p, n in chosen) / 4
    assert expect > 0.3
    assert TripletLoss(m, "semihard")(TE, TY).loss.item() == pytest.approx(expect, rel=1e-5)


def test_triplet_batchhard_hand_computed() -> None:
    a = ANG
    m = 0.2
    chosen = [(0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1)]  # farthest positive, closest negative
    expect = sum(max(_d(a[i], a[p]) - _d(a[i], a[n]) + m, 0.0) for i, p, n in chosen) / 4
    assert TripletLoss(m, "batchhard")(TE, TY).loss.item() == pytest.approx(expect, rel=1e-5)


def test_triplet_without_positives_is_zero_but_differentiable() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    out = TripletLoss()(x, torch.arange(4))
    out.loss.backward()
    assert out.loss.item() == 0.0 and x.grad is not None


# ----------------------------------------------------------------------------- pair verification


def test_pair_verification_hand_computed() -> None:
    head = PairVerificationLoss(2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, -2.0]]))
        head.fc.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([unit(0.0), unit(0.0), unit(math.pi / 2)]) * 2.0
    y = torch.tensor([5, 5, 7])
    # pair (0,1): same photo direction → feature (0,0) → logits = bias (0, 1), label same (1)
    # pairs (0,2), (1,2): feature (1−0)², (0−1)² = (1, 1) → logits (1.5, −2), label different (0)
    genuine = ce([0.0, 1.0], 1)
    impostor = ce([1.5, -2.0], 0)
    assert head(x, y).item() == pytest.approx(0.5 * (genuine + impostor), rel=1e-6)


# ----------------------------------------------------------------------------- AMP-like inputs


def test_gradients_finite_with_fp16_inputs() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 16)
    emb = torch.randn(8, 16) * 300
    emb[0] = w[2] * 1000  # exactly on a prototype: cos = 1 (the arccos edge)
    emb[1] = -w[3]  # exactly opposite its prototype: cos = −1, deep in the fallback region
    emb[2] = emb[3]  # two identical embeddings: distance 0 for triplet / pair
    y = torch.tensor([2, 3, 0, 0, 1, 1, 4, 4])
    half = emb.half().requires_grad_(True)
    weight = w.half().requires_grad_(True)
    heads = [CosFaceLoss(64, 0.35), ArcFaceLoss(64, 0.5), CombinedMarginLoss(64, 1.2, 0.4, 0.15)]
    for head in heads:
        out = head(half, weight, y)
        grads = torch.autograd.grad(out.loss, [half, weight])
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads), type(head).__name__
        assert grads[0].dtype == torch.float16
    others = [lambda e: TripletLoss(0.2, "semihard")(e, y).loss, lambda e: TripletLoss(0.2, "batchhard")(e, y).loss,
              lambda e: PairVerificationLoss(16)(e, y), lambda e: CenterLoss(5, 16)(e, y)]
    for fn in others:
        (g,) = torch.autograd.grad(fn(half), [half])
        assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------- options


def test_loss_options_defaults_and_refusals() -> None:
    assert resolve_loss_options("cosface", {}) == {"s": 24.0, "m": 0.2}
    assert resolve_loss_options("arcface", {"s": 32.0}) == {"s": 32.0, "m": 0.5}
    assert resolve_loss_options("center", {"head": "arcface"})["m"] == 0.5
    with pytest.raises(LblError, match="--m1: not an option of --loss arcface"):
        resolve_loss_options("arcface", {"m1": 1.1})
    with pytest.raises(LblError, match="--center-weight"):
        resolve_loss_options("pair", {"center_weight": 0.1})
    with pytest.raises(LblError, match="--scale"):
        resolve_loss_options("triplet", {"s": 30.0})
    with pytest.raises(LblError, match="--loss softmax: unknown"):
        resolve_loss_options("softmax", {})
    with pytest.raises(LblError, match="--head"):
        Objective("pair", 3, 4, {"head": "triplet"})
    assert isinstance(build_loss("combined", s=30.0, m3=0.1), CombinedMarginLoss)
    assert build_loss("arcface").s == 64.0 and build_loss("cosface", s=30.0).m == 0.2
    with pytest.raises(LblError, match="--margin: not an option of --loss combined"):
        build_loss("combined", s=30.0, m=0.2)
    with pytest.raises(LblError, match="unknown margin head"):
        build_loss("triplet")
    obj = Objective("center", 3, 4, {})
    assert set(obj.state_modules()) == {"head", "center"}
    assert set(Objective("triplet", 3, 4, {}).state_modules()) == set()


# ----------------------------------------------------------------------------- P×K sampler


def test_pk_sampler_is_balanced_deterministic_and_resumable() -> None:
    counts = [1, 2, 3, 5, 9, 4, 1, 6, 2]  # identities 0 and 6 have a single photo
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    s = PKBatchSampler(labels, p=2, k=3, seed=1)
    batches = list(s)
    assert len(batches) == s.batches_per_epoch() == 31 // 6 == len(s)  # 31 photos of eligible identities
    used: dict[int, list[int]] = {}
    for b in batches:
        ids = labels[b]
        assert len(b) == 6 and len(set(ids)) == 2 and all((ids == i).sum() == 3 for i in set(ids))
        assert {0, 6}.isdisjoint(ids)
        for i in set(ids):
            rows = [r for r in b if labels[r] == i]
            assert len(set(rows)) == min(3, counts[i])  # no repeat inside a visit unless too few photos
            used.setdefault(int(i), []).extend(rows)
    for i in (4, 7):  # 9 and 6 photos: every visit of the epoch takes photos not used before
        assert len(set(used.get(i, []))) == len(used.get(i, []))
    assert len(used) >= 5  # identities are spread over the epoch (2 rounds of 3 batches)
    assert batches == list(PKBatchSampler(labels, 2, 3, seed=1))
    assert batches != list(PKBatchSampler(labels, 2, 3, seed=1, epoch=1))
    assert list(PKBatchSampler(labels, 2, 3, seed=1, start=2)) == batches[2:]
    with pytest.raises(LblError, match="--pk-identities 8"):
        PKBatchSampler(labels, 8, 4, seed=1)
    with pytest.raises(LblError, match="at least 2"):
        PKBatchSampler(labels, 3, 1, seed=1)


# ----------------------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 real LFW identities × 4 photos."""
    return copy_slice(tmp_path_factory.mktemp("faces"), lfw_identities(4, 30), 4)


@pytest.mark.parametrize("name,opts", [
    ("cosface", {}), ("arcface", {"s": 16.0}), ("combined", {"s": 16.0}), ("center", {"center_weight": 1.0}),
    ("pair", {"pair_weight": 1.0}), ("triplet", {"mining": "semihard"}), ("triplet", {"mining": "batchhard"}),
])
def test_real_steps_lower_each_loss(faces: Path, name: str, opts: dict) -> None:
    """Eight full-batch SGD steps of a tiny small_cnn on 8 identities × 4 real photos, 32 px."""
    index = open_face_set(faces)
    pre = Preprocess(32, 0.6)
    ids = list(range(8))
    rows = np.concatenate([index.images_of(i) for i in ids])
    x = torch.stack([pre(load_image(index.path(int(r)))) for r in rows])
    y = torch.as_tensor(index.image_identity[rows], dtype=torch.long)
    torch.manual_seed(3)
    model = create_backbone("small_cnn", 32, 32, width=8)
    obj = Objective(name, len(ids), 32, opts)
    params = list(model.parameters()) + [p for m in obj.state_modules().values() for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        out = obj(model(x), y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] > 0 and losses[-1] < 0.9 * losses[0], losses
    if name == "center":
        assert obj.center is not None and obj.center.centers.abs().sum() > 0


def _pcfg(data: Path, out: Path, loss: str, opts: dict, steps: int, **train) -> PretrainConfig:
    return PretrainConfig(
        data=data, out=out, arch="small_cnn", embedding_size=16, input_size=32, center_crop=0.6,
        arch_kwargs={"width": 8}, batch_size=24, val_fraction=0.2, workers=0, loss=loss, loss_kwargs=opts,
        pk_identities=6, pk_images=4, train=TrainConfig(steps=steps, lr=0.1, log_every=1, seed=2, **train),
    )


def _log(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.parametrize("loss,opts", [("center", {"center_weight": 0.5}), ("pair", {}), ("triplet", {})])
def test_pretrain_pk_losses_resume_exactly(faces: Path, tmp_path: Path, loss: str, opts: dict) -> None:
    """P×K pretrain runs; a run resumed from its step-3 checkpoint repeats the losses of steps 4–6
    (centres, pair head and sampler position all come back from the checkpoint)."""
    full, part = tmp_path / "full", tmp_path / "part"
    seed_everything(2)
    summary = pretrain(_pcfg(faces, full, loss, dict(opts), 6, checkpoint_every=3, keep_checkpoints=5),
                       torch.device("cpu"))
    assert summary["loss"] == loss and summary["steps"] == 6 and 0 <= summary["val_accuracy"] <= 1
    state = load_checkpoint(full / "checkpoints" / "step_00000006.pt")
    expected_modules = {"center": {"backbone", "head", "center"}, "pair": {"backbone", "head", "pair"},
                        "triplet": {"backbone"}}[loss]
    assert set(state["modules"]) == expected_modules
    if loss == "center":
        assert state["modules"]["center"]["centers"].abs().sum() > 0
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_00000003.pt", part / "checkpoints")
    seed_everything(99)
    cfg = _pcfg(faces, part, loss, dict(opts), 6, checkpoint_every=3)
    cfg.resume = True
    assert pretrain(cfg, torch.device("cpu"))["steps_this_run"] == 3
    a, b = _log(full), _log(part)
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)
    # resuming with other loss options is refused
    cfg = _pcfg(faces, part, loss, {**opts, "pair_weight": 0.9} if loss == "pair" else dict(opts), 6)
    cfg.resume, cfg.pk_images = True, 3
    with pytest.raises(LblError, match="--resume"):
        pretrain(cfg, torch.device("cpu"))


def test_pretrain_refuses_invalid_loss_combinations(faces: Path, tmp_path: Path) -> None:
    cfg = _pcfg(faces, tmp_path / "r", "triplet", {}, 2)
    cfg.pk_identities = cfg.pk_images = 0
    with pytest.raises(LblError, match="--loss triplet: needs .*--pk-identities"):
        pretrain(cfg, torch.device("cpu"))
    cfg = _pcfg(faces, tmp_path / "r", "cosface", {}, 2)
    cfg.pk_images = 0
    with pytest.raises(LblError, match="give both"):
        pretrain(cfg, torch.device("cpu"))
    with pytest.raises(LblError, match="--center-alpha: not an option of --loss arcface"):
        pretrain(_pcfg(faces, tmp_path / "r", "arcface", {"center_alpha": 0.3}, 2), torch.device("cpu"))
    assert not (tmp_path / "r").exists()  # refused before any work


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_cli_triplet_needs_pk_and_runs_with_it(faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["pretrain", "--data", str(faces), "--input-size", "32", "--center-crop", "0.6", "--width", "8",
            "--embedding-size", "16", "--steps", "2", "--quiet", "--workers", "0", "--device", "cpu"]
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "a"), "--loss", "triplet")
    assert code == 2 and err.startswith("error: --loss triplet") and "--pk-identities" in err
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "a"), "--pk-identities", "4", "--pk-images", "4",
                        "--batch-size", "10")
    assert code == 2 and "--batch-size 10" in err
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "a"), "--loss", "cosface", "--m2", "0.3")
    assert code == 2 and "--m2: not an option of --loss cosface" in err
    code, out, err = _cli(capsys, *base, "--out", str(tmp_path / "b"), "--loss", "triplet", "--mining", "batchhard",
                          "--pk-identities", "4", "--pk-images", "3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["loss"] == "triplet" and summary["loss_options"] == {"triplet_margin": 0.2, "mining": "batchhard"}
    assert (tmp_path / "b" / "backbone.pt").is_file()
