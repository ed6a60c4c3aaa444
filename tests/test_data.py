"""Data readers on real shared faces, and every kind of bad input as a per-item record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lblctl.core.errors import LblError
from lblctl.core.strings import StringArray
from lblctl.data.faces import (
    EpochBatchSampler,
    FaceDataset,
    ImageProblem,
    Preprocess,
    load_image,
    make_loader,
    open_face_set,
    read_identity_csv,
    scan_folders,
    split_identities,
)
from lblctl.data.pairs import PairsFile

from .conftest import LFW, ORL, YALEB


def test_scan_real_lfw_slice(lfw_slice: Path) -> None:
    index = scan_folders(lfw_slice)
    assert index.num_identities == 12 and index.num_images == 48
    assert index.is_id.sum() == 12  # no id* files: the first image in sorted order is the ID photo
    for i in range(index.num_identities):
        rows = index.images_of(i)
        assert index.is_id[rows[0]] and not index.is_id[rows[1:]].any()
        name = index.names[i]
        assert index.paths[rows[0]] == f"{name}/{sorted(p.name for p in (lfw_slice / name).iterdir())[0]}"
    assert set(index.image_identity.tolist()) == set(range(12))


def test_id_prefix_marks_id_photos(lfw_slice: Path) -> None:
    person = sorted(lfw_slice.iterdir())[0]
    last = sorted(person.iterdir())[-1]
    last.rename(person / "id_2.jpg")
    index = scan_folders(lfw_slice)
    row = index.names.index(person.name)
    ids = index.images_of(row, "id")
    assert [index.paths[r] for r in ids] == [f"{person.name}/id_2.jpg"]
    assert len(index.images_of(row, "spot")) == 3


def test_identity_csv(tmp_path: Path, lfw_slice: Path) -> None:
    csv_path = lfw_slice / "set.csv"
    names = sorted(p.name for p in lfw_slice.iterdir() if p.is_dir())[:3]
    lines = ["identity,image,kind"]
    for n in names:
        files = sorted((lfw_slice / n).iterdir())
        lines.append(f"{n},{n}/{files[1].name},id")
        lines += [f"{n},{n}/{f.name},spot" for f in (files[0], files[2])]
    csv_path.write_text("\n".join(lines) + "\n")
    index = open_face_set(csv_path)
    assert index.num_identities == 3 and index.num_images == 9
    first = index.images_of(0, "id")
    assert len(first) == 1 and index.paths[first[0]].endswith(sorted((lfw_slice / names[0]).iterdir())[1].name)
    assert Path(index.path(first[0])).is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("name,file\na,b.jpg\n")
    with pytest.raises(LblError, match="identity,image"):
        read_identity_csv(bad)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(LblError, match="no such folder"):
        scan_folders(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LblError, match="no identity folders"):
        scan_folders(tmp_path / "empty")
    (tmp_path / "text" / "alice").mkdir(parents=True)
    (tmp_path / "text" / "alice" / "notes.txt").write_text("hello")
    with pytest.raises(LblError, match="no identity folders"):
        scan_folders(tmp_path / "text")


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    gray = Image.open(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")
    assert gray.mode == "L"
    out = {}
    out["L"] = gray
    out["RGBA"] = gray.convert("RGBA")
    out["CMYK"] = gray.convert("RGB").convert("CMYK")
    out["P"] = gray.convert("RGB").convert("P")
    arr16 = (np.asarray(gray, dtype=np.uint16) * 257)
    out["I;16"] = Image.frombytes("I;16", gray.size, arr16.astype("<u2").tobytes())
    for mode, img in out.items():
        path = tmp_path / f"x_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png' if mode != 'L' else 'pgm'}"
        img.save(path)
        rgb = load_image(path)
        assert rgb.mode == "RGB" and rgb.size == (250, 250), mode
        # all variants keep the face: correlated with the original gray image
        a = np.asarray(rgb, dtype=np.float64).mean(2).ravel()
        b = np.asarray(gray, dtype=np.float64).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.95, mode
    for pgm in (next(ORL.glob("s1/*.pgm")), next(YALEB.glob("*/*.pgm"))):
        assert load_image(pgm).mode == "RGB"


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.open(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg").convert("RGB").crop((0, 0, 250, 200))
    rotated = img.rotate(90, expand=True)  # stored sideways, EXIF says "rotate 270 to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "r.jpg")
    assert loaded.size == img.size  # 250×200 again, not 200×250
    diff = np.abs(np.asarray(loaded, np.float64) - np.asarray(img, np.float64)).mean()
    assert diff < 8


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "text", "folder"])
def test_bad_images_are_problems(tmp_path: Path, case: str) -> None:
    good = (LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg").read_bytes()
    path = tmp_path / "bad.jpg"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "text":
        path.write_text("not an image at all")
    elif case == "folder":
        path.mkdir()
    with pytest.raises(ImageProblem) as info:
        load_image(path)
    expected = {"missing": "missing", "empty": "empty", "truncated": "truncated", "text": "not an image",
                "folder": "folder"}[case]
    assert expected in str(info.value)


def test_loader_drops_bad_items(lfw_slice: Path) -> None:
    victim = sorted((lfw_slice / sorted(p.name for p in lfw_slice.iterdir())[0]).iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:300])
    index = scan_folders(lfw_slice)
    rows = np.arange(index.num_images)
    ds = FaceDataset(index, rows, index.image_identity, Preprocess(32, 0.6))
    seen, problems = 0, []
    for batch in make_loader(ds, batch_size=16, workers=1):
        assert batch.images.shape[1:] == (3, 32, 32)
        assert batch.images.dtype == torch.float32 and batch.images.abs().max() <= 1.0
        seen += len(batch)
        problems += batch.problems
    assert seen == index.num_images - 1
    assert len(problems) == 1 and problems[0].path.endswith(victim.name) and "truncated" in problems[0].reason


def test_epoch_sampler_resume_matches() -> None:
    full = list(EpochBatchSampler(103, 10, seed=7, epoch=2))
    tail = list(EpochBatchSampler(103, 10, seed=7, epoch=2, start=4))
    assert len(full) == 10 and tail == full[4:]
    assert full != list(EpochBatchSampler(103, 10, seed=7, epoch=3))


def test_pairs_file(tmp_path: Path) -> None:
    src = Path(LFW).parent / "lfw_pairs_dev.csv"
    pf = PairsFile(src)
    rows = list(pf)
    assert len(rows) == 4028 and pf.has_same
    assert sum(r.same for r in rows) == 2284
    assert Path(rows[0].id_image).is_file() and rows[0].get("fold") == "0"
    custom = tmp_path / "p.csv"
    custom.write_text("id_image,spot_image,same,ticket\na.jpg,/abs/b.jpg,true,T1\nc.jpg,d.jpg,no,T2\n")
    rows = list(PairsFile(custom))
    assert [r.same for r in rows] == [1, 0] and rows[0].get("ticket") == "T1"
    assert rows[0].id_image == str(tmp_path / "a.jpg") and rows[0].spot_image == "/abs/b.jpg"
    (tmp_path / "bad.csv").write_text("left,right\na,b\n")
    with pytest.raises(LblError, match="id_image"):
        PairsFile(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("id_image,spot_image,same\na,b,maybe\n")
    assert [r.error for r in PairsFile(tmp_path / "bad2.csv")] == ["same='maybe' is not 1/0 or true/false"]


def test_split_identities_by_person() -> None:
    demo = scan_folders(Path(__file__).resolve().parents[1] / "examples" / "data" / "faces")
    train, val = split_identities(demo, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == demo.num_identities
    assert (demo.counts()[val] >= 2).all() and len(val) == 20


def test_index_is_compact() -> None:
    # 200k names cost their bytes plus one offset each, and the hashed lookup finds them
    names = StringArray.from_iter(f"person_{i:07d}" for i in range(200_000))
    assert names.nbytes() < 200_000 * (14 + 8) + 16
    rows = names.lookup(["person_0123456", "person_0000000", "nobody"])
    assert rows.tolist() == [123456, 0, -1]


def test_preprocess_center_crop() -> None:
    img = load_image(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")
    t = Preprocess(48, 0.6)(img)
    assert t.shape == (3, 48, 48)
    full = Preprocess(48, 1.0)(img)
    assert not torch.equal(t, full)
