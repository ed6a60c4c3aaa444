"""ONNX recognition models (insightface's model zoo, ``lblctl export``) run with onnxruntime.

:class:`OnnxBackbone` has the interface of :class:`lblctl.models.checkpoint.Backbone` (``embed``,
``preprocess``, ``embedding_size``, ``fingerprint``), so every stage that embeds takes either.
Preprocessing is insightface's: RGB at the graph's input size (112×112 for the zoo),
(x − 127.5) / 127.5, or raw 0–255 for the old MXNet exports whose graph starts with Sub/Mul
(the rule of insightface's ``ArcFaceONNX``). Models exported by lblctl carry their own
preprocessing (input size, centre crop) in the ONNX metadata.

Many exported models fix the batch dimension at 1. Such a graph is first tried with a symbolic
batch dimension, and used batched when a probe batch gives the same embeddings as one image
at a time; otherwise images run one by one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lblctl.core.artifacts import fingerprint_file
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.data.faces import Preprocess
from lblctl.models.detectors import onnx_providers

META_PREFIX = "lblctl."


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


# an embedding size outside this range means the graph is not a recognition model (a score, a
# detector's flattened feature map); the shape checks above it catch detectors first
EMBEDDING_RANGE = (4, 8192)


def ort_reason(exc: BaseException, limit: int = 200) -> str:
    """onnxruntime's error as one readable clause: no error-code prefix, source paths or C++
    signatures, cut at a word boundary."""
    import re

    text = " ".join(str(exc).split())
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S*/\S+\.(?:cc|h|cpp):\d+ ", "", text)  # /onnxruntime_src/…/file.h:583
    text = re.sub(r"\b(?:void|bool|int|Status) [\w:<>]+\([^)]*\) ", "", text)  # the C++ function that failed
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text


def _session(model: bytes | str, device: torch.device):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: failures reach the user as one line, not ORT's red log
    threads = torch.get_num_threads()
    if threads > 0:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=opts, providers=onnx_providers(device.type == "cuda"))


def lift_batch(model) -> None:
    """Give ``model`` (in place) a symbolic batch dimension on inputs/outputs and drop stale inner shapes."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]


def _with_symbolic_batch(model) -> bytes:
    """The same graph with a symbolic batch dimension, serialised (the original is left as it is)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    lift_batch(m)
    return m.SerializeToString()


@dataclass
class OnnxBackbone:
    """An ONNX embedding model behind the :class:`~lblctl.models.checkpoint.Backbone` interface."""

    session: Any
    input_name: str
    embedding_size: int
    preprocess: Preprocess
    fingerprint: str
    path: Path
    device: torch.device
    batched: bool  # False: the graph only takes one image per run
    raw_input: bool  # True: the graph normalises itself and wants 0–255 pixels
    arch: str = "onnx"
    meta: dict[str, Any] = field(default_factory=dict)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.batched or len(x) == 1:
            return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32).reshape(len(x), -1)
        return np.concatenate([self._run(x[i : i + 1]) for i in range(len(x))])

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Unit embeddings (float32, CPU) of a batch of preprocessed images in [−1, 1]."""
        x = images.detach().cpu().float()
        if self.raw_input:
            x = x * 127.5 + 127.5
        arr = np.ascontiguousarray(x.numpy())
        out = self._run(arr)
        if flip:
            out = out + self._run(np.ascontiguousarray(arr[:, :, :, ::-1]))
        return F.normalize(torch.from_numpy(out), dim=1)


