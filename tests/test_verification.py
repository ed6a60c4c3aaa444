"""The V stage of the CVC recipe: verification losses mined batch-hard inside ID + spot batches.

Contrastive and triplet losses against a brute-force mining of real-face embeddings (a loss
that mined random or easiest negatives fails), the ID + spot P×K sampler, real training steps
that lower the loss and raise ID-vs-spot pair accuracy, and ``pretrain --loss contrastive
--pk-id-spot --init`` through the CLI with its JSON summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.cli import main
from lblctl.core.errors import LblError
from lblctl.data.faces import Preprocess, load_image, open_face_set
from lblctl.models.backbones import create_backbone
from lblctl.models.losses import ContrastiveLoss, Objective, TripletLoss, hard_pair_accuracy
from lblctl.train.samplers import PKBatchSampler

from .conftest import copy_slice, lfw_identities


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def id_spot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 real LFW identities × 3 photos: the first (name order) is the ID photo, two spot photos."""
    root = copy_slice(tmp_path_factory.mktemp("ids"), lfw_identities(3, 16), 3)
    for folder in root.iterdir():
        first = sorted(folder.iterdir())[0]
        first.rename(folder / f"id_{first.name}")
    return root


def _tensors(root: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    index = open_face_set(root)
    pre = Preprocess(size, 0.6)
    x = torch.stack([pre(load_image(index.path(r))) for r in range(index.num_images)])
    return x, torch.as_tensor(index.image_identity, dtype=torch.long), index.is_id.copy()


@pytest.fixture(scope="module")
def real_embeddings(id_spot: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the 48 real photos by a seeded small CNN (real structure, many violations)."""
    x, y, _ = _tensors(id_spot)
    torch.manual_seed(0)
    model = create_backbone("small_cnn", 16, 32, width=8).eval()
    with torch.no_grad():
        return model(x), y


# ----------------------------------------------------------------------------- mining


def _reference_hardest(emb: torch.Tensor, y: torch.Tensor) -> list[tuple[int, int, int]]:
    """(anchor, hardest positive, hardest negative) by explicit loops over the cosine matrix."""
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    cos = (x @ x.T).tolist()
    out = []
    for a in range(len(y)):
        pos = [j for j in range(len(y)) if j != a and y[j] == y[a]]
        neg = [j for j in range(len(y)) if y[j] != y[a]]
        out.append((a, min(pos, key=lambda j: cos[a][j]), max(neg, key=lambda j: cos[a][j])))
    return out


def test_contrastive_batchhard_equals_explicit_hardest_mining(real_embeddings) -> None:
    emb, y = real_embeddings
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    cos = x @ x.T
    pm, nm = 0.5, 0.2
    chosen = _reference_hardest(emb, y)
    expect = sum(max(pm - cos[a, p].item(), 0) + max(cos[a, n].item() - nm, 0) for a, p, n in chosen) / len(chosen)
    got = ContrastiveLoss(pm, nm, "batchhard")(emb, y).loss.item()
    assert got == pytest.approx(expect, rel=1e-5)
    # hardest means hardest: any other choice of negative (here: each anchor's easiest, or a random
    # one) gives a smaller loss on these real faces, so a miner that does not take the hardest fails
    rng = np.random.default_rng(0)
    for pick in ("easiest", "random"):
        other = 0.0
        for a, p, _ in chosen:
            negs = [j for j in range(len(y)) if y[j] != y[a]]
            n = min(negs, key=lambda j: cos[a, j].item()) if pick == "easiest" else int(rng.choice(negs))
            other += max(pm - cos[a, p].item(), 0) + max(cos[a, n].item() - nm, 0)
        assert other / len(chosen) < got - 1e-3, pick


def test_triplet_batchhard_equals_explicit_hardest_mining(real_embeddings) -> None:
    emb, y = real_embeddings
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    d = 2 - 2 * (x @ x.T)
    m = 0.2
    expect = sum(max(d[a, p].item() - d[a, n].item() + m, 0) for a, p, n in _reference_hardest(emb, y)) / len(y)
    assert TripletLoss(m, "batchhard")(emb, y).loss.item() == pytest.approx(expect, rel=1e-5)


def test_contrastive_hand_computed_and_all_pairs_mode() -> None:
    # unit vectors at 0, 0.4 (identity 0) and 0.6, 2.0 (identity 1)
    ang = [0.0, 0.4, 0.6, 2.0]
    e = torch.tensor([[math.cos(a), math.sin(a)] for a in ang])
    y = torch.tensor([0, 0, 1, 1])
    c = lambda i, j: math.cos(ang[i] - ang[j])  # noqa: E731
    pm, nm = 0.9, 0.1
    # batch-hard: each anchor's only positive; hardest negatives 0→2, 1→2, 2→1, 3→1
    hard = [(0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1)]
    expect = sum(max(pm - c(a, p), 0) + max(c(a, n) - nm, 0) for a, p, n in hard) / 4
    assert ContrastiveLoss(pm, nm)(e, y).loss.item() == pytest.approx(expect, rel=1e-5)
    genuine = [(0, 1), (2, 3)]
    impostor = [(0, 2), (0, 3), (1, 2), (1, 3)]
    expect_all = (sum(max(pm - c(i, j), 0) for i, j in genuine) / 2
                  + sum(max(c(i, j) - nm, 0) for i, j in impostor) / 4)
    assert ContrastiveLoss(pm, nm, "all")(e, y).loss.item() == pytest.approx(expect_all, rel=1e-5)
    # hardest positive (2, 3) at cos 0.17 is below hardest negative (2, 1) at 0.98: anchors 2 and 3 fail
    assert hard_pair_accuracy(e @ e.T, y) == pytest.approx(0.5)
    with pytest.raises(LblError, match="--mining semihard"):
        ContrastiveLoss(mining="semihard")
    with pytest.raises(LblError, match="--pos-margin 0.1 --neg-margin 0.5"):
        ContrastiveLoss(0.1, 0.5)


# ----------------------------------------------------------------------------- ID + spot batches


def test_pk_id_spot_batches_hold_each_identity_s_id_photo_and_a_spot_photo() -> None:
    # 6 identities: 2 ID photos + 3 spots, 1+2, 1+1, 1+0 (left out: no spot), 0+3 (left out: no ID), 1+4
    counts = [(2, 3), (1, 2), (1, 1), (1, 0), (0, 3), (1, 4)]
    labels, is_id = [], []
    for ident, (n_id, n_spot) in enumerate(counts):
        labels += [ident] * (n_id + n_spot)
        is_id += [True] * n_id + [False] * n_spot
    labels_a, is_id_a = np.array(labels), np.array(is_id)
    s = PKBatchSampler(labels_a, 2, 3, seed=1, is_id=is_id_a)
    assert s.identities.tolist() == [0, 1, 2, 5]
    seen_ids: dict[int, set[int]] = {}
    for epoch in range(4):
        for batch in PKBatchSampler(labels_a, 2, 3, seed=1, epoch=epoch, is_id=is_id_a):
            assert len(batch) == 6
            for g in range(2):
                part = batch[3 * g:3 * g + 3]
                assert len({labels_a[i] for i in part}) == 1
                assert is_id_a[part[0]] and not is_id_a[part[1:]].any()  # the ID photo, then spots
                seen_ids.setdefault(int(labels_a[part[0]]), set()).add(part[0])
    assert seen_ids[0] == {0, 1}  # two ID photos take turns
    assert list(PKBatchSampler(labels_a, 2, 3, seed=1, is_id=is_id_a, start=1)) == \
        list(PKBatchSampler(labels_a, 2, 3, seed=1, is_id=is_id_a))[1:]
    with pytest.raises(LblError, match="only 4 identities have an ID photo and a spot photo"):
        PKBatchSampler(labels_a, 5, 2, seed=1, is_id=is_id_a)


def _id_spot_pair_accuracy(emb: torch.Tensor, y: torch.Tensor, is_id: np.ndarray) -> float:
    """Best-threshold accuracy over every ID photo × spot photo pair (genuine and impostor weighted equally)."""
    x = torch.nn.functional.normalize(emb, dim=1)
    ids, spots = np.flatnonzero(is_id), np.flatnonzero(~is_id)
    s = (x[ids] @ x[spots].T).numpy()
    same = (y[ids].view(-1, 1) == y[spots].view(1, -1)).numpy()
    best = 0.0
    for t in np.unique(s):
        best = max(best, 0.5 * ((s[same] >= t).mean() + (s[~same] < t).mean()))
    return float(best)


@pytest.mark.parametrize("name,opts", [("contrastive", {}), ("triplet", {"mining": "batchhard"})])
def test_id_spot_steps_lower_the_loss_and_raise_pair_accuracy(id_spot: Path, name: str, opts: dict) -> None:
    """Twelve SGD steps on ID + spot batches of 16 real identities (a tiny CNN, 32 px) lower the
    verification loss and raise the ID-vs-spot pair accuracy of these identities."""
    x, y, is_id = _tensors(id_spot)
    torch.manual_seed(3)
    model = create_backbone("small_cnn", 16, 32, width=8)
    obj = Objective(name, 16, 16, opts)
    assert obj.state_modules() == {}  # no classifier: the backbone alone trains
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.eval()
    with torch.no_grad():
        before = _id_spot_pair_accuracy(model(x), y, is_id)
    model.train()
    losses = []
    for step in range(12):
        batch = list(PKBatchSampler(y.numpy(), 16, 2, seed=0, epoch=step, is_id=is_id))[0]
        out = obj(model(x[batch]), y[batch])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        assert 0.0 <= out.metrics["train_accuracy"] <= 1.0
    model.eval()
    with torch.no_grad():
        after = _id_spot_pair_accuracy(model(x), y, is_id)
        final = obj(model(x), y).loss.item()
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert final < losses[0], (final, losses)
    assert after > before + 0.03, (before, after)


# ----------------------------------------------------------------------------- pretrain (the V stage)


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_pretrain_v_stage_through_the_cli(id_spot: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """C (a short cosface run) then V: ``--init C --loss contrastive --pk-id-spot``, summary as JSON."""
    common = ["--quiet", "--workers", "0", "--device", "cpu"]
    code, _, err = _cli(capsys, "pretrain", "--data", str(id_spot), "--out", str(tmp_path / "c"), "--input-size",
                        "32", "--center-crop", "0.6", "--width", "8", "--embedding-size", "16", "--steps", "2",
                        "--batch-size", "16", *common)
    assert code == 0, err
    v = ["pretrain", "--data", str(id_spot), "--init", str(tmp_path / "c"), "--loss", "contrastive",
         "--val-fraction", "0", *common]
    code, _, err = _cli(capsys, *v, "--out", str(tmp_path / "x"), "--pk-id-spot")
    assert code == 2 and err.startswith("error: --loss contrastive: needs genuine pairs")
    code, _, err = _cli(capsys, *v, "--out", str(tmp_path / "x"), "--pk-identities", "8", "--pk-images", "2",
                        "--triplet-margin", "0.3")
    assert code == 2 and "--triplet-margin: not an option of --loss contrastive" in err and len(err.splitlines()) == 1
    code, out, err = _cli(capsys, *v, "--out", str(tmp_path / "v"), "--pk-identities", "8", "--pk-images", "2",
                          "--pk-id-spot", "--steps", "3", "--lr", "0.01", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["loss"] == "contrastive" and s["classifier"] is False and s["steps"] == 3
    assert s["loss_options"] == {"pos_margin": 0.5, "neg_margin": 0.2, "mining": "batchhard"}
    assert s["batches"] == {"identities": 8, "photos_per_identity": 2, "id_spot": True, "identities_sampled": 16}
    assert s["embedding_size"] == 16 and s["input_size"] == 32  # from --init
    log = [json.loads(line) for line in (tmp_path / "v" / "log.jsonl").read_text().splitlines()]
    assert any("contrastive_loss" in r and "train_accuracy" in r for r in log)
