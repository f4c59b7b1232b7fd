"""Counts users ask for, per stream and vehicle class: unique vehicles, line crossings, moving vs parked.

``VehicleCounter`` (``pipeline/counting.py``) adds up boxes per frame, so a car
in view for 3 s at 25 frames/s counts 75 times. ``TrafficCounter`` counts
vehicles: each stream's frames are put back in order (``ReorderBuffer``),
tracked (``ByteTracker``), and each track is counted once:

* ``unique_vehicles``: a track matched at least ``min_hits`` times;
* ``moving_vehicles``: such a track whose anchor moved more than
  ``moving_threshold`` of the frame diagonal within ``moving_window_s`` (parked cars never do);
* ``stationary_vehicles``: confirmed tracks in the latest frame that have not moved (a gauge, not a total);
* ``line_crossings``: per line and direction ("in"/"out"), once per (track, line, direction),
  when the anchor's move between two positions on either side of the line's
  hysteresis band passes through the line segment. Only moving, confirmed
  tracks count; a crossing seen earlier is counted when the track qualifies.

Everything a stream needs to resume (tracker, reorder buffer, counts, per-track
memory) is one plain JSON-ready dict from ``StreamTraffic.to_state()``, small and
bounded: lost tracks expire after ``track_buffer_s`` and their memory with them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.assignment import box_iou
from pipeline.config import TrackingConfig
from pipeline.lines import LineGeometry, Point, anchors, diagonal_distance
from pipeline.messages import Detections, EndOfStream, FrameDetections, FrameMeta
from pipeline.reorder import Pushed, ReorderBuffer
from pipeline.tracking import ByteTracker, TrackedObjects

__all__ = [
    "STATE_VERSION",
    "Direction",
    "Crossing",
    "TrafficCounts",
    "TrafficUpdate",
    "StreamTraffic",
    "TrafficCounter",
    "suppress_duplicates",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1

Direction = Literal["in", "out"]

_DUPLICATE_IOU = 0.7
"""Per-class NMS leaves a car and a truck box on one vehicle; above this IoU the weaker one is dropped."""
_HISTORY_POINTS = 8
"""Anchor samples kept per track for the moving test: one per moving_window_s / 8, so memory stays bounded."""


def _direction(name: str) -> Direction:
    if name == "in":
        return "in"
    if name == "out":
        return "out"
    raise ValueError(f"direction must be 'in' or 'out', got {name!r}")


def suppress_duplicates(detections: Detections, iou: float = _DUPLICATE_IOU) -> Detections:
    """Class-agnostic NMS: drop a box that overlaps a more confident one by more than ``iou``.

    YOLO's NMS is per class, so one vehicle often comes as "car" 0.38 and "truck" 0.36;
    the tracker would make two tracks of it.
    """
    n = len(detections)
    if n < 2:
        return detections
    order = np.argsort(-detections.confidence, kind="stable")
    overlap = box_iou(detections.xyxy[order], detections.xyxy[order])
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if keep[i]:
            keep[i + 1 :] &= overlap[i, i + 1 :] <= iou
    mask = np.zeros(n, dtype=bool)
    mask[order[keep]] = True
    return detections.filter(mask)


@dataclass(frozen=True)
class Crossing:
    """One counted line crossing.

    ``frame_index`` and ``capture_ts`` are of the frame in which it was counted: a crossing made before
    its track was confirmed and moving is counted (once) when the track qualifies.
    """

    line: str
    direction: Direction
    label: str
    track_id: int
    frame_index: int
    capture_ts: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "direction": self.direction,
            "label": self.label,
            "track_id": self.track_id,
            "frame_index": self.frame_index,
            "capture_ts": self.capture_ts,
        }


@dataclass
class TrafficCounts:
    """Totals of one stream, per class; line crossings per line, direction and class."""

    unique_vehicles: Counter[str] = field(default_factory=Counter)
    moving_vehicles: Counter[str] = field(default_factory=Counter)
    stationary_vehicles: Counter[str] = field(default_factory=Counter)
    line_crossings: dict[str, dict[Direction, Counter[str]]] = field(default_factory=dict)

    def add_crossing(self, line: str, direction: Direction, label: str) -> None:
        per_line = self.line_crossings.setdefault(line, {"in": Counter(), "out": Counter()})
        per_line[direction][label] += 1

    def crossings(self, line: str, direction: Direction) -> int:
        """All classes together."""
        return sum(self.line_crossings.get(line, {}).get(direction, Counter()).values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "unique_vehicles": dict(sorted(self.unique_vehicles.items())),
            "moving_vehicles": dict(sorted(self.moving_vehicles.items())),
            "stationary_vehicles": dict(sorted(self.stationary_vehicles.items())),
            "line_crossings": {
                line: {direction: dict(sorted(c.items())) for direction, c in sorted(per_line.items())}
                for line, per_line in sorted(self.line_crossings.items())
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrafficCounts:
        counts = cls(
            unique_vehicles=Counter({str(k): int(v) for k, v in data.get("unique_vehicles", {}).items()}),
            moving_vehicles=Counter({str(k): int(v) for k, v in data.get("moving_vehicles", {}).items()}),
            stationary_vehicles=Counter({str(k): int(v) for k, v in data.get("stationary_vehicles", {}).items()}),
        )
        for line, per_line in data.get("line_crossings", {}).items():
            for direction in ("in", "out"):
                for label, n in per_line.get(direction, {}).items():
                    counts.line_crossings.setdefault(line, {"in": Counter(), "out": Counter()})[direction][label] += int(n)
        return counts


@dataclass
class _TrackMemory:
    """What the counter remembers about one live track: enough to decide crossings and motion."""

    counted: bool = False
    """Counted in unique_vehicles (matched min_hits times)."""
    moving: bool = False
    counted_moving: bool = False
    """Counted in moving_vehicles (counted and moving)."""
    history: list[list[float]] = field(default_factory=list)
    """Sparse ``[capture_ts, x, y]`` anchor samples within the moving window, oldest first."""
    sides: dict[str, list[float]] = field(default_factory=dict)
    """Per line: ``[side, x, y]``, the last decided side (+1 in, -1 out) and the anchor where it was seen."""
    crossed: list[list[str]] = field(default_factory=list)
    """``[line, direction]`` pairs seen and not counted yet (the track was not confirmed or moving then)."""
    done: list[list[str]] = field(default_factory=list)
    """``[line, direction]`` pairs already counted for this track."""

    def to_state(self) -> dict[str, Any]:
        return {
            "counted": self.counted,
            "moving": self.moving,
            "counted_moving": self.counted_moving,
            "history": self.history,
            "sides": self.sides,
            "crossed": self.crossed,
            "done": self.done,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> _TrackMemory:
        return cls(
            counted=bool(data.get("counted", False)),
            moving=bool(data.get("moving", False)),
            counted_moving=bool(data.get("counted_moving", False)),
            history=[[float(c) for c in h] for h in data.get("history", [])],
            sides={str(k): [float(c) for c in v] for k, v in data.get("sides", {}).items()},
            crossed=[[str(c) for c in pair] for pair in data.get("crossed", [])],
            done=[[str(c) for c in pair] for pair in data.get("done", [])],
        )


@dataclass(frozen=True)
class TrafficUpdate:
    """What one incoming frame changed: the frames it let through (in order) and the counts after them."""

    stream_id: str
    frame_index: int
    """The incoming frame's index; -1 for a ``flush`` or end of stream."""
    pushed: Pushed
    frames_applied: list[int]
    frames_stepped_over: list[int]
    crossings: list[Crossing]
    new_vehicles: dict[str, int]
    tracks_in_view: int
    counts: dict[str, Any]
    """``TrafficCounts.to_dict()`` after the applied frames (a copy: later frames do not change it)."""
    tracks: dict[int, list[list[Any]]] = field(default_factory=dict)
    """Per applied frame, its tracks as ``[track_id, label, x1, y1, x2, y2]`` (pixels, 0.1 px): what
    ``vapipe annotate`` draws."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "traffic",
            "stream_id": self.stream_id,
            "frame_index": self.frame_index,
            "pushed": self.pushed,
            "frames_applied": self.frames_applied,
            "frames_stepped_over": self.frames_stepped_over,
            "crossings": [c.to_dict() for c in self.crossings],
            "new_vehicles": self.new_vehicles,
            "tracks_in_view": self.tracks_in_view,
            **self.counts,
            "tracks": {str(i): rows for i, rows in self.tracks.items()},
        }


def _shortest(values: np.ndarray) -> list[float]:
    """Floats that print short in JSON yet give back the same array: float32 boxes and scores need ~8 digits, not 17."""
    if values.dtype == np.float32:
        return [float(str(v)) for v in values.ravel()]
    return [float(v) for v in values.ravel()]


def _track_rows(tracked: TrackedObjects) -> list[list[Any]]:
    """``[track_id, label, x1, y1, x2, y2]`` per track, boxes rounded to 0.1 px."""
    return [
        [int(tracked.track_id[i]), tracked.labels[i], *(round(float(c), 1) for c in tracked.xyxy[i])] for i in range(len(tracked))
    ]


def _frame_to_state(frame: FrameDetections) -> dict[str, Any]:
    """A waiting frame, column-wise and short: the reorder buffer is most of a busy stream's snapshot."""
    m, d = frame.meta, frame.detections
    return {
        "frame_index": m.frame_index,
        "capture_ts": m.capture_ts,
        "width": m.width,
        "height": m.height,
        "float32": [d.xyxy.dtype == np.float32, d.confidence.dtype == np.float32],
        "xyxy": _shortest(d.xyxy),
        "confidence": _shortest(d.confidence),
        "class_id": [int(c) for c in d.class_id],
        "labels": list(d.labels),
    }


