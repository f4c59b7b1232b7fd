"""Detector wrapper: ultralytics YOLO at the edge, loaded lazily, plus a calibration detector.

``ultralytics`` and ``torch`` are imported only when a model is loaded, so the
rest of the core (and its tests) never pays for them.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import ModelConfig
from pipeline.errors import ModelError
from pipeline.messages import Detections

__all__ = [
    "Detector",
    "UltralyticsDetector",
    "CalibrationDetector",
    "SyntheticDetector",
    "synthetic_detections",
    "make_detector",
    "check_model",
    "resolve_device",
]

logger = logging.getLogger(__name__)

_CALIBRATION = re.compile(r"^(sleep|synthetic):(\d+(?:\.\d+)?)ms$")
MODEL_SUFFIXES = (".pt", ".onnx", ".engine", ".torchscript", ".yaml", ".xml", ".tflite", ".mlpackage")
SAFE_SUFFIXES = (".onnx", ".engine", ".xml")
"""Formats that hold no pickle: ONNX, TensorRT, OpenVINO IR (``model.safe_formats_only``)."""


class Detector(Protocol):
    """Anything that turns a batch of BGR images into one ``Detections`` per image."""

    name: str

    def detect(self, images: list[np.ndarray]) -> list[Detections]: ...


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when this process sees a GPU, else 'cpu'."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def from_ultralytics(result: Any) -> Detections:
    """Convert one ``ultralytics.engine.results.Results`` to column-wise ``Detections``."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return Detections.empty()
    class_id = boxes.cls.cpu().numpy().astype(np.int64)
    names = result.names
    return Detections(
        xyxy=boxes.xyxy.cpu().numpy().astype(np.float32),
        confidence=boxes.conf.cpu().numpy().astype(np.float32),
        class_id=class_id,
        labels=tuple(str(names[int(c)]) for c in class_id),
    )


