"""Face detectors that give a box, a score and 5 landmarks: insightface's SCRFD and OpenCV's YuNet.

Both are thin wrappers over the libraries' own classes (never a model-zoo download: the model is
always a path). They take a BGR uint8 image, as both libraries expect, and return every face
scoring at least ``floor`` so that the caller can tell "no face" from "a face, but a weak one".
Landmark order is the ArcFace one: right eye, left eye (the eye on the image's left first), nose
tip, right and left mouth corner.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lblctl.core.errors import LblError

MAX_NATIVE_SIDE = 640  # --det-size 0 runs at the image's own size, but never above this side


@dataclass
class Face:
    """One detection in the input image's pixel coordinates."""

    box: np.ndarray  # x1, y1, x2, y2 (float32)
    score: float
    landmarks: np.ndarray  # 5×2 (float32)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])


def onnx_providers(use_cuda: bool) -> list[str]:
    """CUDA first when asked for and present in this onnxruntime build, CPU always last (the one choice of
    onnxruntime providers: detectors here, recognition models in :mod:`lblctl.models.onnx`)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if use_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _round32(x: float) -> int:
    return max(32, int(math.ceil(x / 32.0)) * 32)


def _check_model(model: Path | None, detector: str) -> Path:
    if model is None:
        shipped = "scrfd_500m" if detector == "scrfd" else "yunet"
        raise LblError(f"--detector {detector} needs --model PATH to its ONNX file "
                       f"(the shipped one is shared/models/{shipped}.onnx)")
    model = Path(model)
    if not model.is_file():
        raise LblError(f"--model {model}: no such file; give the path to the {detector} ONNX model")
    return model


class ScrfdDetector:
    """insightface's ``SCRFD`` on an onnxruntime session whose thread count we choose."""

    name = "scrfd"

    def __init__(self, model: Path | None, *, threads: int = 1, use_cuda: bool = False, det_size: int = 640,
                 floor: float = 0.3) -> None:
        import onnxruntime as ort
        from insightface.model_zoo.scrfd import SCRFD

        model = _check_model(model, "scrfd")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # SCRFD at non-640 sizes logs a harmless shape warning
        self.providers = onnx_providers(use_cuda)
        try:
            session = ort.InferenceSession(str(model), sess_options=opts, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several private types
            raise LblError(f"--model {model}: not a loadable ONNX model "
                           f"({type(exc).__name__}: {exc})") from None
        outputs = len(session.get_outputs())
        if outputs not in (9, 15):
            raise LblError(f"--model {model}: not an SCRFD model with keypoints (it has {outputs} outputs, "
                           "SCRFD *kps models have 9 or 15); for YuNet use --detector yunet")
        self.det_size = int(det_size)
        # a fixed square input gets its own static-shape session; native sizes share the dynamic one
        self.model = SCRFD(model_file=str(model), session=session, static_shape_sessions=self.det_size > 0)
        size = (self.det_size, self.det_size) if self.det_size > 0 else None
        self.model.prepare(0 if self.providers[0] == "CUDAExecutionProvider" else -1, input_size=size,
                           det_thresh=floor, nms_thresh=0.4)
        self.floor = floor

    def detect(self, bgr: np.ndarray) -> list[Face]:
        if self.det_size > 0:
            input_size = (self.det_size, self.det_size)
        else:
            h, w = bgr.shape[:2]
            s = min(1.0, MAX_NATIVE_SIDE / max(h, w))
            input_size = (_round32(w * s), _round32(h * s))
        dets, kpss = self.model.detect(bgr, input_size=input_size, det_thresh=self.floor)
        if kpss is None:
            return []
        return [Face(d[:4].astype(np.float32), float(d[4]), k.astype(np.float32))
                for d, k in zip(dets, kpss, strict=True)]


class YunetDetector:
    """OpenCV's ``FaceDetectorYN``; large images are scaled down to ``det_size`` first."""

    name = "yunet"

    def __init__(self, model: Path | None, *, threads: int = 1, det_size: int = 640, floor: float = 0.3,
                 nms: float = 0.3, top_k: int = 50) -> None:
        import cv2

        model = _check_model(model, "yunet")
        cv2.setNumThreads(max(1, threads))
        with contextlib.suppress(AttributeError):  # older builds have no logging module
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self.net = cv2.FaceDetectorYN.create(str(model), "", (320, 320), floor, nms, top_k)
            self.net.setInputSize((64, 64))
            _, probe = self.net.detect(np.zeros((64, 64, 3), np.uint8))
        except cv2.error as exc:
            raise LblError(f"--model {model}: OpenCV's FaceDetectorYN cannot use it "
                           f"({str(exc).strip().splitlines()[-1]}); give a YuNet ONNX file") from None
        if probe is not None and probe.shape[1] < 15:
            raise LblError(f"--model {model}: gives no landmarks; give a YuNet ONNX file")
        self.max_side = int(det_size) if det_size > 0 else MAX_NATIVE_SIDE
        self.floor = floor

    def detect(self, bgr: np.ndarray) -> list[Face]:
        import cv2

        h, w = bgr.shape[:2]
        s = min(1.0, self.max_side / max(h, w))
        img = bgr if s == 1.0 else cv2.resize(bgr, (max(1, round(w * s)), max(1, round(h * s))),
                                              interpolation=cv2.INTER_AREA)
        self.net.setInputSize((img.shape[1], img.shape[0]))
        _, faces = self.net.detect(img)
        if faces is None:
            return []
        out = []
        for f in faces:
            x, y, bw, bh = (float(v) / s for v in f[:4])
            out.append(Face(np.array([x, y, x + bw, y + bh], np.float32), float(f[14]),
                            (f[4:14].reshape(5, 2) / s).astype(np.float32)))
        return out


Detector = ScrfdDetector | YunetDetector


def make_detector(name: str, model: Path | None, *, threads: int = 1, use_cuda: bool = False,
                  det_size: int = 640, floor: float = 0.3) -> Detector:
    """Load one detector (a worker process calls this once)."""
    if name == "scrfd":
        return ScrfdDetector(model, threads=threads, use_cuda=use_cuda, det_size=det_size, floor=floor)
    if name == "yunet":
        return YunetDetector(model, threads=threads, det_size=det_size, floor=floor)
    raise LblError(f"--detector {name}: expected scrfd, yunet, landmarks or none")


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
