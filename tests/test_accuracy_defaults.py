"""train-dp, run as the README shows it (backbone fine-tuned, default options), must not end worse
than what a user gets without it.

The baseline a user tries first is imprinting every identity from all its training photos
(imprint-all). The world is small and real: a tiny small_cnn pretrained on ORL's people s1–s20;
ORL's people s21–s40 are the ID/spot set (photo 1 the ID photo, 2–3 spot photos, 4–10 held out as
probes). The pipeline is the README's: ``imprint --photos all`` → ``build-index`` → ``train-dp``
with the backbone trainable and every option at its default except the run's size (K, S, steps).
Closed-set top-1 of the probes against all prototypes must be no worse than imprint-all's.

Measured on this seed (top-1 of 140 probes), with this code (issue 17's session): imprint-ID 0.636,
imprint-all 0.643, train-dp defaults 0.700, the same with BatchNorm statistics frozen (``--freeze-bn``)
0.593, with ``--hard-fraction 1`` (every non-sampled class from the dominant queues, the former behaviour)
0.650. (An earlier session measured 0.579 / 0.586 / 0.707 / 0.629 here, before later changes to the code.)
With ``hard_fraction`` 1 as the default the test fails (measured: at the BatchNorm assertion, 0.650 vs 0.714
with both runs queues-only); the third assertion (a store with photo-less identities too) tests the queue
share directly. The second assertion fails when ``freeze_bn`` is the default.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.cli import main
from lblctl.core.store import PrototypeStore
from lblctl.models.checkpoint import load_backbone
from lblctl.models.embed import embed_paths

from .conftest import ORL

STEPS = 30


def _cli(*args: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([*args, "--quiet", "--device", "cpu"])
    assert not info.value.code, args


def _top1(backbone: Path, store: Path, probes: list[tuple[str, Path]]) -> float:
    bb = load_backbone(backbone, torch.device("cpu"))
    emb = embed_paths(bb, [str(p) for _, p in probes], batch_size=128).vectors
    with PrototypeStore.open(store) as s:
        protos = np.concatenate([c for _, c in s.iter_chunks()])
        names = list(s.names)
    pred = np.argmax(emb @ protos.T, axis=1)
    return float(np.mean([names[p] == t for p, (t, _) in zip(pred, probes, strict=True)]))


def _world(root: Path) -> tuple[Path, Path, list[tuple[str, Path]]]:
    """ORL s1–s20 pretrain a tiny backbone; s21–s40: ID photo + 2 spot photos, the rest probes."""
    subjects = sorted((d for d in os.listdir(ORL) if (ORL / d).is_dir()), key=lambda d: int(d[1:]))
    pre, ids, probes = root / "pretrain", root / "ids", []
    for s in subjects:
        if int(s[1:]) <= 20:
            (pre / s).mkdir(parents=True)
            for i in range(1, 11):
                os.symlink(ORL / s / f"{i}.pgm", pre / s / f"{i}.pgm")
            continue
        (ids / s).mkdir(parents=True)
        os.symlink(ORL / s / "1.pgm", ids / s / "id_1.pgm")
        for i in (2, 3):
            os.symlink(ORL / s / f"{i}.pgm", ids / s / f"spot_{i}.pgm")
        probes += [(s, ORL / s / f"{i}.pgm") for i in range(4, 11)]
    _cli("pretrain", "--data", str(pre), "--out", str(root / "run"), "--input-size", "32", "--width", "8",
         "--embedding-size", "32", "--epochs", "10", "--batch-size", "64", "--workers", "1",
         "--checkpoint-every", "0", "--seed", "0")
    return root / "run", ids, probes


def _train_dp(root: Path, run: Path, ids: Path, store: Path, name: str, *extra: str) -> tuple[Path, Path]:
    out, out_store = root / name, root / f"{name}_store"
    _cli("train-dp", "--data", str(ids), "--backbone", str(run), "--store", str(store), "--out-store", str(out_store),
         "--out", str(out), "--classes", "8", "--sampled", "2", "--steps", str(STEPS), "--checkpoint-every", "0",
         "--workers", "1", "--seed", "0", *extra)
    return out, out_store


@pytest.mark.slow
def test_train_dp_defaults_fine_tuned_not_worse_than_imprint_all(tmp_path: Path) -> None:
    run, ids, probes = _world(tmp_path)
    for photos in ("id", "all"):
        _cli("imprint", "--data", str(ids), "--backbone", str(run), "--out", str(tmp_path / f"store_{photos}"),
             "--photos", photos, "--workers", "1")
    _cli("build-index", "--store", str(tmp_path / "store_all"), "--candidates", "10", "--dominant", "5")
    imprint_id = _top1(run, tmp_path / "store_id", probes)
    imprint_all = _top1(run, tmp_path / "store_all", probes)
    assert imprint_all > imprint_id  # the baseline is a real one: the spot photos help

    out, out_store = _train_dp(tmp_path, run, ids, tmp_path / "store_all", "defaults")
    trained = _top1(out, out_store, probes)
    assert trained >= imprint_all, (imprint_id, imprint_all, trained)
    # the BatchNorm default: updating the statistics beats keeping the pretrained ones (0.707 vs 0.629 here)
    out, out_store = _train_dp(tmp_path, run, ids, tmp_path / "store_all", "freeze_bn", "--freeze-bn")
    frozen_bn = _top1(out, out_store, probes)
    assert trained > frozen_bn, (imprint_all, trained, frozen_bn)

    # The store also holds identities nobody has photos of (ORL s1–s20, photo 1 only: prototypes, never a
    # sampled class). With every non-sampled slot taken from the dominant queues (--hard-fraction 1, the former
    # behaviour) the queue members are pushed away from the photos while the rows outside the queues stay put
    # and take the probes; the default keeps half the slots random. Measured (seeds 0 / 1 / 2): default
    # 0.664 / 0.521 / 0.521, --hard-fraction 1 0.550 / 0.421 / 0.421 (imprint-all 0.571).
    plus = tmp_path / "ids_plus"
    shutil.copytree(ids, plus, symlinks=True)
    for k in range(1, 21):
        (plus / f"s{k}").mkdir()
        os.symlink(ORL / f"s{k}" / "1.pgm", plus / f"s{k}" / "id_1.pgm")
    _cli("imprint", "--data", str(plus), "--backbone", str(run), "--out", str(tmp_path / "store_plus"),
         "--photos", "all", "--workers", "1")
    _cli("build-index", "--store", str(tmp_path / "store_plus"), "--candidates", "10", "--dominant", "5")
    out, out_store = _train_dp(tmp_path, run, ids, tmp_path / "store_plus", "plus_defaults")
    with_random = _top1(out, out_store, probes)
    out, out_store = _train_dp(tmp_path, run, ids, tmp_path / "store_plus", "plus_queues_only", "--hard-fraction", "1")
    queues_only = _top1(out, out_store, probes)
    assert with_random > queues_only, (with_random, queues_only)


def _bn_state(backbone: Path) -> dict[str, torch.Tensor]:
    model = load_backbone(backbone, torch.device("cpu")).model
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _conv_weights(backbone: Path) -> list[torch.Tensor]:
    model = load_backbone(backbone, torch.device("cpu")).model
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_freeze_bn_keeps_statistics_and_head_warmup_counts(tmp_path: Path) -> None:
    """``--freeze-bn`` leaves the running statistics as pretrained (the default updates them);
    ``--head-warmup`` holds the backbone for its share of the steps."""
    from .conftest import imprinted_world

    paths, _ = imprinted_world(tmp_path / "world")
    _cli("build-index", "--store", str(paths["store"]), "--candidates", "8", "--dominant", "4")
    start_bn, start_conv = _bn_state(paths["backbone"]), _conv_weights(paths["backbone"])

    def run(name: str, *extra: str) -> Path:
        _cli("train-dp", "--data", str(paths["faces"]), "--backbone", str(paths["backbone"]),
             "--store", str(paths["store"]), "--out-store", str(tmp_path / f"{name}_store"),
             "--out", str(tmp_path / name), "--classes", "8", "--sampled", "4", "--steps", "3",
             "--checkpoint-every", "0", "--workers", "1", "--seed", "0", *extra)
        return tmp_path / name

    for k, v in _bn_state(run("frozen", "--freeze-bn")).items():
        assert torch.equal(v, start_bn[k]), k
    assert any(not torch.equal(v, start_bn[k]) for k, v in _bn_state(run("updated")).items())
    # 3 steps, warm-up 0.67: the first 2 train the prototypes only, the third the backbone too
    warm = run("warm", "--head-warmup", "0.67")
    assert json.loads((warm / "manifest.json").read_text())["summary"]["head_warmup_steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(_conv_weights(warm), start_conv, strict=True))