class UltralyticsDetector:
    """YOLO through ultralytics; the weights load on first use (or ``load()``), once per process.

    Example:
        >>> det = UltralyticsDetector(ModelConfig(name="../shared/models/yolov8n_int8.onnx"))
        >>> det.detect([image])[0].labels
        ('bicycle', 'car', 'dog', 'truck')
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.name = config.name
        self.device = resolve_device(config.device)
        self._model: Any = None

    def load(self) -> None:
        if self._model is not None:
            return
        check_model(self.config.name, safe_only=self.config.safe_formats_only)
        try:
            from ultralytics import YOLO

            model = YOLO(self.config.name, task="detect")
            # Some formats (ONNX) only open their runtime on the first predict: fail here, not mid-stream.
            model.predict(np.zeros((64, 64, 3), dtype=np.uint8), imgsz=self.config.imgsz, device=self.device, verbose=False)
            self._model = model
        except Exception as exc:  # ultralytics raises many types for a bad file
            raise ModelError(f"cannot load model {self.config.name!r}: {exc}") from exc
        logger.info("loaded %s on %s", self.config.name, self.device)

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        self.load()
        results = self._model.predict(
            images,
            conf=self.config.min_confidence,
            imgsz=self.config.imgsz,
            device=self.device,
            verbose=False,
        )
        return [from_ultralytics(r) for r in results]


class CalibrationDetector:
    """Sleeps a fixed time per frame and finds nothing: measures the pipeline's own cost.

    A calibration tool for scaling experiments on small machines, selected with
    ``model.name: "sleep:40ms"``; ``vapipe run`` refuses it unless asked.
    """

    needs_pixels = False
    """Finds nothing whatever the pixels: the InterConsumer does not decode JPEGs for it."""

    def __init__(self, per_frame_s: float) -> None:
        self.per_frame_s = per_frame_s
        self.name = f"sleep:{per_frame_s * 1000:g}ms"

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        time.sleep(self.per_frame_s * len(images))
        return [Detections.empty() for _ in images]


SYNTHETIC_LABELS = ("car", "truck", "bus", "person")


def synthetic_detections(image: np.ndarray, grid: int = 4) -> Detections:
    """Boxes that depend only on the pixels: one per grid cell, labelled by cell, scored by its brightness.

    The same JPEG always gives the same boxes, with confidences spread over 0.3-0.99, so crops
    (> 0.7) and vehicle counts (> 0.5) exist and are reproducible without running a model.
    """
    h, w = image.shape[:2]
    gray = image.mean(axis=2) if image.ndim == 3 else image.astype(np.float64)
    boxes, scores, classes = [], [], []
    for row in range(grid):
        for col in range(grid):
            y0, y1, x0, x1 = row * h // grid, (row + 1) * h // grid, col * w // grid, (col + 1) * w // grid
            if y1 - y0 < 2 or x1 - x0 < 2:
                continue
            level = float(gray[y0:y1, x0:x1].mean())
            boxes.append((x0, y0, x1 - 1, y1 - 1))
            scores.append(0.3 + 0.69 * ((level * 7.0) % 100.0) / 100.0)
            classes.append((row * grid + col) % len(SYNTHETIC_LABELS))
    if not boxes:
        return Detections.empty()
    class_id = np.asarray(classes, dtype=np.int64)
    return Detections(
        xyxy=np.asarray(boxes, dtype=np.float32),
        confidence=np.asarray(scores, dtype=np.float32),
        class_id=class_id,
        labels=tuple(SYNTHETIC_LABELS[int(c)] for c in class_id),
    )


class SyntheticDetector(CalibrationDetector):
    """A calibration detector that finds ``synthetic_detections``: crops and counts without a model.

    Selected with ``model.name: "synthetic:40ms"``; for tests of delivery under faults, where
    what is detected does not matter but that every box is cropped and counted exactly once does.
    """

    needs_pixels = True

    def __init__(self, per_frame_s: float) -> None:
        super().__init__(per_frame_s)
        self.name = f"synthetic:{per_frame_s * 1000:g}ms"

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        time.sleep(self.per_frame_s * len(images))
        return [synthetic_detections(image) for image in images]


def is_calibration(name: str) -> bool:
    return bool(_CALIBRATION.match(name))


def check_model(name: str, safe_only: bool = False) -> None:
    """Fail early, with one line, on a model path that cannot exist (or, with ``safe_only``, that is not
    a pickle-free format: a ``.pt`` file runs whatever code it carries when loaded).

    Bare official names ('yolov8n.pt') are left to ultralytics, which downloads them.

    Raises:
        ModelError: the name looks like a path and no such file exists; or ``safe_only`` and the
            format is not ONNX, TensorRT or OpenVINO.
    """
    if is_calibration(name):
        return
    if safe_only and not (name.endswith(SAFE_SUFFIXES) or name.rstrip("/").endswith("_openvino_model")):
        raise ModelError(
            f"model {name!r} refused: model.safe_formats_only accepts only ONNX (.onnx), TensorRT (.engine) "
            "or OpenVINO (.xml, *_openvino_model) files; pickle-based weights (.pt) can run code when loaded"
        )
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and path.suffix not in (".mlpackage", ""):
            raise ModelError(f"model path {name!r} is a folder, not a model file")
        return
    looks_like_path = "/" in name or "\\" in name or name.startswith(".")
    if looks_like_path:
        raise ModelError(f"model file not found: {name}")
    if not name.endswith(MODEL_SUFFIXES):
        raise ModelError(
            f"unknown model {name!r}: give an ultralytics name such as 'yolov8n.pt' or a path ending in one of {', '.join(MODEL_SUFFIXES)}"
        )


def make_detector(config: ModelConfig) -> Detector:
    """Build the detector a config names (not loaded yet)."""
    match = _CALIBRATION.match(config.name)
    if match:
        kind, per_frame_s = match.group(1), float(match.group(2)) / 1000.0
        return SyntheticDetector(per_frame_s) if kind == "synthetic" else CalibrationDetector(per_frame_s)
    check_model(config.name, safe_only=config.safe_formats_only)
    return UltralyticsDetector(config)
