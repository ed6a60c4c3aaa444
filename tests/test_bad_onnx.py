"""An ONNX file that is not a recognition model, wherever an ONNX backbone is accepted: one
``error:`` line, exit 2, before any work (nothing written under the output paths)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from .conftest import MODELS, imprinted_world
from .test_cli import assert_one_line_error, run_cli


def _conv_net(path: Path, declared_output: list | None) -> Path:
    """A one-conv net whose output is a 4-D feature map N×4×32×32 (a detector/segmenter, not N×D).
    ``declared_output`` is the output's declared shape; None declares no shape, so that only
    running the graph shows the rank."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["input", "w"], ["features"], pads=[1, 1, 1, 1])
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 32, 32])
    out = helper.make_tensor_value_info("features", TensorProto.FLOAT, declared_output)
    graph = helper.make_graph([node], "conv", [inp], [out], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    paths, _ = imprinted_world(root)
    faces = paths["faces"]
    pairs = root / "pairs.csv"
    names = sorted(p.name for p in faces.iterdir())[:2]
    photos = [sorted((faces / n).iterdir()) for n in names]
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id_image", "spot_image", "same"])
        w.writerow([photos[0][0], photos[0][1], 1])
        w.writerow([photos[0][0], photos[1][1], 0])
    paths["pairs"] = pairs
    paths["conv_declared"] = _conv_net(root / "conv4d.onnx", [None, 4, 32, 32])
    paths["conv_undeclared"] = _conv_net(root / "conv_noshape.onnx", None)
    return paths


ENTRY_POINTS = ["eval", "imprint", "train-dp", "pretrain", "verify-pair"]


def _command(entry: str, model: Path, world: dict[str, Path], out: Path) -> list[str]:
    data = ["--data", str(world["faces"])]
    return {
        "eval": ["eval", "--backbone", str(model), "--pairs", str(world["pairs"]), *data, "--out", str(out)],
        "imprint": ["imprint", *data, "--backbone", str(model), "--out", str(out)],
        "train-dp": ["train-dp", *data, "--backbone", str(model), "--store", str(world["store"]),
                     "--out-store", str(out / "store"), "--out", str(out), "--steps", "1"],
        "pretrain": ["pretrain", *data, "--init", str(model), "--out", str(out), "--steps", "1"],
        "verify-pair": ["verify-pair", "--backbone", str(model), "--pairs", str(world["pairs"]),
                        "--out", str(out / "scores.csv"), "--threshold", "0.3"],
    }[entry] + ["--device", "cpu", "--workers", "0"]


@pytest.mark.parametrize("model", ["conv_declared", "conv_undeclared", "scrfd_500m.onnx"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_non_recognition_onnx_is_one_error_before_any_work(world: dict[str, Path], tmp_path: Path, entry: str,
                                                             model: str, capsys: pytest.CaptureFixture) -> None:
    path = world[model] if model in world else MODELS / model
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *_command(entry, path, world, out))
    flag = "--init" if entry == "pretrain" else "--backbone"
    assert_one_line_error(code, err, f"{flag} {path}", "not a recognition model")
    if model == "conv_declared":
        assert "output has 4 dimensions" in err
    if model == "conv_undeclared":
        assert "[1, 4, 32, 32]" in err  # found by running one image
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_backbone_of_another_embedding_size_than_the_store(world: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """``train-dp --backbone`` (a backbone.pt, or a RUN that ``pretrain --init`` made) of another D than
    the store: one error line, and no copy of the store at ``--out-store``, no run folder."""
    import torch

    from lblctl.data.faces import Preprocess
    from lblctl.models.backbones import create_backbone
    from lblctl.models.checkpoint import save_backbone

    torch.manual_seed(0)
    other = tmp_path / "b16" / "backbone.pt"
    save_backbone(other, create_backbone("small_cnn", 16, 32, width=8), arch="small_cnn", embedding_size=16,
                  preprocess=Preprocess(32, 0.6), arch_kwargs={"width": 8})
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train-dp", "--data", str(world["faces"]), "--backbone", str(other.parent),
                           "--store", str(world["store"]), "--out-store", str(out / "store"), "--out", str(out),
                           "--steps", "1", "--device", "cpu", "--workers", "0")
    assert_one_line_error(code, err, "embedding size", "16", "32")
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
