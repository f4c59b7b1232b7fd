"""Message types carried between stages: frame metadata and column-wise detections.

Detections are held column-wise like ``supervision.Detections`` (``xyxy (n,4)``,
``confidence (n,)``, ``class_id (n,)``), so crop and count logic stays vectorised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["SCHEMA_VERSION", "FrameMeta", "Detections", "FrameDetections", "EndOfStream", "SkippedFrame", "SkipReason"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Bumped on any incompatible change to a topic's wire format."""


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """What every stage needs to know about a frame without decoding its JPEG.

    Attributes:
        stream_id: name of the camera or video the frame belongs to.
        frame_index: position of the frame in its stream, from 0; restores per-stream order.
        capture_ts: when the frame was captured (Unix seconds): grabbed from a live camera, or the
            frame's time within a recording from when the producer started it, so a replayed file has
            the same clock whatever the producer's pace (the tracker's clock).
        width: image width in pixels.
        height: image height in pixels.
        publish_ts: when the producer published it (Unix seconds); the pipeline's latency is measured
            from here. None in records written before it existed: ``published_at`` is then ``capture_ts``.
    """

    stream_id: str
    frame_index: int
    capture_ts: float
    width: int
    height: int
    schema_version: int = SCHEMA_VERSION
    publish_ts: float | None = None

    @property
    def published_at(self) -> float:
        """When the frame entered the pipeline."""
        return self.capture_ts if self.publish_ts is None else self.publish_ts

    def __post_init__(self) -> None:
        if not self.stream_id:
            raise ValueError("stream_id must not be empty")
        if self.frame_index < 0:
            raise ValueError(f"frame_index must be >= 0, got {self.frame_index}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"frame size must be positive, got {self.width}x{self.height}")

    @property
    def key(self) -> str:
        """Unique id of the frame across streams, used as record key and file-name stem."""
        return f"{self.stream_id}/{self.frame_index:08d}"


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Marks the end of a finite stream: how many frames were published and how many skipped."""

    stream_id: str
    frames_published: int
    frames_skipped: int = 0
    schema_version: int = SCHEMA_VERSION


SkipReason = Literal["poison", "too_large", "lost_gap", "disconnected", "behind"]
"""Why a frame index will never be counted: its record was dead-lettered because it could not be
decoded (``poison``) or its output would not fit a record (``too_large``), the count table gave up
waiting for it (``lost_gap``: more frames above it applied than the reorder horizon), or its camera
was away when it would have been captured (``disconnected``: the producer numbers on over an outage),
or it was dropped at the source because the pipeline was behind (``behind``: ``producer.mode: realtime``)."""


@dataclass(frozen=True, slots=True)
class SkippedFrame:
    """A frame that will never reach the count stage, so its index must not hold the table open."""

    stream_id: str
    frame_index: int
    reason: SkipReason
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.stream_id:
            raise ValueError("stream_id must not be empty")
        if self.frame_index < 0:
            raise ValueError(f"frame_index must be >= 0, got {self.frame_index}")


@dataclass(frozen=True)
class Detections:
    """Boxes found in one frame, column-wise.

    Attributes:
        xyxy: ``(n, 4)`` float boxes in pixels (x1, y1, x2, y2).
        confidence: ``(n,)`` scores in [0, 1].
        class_id: ``(n,)`` integer class ids.
        labels: ``n`` class names, aligned with ``class_id``.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.confidence)
        expected = {"xyxy": (n, 4), "confidence": (n,), "class_id": (n,)}
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise ValueError(f"{name} must have shape {shape}, got {actual}")
        if len(self.labels) != n:
            raise ValueError(f"labels must have {n} entries, got {len(self.labels)}")

    @classmethod
    def empty(cls) -> Detections:
        return cls(
            xyxy=np.zeros((0, 4), dtype=np.float32),
            confidence=np.zeros((0,), dtype=np.float32),
            class_id=np.zeros((0,), dtype=np.int64),
            labels=(),
        )

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> Detections:
        """Build from ``[{"label", "class_id", "confidence", "box": [x1, y1, x2, y2]}, ...]``."""
        if not records:
            return cls.empty()
        return cls(
            xyxy=np.asarray([r["box"] for r in records], dtype=np.float32).reshape(-1, 4),
            confidence=np.asarray([r["confidence"] for r in records], dtype=np.float32),
            class_id=np.asarray([r["class_id"] for r in records], dtype=np.int64),
            labels=tuple(str(r["label"]) for r in records),
        )

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per box (the wire format of topics B and C)."""
        return [
            {
                "label": self.labels[i],
                "class_id": int(self.class_id[i]),
                "confidence": float(self.confidence[i]),
                "box": [float(v) for v in self.xyxy[i]],
            }
            for i in range(len(self))
        ]

    def __len__(self) -> int:
        return len(self.confidence)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Detections):
            return NotImplemented
        return (
            self.labels == other.labels
            and np.array_equal(self.class_id, other.class_id)
            and np.array_equal(self.confidence, other.confidence)
            and np.array_equal(self.xyxy, other.xyxy)
        )

    def filter(self, mask: np.ndarray) -> Detections:
        """Keep the boxes where ``mask`` is true."""
        idx = np.flatnonzero(mask)
        return Detections(
            xyxy=self.xyxy[idx],
            confidence=self.confidence[idx],
            class_id=self.class_id[idx],
            labels=tuple(self.labels[i] for i in idx),
        )


@dataclass(frozen=True)
class FrameDetections:
    """The InterConsumer's result for one frame: its metadata and what the model found."""

    meta: FrameMeta
    detections: Detections
    model: str = ""
    inference_ms: float = 0.0