def _frame_from_state(stream_id: str, data: dict[str, Any]) -> FrameDetections:
    meta = FrameMeta(stream_id, int(data["frame_index"]), float(data["capture_ts"]), int(data["width"]), int(data["height"]))
    box_f32, conf_f32 = data["float32"]
    detections = Detections(
        xyxy=np.asarray(data["xyxy"], dtype=np.float32 if box_f32 else np.float64).reshape(-1, 4),
        confidence=np.asarray(data["confidence"], dtype=np.float32 if conf_f32 else np.float64),
        class_id=np.asarray(data["class_id"], dtype=np.int64),
        labels=tuple(str(label) for label in data["labels"]),
    )
    return FrameDetections(meta=meta, detections=detections)


class StreamTraffic:
    """Tracking and traffic counts of one stream; ``update`` per incoming frame, state as plain data.

    Example:
        >>> traffic = StreamTraffic("cam1", TrackingConfig(enabled=True, lines=[line]), labels=("car", "truck"))
        >>> update = traffic.update(frame)
        >>> update.counts["line_crossings"]["gate"]["in"]
        {'car': 3}
        >>> same = StreamTraffic.from_state("cam1", config, labels, json.loads(json.dumps(traffic.to_state())))
    """

    def __init__(self, stream_id: str, config: TrackingConfig, labels: tuple[str, ...] | frozenset[str]) -> None:
        self.stream_id = stream_id
        self.config = config
        self.labels = frozenset(labels)
        self.lines = config.lines_for(stream_id)
        self.tracker = ByteTracker(config)
        self.reorder: ReorderBuffer[FrameDetections] = ReorderBuffer(config.reorder_wait_s, config.reorder_max_frames)
        self.counts = TrafficCounts()
        self.memory: dict[int, _TrackMemory] = {}
        self.frames_applied = 0
        self.frames_stepped_over = 0

    def update(self, frame: FrameDetections, now: float | None = None) -> TrafficUpdate:
        """Take one frame (in any order); apply every frame that is now due, in index order.

        Args:
            frame: detections of one frame of this stream.
            now: the clock the reorder wait is measured on; default the frame's capture time.
        """
        if frame.meta.stream_id != self.stream_id:
            raise ValueError(f"frame of stream {frame.meta.stream_id!r} given to the counter of {self.stream_id!r}")
        clock = frame.meta.capture_ts if now is None else now
        pushed = self.reorder.push(frame.meta.frame_index, frame, clock)
        return self._release(frame.meta.frame_index, pushed, clock, flush=False)

    def skip(self, frame_index: int) -> None:
        """The producer will never publish this frame: do not wait for it."""
        self.reorder.skip(frame_index)

    def flush(self, now: float, *, end: bool = False) -> TrafficUpdate:
        """Apply what waited long enough by ``now`` (a timer with no new frame), or everything at the end of the stream."""
        return self._release(-1, "buffered", now, flush=end)

    def end_of_stream(self, eos: EndOfStream, now: float) -> TrafficUpdate:
        """No more frames will come: apply everything still waiting, stepping over the gaps."""
        return self.flush(now, end=True)

    def _release(self, frame_index: int, pushed: Pushed, clock: float, *, flush: bool) -> TrafficUpdate:
        released = self.reorder.release(clock, flush=flush)
        self.frames_stepped_over += len(released.stepped_over)
        crossings: list[Crossing] = []
        new_vehicles: Counter[str] = Counter()
        tracks_in_view = 0
        tracks: dict[int, list[list[Any]]] = {}
        for index, ready in released.items:
            tracked = self._apply(ready, crossings, new_vehicles)
            tracks_in_view = len(tracked)
            tracks[index] = _track_rows(tracked)
        return TrafficUpdate(
            stream_id=self.stream_id,
            frame_index=frame_index,
            pushed=pushed,
            frames_applied=[i for i, _ in released.items],
            frames_stepped_over=released.stepped_over,
            crossings=crossings,
            new_vehicles=dict(sorted(new_vehicles.items())),
            tracks_in_view=tracks_in_view,
            counts=self.counts.to_dict(),
            tracks=tracks,
        )

    def _apply(self, frame: FrameDetections, crossings: list[Crossing], new_vehicles: Counter[str]) -> TrackedObjects:
        """Track one in-order frame and update the counts."""
        meta = frame.meta
        detections = frame.detections
        detections = suppress_duplicates(
            detections.filter(np.asarray([label in self.labels for label in detections.labels], dtype=bool))
        )
        tracked = self.tracker.update(detections, meta.capture_ts, meta.width, meta.height)
        self.frames_applied += 1
        cfg = self.config
        geometry = [LineGeometry(line, meta.width, meta.height) for line in self.lines]
        points = anchors(tracked.xyxy, meta.width, meta.height, cfg.anchor)
        stationary: Counter[str] = Counter()
        for i in range(len(tracked)):
            track_id, label, hits = int(tracked.track_id[i]), tracked.labels[i], int(tracked.hits[i])
            point: Point = (float(points[i, 0]), float(points[i, 1]))
            memory = self.memory.setdefault(track_id, _TrackMemory())
            confirmed = hits >= cfg.min_hits
            if not memory.moving and self._moved(memory, meta.capture_ts, point, meta.width, meta.height):
                memory.moving = True
            if confirmed and not memory.counted:
                memory.counted = True
                self.counts.unique_vehicles[label] += 1
                new_vehicles[label] += 1
            if memory.counted and memory.moving and not memory.counted_moving:
                memory.counted_moving = True
                self.counts.moving_vehicles[label] += 1
            for line in geometry:
                self._watch_line(memory, line, point)
            if memory.counted and memory.moving:
                for line_name, direction_name in memory.crossed:
                    direction = _direction(direction_name)
                    self.counts.add_crossing(line_name, direction, label)
                    crossings.append(Crossing(line_name, direction, label, track_id, meta.frame_index, meta.capture_ts))
                    memory.done.append([line_name, direction])
                memory.crossed = []
            if memory.counted and not memory.moving:
                stationary[label] += 1
        self.counts.stationary_vehicles = stationary
        live = self.tracker.live_ids
        self.memory = {tid: m for tid, m in self.memory.items() if tid in live}
        return tracked

    def _moved(self, memory: _TrackMemory, ts: float, point: Point, width: int, height: int) -> bool:
        """Keep a sparse anchor history within the window; true once the anchor got far enough from any of it."""
        cfg = self.config
        memory.history = [h for h in memory.history if ts - h[0] <= cfg.moving_window_s]
        moved = any(diagonal_distance((h[1], h[2]), point, width, height) > cfg.moving_threshold for h in memory.history)
        if not memory.history or ts - memory.history[-1][0] >= cfg.moving_window_s / _HISTORY_POINTS:
            memory.history.append([ts, point[0], point[1]])
        if moved:
            memory.history = []
        return moved

    def _watch_line(self, memory: _TrackMemory, line: LineGeometry, point: Point) -> None:
        """Note a crossing when the anchor's decided side flips and its move went through the segment."""
        side = line.side(point, self.config.hysteresis)
        if side == 0:
            return  # inside the hysteresis band: undecided, keep the last decided side and position
        before = memory.sides.get(line.name)
        memory.sides[line.name] = [float(side), point[0], point[1]]
        if before is None or int(before[0]) == side:
            return
        if not line.crossed((before[1], before[2]), point):
            return  # went round the end of the line, not through it
        direction = "in" if side > 0 else "out"
        pair = [line.name, direction]
        if pair in memory.done or pair in memory.crossed:
            return
        memory.crossed.append(pair)

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume this stream exactly, as JSON-ready plain data."""
        return {
            "version": STATE_VERSION,
            "stream_id": self.stream_id,
            "frames_applied": self.frames_applied,
            "frames_stepped_over": self.frames_stepped_over,
            "counts": self.counts.to_dict(),
            "tracker": self.tracker.to_state(),
            "reorder": self.reorder.to_state(_frame_to_state),
            "memory": {str(tid): m.to_state() for tid, m in sorted(self.memory.items())},
        }

    @classmethod
    def from_state(
        cls, stream_id: str, config: TrackingConfig, labels: tuple[str, ...] | frozenset[str], data: dict[str, Any]
    ) -> StreamTraffic:
        """Resume from ``to_state`` output; settings come from ``config``, not from the snapshot.

        Raises:
            ValueError: the state has another version or belongs to another stream.
        """
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"traffic state version {version!r} is not supported (expected {STATE_VERSION})")
        if data.get("stream_id") != stream_id:
            raise ValueError(f"state of stream {data.get('stream_id')!r} cannot resume stream {stream_id!r}")
        traffic = cls(stream_id, config, labels)
        traffic.frames_applied = int(data.get("frames_applied", 0))
        traffic.frames_stepped_over = int(data.get("frames_stepped_over", 0))
        traffic.counts = TrafficCounts.from_dict(data.get("counts", {}))
        traffic.tracker = ByteTracker.from_state(config, data["tracker"])
        traffic.reorder = ReorderBuffer.from_state(
            data["reorder"], lambda item: _frame_from_state(stream_id, item), config.reorder_wait_s, config.reorder_max_frames
        )
        traffic.memory = {int(tid): _TrackMemory.from_state(m) for tid, m in data.get("memory", {}).items()}
        return traffic


class TrafficCounter:
    """One ``StreamTraffic`` per stream, made on first sight; the count stage's tracking table.

    Example:
        >>> counter = TrafficCounter(settings.tracking, labels=settings.counting.labels)
        >>> counter.update(frame).counts["unique_vehicles"]
        {'car': 12, 'truck': 2}
    """

    def __init__(self, config: TrackingConfig, labels: tuple[str, ...]) -> None:
        self.config = config
        self.labels = frozenset(labels)
        self.streams: dict[str, StreamTraffic] = {}

    def stream(self, stream_id: str) -> StreamTraffic:
        traffic = self.streams.get(stream_id)
        if traffic is None:
            traffic = self.streams[stream_id] = StreamTraffic(stream_id, self.config, self.labels)
        return traffic

    def update(self, frame: FrameDetections, now: float | None = None) -> TrafficUpdate:
        return self.stream(frame.meta.stream_id).update(frame, now)

    def end_of_stream(self, eos: EndOfStream, now: float) -> TrafficUpdate:
        return self.stream(eos.stream_id).end_of_stream(eos, now)

    def snapshot(self, stream_id: str) -> dict[str, Any]:
        return self.stream(stream_id).to_state()

    def restore(self, stream_id: str, data: dict[str, Any]) -> None:
        self.streams[stream_id] = StreamTraffic.from_state(stream_id, self.config, self.labels, data)

    def table(self) -> dict[str, dict[str, Any]]:
        """Readable view: per stream counts and progress."""
        return {
            sid: {**s.counts.to_dict(), "frames_applied": s.frames_applied, "frames_stepped_over": s.frames_stepped_over}
            for sid, s in sorted(self.streams.items())
        }