def _graph_normalises(graph) -> bool:
    """insightface's test: MXNet exports subtract and multiply in their first nodes."""
    names = [n.name for n in graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return sub and mul


def load_onnx_backbone(path: str | os.PathLike, device: torch.device | str = "cpu",
                       expect_embedding_size: int | None = None, probe: bool = True) -> OnnxBackbone:
    """Open an ONNX recognition model; ``probe`` checks whether a fixed batch of 1 can be lifted."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise LblError(f"--backbone {p}: no such file; give an ONNX recognition model or an lblctl RUN/backbone.pt")
    try:
        model = onnx.load(str(p))
    except (DecodeError, OSError, ValueError) as exc:
        raise IncompatibleArtifact(f"--backbone {p}: not a readable ONNX model ({str(exc)[:120]})") from None
    device = torch.device(device)
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        hint = " (a face detector?)" if len(model.graph.output) > 1 else ""
        raise IncompatibleArtifact(f"--backbone {p}: not a recognition model{hint}: expected one image input and "
                                   f"one embedding output, found {len(inputs)} inputs and "
                                   f"{len(model.graph.output)} outputs")
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) not in (0, 2):
        raise IncompatibleArtifact(f"--backbone {p}: not a recognition model: its output has {len(out_dims)} "
                                   "dimensions, an embedding batch has 2 (N×D)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or (dims[1] is not None and dims[1] != 3):
        raise IncompatibleArtifact(f"--backbone {p}: input shape {dims} is not an N×3×H×W image batch")
    meta = {m.key[len(META_PREFIX):]: m.value for m in model.metadata_props if m.key.startswith(META_PREFIX)}
    h, w = _dim(dims[2]), _dim(dims[3])
    if h is not None and w is not None and h != w:
        raise IncompatibleArtifact(f"--backbone {p}: non-square input {h}×{w} is not supported")
    size = int(meta.get("input_size", h or 112))
    preprocess = Preprocess(input_size=size, center_crop=float(meta.get("center_crop", 1.0)))
    raw_input = _graph_normalises(model.graph) and "input_size" not in meta
    fixed_batch = dims[0]
    if fixed_batch is not None and fixed_batch != 1:
        raise IncompatibleArtifact(f"--backbone {p}: fixed batch dimension {fixed_batch}; only 1 or dynamic work")

    try:
        session = _session(str(p), device)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise IncompatibleArtifact(f"--backbone {p}: onnxruntime cannot run it ({ort_reason(exc)})") from None
    bb = OnnxBackbone(session, inputs[0].name, 0, preprocess, fingerprint_file(p), p, device,
                      batched=fixed_batch is None, raw_input=raw_input,
                      meta={"onnx_meta": meta, "fixed_batch": fixed_batch})
    rng = np.random.default_rng(0)
    one = rng.uniform(-1, 1, size=(1, 3, size, size)).astype(np.float32)
    try:
        probe_out = np.asarray(session.run(None, {bb.input_name: one})[0])
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleArtifact(f"--backbone {p}: a {size}×{size} test image does not run "
                                   f"({ort_reason(exc)})") from None
    _check_embedding_output(p, probe_out)
    bb.embedding_size = int(probe_out.shape[1])
    if fixed_batch == 1 and probe:
        bb = _try_batched(bb, model, device, rng)
    if expect_embedding_size is not None and bb.embedding_size != expect_embedding_size:
        raise IncompatibleArtifact(f"--backbone {p}: embedding size {bb.embedding_size}, "
                                   f"expected {expect_embedding_size}")
    return bb


def _check_embedding_output(p: Path, out: np.ndarray) -> None:
    """One image in must give one float vector of a plausible embedding size out."""
    lo, hi = EMBEDDING_RANGE
    if out.ndim != 2 or out.shape[0] != 1 or not np.issubdtype(out.dtype, np.floating):
        raise IncompatibleArtifact(f"--backbone {p}: not a recognition model: one image gives an output of shape "
                                   f"{list(out.shape)} ({out.dtype}), expected 1×D floats")
    if not lo <= out.shape[1] <= hi:
        raise IncompatibleArtifact(f"--backbone {p}: not a recognition model: embedding size {out.shape[1]} is "
                                   f"outside {lo}–{hi}")


def _try_batched(bb: OnnxBackbone, model, device: torch.device, rng: np.random.Generator) -> OnnxBackbone:
    """Lift a fixed batch of 1 when the graph really computes per image (checked on a probe batch)."""
    size = bb.preprocess.input_size
    x = rng.uniform(-1, 1, size=(3, 3, size, size)).astype(np.float32)
    if bb.raw_input:
        x = x * 127.5 + 127.5
    try:
        one_by_one = bb._run(x)
        session = _session(_with_symbolic_batch(model), device)
        together = np.asarray(session.run(None, {bb.input_name: x})[0], dtype=np.float32).reshape(3, -1)
    except Exception:  # noqa: BLE001 - any failure means: keep one image per run
        return bb
    if together.shape != one_by_one.shape:
        return bb
    scale = max(1.0, float(np.abs(one_by_one).max()))
    if not np.allclose(together, one_by_one, atol=1e-4 * scale, rtol=1e-4):
        return bb
    return replace(bb, session=session, batched=True)
