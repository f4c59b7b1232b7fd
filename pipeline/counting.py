"""Vehicle counting core: per-stream totals and a moving count, applied once per frame.

State is plain data with ``snapshot()``/``restore()``, so the count stage can
back it with a compacted Kafka changelog (like a Faust Table) and a restarted
replica resumes exactly where the last one stopped.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.messages import Detections, EndOfStream, FrameDetections

__all__ = ["AppliedFrames", "StreamCounts", "CountUpdate", "VehicleCounter", "vehicles_in"]

logger = logging.getLogger(__name__)


def vehicles_in(detections: Detections, labels: frozenset[str], min_confidence: float) -> Counter[str]:
    """Count boxes whose label is in ``labels`` and confidence is strictly above ``min_confidence``."""
    mask = detections.confidence > min_confidence
    return Counter(label for label, keep in zip(detections.labels, mask, strict=True) if keep and label in labels)


@dataclass
class AppliedFrames:
    """Set of frame indices already applied, compact for endless streams.

    Holds a watermark (every index below it is applied) plus the indices above it.
    """

    watermark: int = 0
    above: set[int] = field(default_factory=set)

    def __contains__(self, index: int) -> bool:
        return index < self.watermark or index in self.above

    def add(self, index: int) -> None:
        if index in self:
            return
        self.above.add(index)
        while self.watermark in self.above:
            self.above.remove(self.watermark)
            self.watermark += 1

    def skip(self, index: int) -> None:
        """Treat a never-published index (skipped by the producer) as applied-but-empty."""
        self.add(index)


@dataclass
class StreamCounts:
    """Everything the table knows about one stream."""

    totals: Counter[str] = field(default_factory=Counter)
    frames_applied: int = 0
    max_frame: int = -1
    window: dict[int, Counter[str]] = field(default_factory=dict)
    applied: AppliedFrames = field(default_factory=AppliedFrames)
    frames_expected: int | None = None
    last_capture_ts: float = 0.0

    @property
    def complete(self) -> bool:
        return self.frames_expected is not None and self.frames_applied >= self.frames_expected

    def moving(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for counts in self.window.values():
            out.update(counts)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(sorted(self.totals.items())),
            "frames_applied": self.frames_applied,
            "max_frame": self.max_frame,
            "window": {str(k): dict(v) for k, v in sorted(self.window.items())},
            "applied_watermark": self.applied.watermark,
            "applied_above": sorted(self.applied.above),
            "frames_expected": self.frames_expected,
            "last_capture_ts": self.last_capture_ts,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamCounts:
        return cls(
            totals=Counter({str(k): int(v) for k, v in data.get("totals", {}).items()}),
            frames_applied=int(data.get("frames_applied", 0)),
            max_frame=int(data.get("max_frame", -1)),
            window={int(k): Counter(v) for k, v in data.get("window", {}).items()},
            applied=AppliedFrames(int(data.get("applied_watermark", 0)), set(map(int, data.get("applied_above", [])))),
            frames_expected=data.get("frames_expected"),
            last_capture_ts=float(data.get("last_capture_ts", 0.0)),
        )


@dataclass(frozen=True)
class CountUpdate:
    """What one applied frame changed: published on the counts topic."""

    stream_id: str
    frame_index: int
    capture_ts: float
    in_frame: dict[str, int]
    totals: dict[str, int]
    moving: dict[str, int]
    frames_applied: int
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "count",
            "stream_id": self.stream_id,
            "frame_index": self.frame_index,
            "capture_ts": self.capture_ts,
            "in_frame": self.in_frame,
            "totals": self.totals,
            "moving": self.moving,
            "frames_applied": self.frames_applied,
            "complete": self.complete,
        }


class VehicleCounter:
    """The count table: per-stream, per-class totals and a moving count over the last N frames.

    ``update`` applies a frame once; a redelivered frame changes nothing and returns None.

    Example:
        >>> counter = VehicleCounter(labels=("car",), min_confidence=0.5, window_frames=10)
        >>> counter.update(frame).totals
        {'car': 2}
    """

    def __init__(self, labels: tuple[str, ...], min_confidence: float, window_frames: int) -> None:
        self.labels = frozenset(labels)
        self.min_confidence = min_confidence
        self.window_frames = window_frames
        self.streams: dict[str, StreamCounts] = {}

    def _stream(self, stream_id: str) -> StreamCounts:
        return self.streams.setdefault(stream_id, StreamCounts())

    def update(self, frame: FrameDetections) -> CountUpdate | None:
        meta = frame.meta
        state = self._stream(meta.stream_id)
        if meta.frame_index in state.applied:
            return None
        in_frame = vehicles_in(frame.detections, self.labels, self.min_confidence)
        state.applied.add(meta.frame_index)
        state.frames_applied += 1
        state.totals.update(in_frame)
        state.last_capture_ts = max(state.last_capture_ts, meta.capture_ts)
        state.max_frame = max(state.max_frame, meta.frame_index)
        lowest = state.max_frame - self.window_frames + 1
        if meta.frame_index >= lowest:
            state.window[meta.frame_index] = in_frame
        for index in [k for k in state.window if k < lowest]:
            del state.window[index]
        return CountUpdate(
            stream_id=meta.stream_id,
            frame_index=meta.frame_index,
            capture_ts=meta.capture_ts,
            in_frame=dict(in_frame),
            totals=dict(sorted(state.totals.items())),
            moving=dict(sorted(state.moving().items())),
            frames_applied=state.frames_applied,
            complete=state.complete,
        )

    def end_of_stream(self, eos: EndOfStream) -> bool:
        """Record how many frames a finite stream has; returns whether it is already complete."""
        state = self._stream(eos.stream_id)
        state.frames_expected = eos.frames_published
        return state.complete

    def snapshot(self, stream_id: str) -> dict[str, Any]:
        return self._stream(stream_id).to_dict()

    def restore(self, stream_id: str, data: dict[str, Any]) -> None:
        self.streams[stream_id] = StreamCounts.from_dict(data)

    def table(self) -> dict[str, dict[str, Any]]:
        """Readable view: per stream totals, moving counts and progress."""
        return {
            sid: {
                "totals": dict(sorted(s.totals.items())),
                "moving": dict(sorted(s.moving().items())),
                "frames_applied": s.frames_applied,
                "frames_expected": s.frames_expected,
                "complete": s.complete,
            }
            for sid, s in sorted(self.streams.items())
        }
