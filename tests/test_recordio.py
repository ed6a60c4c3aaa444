"""insightface RecordIO (.rec/.idx/property): pack real faces, read them back, damaged files, workers."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lblctl.data.faces import FaceDataset, Preprocess, Problem, ProblemLog, load_image, make_loader, open_face_set
from lblctl.data.recordio import (
    IDX,
    MAGIC,
    REC,
    encode_frames,
    read_frames,
    read_idx,
    read_property,
    read_record,
)
from lblctl.stages.pack import PackConfig, run

from .conftest import ORL, copy_slice, lfw_identities
from .test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 LFW identities × 3 JPEGs (one renamed id.jpg) and 3 ORL identities × 4 PGMs."""
    root = copy_slice(tmp_path_factory.mktemp("mixed"), lfw_identities(3, 6), 3)
    first = sorted(os.listdir(root))[0]
    photo = sorted(os.listdir(root / first))[1]
    os.rename(root / first / photo, root / first / "id.jpg")
    for s in ("s1", "s2", "s3"):
        (root / f"orl_{s}").mkdir()
        for f in sorted(os.listdir(ORL / s))[:4]:
            shutil.copyfile(ORL / s / f, root / f"orl_{s}" / f)
    return root


@pytest.fixture(scope="module")
def packed(mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "set"
    summary = run(PackConfig(data=mixed, out=out))
    assert summary["identities"] == 9 and summary["images"] == 30 and summary["left_out_images"] == 0
    return out


def _copy(packed: Path, dest: Path) -> Path:
    shutil.copytree(packed, dest)
    return dest


def test_round_trip_same_images_labels_and_id_photos(mixed: Path, packed: Path) -> None:
    src, rec = open_face_set(mixed), open_face_set(packed)
    assert rec.source == "rec"
    assert list(rec.names) == list(src.names)
    assert np.array_equal(rec.offsets, src.offsets) and np.array_equal(rec.is_id, src.is_id)
    for r in range(src.num_images):
        a, b = np.asarray(load_image(src.path(r))), np.asarray(load_image(rec.path(r)))
        assert a.shape == b.shape and np.array_equal(a, b), src.path(r)  # JPEG kept as bytes, PGM → PNG
        if src.path(r).endswith(".jpg"):
            _, payload = read_record(packed / REC, int(rec.path(r).rsplit("#", 1)[1]))
            assert payload == Path(src.path(r)).read_bytes()
    assert read_property(packed) == {"num_classes": 9, "height": 250, "width": 250}


def test_layout_is_insightface_header_images_then_identity_ranges(packed: Path) -> None:
    """Record 0's label gives the identity keys; images carry their identity as scalar label."""
    keys = read_idx(packed / IDX)
    h0, _ = read_record(packed / REC, keys[0])
    assert h0.flag == 2 and h0.label == (31.0, 40.0)  # MXFaceDataset: images are keys 1 … label[0]-1
    images = [read_record(packed / REC, keys[k])[0] for k in range(1, 31)]
    assert all(h.flag == 0 and h.id == k for k, h in zip(range(1, 31), images, strict=True))
    ranges = [read_record(packed / REC, keys[k])[0].label[:2] for k in range(31, 40)]
    assert ranges[0][0] == 1 and ranges[-1][1] == 31
    for ident, (a, b) in enumerate(ranges):
        assert {images[k - 1].label for k in range(int(a), int(b))} == {float(ident)}


def test_payload_with_magic_words_is_split_like_dmlc() -> None:
    magic = struct.pack("<I", MAGIC)
    payload = b"abcd" + magic + b"efgh" + magic + b"ij"  # magic at 4 and 12 (aligned)
    data = encode_frames(payload)
    lrecs = [struct.unpack_from("<I", data, o + 4)[0] for o in (0, 12, 24)]
    assert [(x >> 29, x & ((1 << 29) - 1)) for x in lrecs] == [(1, 4), (2, 4), (3, 2)]
    assert len(data) % 4 == 0
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"frames_{os.getpid()}.bin"
    path.write_bytes(data + encode_frames(b"x" + magic))  # unaligned magic: not split
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_frames(fd, 0, len(data)) == payload
        assert read_frames(fd, len(data), 0) == b"x" + magic
    finally:
        os.close(fd)
        path.unlink()


def _dataset(index) -> FaceDataset:
    return FaceDataset(index, np.arange(index.num_images), None, Preprocess(32))


def test_bad_magic_is_a_problem_of_that_record_only(packed: Path, tmp_path: Path) -> None:
    rec_dir = _copy(packed, tmp_path / "bad")
    keys = read_idx(rec_dir / IDX)
    with open(rec_dir / REC, "r+b") as fh:
        fh.seek(keys[5])
        fh.write(b"\0\0\0\0")
    index = open_face_set(rec_dir)
    assert index.num_images == 30
    items = [_dataset(index)[i] for i in range(30)]
    bad = [x for x in items if isinstance(x, Problem)]
    assert len(bad) == 1 and "bad magic" in bad[0].reason and bad[0].path.endswith(f"#{keys[5]}")
    log = ProblemLog()
    for batch in make_loader(_dataset(index), batch_size=8):
        log.extend(batch.problems)
    assert log.count == 1


def test_file_cut_short_gives_per_record_problems(packed: Path, tmp_path: Path) -> None:
    rec_dir = _copy(packed, tmp_path / "cut")
    keys = read_idx(rec_dir / IDX)
    cut = keys[20] + 100  # inside image record 20; identity records (at the end) are gone
    with open(rec_dir / REC, "r+b") as fh:
        fh.truncate(cut)
    index = open_face_set(rec_dir)  # falls back to the image labels, with a warning
    assert index.num_images == 20  # records 1…20 have a readable header; 21…30 lie past the end
    assert len(index.rec_problems) == 11  # identity records + the 10 images past the end
    items = [_dataset(index)[i] for i in range(index.num_images)]
    bad = [x for x in items if isinstance(x, Problem)]
    assert len(bad) == 1 and "cut short" in bad[0].reason


def test_rec_without_idx_is_one_error_before_any_work(packed: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    rec_dir = _copy(packed, tmp_path / "noidx")
    (rec_dir / IDX).unlink()
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(rec_dir), "--out", str(out), "--arch", "small_cnn")
    assert_one_line_error(code, err, "train.idx")
    assert not (out / "log.jsonl").exists()


def test_two_workers_read_the_same_tensors(packed: Path) -> None:
    index = open_face_set(packed)
    ds = _dataset(index)
    want = torch.stack([ds[i][0] for i in range(len(ds))])
    got = torch.zeros_like(want)
    seen = 0
    for batch in make_loader(ds, batch_size=4, workers=2):
        got[batch.rows] = batch.images
        seen += len(batch)
    assert seen == len(ds) and torch.equal(got, want)


def test_pack_cli_and_pretrain_on_rec(mixed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "set"
    code, stdout, err = run_cli(capsys, "pack", "--data", str(mixed), "--out", str(out), "--json", "-q")
    assert code == 0, err
    assert '"identities": 9' in stdout
    code, _, err = run_cli(capsys, "pack", "--data", str(mixed), "--out", str(out))
    assert_one_line_error(code, err, "--out")
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(out), "--out", str(run_dir), "--arch", "small_cnn",
                           "--embedding-size", "16", "--input-size", "32", "--batch-size", "8", "--steps", "2",
                           "--val-fraction", "0", "--workers", "0", "-q")
    assert code == 0, err
    assert (run_dir / "backbone.pt").is_file()


def test_plain_rec_without_header_groups_images_by_label(mixed: Path, tmp_path: Path) -> None:
    """An im2rec-style file (no header record, keys not starting at 0): identities from image labels."""
    from lblctl.data.recordio import IRHeader, RecordWriter, pack_record

    src = open_face_set(mixed)
    writer = RecordWriter(tmp_path / "plain")
    labels = src.image_identity
    for r in range(src.num_images):
        payload = Path(src.path(r)).read_bytes() if src.path(r).endswith(".jpg") else None
        if payload is None:
            continue
        writer.write(100 + r, pack_record(IRHeader(0, float(labels[r]) * 3, 100 + r, 0), payload))
    writer.close()
    index = open_face_set(tmp_path / "plain")
    jpeg_ids = sorted({int(labels[r]) for r in range(src.num_images) if src.path(r).endswith(".jpg")})
    assert list(index.names) == [str(3 * i) for i in jpeg_ids]
    assert index.counts().tolist() == [int(src.counts()[i]) for i in jpeg_ids]
    first = index.images_of(0)[0]
    assert np.array_equal(np.asarray(load_image(index.path(first))), np.asarray(load_image(src.path(0))))


def test_imprint_from_rec_equals_imprint_from_folders(mixed: Path, packed: Path, tmp_path: Path) -> None:
    """The same photos through --data FOLDERS and --data REC give the same prototypes."""
    import h5py

    from lblctl.stages.imprint import ImprintConfig, imprint

    from .test_export import make_backbone

    bb = make_backbone(tmp_path / "bb" / "backbone.pt")
    for name, data in (("folders", mixed), ("rec", packed)):
        imprint(ImprintConfig(out=tmp_path / name, data=data, backbone=bb, photos="all", workers=0), "cpu")
    with h5py.File(tmp_path / "folders" / "prototypes.h5") as a, h5py.File(tmp_path / "rec" / "prototypes.h5") as b:
        assert [x.decode() if isinstance(x, bytes) else x for x in a["identities"][:]] == \
            [x.decode() if isinstance(x, bytes) else x for x in b["identities"][:]]
        assert np.allclose(a["prototypes"][:], b["prototypes"][:], atol=1e-6)
