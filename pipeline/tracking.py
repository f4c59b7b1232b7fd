"""ByteTrack for one stream, with all of its state as plain, versioned, JSON-ready data.

Why not ``supervision.ByteTrack``: its state is an object graph (``STrack`` objects
holding a shared ``KalmanFilter``, enum states, float32 arrays) with no public way
to save or restore it, and its lost-track buffer counts *calls* (frames), so a
dropped frame or another frame rate changes what it keeps. The count stage must
put the tracker into its changelog snapshot and resume with the same ids and
the same future outputs, so this module keeps the algorithm (two-stage
association of high then low confidence boxes, Hungarian matching on IoU, a
constant-velocity Kalman filter) and makes its state explicit:

* the filter runs on ``(x, y, w, h)`` like BoT-SORT's (without its appearance and
  camera-motion parts), not on ByteTrack's ``(x, y, aspect, h)``: a box cut by the
  frame edge changes its aspect fast, which ByteTrack's filter all but forbids, so a
  vehicle entering the frame lost its track (a synthetic test showed it);
* time is the frames' capture time in seconds: the filter predicts over the real
  interval and the track buffer is ``track_buffer_s`` of capture time;
* the filter's covariance is block diagonal (every matrix in it is, per coordinate),
  so a track stores 20 floats instead of 8 + 64;
* ids come from a counter in the state, one tracker per stream, never global;
* everything is float64 and JSON round-trips floats exactly, so a restored
  tracker continues bit for bit like one that never stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.assignment import box_iou, match
from pipeline.config import TrackingConfig
from pipeline.messages import Detections

__all__ = ["STATE_VERSION", "Track", "TrackedObjects", "ByteTracker"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1

TrackStatus = Literal["tentative", "tracked", "lost"]

# ByteTrack's / BoT-SORT's Kalman noise weights, tuned per frame at 30 frames/s (MOT17); scaled here to seconds.
_REFERENCE_FPS = 30.0
_POSITION_WEIGHT = 1.0 / 20
_VELOCITY_WEIGHT = 1.0 / 160
_SECOND_STAGE_MAX_COST = 0.5
"""Second association (low-confidence boxes): at least 0.5 IoU, as in ByteTrack."""
_TENTATIVE_MAX_COST = 0.7
"""A tentative track needs at least 0.3 IoU (times confidence) to be confirmed, as in ByteTrack."""
_DUPLICATE_IOU = 0.85


def _position_std(size: np.ndarray) -> np.ndarray:
    """Std of (x, y, w, h) for a box of this (w, h): x and w scale with the width, y and h with the height."""
    w, h = float(size[0]), float(size[1])
    return _POSITION_WEIGHT * np.asarray([w, h, w, h])


def _velocity_std(size: np.ndarray) -> np.ndarray:
    """Std of the per-second velocity of (x, y, w, h): the per-frame weight times the reference frame rate."""
    w, h = float(size[0]), float(size[1])
    return _REFERENCE_FPS * _VELOCITY_WEIGHT * np.asarray([w, h, w, h])


def xyxy_to_xywh(xyxy: np.ndarray) -> np.ndarray:
    """Corners to centre, width, height."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    w = np.maximum(xyxy[:, 2] - xyxy[:, 0], 1e-6)
    h = np.maximum(xyxy[:, 3] - xyxy[:, 1], 1e-6)
    return np.stack([xyxy[:, 0] + w / 2, xyxy[:, 1] + h / 2, w, h], axis=1)


