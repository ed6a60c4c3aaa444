"""ONNX models as trainable backbones: parity with onnxruntime, pretrain --init, train-dp fine-tunes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnx2torch")

from lblctl.core.errors import IncompatibleArtifact  # noqa: E402
from lblctl.core.store import PrototypeStore  # noqa: E402
from lblctl.data.faces import Preprocess, load_image, open_face_set  # noqa: E402
from lblctl.models.backbones import create_backbone  # noqa: E402
from lblctl.models.checkpoint import load_backbone, open_backbone, save_backbone  # noqa: E402
from lblctl.models.embed import embed_paths  # noqa: E402
from lblctl.models.export import export_onnx  # noqa: E402
from lblctl.stages.train_dp import TrainDPConfig, train_dp  # noqa: E402
from lblctl.train.engine import TrainConfig  # noqa: E402

from .conftest import LFW, copy_slice, exact_queues, lfw_identities  # noqa: E402
from .test_cli import assert_one_line_error, run_cli  # noqa: E402
from .test_export import make_backbone  # noqa: E402

CPU = torch.device("cpu")


def real_faces(n: int = 8) -> list[str]:
    names = lfw_identities(2, 60)[-n:]
    return [str(LFW / name / sorted(os.listdir(LFW / name))[0]) for name in names]


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    make_backbone(root / "cnn" / "backbone.pt")
    torch.manual_seed(0)
    ir = create_backbone("iresnet18", 64, 112).eval()
    save_backbone(root / "ir" / "backbone.pt", ir, arch="iresnet18", embedding_size=64,
                  preprocess=Preprocess(112, 1.0))
    out = {"cnn_dynamic": root / "cnn.onnx", "cnn_batch1": root / "cnn_b1.onnx", "iresnet_batch1": root / "ir.onnx"}
    export_onnx(root / "cnn", out["cnn_dynamic"], batch=0)
    export_onnx(root / "cnn", out["cnn_batch1"], batch=1)
    export_onnx(root / "ir", out["iresnet_batch1"], batch=1)
    out["cnn_pt"] = root / "cnn" / "backbone.pt"
    return out


@pytest.mark.parametrize("name", ["cnn_dynamic", "cnn_batch1", "iresnet_batch1"])
def test_converted_model_matches_onnxruntime_on_real_faces(onnx_models: dict[str, Path], name: str) -> None:
    ort_bb = open_backbone(onnx_models[name])  # onnxruntime
    torch_bb = load_backbone(onnx_models[name])  # onnx2torch, trainable
    assert torch_bb.arch == "onnx" and torch_bb.fingerprint == ort_bb.fingerprint
    assert torch_bb.preprocess == ort_bb.preprocess
    assert any(p.requires_grad for p in torch_bb.model.parameters())
    x = torch.stack([ort_bb.preprocess(load_image(p)) for p in real_faces()])
    assert float((torch_bb.embed(x) - ort_bb.embed(x)).abs().max()) < 1e-4
    raw_t = torch_bb.model.eval()(x).detach()  # the raw embeddings too, not only the unit ones
    raw_o = torch.from_numpy(ort_bb._run(x.numpy()))
    assert float((raw_t - raw_o).abs().max()) / max(1.0, float(raw_o.abs().max())) < 1e-4


def test_unconvertible_op_is_one_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Shrink", ["f"], ["embedding"], lambd=0.1)]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 32, 32])
    graph = helper.make_graph(nodes, "g", [inp], [helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                                                                [None, 4])], [w])
    path = tmp_path / "shrink.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert open_backbone(path).embedding_size == 4  # onnxruntime runs it: only training is refused
    with pytest.raises(IncompatibleArtifact, match="ONNX op Shrink"):
        load_backbone(path)
    code, _, err = run_cli(capsys, "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                           "--init", str(path))
    assert_one_line_error(code, err, "Shrink")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_slice(tmp_path_factory.mktemp("faces"), lfw_identities(3, 24), 3)


def test_pretrain_init_from_onnx_trains_and_exports(onnx_models: dict[str, Path], faces: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    src = onnx_models["cnn_batch1"]
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "pretrain", "--data", str(faces), "--out", str(run), "--init", str(src),
                           "--batch-size", "16", "--steps", "3", "--lr", "0.05", "--val-fraction", "0",
                           "--workers", "0", "-q")
    assert code == 0, err
    before, after = load_backbone(src), load_backbone(run)
    assert after.arch == "onnx" and after.embedding_size == before.embedding_size == 32
    assert after.preprocess == before.preprocess
    x = torch.stack([before.preprocess(load_image(p)) for p in real_faces(4)])
    moved = float((after.embed(x) - before.embed(x)).abs().max())
    assert moved > 1e-4  # trained, not frozen
    summary = export_onnx(run, tmp_path / "tuned.onnx", check_paths=real_faces(4))
    assert summary["max_abs_diff"] <= 1e-4
    assert float((open_backbone(tmp_path / "tuned.onnx").embed(x) - after.embed(x)).abs().max()) < 1e-4
    assert "ONNX graph" in (run / "manifest.json").read_text()  # the graph is named, not copied


def test_init_refuses_other_sizes_or_arch(onnx_models: dict[str, Path], faces: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    for extra, needle in ((["--embedding-size", "64"], "embedding size 32"), (["--arch", "iresnet18"], "small_cnn"),
                          (["--input-size", "64"], "32px")):
        out = tmp_path / "x"
        code, _, err = run_cli(capsys, "pretrain", "--data", str(faces), "--out", str(out), "--init",
                               str(onnx_models["cnn_pt"].parent), *extra)
        assert_one_line_error(code, err, "--init", needle)
        assert not out.exists()


def test_train_dp_fine_tunes_an_onnx_backbone(onnx_models: dict[str, Path], faces: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    src = onnx_models["cnn_dynamic"]
    ort_bb = open_backbone(src)
    index = open_face_set(faces)
    emb = embed_paths(ort_bb, [index.path(r) for r in index.select_images("id")], batch_size=32)
    store = tmp_path / "store"
    PrototypeStore.create(store, 32, list(index.names), backbone_fingerprint=ort_bb.fingerprint,
                          vectors=emb.vectors, momentum=True).close()
    exact_queues(store, emb.vectors, cq=8, dq=4)
    out = tmp_path / "run"
    train = TrainConfig(steps=3, lr=0.05, weight_decay=0.0, schedule="constant", log_every=1, seed=3)
    train_dp(TrainDPConfig(store=store, out=out, data=faces, backbone=src, classes=8, sampled=4,
                           photos_per_class=2, workers=0, train=train), CPU)
    tuned, before = load_backbone(out), load_backbone(src)
    assert tuned.arch == "onnx"
    x = torch.stack([before.preprocess(load_image(p)) for p in real_faces(4)])
    assert float((tuned.embed(x) - before.embed(x)).abs().max()) > 1e-4  # the backbone moved
    other = tmp_path / "store64"
    PrototypeStore.create(other, 64, list(index.names), backbone_fingerprint=ort_bb.fingerprint,
                          vectors=np.tile(emb.vectors, 2) / np.sqrt(2), momentum=True).close()
    exact_queues(other, np.tile(emb.vectors, 2) / np.sqrt(2), cq=8, dq=4)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "train-dp", "--data", str(faces), "--backbone", str(src), "--store", str(other),
                           "--out", str(tmp_path / "run2"), "--steps", "1")
    assert_one_line_error(code, err, "embedding size 64", "32")
    assert not (tmp_path / "run2" / "log.jsonl").exists()
