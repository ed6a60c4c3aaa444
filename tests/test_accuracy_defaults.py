"""train-dp, run with its default options, must end better than what a user gets without it.

The baseline a user tries first is imprinting every identity from all its training photos
(imprint-all). On a small real-face split (ORL: 40 people, ID photo + 2 spot photos each for
training, the other 7 photos held out as probes) train-dp starts from the ID-photo prototypes,
as the README's pipeline does, and must end with a closed-set top-1 above imprint-all's.
The "tiny model" is fixed: head-only train-dp over 23×28-pixel features (``--features``), so
the test measures the prototype training that train-dp's defaults control, on a fixed seed.
With the old default (prototype lr = backbone lr 0.01) it only ties imprint-all here (0.843 = 0.843
on this seed); with the default (0.5 × 32 images / 256 = 0.0625) it ends above it (0.868 in the
bench's lab): the test asserts "above".
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from lblctl.cli import main
from lblctl.core.store import PrototypeStore

from .conftest import ORL


def _cli(*args: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([*args, "--quiet", "--device", "cpu"])
    assert not info.value.code, args


def _features(path: Path, vectors: np.ndarray, names: list[str]) -> Path:
    with h5py.File(path, "w") as f:
        f["features"] = vectors.astype(np.float32)
        f["identities"] = np.array(names, dtype=object).astype(h5py.string_dtype())
    return path


def _top1(store: Path, probes: np.ndarray, truth: list[str]) -> float:
    with PrototypeStore.open(store) as s:
        protos = np.concatenate([c for _, c in s.iter_chunks()])
        names = list(s.names)
    pred = np.argmax(probes @ protos.T, axis=1)
    return float(np.mean([names[p] == t for p, t in zip(pred, truth, strict=True)]))


@pytest.mark.slow
def test_train_dp_defaults_beat_imprint_all(tmp_path: Path) -> None:
    subjects = sorted(d for d in os.listdir(ORL) if (ORL / d).is_dir())
    train, train_names, probes, probe_names = [], [], [], []
    for s in subjects:
        for i in range(1, 11):
            img = Image.open(ORL / s / f"{i}.pgm").convert("L").resize((23, 28), Image.BILINEAR)
            (train if i <= 3 else probes).append(np.asarray(img, np.float32).ravel())
            (train_names if i <= 3 else probe_names).append(s)
    mean = np.mean(train, axis=0)

    def unit(x: list[np.ndarray]) -> np.ndarray:
        v = np.asarray(x) - mean
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    tr, pr = unit(train), unit(probes)
    is_id = np.arange(len(tr)) % 3 == 0  # 1.pgm is each person's ID photo
    _features(tmp_path / "id.h5", tr[is_id], [n for n, m in zip(train_names, is_id, strict=True) if m])
    _features(tmp_path / "all.h5", tr, train_names)
    _cli("imprint", "--features", str(tmp_path / "id.h5"), "--out", str(tmp_path / "store"))
    _cli("imprint", "--features", str(tmp_path / "all.h5"), "--out", str(tmp_path / "store_all"))
    _cli("build-index", "--store", str(tmp_path / "store"), "--candidates", "10", "--dominant", "5")
    # defaults except the size of the run (K, S, steps), which the README scales to the data; three seeds,
    # because one seed's figure moves by a probe or two with the sampler's order (280 probes)
    trained = []
    for seed in ("0", "1", "2"):
        _cli("train-dp", "--features", str(tmp_path / "all.h5"), "--store", str(tmp_path / "store"),
             "--out-store", str(tmp_path / f"store_dp{seed}"), "--out", str(tmp_path / f"run{seed}"),
             "--classes", "16", "--sampled", "4", "--steps", "100", "--checkpoint-every", "0", "--seed", seed)
        trained.append(_top1(tmp_path / f"store_dp{seed}", pr, probe_names))
    imprint_id = _top1(tmp_path / "store", pr, probe_names)
    imprint_all = _top1(tmp_path / "store_all", pr, probe_names)
    assert imprint_all > imprint_id  # the baseline is a real one: the spot photos help
    assert np.mean(trained) > imprint_all and min(trained) > imprint_id, (imprint_id, imprint_all, trained)