@dataclass
class Track:
    """One tracked object; every field is plain data so the tracker state is JSON as it is.

    The Kalman state is four independent (position, velocity) pairs: ``x`` and ``v``
    hold the means, ``p_xx``, ``p_xv``, ``p_vv`` the 2x2 covariance of each pair.
    """

    track_id: int
    status: TrackStatus
    x: list[float]
    v: list[float]
    p_xx: list[float]
    p_xv: list[float]
    p_vv: list[float]
    hits: int
    score: float
    first_ts: float
    last_seen_ts: float
    votes: dict[str, int] = field(default_factory=dict)
    """Matches per label: the track's class is the label seen most often, so car/truck flicker does not split it."""
    class_ids: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return max(sorted(self.votes), key=lambda name: self.votes[name]) if self.votes else ""

    @property
    def class_id(self) -> int:
        return self.class_ids.get(self.label, -1)

    def corners(self) -> list[float]:
        """The filter's box as ``[x1, y1, x2, y2]`` (plain floats: this runs for every track in every stage)."""
        x, y, w, h = self.x
        return [x - w / 2, y - h / 2, x + w / 2, y + h / 2]

    def xyxy(self) -> np.ndarray:
        return np.asarray(self.corners(), dtype=np.float64)

    def vote(self, label: str, class_id: int) -> None:
        self.votes[label] = self.votes.get(label, 0) + 1
        self.class_ids[label] = class_id

    def to_state(self) -> dict[str, Any]:
        return {
            "id": self.track_id,
            "status": self.status,
            "x": self.x,
            "v": self.v,
            "p_xx": self.p_xx,
            "p_xv": self.p_xv,
            "p_vv": self.p_vv,
            "hits": self.hits,
            "score": self.score,
            "first_ts": self.first_ts,
            "last_seen_ts": self.last_seen_ts,
            "votes": dict(sorted(self.votes.items())),
            "class_ids": dict(sorted(self.class_ids.items())),
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Track:
        status = str(data["status"])
        if status not in ("tentative", "tracked", "lost"):
            raise ValueError(f"unknown track status {status!r}")
        return cls(
            track_id=int(data["id"]),
            status=status,  # type: ignore[arg-type]  # checked just above
            x=[float(c) for c in data["x"]],
            v=[float(c) for c in data["v"]],
            p_xx=[float(c) for c in data["p_xx"]],
            p_xv=[float(c) for c in data["p_xv"]],
            p_vv=[float(c) for c in data["p_vv"]],
            hits=int(data["hits"]),
            score=float(data["score"]),
            first_ts=float(data["first_ts"]),
            last_seen_ts=float(data["last_seen_ts"]),
            votes={str(k): int(n) for k, n in data.get("votes", {}).items()},
            class_ids={str(k): int(c) for k, c in data.get("class_ids", {}).items()},
        )


def _new_track(xyxy: np.ndarray, score: float, label: str, class_id: int, ts: float) -> Track:
    xywh = xyxy_to_xywh(xyxy)[0]
    pos_std = 2 * _position_std(xywh[2:])
    vel_std = 10 * _velocity_std(xywh[2:])
    track = Track(
        track_id=0,
        status="tentative",
        x=[float(c) for c in xywh],
        v=[0.0, 0.0, 0.0, 0.0],
        p_xx=[float(c) for c in pos_std**2],
        p_xv=[0.0, 0.0, 0.0, 0.0],
        p_vv=[float(c) for c in vel_std**2],
        hits=1,
        score=score,
        first_ts=ts,
        last_seen_ts=ts,
    )
    track.vote(label, class_id)
    return track


def _predict(track: Track, dt: float) -> None:
    """Constant-velocity prediction over ``dt`` seconds; a lost track's size stops changing (BoT-SORT)."""
    if dt <= 0:
        return
    x = np.asarray(track.x)
    v = np.asarray(track.v)
    if track.status != "tracked":
        v[2] = v[3] = 0.0
    p_xx, p_xv, p_vv = np.asarray(track.p_xx), np.asarray(track.p_xv), np.asarray(track.p_vv)
    frames = dt * _REFERENCE_FPS  # process noise grows with time, calibrated per reference frame
    q_x = _position_std(x[2:]) ** 2 * frames
    q_v = _velocity_std(x[2:]) ** 2 * frames
    x = x + v * dt
    p_xx, p_xv, p_vv = p_xx + 2 * dt * p_xv + dt * dt * p_vv + q_x, p_xv + dt * p_vv, p_vv + q_v
    track.x, track.v = x.tolist(), v.tolist()
    track.p_xx, track.p_xv, track.p_vv = p_xx.tolist(), p_xv.tolist(), p_vv.tolist()


def _correct(track: Track, xyxy: np.ndarray) -> None:
    """Kalman update with a measured box; measurement noise scales with the predicted size."""
    z = xyxy_to_xywh(xyxy)[0]
    x, v = np.asarray(track.x), np.asarray(track.v)
    p_xx, p_xv, p_vv = np.asarray(track.p_xx), np.asarray(track.p_xv), np.asarray(track.p_vv)
    r = _position_std(x[2:]) ** 2
    s = p_xx + r
    gain_x, gain_v = p_xx / s, p_xv / s
    innovation = z - x
    x = x + gain_x * innovation
    v = v + gain_v * innovation
    p_vv = p_vv - gain_v * p_xv
    p_xx, p_xv = (1 - gain_x) * p_xx, (1 - gain_x) * p_xv
    track.x, track.v = x.tolist(), v.tolist()
    track.p_xx, track.p_xv, track.p_vv = p_xx.tolist(), p_xv.tolist(), p_vv.tolist()


@dataclass(frozen=True)
class TrackedObjects:
    """Confirmed tracks seen in one frame, column-wise like ``Detections``.

    Attributes:
        xyxy: ``(n, 4)`` Kalman-smoothed boxes in pixels, clipped to the frame.
        track_id: ``(n,)`` ids, unique within the stream, from 1.
        class_id: ``(n,)`` the track's class (most frequent label of its matches).
        confidence: ``(n,)`` confidence of the detection matched in this frame.
        hits: ``(n,)`` how many frames the track was matched in so far.
        labels: ``n`` class names.
    """

    xyxy: np.ndarray
    track_id: np.ndarray
    class_id: np.ndarray
    confidence: np.ndarray
    hits: np.ndarray
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.track_id)
        for name, shape in {"xyxy": (n, 4), "class_id": (n,), "confidence": (n,), "hits": (n,)}.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise ValueError(f"{name} must have shape {shape}, got {actual}")
        if len(self.labels) != n:
            raise ValueError(f"labels must have {n} entries, got {len(self.labels)}")

    def __len__(self) -> int:
        return len(self.track_id)

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {
                "track_id": int(self.track_id[i]),
                "label": self.labels[i],
                "class_id": int(self.class_id[i]),
                "confidence": float(self.confidence[i]),
                "hits": int(self.hits[i]),
                "box": [float(c) for c in self.xyxy[i]],
            }
            for i in range(len(self))
        ]

    @classmethod
    def from_tracks(cls, tracks: list[Track], width: int, height: int) -> TrackedObjects:
        xyxy = _boxes(tracks)
        xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, width)
        xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, height)
        return cls(
            xyxy=xyxy,
            track_id=np.asarray([t.track_id for t in tracks], dtype=np.int64),
            class_id=np.asarray([t.class_id for t in tracks], dtype=np.int64),
            confidence=np.asarray([t.score for t in tracks], dtype=np.float64),
            hits=np.asarray([t.hits for t in tracks], dtype=np.int64),
            labels=tuple(t.label for t in tracks),
        )


