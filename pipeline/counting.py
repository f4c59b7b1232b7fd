"""Vehicle counting core: per-stream totals and a moving count, applied once per frame.

State is plain data with ``snapshot()``/``restore()``, so the count stage can
back it with a compacted Kafka changelog (like a Faust Table) and a restarted
replica resumes exactly where the last one stopped.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DecodeError
from pipeline.messages import Detections, EndOfStream, FrameDetections, SkippedFrame

__all__ = ["AppliedFrames", "StreamCounts", "CountUpdate", "VehicleCounter", "vehicles_in"]

logger = logging.getLogger(__name__)


def vehicles_in(detections: Detections, labels: frozenset[str], min_confidence: float) -> Counter[str]:
    """Count boxes whose label is in ``labels`` and confidence is strictly above ``min_confidence``."""
    mask = detections.confidence > min_confidence
    return Counter(label for label, keep in zip(detections.labels, mask, strict=True) if keep and label in labels)


DEFAULT_MAX_GAPS = 256
"""Most gaps (runs of missing indices above the watermark) an ``AppliedFrames`` holds open:
one inter replica lagging behind five others opens one gap per six frames, so 256 gaps ride
out a lag of about 1500 frames of one stream, and take about 2 KB of a snapshot."""

DEFAULT_REORDER_HORIZON = 4096
"""Most applied indices an ``AppliedFrames`` holds above its lowest gap before giving up on the
gap (about 160 s of a 25 fps stream)."""


@dataclass
class AppliedFrames:
    """Set of frame indices already applied, bounded for endless streams whatever arrives.

    Holds a watermark (every index below it is applied, skipped or given up) plus the applied
    indices above it as sorted, disjoint half-open ranges ``[start, end)``. A frame that never
    comes leaves a gap; so that one lost frame cannot grow the set (and every snapshot of it)
    forever, the lowest gap is given up -- the watermark moves past it -- once more than
    ``horizon`` indices are applied above it or more than ``max_gaps`` gaps are open. ``add``
    and ``skip`` return how many indices were given up that way (reason ``lost_gap``); a frame
    of a given-up gap that arrives later is treated as already applied.

    Example:
        >>> applied = AppliedFrames()
        >>> for i in (0, 1, 3):
        ...     applied.add(i)
        >>> applied.watermark, applied.ranges
        (2, [[3, 4]])
    """

    watermark: int = 0
    ranges: list[list[int]] = field(default_factory=list)
    max_gaps: int = DEFAULT_MAX_GAPS
    horizon: int = DEFAULT_REORDER_HORIZON
    held: int = field(default=0, compare=False)
    """How many applied indices are held above the watermark (derived from ``ranges``)."""
    given_up: int = field(default=0, compare=False)
    """Missing indices given up by this object since it was made (not part of a snapshot)."""

    def __post_init__(self) -> None:
        self.held = sum(end - start for start, end in self.ranges)

    @property
    def above(self) -> set[int]:
        """The applied indices above the watermark (at most ``horizon`` of them)."""
        return {i for start, end in self.ranges for i in range(start, end)}

    def __contains__(self, index: int) -> bool:
        if index < self.watermark:
            return True
        i = bisect.bisect_right(self.ranges, index, key=lambda r: r[0]) - 1
        return i >= 0 and index < self.ranges[i][1]

    def add(self, index: int) -> int:
        """Mark ``index`` applied; returns how many missing indices were given up to stay bounded."""
        if index in self:
            return 0
        ranges = self.ranges
        i = bisect.bisect_right(ranges, index, key=lambda r: r[0])
        joins_left = i > 0 and ranges[i - 1][1] == index
        joins_right = i < len(ranges) and ranges[i][0] == index + 1
        if joins_left and joins_right:
            ranges[i - 1][1] = ranges[i][1]
            del ranges[i]
        elif joins_left:
            ranges[i - 1][1] = index + 1
        elif joins_right:
            ranges[i][0] = index
        else:
            ranges.insert(i, [index, index + 1])
        self.held += 1
        return self._compact()

    def skip(self, index: int) -> int:
        """Treat an index that will never be applied (dead-lettered upstream) as applied-but-empty."""
        return self.add(index)

    def _compact(self) -> int:
        lost = 0
        while self.ranges and (
            self.ranges[0][0] == self.watermark or len(self.ranges) > self.max_gaps or self.held > self.horizon
        ):
            start, end = self.ranges.pop(0)
            lost += start - self.watermark
            self.held -= end - start
            self.watermark = end
        self.given_up += lost
        return lost

    def to_dict(self) -> dict[str, Any]:
        """The set as a snapshot holds it: the watermark, then alternating gap and run lengths above it.

        ``{"applied_watermark": 3, "applied_runs": [2, 3, 1, 1]}`` means 0-2 applied, 3-4 missing,
        5-7 applied, 8 missing, 9 applied: small numbers, a few bytes per gap.
        """
        runs: list[int] = []
        at = self.watermark
        for start, end in self.ranges:
            runs += [start - at, end - start]
            at = end
        return {"applied_watermark": self.watermark, "applied_runs": runs}

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], max_gaps: int = DEFAULT_MAX_GAPS, horizon: int = DEFAULT_REORDER_HORIZON
    ) -> AppliedFrames:
        """Read a snapshot's applied set: ``applied_runs``, or the flat ``applied_above`` list of older snapshots.

        Raises:
            ValueError: the runs are not pairs of positive lengths.
        """
        applied = cls(int(data.get("applied_watermark", 0)), [], max_gaps, horizon)
        runs = [int(n) for n in data.get("applied_runs", [])]
        if len(runs) % 2 or any(n <= 0 for n in runs):
            raise ValueError(f"applied_runs must be pairs of positive lengths, got {runs[:8]}")
        at = applied.watermark
        for gap, run in zip(runs[::2], runs[1::2], strict=True):
            start = at + gap
            for index in range(start, start + min(run, horizon + 1)):  # a forged run cannot take long
                applied.add(index)
            at = start + run
        for index in data.get("applied_above", []):
            applied.add(int(index))
        return applied


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
    skipped: Counter[str] = field(default_factory=Counter)
    """Frame indices that will never be applied, by reason (``SkipReason``)."""

    @property
    def frames_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def complete(self) -> bool:
        """Every frame of a finite stream was applied or is known never to come."""
        return self.frames_expected is not None and self.frames_applied + self.frames_skipped >= self.frames_expected

    def moving(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for counts in self.window.values():
            for label, n in counts.items():  # Counter.update's Mapping checks cost more than the sum
                out[label] += n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(sorted(self.totals.items())),
            "frames_applied": self.frames_applied,
            "frames_skipped": dict(sorted(self.skipped.items())),
            "max_frame": self.max_frame,
            "window": {str(k): dict(v) for k, v in sorted(self.window.items()) if v},
            **self.applied.to_dict(),
            "frames_expected": self.frames_expected,
            "last_capture_ts": self.last_capture_ts,
            "complete": self.complete,
        }

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], max_gaps: int = DEFAULT_MAX_GAPS, horizon: int = DEFAULT_REORDER_HORIZON
    ) -> StreamCounts:
        """Rebuild from a snapshot.

        Raises:
            DecodeError: the snapshot is not one (wrong types or shapes).
        """
        try:
            expected = data.get("frames_expected")
            state = cls(
                totals=Counter({str(k): int(v) for k, v in data.get("totals", {}).items()}),
                frames_applied=int(data.get("frames_applied", 0)),
                max_frame=int(data.get("max_frame", -1)),
                window={
                    int(k): Counter({str(label): int(n) for label, n in v.items()}) for k, v in data.get("window", {}).items()
                },
                applied=AppliedFrames.from_dict(data, max_gaps, horizon),
                frames_expected=None if expected is None else int(expected),
                last_capture_ts=float(data.get("last_capture_ts", 0.0)),
                skipped=Counter({str(k): int(v) for k, v in data.get("frames_skipped", {}).items()}),
            )
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            raise DecodeError(f"invalid count snapshot: {exc!r}") from None
        if state.applied.given_up:  # an older, unbounded snapshot: its oldest gaps are given up now
            state.skipped["lost_gap"] += state.applied.given_up
        return state


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


def _reopen(state: StreamCounts, frame_index: int) -> None:
    """A frame past a stream's end: a named camera is running again (a new run numbers on), so the
    stream is open until its next end-of-stream says how far it went."""
    if state.frames_expected is not None and frame_index >= state.frames_expected:
        state.frames_expected = None


class VehicleCounter:
    """The count table: per-stream, per-class totals and a moving count over the last N frames.

    ``update`` applies a frame once; a redelivered frame changes nothing and returns None.

    Example:
        >>> counter = VehicleCounter(labels=("car",), min_confidence=0.5, window_frames=10)
        >>> counter.update(frame).totals
        {'car': 2}
    """

    def __init__(
        self,
        labels: tuple[str, ...],
        min_confidence: float,
        window_frames: int,
        max_gaps: int = DEFAULT_MAX_GAPS,
        reorder_horizon: int = DEFAULT_REORDER_HORIZON,
    ) -> None:
        self.labels = frozenset(labels)
        self.min_confidence = min_confidence
        self.window_frames = window_frames
        self.max_gaps = max_gaps
        self.reorder_horizon = reorder_horizon
        self.streams: dict[str, StreamCounts] = {}

    def _stream(self, stream_id: str) -> StreamCounts:
        state = self.streams.get(stream_id)
        if state is None:
            state = StreamCounts(applied=AppliedFrames(max_gaps=self.max_gaps, horizon=self.reorder_horizon))
            self.streams[stream_id] = state
        return state

    def skip(self, item: SkippedFrame) -> bool:
        """Record that a frame will never come (dead-lettered upstream); False if it was already known."""
        state = self._stream(item.stream_id)
        if item.frame_index in state.applied:
            return False
        _reopen(state, item.frame_index)
        state.skipped[item.reason] += 1
        lost = state.applied.skip(item.frame_index)
        if lost:
            state.skipped["lost_gap"] += lost
        return True

    def update(self, frame: FrameDetections) -> CountUpdate | None:
        meta = frame.meta
        state = self._stream(meta.stream_id)
        if meta.frame_index in state.applied:
            return None
        in_frame = vehicles_in(frame.detections, self.labels, self.min_confidence)
        _reopen(state, meta.frame_index)
        lost = state.applied.add(meta.frame_index)
        if lost:
            state.skipped["lost_gap"] += lost
            logger.warning(
                "%s: gave up on %d frame(s) that never came, below frame %d", meta.stream_id, lost, state.applied.watermark
            )
        state.frames_applied += 1
        state.totals.update(in_frame)
        state.last_capture_ts = max(state.last_capture_ts, meta.capture_ts)
        state.max_frame = max(state.max_frame, meta.frame_index)
        lowest = state.max_frame - self.window_frames + 1
        if meta.frame_index >= lowest and in_frame:
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
        """Load a stream's snapshot.

        Raises:
            DecodeError: the snapshot is not one.
        """
        self.streams[stream_id] = StreamCounts.from_dict(data, self.max_gaps, self.reorder_horizon)

    def table(self) -> dict[str, dict[str, Any]]:
        """Readable view: per stream totals, moving counts and progress."""
        return {
            sid: {
                "totals": dict(sorted(s.totals.items())),
                "moving": dict(sorted(s.moving().items())),
                "frames_applied": s.frames_applied,
                "frames_skipped": dict(sorted(s.skipped.items())),
                "frames_expected": s.frames_expected,
                "complete": s.complete,
            }
            for sid, s in sorted(self.streams.items())
        }
