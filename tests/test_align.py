"""``lblctl align`` on real shipped photos (LFW-a, ORL, Yale B) with the shipped SCRFD and YuNet models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lblctl.core.artifacts import read_manifest
from lblctl.core.errors import LblError
from lblctl.data.faces import open_face_set
from lblctl.models.detectors import ScrfdDetector
from lblctl.stages.align import (
    ARCFACE_TEMPLATE,
    FACES_CSV,
    JOURNAL,
    QUARANTINE,
    REPORT,
    AlignConfig,
    Journal,
    align,
    landmark_fit_error,
)

from .conftest import LFW, MODELS, ORL, YALEB, copy_slice, lfw_identities

SCRFD = MODELS / "scrfd_500m.onnx"
YUNET = MODELS / "yunet.onnx"
EYES_AARON = np.array([[105.0, 113.0], [146.0, 113.0]])  # data/README: Aaron_Eckhart_0001's eyes


def _report(out: Path) -> dict[str, dict[str, str]]:
    with open(out / REPORT, newline="") as fh:
        return {row["image"]: row for row in csv.DictReader(fh)}


def _points(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split()], dtype=np.float64).reshape(-1, 2)


def _crop(out: Path, row: dict[str, str]) -> np.ndarray:
    return np.asarray(Image.open(out / row["output"]).convert("RGB"), dtype=np.float64)


def _run(data: Path, out: Path, **kw) -> dict:
    kw.setdefault("model", SCRFD)
    kw.setdefault("workers", 1)
    kw.setdefault("threads", 1)
    return align(AlignConfig(data=data, out=out, **kw))


def _mixed_set(root: Path) -> Path:
    """Aaron_Eckhart's one photo + 2 LFW identities × 2, 2 ORL subjects × 1, 1 Yale B subject × 2."""
    copy_slice(root, ["Aaron_Eckhart", *lfw_identities(2, 2)], 2)
    for s in ("s1", "s2"):
        (root / f"orl_{s}").mkdir()
        shutil.copyfile(ORL / s / "1.pgm", root / f"orl_{s}" / "1.pgm")
    (root / "yaleB01").mkdir()
    for name in ("yaleB01_P00A+000E+00.pgm", "yaleB01_P00A+005E+10.pgm"):
        shutil.copyfile(YALEB / "yaleB01" / name, root / "yaleB01" / name)
    return root


@pytest.fixture(scope="module")
def scrfd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("scrfd")
    data = _mixed_set(tmp / "raw")
    return data, tmp / "aligned", _run(data, tmp / "aligned")


# --------------------------------------------------------------------------- the crops


def test_scrfd_aligns_real_photos_to_the_template(scrfd_run: tuple[Path, Path, dict]) -> None:
    data, out, summary = scrfd_run
    index = open_face_set(data)
    assert summary["images"] == index.num_images == 9
    assert summary["aligned"] == 9 and summary["quarantined"] == 0 and summary["failed"] == 0
    report = _report(out)
    assert set(report) == {index.paths[r] for r in range(index.num_images)}
    fits = []
    for image, row in report.items():
        assert row["status"] == "aligned", (image, row["reason"])
        # same layout and file stem, PNG
        assert row["output"] == f"{Path(image).parent}/{Path(image).stem}.png"
        crop = np.asarray(Image.open(out / row["output"]))
        assert crop.shape == (112, 112, 3)
        assert 0.5 <= float(row["det_score"]) <= 1.0
        fits.append(landmark_fit_error(_points(row["landmarks"])))
    # the 5 detected points land on the ArcFace template after norm_crop's similarity transform
    assert np.mean(fits) < 4.0 and max(fits) < 7.0
    # LFW-a's known geometry: Aaron Eckhart's eyes are at about (105,113) and (146,113)
    eyes = _points(report["Aaron_Eckhart/Aaron_Eckhart_0001.jpg"]["landmarks"])[:2]
    assert np.abs(eyes - EYES_AARON).max() < 4.0