def _boxes(tracks: list[Track]) -> np.ndarray:
    return np.asarray([t.corners() for t in tracks], dtype=np.float64).reshape(-1, 4)


class ByteTracker:
    """ByteTrack over one stream's frames, in capture order; state via ``to_state``/``from_state``.

    Example:
        >>> tracker = ByteTracker(TrackingConfig())
        >>> tracked = tracker.update(detections, capture_ts=12.04, width=320, height=240)
        >>> tracked.track_id
        array([1, 2])
        >>> restored = ByteTracker.from_state(TrackingConfig(), json.loads(json.dumps(tracker.to_state())))
    """

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self.tracks: list[Track] = []
        self.next_id = 1
        self.last_ts: float | None = None
        self.frames = 0

    def update(self, detections: Detections, capture_ts: float, width: int, height: int) -> TrackedObjects:
        """Advance to ``capture_ts`` and associate this frame's boxes; frames come in index order.

        A frame stamped before the previous one (a camera whose clock stepped back, a forged stamp) is
        taken as no time passing: one bad stamp must not stop the stream's counting.

        Returns:
            The confirmed tracks matched in this frame.
        """
        cfg = self.config
        if self.last_ts is not None:
            capture_ts = max(capture_ts, self.last_ts)
        dt = 0.0 if self.last_ts is None else capture_ts - self.last_ts
        first_frame = self.frames == 0
        self.frames += 1
        self.last_ts = capture_ts
        # Expire before matching: after dropped frames a track unseen for longer than the buffer is gone, even if
        # no frame in between could have removed it.
        self.tracks = [t for t in self.tracks if capture_ts - t.last_seen_ts <= cfg.track_buffer_s]
        for track in self.tracks:
            _predict(track, dt)

        xyxy = np.asarray(detections.xyxy, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(detections.confidence, dtype=np.float64)
        high = np.flatnonzero(scores >= cfg.high_threshold)
        low = np.flatnonzero((scores >= cfg.low_threshold) & (scores < cfg.high_threshold))

        def observe(track: Track, det: int) -> None:
            _correct(track, xyxy[det])
            track.hits += 1
            track.score = float(scores[det])
            track.last_seen_ts = capture_ts
            track.vote(detections.labels[det], int(detections.class_id[det]))

        confirmed = [t for t in self.tracks if t.status != "tentative"]
        tentative = [t for t in self.tracks if t.status == "tentative"]
        seen: set[int] = set()  # id() of the tracks matched in this frame

        # First association: confirmed (tracked and lost) tracks with high-confidence boxes, IoU fused with score.
        cost = 1.0 - box_iou(_boxes(confirmed), xyxy[high]) * scores[high][None, :]
        pairs, free_tracks, free_high = match(cost, 1.0 - cfg.match_iou)
        for ti, di in pairs:
            confirmed[ti].status = "tracked"
            observe(confirmed[ti], int(high[di]))
            seen.add(id(confirmed[ti]))

        # Second association: tracks still unmatched (not lost ones) with the low-confidence boxes.
        remaining = [confirmed[i] for i in free_tracks if confirmed[i].status == "tracked"]
        cost = 1.0 - box_iou(_boxes(remaining), xyxy[low])
        pairs, free_remaining, _ = match(cost, _SECOND_STAGE_MAX_COST)
        for ti, di in pairs:
            observe(remaining[ti], int(low[di]))
            seen.add(id(remaining[ti]))
        for i in free_remaining:
            remaining[i].status = "lost"

        # Tentative tracks (seen once) are confirmed by a second high-confidence box or dropped.
        unmatched_high = high[free_high]
        cost = 1.0 - box_iou(_boxes(tentative), xyxy[unmatched_high]) * scores[unmatched_high][None, :]
        pairs, _, free_new = match(cost, _TENTATIVE_MAX_COST)
        kept_tentative: list[Track] = []
        for ti, di in pairs:
            track = tentative[ti]
            observe(track, int(unmatched_high[di]))
            self._confirm(track)
            seen.add(id(track))
        # New tracks from the high-confidence boxes nobody claimed; on the very first frame they are confirmed at once.
        for det in unmatched_high[free_new]:
            di = int(det)
            if scores[di] < cfg.new_track_threshold:
                continue
            track = _new_track(xyxy[di], float(scores[di]), detections.labels[di], int(detections.class_id[di]), capture_ts)
            if first_frame:
                self._confirm(track)
                seen.add(id(track))
            kept_tentative.append(track)

        alive = [t for t in confirmed if t.status == "tracked" or capture_ts - t.last_seen_ts <= cfg.track_buffer_s]
        alive += [tentative[ti] for ti, _ in pairs]
        alive += kept_tentative
        self.tracks = _drop_duplicates(alive)
        out = [t for t in self.tracks if id(t) in seen]
        return TrackedObjects.from_tracks(out, width, height)

    def _confirm(self, track: Track) -> None:
        track.status = "tracked"
        track.track_id = self.next_id
        self.next_id += 1

    @property
    def live_ids(self) -> set[int]:
        """Ids of confirmed tracks the tracker still keeps (tracked or lost within the buffer)."""
        return {t.track_id for t in self.tracks if t.status != "tentative"}

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "next_id": self.next_id,
            "last_ts": self.last_ts,
            "frames": self.frames,
            "tracks": [t.to_state() for t in self.tracks],
        }

    @classmethod
    def from_state(cls, config: TrackingConfig, data: dict[str, Any]) -> ByteTracker:
        """Rebuild a tracker from ``to_state()`` output (after any JSON round trip).

        Raises:
            ValueError: the state has another version.
        """
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"tracker state version {version!r} is not supported (expected {STATE_VERSION})")
        tracker = cls(config)
        tracker.next_id = int(data["next_id"])
        tracker.last_ts = None if data.get("last_ts") is None else float(data["last_ts"])
        tracker.frames = int(data.get("frames", 0))
        tracker.tracks = [Track.from_state(t) for t in data.get("tracks", [])]
        return tracker


def _drop_duplicates(tracks: list[Track]) -> list[Track]:
    """A lost track that a newer tracked one now overlaps almost exactly is dropped, keeping the older (ByteTrack)."""
    tracked = [t for t in tracks if t.status == "tracked"]
    lost = [t for t in tracks if t.status == "lost"]
    if not tracked or not lost:
        return tracks
    iou = box_iou(_boxes(tracked), _boxes(lost))
    drop: set[int] = set()
    for ti, li in zip(*np.nonzero(iou > _DUPLICATE_IOU), strict=True):
        a, b = tracked[int(ti)], lost[int(li)]
        older_is_tracked = (a.last_seen_ts - a.first_ts) >= (b.last_seen_ts - b.first_ts)
        drop.add(id(b) if older_is_tracked else id(a))
    return [t for t in tracks if id(t) not in drop]
