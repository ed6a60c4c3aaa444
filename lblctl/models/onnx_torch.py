"""ONNX recognition models as trainable torch modules (``pretrain --init``, ``train-dp --backbone x.onnx``).

Which converter, and why: the graph is converted op by op with **onnx2torch** (an optional extra,
``pip install 'lblctl[onnx]'``), not by mapping weights into our own ``iresnet``. Mapping by
name only works for graphs exported from arcface_torch with unfused batch norms and known
parameter names; the insightface zoo holds ResNets, MobileFaceNets and ViTs exported by different
tools (MXNet, PyTorch), and onnx2torch turns each Conv/Gemm/BatchNormalization/PRelu into the
matching ``nn`` module with its weights as parameters, so every such graph fine-tunes as it is.

Preprocessing is the one :mod:`lblctl.models.onnx` reads for onnxruntime: the graph's input size,
``(x − 127.5) / 127.5`` in RGB, or raw 0–255 pixels for the old MXNet graphs that start with
Sub/Mul (the wrapper feeds ``x * 127.5 + 127.5`` to those), lblctl's own metadata when present.
A fixed batch of 1 is lifted to a symbolic batch before converting, and the converted module is
checked on a probe batch against onnxruntime (1e-4, relative to the output's magnitude).

A converted backbone is saved as arch ``onnx`` whose ``arch_kwargs`` hold the graph without its
large weight tensors (base64); the weights are the checkpoint's ``state_dict`` as for any arch.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lblctl.core.artifacts import fingerprint_file
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.models.backbones import register_backbone

_STRIP_MIN_ELEMENTS = 1024  # float initializers at least this large are weights (in the state_dict)


def _require_onnx2torch():
    try:
        import onnx2torch
    except ImportError:
        raise LblError("training an ONNX model needs the optional 'onnx2torch' package: pip install "
                       "'lblctl[onnx]' (embedding with an ONNX model works without it)") from None
    return onnx2torch


def _inline_identities(model) -> None:
    """Identity nodes over initializers (the exporter's shared weights) become initializers."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
            inits[node.output[0]] = model.graph.initializer[-1]
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _check_ops(model) -> None:
    """One error naming the first op onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            get_converter(node.op_type, opsets.get(domain, opsets.get("", 13)), domain or "")
        except NotImplementedError:
            where = f" (node {node.name})" if node.name else ""
            raise IncompatibleArtifact(f"ONNX op {node.op_type} (opset {opsets.get(domain)}){where} cannot be "
                                       "converted to a trainable torch module; embed with this model "
                                       "(eval, imprint) or fine-tune another one") from None


def strip_weights(model) -> str:
    """The graph with large float initializers emptied (shape kept), base64 for ``arch_kwargs``."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) \
                and n >= _STRIP_MIN_ELEMENTS:
            for f in ("raw_data", "float_data", "double_data", "int32_data"):
                t.ClearField(f)
            t.doc_string = "lblctl:stripped"
    return base64.b64encode(m.SerializeToString()).decode("ascii")


def _unstrip(model) -> None:
    import onnx
    from onnx import helper

    for t in model.graph.initializer:
        if t.doc_string == "lblctl:stripped":
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            t.raw_data = np.zeros(tuple(t.dims), dtype=dtype).tobytes()
            t.doc_string = ""
    assert onnx  # noqa: S101 - keep the import for type checkers


class OnnxNet(nn.Module):
    """A converted ONNX graph taking our [−1, 1] RGB batch and returning B×D embeddings."""

    def __init__(self, graph: nn.Module, raw_input: bool) -> None:
        super().__init__()
        self.graph = graph
        self.raw_input = raw_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.raw_input:
            x = x * 127.5 + 127.5
        out = self.graph(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)  # B×D (also from B×D×1×1); traced without a fixed batch


def convert_model(model, raw_input: bool) -> OnnxNet:
    """An ``onnx.ModelProto`` (already prepared) as a trainable :class:`OnnxNet`."""
    onnx2torch = _require_onnx2torch()
    _check_ops(model)
    try:
        graph = onnx2torch.convert(model)
    except (NotImplementedError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise IncompatibleArtifact(f"the ONNX graph cannot be converted to torch: {str(exc).splitlines()[0][:160]}") \
            from None
    return OnnxNet(graph, raw_input)


@register_backbone("onnx", default_input_size=112)
def onnx_backbone(embedding_size: int = 512, input_size: int = 112, onnx_graph: str = "",
                  raw_input: bool = False, **_: Any) -> nn.Module:
    """Rebuild a converted ONNX backbone from its stored graph (weights come from the state_dict)."""
    import onnx

    if not onnx_graph:
        raise LblError("--arch onnx: give an ONNX model with --init (or --backbone), not --arch onnx")
    model = onnx.load_from_string(base64.b64decode(onnx_graph))
    _unstrip(model)
    return convert_model(model, raw_input)


def load_onnx_trainable(path: str | os.PathLike, device: torch.device | str = "cpu",
                        expect_embedding_size: int | None = None, atol: float = 1e-4):
    """An ONNX recognition model as a :class:`~lblctl.models.checkpoint.Backbone` with a trainable module.

    Its ``fingerprint`` is the ONNX file's, so stores imprinted with the ONNX model stay tied to it.
    """
    import onnx

    from lblctl.models.checkpoint import Backbone
    from lblctl.models.onnx import lift_batch, load_onnx_backbone

    p = Path(path)
    _require_onnx2torch()
    ort_bb = load_onnx_backbone(p, "cpu", expect_embedding_size, probe=False)  # checks shapes, preprocessing
    model = onnx.load(str(p))
    _inline_identities(model)
    lift_batch(model)
    net = convert_model(model, ort_bb.raw_input)
    size = ort_bb.preprocess.input_size
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32))
    net.eval()
    try:
        with torch.no_grad():
            got = net(x).numpy()
    except Exception as exc:  # noqa: BLE001 - a graph that fixes the batch somewhere inside
        raise IncompatibleArtifact(f"--backbone {p}: the converted graph does not run on a batch of 2 "
                                   f"({str(exc).splitlines()[0][:160]})") from None
    want = np.concatenate([ort_bb._run((x[i:i + 1] * 127.5 + 127.5 if ort_bb.raw_input else x[i:i + 1]).numpy())
                           for i in range(2)])
    scale = max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(got - want).max()) / scale
    if diff > atol:
        raise IncompatibleArtifact(f"--backbone {p}: the converted torch module differs from onnxruntime by "
                                   f"{diff:.2e} (> {atol:g}); it cannot be fine-tuned faithfully")
    state_kwargs = {"onnx_graph": strip_weights(model), "raw_input": bool(ort_bb.raw_input)}
    device = torch.device(device)
    net.to(device)
    return Backbone(net, "onnx", ort_bb.embedding_size, ort_bb.preprocess, fingerprint_file(p), p, device,
                    {"arch_kwargs": state_kwargs, "extra": {"onnx_source": str(p)}, "onnx_parity": diff})