def test_crops_are_aligned_when_detected_again(scrfd_run: tuple[Path, Path, dict]) -> None:
    """Detect on each crop (padded into a larger canvas): its landmarks sit on the template."""
    _, out, _ = scrfd_run
    det = ScrfdDetector(SCRFD, threads=1)
    errors = []
    for row in _report(out).values():
        bgr = np.ascontiguousarray(_crop(out, row).astype(np.uint8)[:, :, ::-1])
        canvas = np.zeros((224, 224, 3), np.uint8)
        canvas[56:168, 56:168] = bgr
        faces = det.detect(canvas)
        assert faces, row["image"]
        best = max(faces, key=lambda f: f.score)
        errors.append(np.linalg.norm(best.landmarks - 56 - ARCFACE_TEMPLATE, axis=1).mean())
    assert np.mean(errors) < 4.0, errors


def test_outputs_manifest_and_id_names(scrfd_run: tuple[Path, Path, dict]) -> None:
    data, out, summary = scrfd_run
    manifest = read_manifest(out, kind="aligned")
    assert manifest["params"]["detector"] == "scrfd" and manifest["params"]["size"] == 112
    assert manifest["inputs"]["data"]["fingerprint"].startswith("tree:")
    assert manifest["inputs"]["model"]["fingerprint"].startswith("sha256:")
    aligned = open_face_set(out)  # the output is itself a face set, with the same identities
    source = open_face_set(data)
    assert list(aligned.names) == list(source.names)
    with open(out / FACES_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and all((out / r["image"]).is_file() for r in rows)
    assert sum(r["kind"] == "id" for r in rows) == source.num_identities
    assert not (out / JOURNAL).exists() and not (out / QUARANTINE).exists()
    assert summary["this_run"]["processed"] == 9 and summary["this_run"]["images_per_s"] > 0


def test_yunet_lands_on_the_same_points(scrfd_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    data, scrfd_out, _ = scrfd_run
    summary = _run(data, tmp_path / "yunet", detector="yunet", model=YUNET)
    assert summary["aligned"] == 9, summary
    a, b = _report(scrfd_out), _report(tmp_path / "yunet")
    diffs, corrs = [], []
    for image in a:
        pa, pb = _points(a[image]["landmarks"]), _points(b[image]["landmarks"])
        # normalised mean error: point distance over the inter-ocular distance
        diffs.append(np.linalg.norm(pa - pb, axis=1).mean() / np.linalg.norm(pa[1] - pa[0]))
        crops = _crop(scrfd_out, a[image]), _crop(tmp_path / "yunet", b[image])
        corrs.append(np.corrcoef(crops[0].ravel(), crops[1].ravel())[0, 1])
    # two different detectors: a few pixels apart on a point, never a different face
    assert max(diffs) < 0.25 and np.mean(diffs) < 0.12, diffs
    assert np.median(corrs) > 0.75 and min(corrs) > 0.5, corrs  # another person: about 0


def _variants(folder: Path) -> dict[str, str]:
    """The same LFW photo rotated 17°, EXIF-rotated, 16-bit, CMYK, 2000 px and grayscale PNG."""
    src = Image.open(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")
    rgb = src.convert("RGB")
    folder.mkdir(parents=True)
    shutil.copyfile(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg", folder / "a_orig.jpg")
    rgb.rotate(17, resample=Image.BICUBIC, expand=True).save(folder / "b_rot17.png")
    rgb.rotate(-20, resample=Image.BICUBIC, expand=True).save(folder / "c_rot-20.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers (and load_image) turn it 90° clockwise
    rgb.transpose(Image.Transpose.ROTATE_90).save(folder / "d_exif6.jpg", quality=95, exif=exif)
    arr16 = (np.asarray(src, dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(folder / "e_16bit.png")
    assert Image.open(folder / "e_16bit.png").mode.startswith("I")
    rgb.convert("CMYK").save(folder / "f_cmyk.jpg", quality=95)
    rgb.resize((2000, 2000), Image.BICUBIC).save(folder / "g_large.jpg", quality=90)
    src.save(folder / "h_gray.png")
    return {p.name: p.name for p in folder.iterdir()}


def test_rotated_exif_and_odd_modes_align_alike(tmp_path: Path) -> None:
    _variants(tmp_path / "raw" / "Aaron_Eckhart")
    shutil.copyfile(LFW / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg", tmp_path / "raw" / "Aaron_Eckhart" / "z.jpg")
    out = tmp_path / "aligned"
    summary = _run(tmp_path / "raw", out)
    assert summary["aligned"] == 9, summary
    report = {Path(k).name: v for k, v in _report(out).items()}
    ref = _crop(out, report["a_orig.jpg"])
    for name, row in report.items():
        crop = _crop(out, row)
        corr = np.corrcoef(crop.ravel(), ref.ravel())[0, 1]  # 16-bit input is contrast-stretched: not diff
        if name == "z.jpg":  # another person: the comparison can tell faces apart
            assert corr < 0.5
        else:
            assert corr > 0.9, (name, corr)
    assert report["d_exif6.jpg"]["width"] == "250" and report["g_large.jpg"]["width"] == "2000"


# --------------------------------------------------------------------------- what cannot be aligned


def _bad_set(root: Path) -> Path:
    good = root / "Aaron_Eckhart"
    copy_slice(root, ["Aaron_Eckhart"], 1)
    Image.fromarray(np.full((250, 250), 128, np.uint8)).save(good / "flat.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8)).save(good / "noise.png")
    raw = (LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg").read_bytes()
    (good / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (good / "empty.jpg").write_bytes(b"")
    (good / "text.jpg").write_text("not an image")
    return root


def test_non_faces_are_quarantined_and_corrupt_files_reported(tmp_path: Path) -> None:
    out = tmp_path / "aligned"
    summary = _run(_bad_set(tmp_path / "raw"), out)
    report = {Path(k).name: v for k, v in _report(out).items()}
    assert report["Aaron_Eckhart_0001.jpg"]["status"] == "aligned"
    assert report["flat.png"]["status"] == "quarantined" and report["flat.png"]["reason"] == "no_face"
    assert report["noise.png"]["status"] == "quarantined"
    assert report["noise.png"]["reason"].split(" ")[0] in ("no_face", "low_score")
    assert report["truncated.jpg"]["status"] == "failed" and "truncated" in report["truncated.jpg"]["reason"]
    assert report["empty.jpg"]["status"] == "failed" and report["empty.jpg"]["reason"] == "empty file"
    assert report["text.jpg"]["status"] == "failed"
    assert summary["aligned"] == 1 and summary["quarantined"] == 2 and summary["failed"] == 3
    assert summary["quarantined_by_reason"]["no_face"] >= 1
    assert summary["failed_by_reason"]["truncated image"] == 1
    # the quarantined originals are copied beside the crops, byte for byte; nothing else is
    q = out / report["flat.png"]["output"]
    assert q.parent == out / QUARANTINE / "Aaron_Eckhart"
    assert q.read_bytes() == (tmp_path / "raw" / "Aaron_Eckhart" / "flat.png").read_bytes()
    assert sorted(p.name for p in q.parent.iterdir()) == ["flat.png", "noise.png"]
    assert not (out / "Aaron_Eckhart" / "flat.png").exists()


def test_no_copy_lists_only(tmp_path: Path) -> None:
    out = tmp_path / "aligned"
    data = tmp_path / "raw" / "x"
    data.mkdir(parents=True)
    Image.fromarray(np.full((200, 200), 30, np.uint8)).save(data / "flat.png")
    summary = _run(tmp_path / "raw", out, copy_quarantine=False)
    assert summary["quarantined"] == 1 and not (out / QUARANTINE).exists()
    assert _report(out)["x/flat.png"]["output"] == ""


def test_min_score_min_size_and_picking(tmp_path: Path) -> None:
    # one canvas, two real faces: a big one at the left edge and a smaller one in the middle
    face = Image.open(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg").convert("RGB")
    canvas = Image.new("RGB", (720, 260))
    canvas.paste(face, (0, 5))
    canvas.paste(face.resize((160, 160), Image.BICUBIC), (280, 50))
    (tmp_path / "raw" / "two").mkdir(parents=True)
    canvas.save(tmp_path / "raw" / "two" / "two.png")
    shutil.copyfile(ORL / "s1" / "1.pgm", tmp_path / "raw" / "two" / "orl.pgm")
    centres = {}
    for pick in ("largest", "central"):
        _run(tmp_path / "raw", tmp_path / pick, pick=pick)
        row = _report(tmp_path / pick)["two/two.png"]
        assert row["status"] == "aligned" and row["faces"] == "2"
        box = _points(row["box"]).ravel()
        centres[pick] = (box[0] + box[2]) / 2
    assert centres["largest"] < 200 < 300 < centres["central"] < 420, centres
    # ORL's face box is ~57 px wide, the small pasted face ~58, the big one ~90
    _run(tmp_path / "raw", tmp_path / "tiny", min_size=70, pick="central")
    report = _report(tmp_path / "tiny")
    assert report["two/orl.pgm"]["reason"].startswith("small_face")
    assert report["two/two.png"]["status"] == "aligned"  # only the big face is left to pick
    assert _points(report["two/two.png"]["box"]).ravel()[0] < 200
    _run(tmp_path / "raw", tmp_path / "strict", min_score=0.99)
    assert all(r["reason"].startswith("low_score") for r in _report(tmp_path / "strict").values())


# --------------------------------------------------------------------------- resume


def test_resume_skips_done_work_and_recovers_a_killed_run(tmp_path: Path) -> None:
    data = copy_slice(tmp_path / "raw", lfw_identities(3, 2), 3)
    out = tmp_path / "aligned"
    first = _run(data, out)
    assert first["this_run"]["processed"] == 6
    crop = next(out.glob("*/*.png"))
    stamp = crop.stat().st_mtime_ns
    report_before = (out / REPORT).read_bytes()

    again = _run(data, out)
    assert again["this_run"] == {**again["this_run"], "processed": 0, "skipped": 6}
    assert crop.stat().st_mtime_ns == stamp and (out / REPORT).read_bytes() == report_before

    # a new photo and a changed one are the only work; a removed photo's crop goes
    ident = sorted(p for p in data.iterdir())[0]
    shutil.copyfile(LFW / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg", ident / "new.jpg")
    changed = sorted(ident.glob("*.jpg"))[0]
    Image.open(changed).rotate(10).save(changed, quality=90)
    gone = sorted(data.iterdir())[1] / sorted(os.listdir(sorted(data.iterdir())[1]))[-1]
    gone.unlink()
    third = _run(data, out)
    assert third["this_run"]["processed"] == 2 and third["images"] == 6
    assert (out / ident.name / "new.png").is_file()
    assert not (out / gone.parent.name / (gone.stem + ".png")).exists()

    # a killed run: no final report yet, the journal holds what finished, its last record cut
    lines = (out / REPORT).read_bytes().splitlines(keepends=True)[1:]
    (out / REPORT).unlink()
    journal = Journal(out / JOURNAL)
    for line in lines + [b"Half/written_line.jpg,Half,spot,Half/written_line.png,aligned" + b",x" * 9 + b"\n"]:
        journal.write(line)
    journal.close()
    with open(out / JOURNAL, "r+b") as fh:
        fh.truncate((out / JOURNAL).stat().st_size - 7)
    recovered = _run(data, out)
    assert recovered["this_run"]["processed"] == 0 and recovered["aligned"] == 6
    assert not (out / JOURNAL).exists() and len(_report(out)) == 6

    # other settings need --force, which redoes everything
    with pytest.raises(LblError, match="--force"):
        _run(data, out, size=224)
    forced = _run(data, out, size=224, force=True)
    assert forced["this_run"]["processed"] == 6
    assert Image.open(out / ident.name / "new.png").size == (224, 224)


def test_two_workers_give_the_same_report(scrfd_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    data, out1, _ = scrfd_run
    summary = _run(data, tmp_path / "w2", workers=2)
    assert summary["workers"] == 2 and summary["aligned"] == 9
    a, b = _report(out1), _report(tmp_path / "w2")
    assert list(a) == list(b)  # input order, whatever order the workers finished in
    for image in a:
        assert a[image]["landmarks"] == b[image]["landmarks"]
        assert np.array_equal(_crop(out1, a[image]), _crop(tmp_path / "w2", b[image]))


# --------------------------------------------------------------------------- other detectors, CSV input


def test_landmarks_csv_and_already_aligned_modes(scrfd_run: tuple[Path, Path, dict], tmp_path: Path) -> None:
    data, scrfd_out, _ = scrfd_run
    report = _report(scrfd_out)
    lm_csv = tmp_path / "points.csv"
    with open(lm_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image"] + [f"{a}{i}" for i in range(1, 6) for a in ("x", "y")])
        for image, row in list(report.items())[:-1]:  # the last photo has no landmarks given
            w.writerow([str(data / image), *row["landmarks"].split()])
    out = tmp_path / "lm"
    summary = _run(data, out, detector="landmarks", landmarks=lm_csv, model=None)
    assert summary["aligned"] == 8 and summary["quarantined_by_reason"] == {"no_landmarks": 1}
    lm = _report(out)
    for image in list(report)[:-1]:
        assert np.abs(_crop(out, lm[image]) - _crop(scrfd_out, report[image])).mean() < 1.0

    # --detector none: the crops themselves are valid aligned input; ORL's 92×112 frames are not square
    summary = _run(scrfd_out, tmp_path / "none", detector="none", model=None, size=224)
    assert summary["aligned"] == 9
    assert all(Image.open(p).size == (224, 224) for p in (tmp_path / "none").glob("*/*.png"))
    summary = _run(data, tmp_path / "none_raw", detector="none", model=None)
    assert summary["quarantined_by_reason"] == {"not_square": 4}  # ORL 92×112, Yale B 168×192


def test_csv_input_keeps_kinds_and_stems(tmp_path: Path) -> None:
    names = lfw_identities(2, 2)
    copy_slice(tmp_path / "raw", names, 2)
    rows = [(n, f"{n}/{f}", "id" if k == 1 else "spot")
            for n in names for k, f in enumerate(sorted(os.listdir(tmp_path / "raw" / n)))]
    with open(tmp_path / "raw" / "faces.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["identity", "image", "kind"])
        w.writerows(rows)
    out = tmp_path / "aligned"
    summary = _run(tmp_path / "raw" / "faces.csv", out, detector="yunet", model=YUNET, fmt="jpg")
    assert summary["aligned"] == 4
    aligned = open_face_set(out / FACES_CSV)
    for n in names:
        ids = [aligned.paths[r] for r in aligned.images_of(aligned.names.index(n), "id")]
        second = sorted(os.listdir(tmp_path / "raw" / n))[1]
        assert ids == [f"{n}/{Path(second).stem}.jpg"]


# --------------------------------------------------------------------------- user errors


def test_user_errors_are_one_line(tmp_path: Path, lfw_slice: Path) -> None:
    with pytest.raises(LblError, match="needs --model"):
        _run(lfw_slice, tmp_path / "o", model=None)
    with pytest.raises(LblError, match="not an SCRFD model"):
        _run(lfw_slice, tmp_path / "o", model=YUNET)
    with pytest.raises(LblError, match="no such file"):
        _run(lfw_slice, tmp_path / "o", model=tmp_path / "missing.onnx")
    with pytest.raises(LblError, match="multiples of 112"):
        _run(lfw_slice, tmp_path / "o", size=100)
    with pytest.raises(LblError, match="inside --data"):
        _run(lfw_slice, lfw_slice / "aligned")
    with pytest.raises(LblError, match="--landmarks"):
        _run(lfw_slice, tmp_path / "o", detector="landmarks", model=None)
    with pytest.raises(LblError, match="--pick"):
        _run(lfw_slice, tmp_path / "o", pick="first")


@pytest.mark.slow
def test_cli_json(tmp_path: Path) -> None:
    data = copy_slice(tmp_path / "raw", lfw_identities(2, 2), 2)
    cmd = [sys.executable, "-m", "lblctl.cli", "align", "--data", str(data), "--out", str(tmp_path / "a"),
           "--model", str(SCRFD), "--json", "--quiet", "--workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["aligned"] == 4 and summary["this_run"]["processed"] == 4
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["kind"] == "aligned"


def test_cli_error_is_one_line(tmp_path: Path, lfw_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lblctl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["align", "--data", str(lfw_slice), "--out", str(tmp_path / "a")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --detector scrfd needs --model") and len(err.splitlines()) == 1
