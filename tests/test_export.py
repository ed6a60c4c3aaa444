"""ONNX export parity with PyTorch, and ONNX backbones (dynamic, fixed batch 1, in-graph normalisation)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lblctl.core.errors import LblError
from lblctl.data.faces import Preprocess, load_image
from lblctl.models.backbones import create_backbone
from lblctl.models.checkpoint import load_backbone, open_backbone, save_backbone
from lblctl.models.export import export_onnx
from lblctl.models.onnx import OnnxBackbone, load_onnx_backbone

from .conftest import LFW, lfw_identities

SIZE = 32


def make_backbone(path: Path, seed: int = 0, center_crop: float = 0.6) -> Path:
    """An untrained small_cnn (32 px, width 8) with BN statistics of real faces.

    Random weights with default BN statistics map every face near one direction (cosines ≈ 0.99),
    where float noise between batch sizes reorders scores; face statistics spread them out.
    """
    torch.manual_seed(seed)
    model = create_backbone("small_cnn", 32, SIZE, width=8)
    pre = Preprocess(SIZE, center_crop)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        model(_calibration_batch(pre))
    model.eval()
    save_backbone(path, model, arch="small_cnn", embedding_size=32, preprocess=Preprocess(SIZE, center_crop),
                  arch_kwargs={"width": 8})
    return path


@functools.cache
def _calibration_batch(pre: Preprocess) -> torch.Tensor:
    names = lfw_identities(1, 400)[-48:]  # identities far down the list: not in the test slices
    return torch.stack([pre(load_image(LFW / n / sorted(os.listdir(LFW / n))[0])) for n in names])


def face_paths(n: int) -> list[str]:
    out = []
    for name in lfw_identities(2, n):
        out.append(str(LFW / name / sorted(os.listdir(LFW / name))[0]))
    return out[:n]


def faces_tensor(pre: Preprocess, n: int) -> torch.Tensor:
    return torch.stack([pre(load_image(p)) for p in face_paths(n)])


def test_export_dynamic_matches_pytorch(tmp_path):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    out = tmp_path / "model.onnx"
    res = export_onnx(bb_path, out, check_paths=face_paths(5))
    assert res["max_abs_diff"] <= 1e-4 and res["batch"] == "dynamic"
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = {m.key: m.value for m in proto.metadata_props}
    assert meta["lblctl.center_crop"] == "0.6" and meta["lblctl.input_size"] == str(SIZE)

    torch_bb = load_backbone(bb_path)
    onnx_bb = open_backbone(out)
    assert isinstance(onnx_bb, OnnxBackbone) and onnx_bb.batched
    assert onnx_bb.preprocess == torch_bb.preprocess and onnx_bb.embedding_size == 32
    x = faces_tensor(torch_bb.preprocess, 7)
    for n in (1, 3, 7):  # other batch sizes than the export's example
        raw_onnx = onnx_bb.session.run(None, {onnx_bb.input_name: x[:n].numpy()})[0]
        raw_torch = torch_bb.model(x[:n]).detach().numpy()
        assert np.abs(raw_onnx - raw_torch).max() <= 1e-4
    for flip in (False, True):
        np.testing.assert_allclose(onnx_bb.embed(x, flip=flip).numpy(), torch_bb.embed(x, flip=flip).numpy(),
                                   atol=1e-5)
    assert onnx_bb.fingerprint != torch_bb.fingerprint


def test_export_fixed_batch_one_is_batched_when_the_graph_allows(tmp_path):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    out = tmp_path / "fixed.onnx"
    export_onnx(bb_path, out, batch=1)
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 1
    onnx_bb = load_onnx_backbone(out)
    assert onnx_bb.meta["fixed_batch"] == 1 and onnx_bb.batched  # lifted after the probe agreed
    torch_bb = load_backbone(bb_path)
    x = faces_tensor(torch_bb.preprocess, 6)
    np.testing.assert_allclose(onnx_bb.embed(x).numpy(), torch_bb.embed(x).numpy(), atol=1e-5)
    unlifted = load_onnx_backbone(out, probe=False)
    assert not unlifted.batched
    np.testing.assert_allclose(unlifted.embed(x).numpy(), torch_bb.embed(x).numpy(), atol=1e-5)


def _handmade(path: Path, *, reshape_to_one: bool, normalise_in_graph: bool, size: int = 8, dim: int = 6) -> np.ndarray:
    """A tiny insightface-like graph: [Sub, Mul] → Reshape → MatMul; returns its weight matrix."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * size * size, dim)).astype(np.float32)
    nodes, inits = [], [numpy_helper.from_array(w, "W")]
    x = "data"
    if normalise_in_graph:  # MXNet exports: the graph takes 0–255 pixels and normalises itself
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                  numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["centred"], name="_minus0"),
                  helper.make_node("Mul", ["centred", "scale"], ["normed"], name="_mul0")]
        x = "normed"
    shape = [1, -1] if reshape_to_one else [0, -1]
    inits.append(numpy_helper.from_array(np.array(shape, np.int64), "shape"))
    nodes += [helper.make_node("Reshape", [x, "shape"], ["flat"], name="Reshape_0"),
              helper.make_node("MatMul", ["flat", "W"], ["fc1"], name="MatMul_0")]
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])
    graph = helper.make_graph(nodes, "g", [data],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def _expected(images: torch.Tensor, w: np.ndarray) -> np.ndarray:
    out = images.reshape(len(images), -1).numpy() @ w
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_fixed_batch_graph_that_cannot_batch_runs_image_by_image(tmp_path):
    w = _handmade(tmp_path / "m.onnx", reshape_to_one=True, normalise_in_graph=False)
    bb = load_onnx_backbone(tmp_path / "m.onnx")
    assert not bb.batched and not bb.raw_input and bb.preprocess.input_size == 8 and bb.embedding_size == 6
    x = faces_tensor(bb.preprocess, 5)
    np.testing.assert_allclose(bb.embed(x).numpy(), _expected(x, w), atol=1e-5)


def test_graph_that_normalises_itself_gets_raw_pixels(tmp_path):
    w = _handmade(tmp_path / "m.onnx", reshape_to_one=False, normalise_in_graph=True)
    bb = load_onnx_backbone(tmp_path / "m.onnx")
    assert bb.raw_input and bb.batched  # the [0, -1] reshape keeps the batch: lifted
    x = faces_tensor(bb.preprocess, 4)  # our tensors in [−1, 1]; the graph must see 0–255 to agree
    np.testing.assert_allclose(bb.embed(x).numpy(), _expected(x, w), atol=1e-4)


def test_bad_inputs(tmp_path):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    with pytest.raises(LblError, match="ending in .onnx"):
        export_onnx(bb_path, tmp_path / "model.bin")
    export_onnx(bb_path, tmp_path / "m.onnx")
    with pytest.raises(LblError, match="already an ONNX model"):
        export_onnx(tmp_path / "m.onnx", tmp_path / "again.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(LblError, match="not a readable ONNX model"):
        open_backbone(tmp_path / "junk.onnx")
    with pytest.raises(LblError, match="no such file"):
        open_backbone(tmp_path / "missing.onnx")
    with pytest.raises(LblError, match="embedding size 32, expected 64"):
        open_backbone(tmp_path / "m.onnx", expect_embedding_size=64)


@pytest.mark.slow
def test_cli_export(tmp_path):
    bb_path = make_backbone(tmp_path / "backbone.pt")
    out = tmp_path / "model.onnx"
    args = [sys.executable, "-m", "lblctl.cli", "export", "--backbone", str(tmp_path), "--out", str(out), "--json",
            "--check-image", face_paths(1)[0]]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["max_abs_diff"] <= 1e-4 and summary["checked_images"] == 1 and out.is_file()
    assert summary["source_fingerprint"] == load_backbone(bb_path).fingerprint
    proc = subprocess.run([sys.executable, "-m", "lblctl.cli", "export", "--backbone", str(out), "--out",
                           str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: --backbone" in proc.stderr
