"""Tiny builders shared by the pipeline unit tests (after supervision's ``test/test_utils.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext as DoesNotRaise

import numpy as np

from pipeline.messages import Detections, FrameDetections, FrameMeta

__all__ = ["DoesNotRaise", "gradient_image", "mock_detections", "mock_meta", "mock_frame", "vehicles"]


def mock_detections(
    xyxy: Sequence[Sequence[float]] = (),
    confidence: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    class_id: Sequence[int] | None = None,
) -> Detections:
    """Detections from plain lists; confidence defaults to 0.9 and labels to 'car'."""
    n = len(xyxy)
    return Detections(
        xyxy=np.asarray(xyxy, dtype=np.float32).reshape(n, 4),
        confidence=np.asarray([0.9] * n if confidence is None else confidence, dtype=np.float32),
        class_id=np.asarray(range(n) if class_id is None else class_id, dtype=np.int64),
        labels=tuple(["car"] * n if labels is None else labels),
    )


def vehicles(*pairs: tuple[str, float]) -> Detections:
    """One 10x10 box per (label, confidence) pair."""
    return mock_detections(
        xyxy=[[0, 0, 10, 10]] * len(pairs),
        confidence=[c for _, c in pairs],
        labels=[label for label, _ in pairs],
    )


def mock_meta(
    stream_id: str = "cam1", frame_index: int = 0, capture_ts: float = 1000.0, width: int = 64, height: int = 48
) -> FrameMeta:
    return FrameMeta(stream_id=stream_id, frame_index=frame_index, capture_ts=capture_ts, width=width, height=height)


def mock_frame(
    stream_id: str = "cam1", frame_index: int = 0, detections: Detections | None = None, capture_ts: float | None = None
) -> FrameDetections:
    ts = 1000.0 + frame_index if capture_ts is None else capture_ts
    return FrameDetections(
        meta=mock_meta(stream_id, frame_index, ts),
        detections=mock_detections() if detections is None else detections,
        model="fake",
        inference_ms=1.5,
    )


def gradient_image(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth BGR test image (compresses well, survives JPEG with small error)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1).astype(np.uint8)
