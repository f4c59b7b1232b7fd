"""The count stage's table: per-frame box totals and, with tracking on, vehicles per stream, in one snapshot.

``VehicleCounter`` adds up boxes per frame (the study's count: a car in view for
75 frames counts 75 times). With ``tracking.enabled`` a ``TrafficCounter`` runs
beside it on the same frames and counts vehicles (``pipeline/traffic.py``). Both
live in one JSON snapshot per stream, the record the count stage writes to its
compacted changelog in the same transaction as its outputs, so a replica that
takes a stream over resumes with the same tracks, the same reorder buffer and
the same counts.

Snapshot keys added to the box counter's (``totals`` etc. keep their meaning):

* ``box_totals``: the same figures as ``totals``, named for what they are;
* ``unique_vehicles``, ``moving_vehicles``, ``stationary_vehicles``, ``line_crossings``,
  ``frames_tracked``, ``frames_stepped_over``: the tracking counts (tracking on only);
* ``traffic``: the tracker's resume state (``StreamTraffic.to_state()``; tracking on only).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import CountConfig, TrackingConfig
from pipeline.counting import CountUpdate, StreamCounts, VehicleCounter
from pipeline.messages import EndOfStream, FrameDetections, SkippedFrame
from pipeline.traffic import TrafficCounter, TrafficUpdate

__all__ = ["CountTable", "TRAFFIC_KEYS", "comparable", "prunable", "readable", "traffic_figures"]

logger = logging.getLogger(__name__)

TRAFFIC_KEYS: tuple[str, ...] = ("unique_vehicles", "moving_vehicles", "stationary_vehicles", "line_crossings")
"""The tracking counts a snapshot, the summary and ``vapipe counts`` carry per stream."""


def readable(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A stream's snapshot without the tracker's resume state: what people and scripts read."""
    return {k: v for k, v in snapshot.items() if k != "traffic"}


def traffic_figures(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A stream's tracking counts and progress from its snapshot (empty counts if it has none yet)."""
    figures: dict[str, Any] = {key: snapshot.get(key, {}) for key in TRAFFIC_KEYS}
    figures["frames_tracked"] = int(snapshot.get("frames_tracked", 0))
    figures["frames_stepped_over"] = int(snapshot.get("frames_stepped_over", 0))
    return figures


def comparable(figures: dict[str, Any]) -> dict[str, Any]:
    """The totals two runs of one input must agree on: ``stationary_vehicles`` is a gauge of the last frame, left out."""
    return {k: v for k, v in figures.items() if k != "stationary_vehicles"}


def prunable(table: dict[str, dict[str, Any]]) -> list[str]:
    """Streams ``vapipe counts --prune`` drops: finished runs of unnamed sources.

    An unnamed source's stream id carries its run (``clip@<run id>``), so each run is counted
    afresh and leaves a key behind; once complete nothing will write it again. Named streams
    (``cam1=rtsp://...``) persist across runs and are kept.

    Example:
        >>> prunable({"clip@r1": {"complete": True}, "clip@r2": {}, "cam1": {"complete": True}})
        ['clip@r1']
    """
    return sorted(sid for sid, snap in table.items() if "@" in sid and snap.get("complete"))


class _Streams(dict[str, StreamCounts]):
    """The box counter's streams; dropping one (the Faust shell pops a stream the Table lacks) drops its tracks too."""

    def __init__(self, table: CountTable) -> None:
        super().__init__()
        self._table = table

    def pop(self, key: str, *default: Any) -> Any:
        if self._table.traffic is not None:
            self._table.traffic.streams.pop(key, None)
        return super().pop(key, *default)

    def clear(self) -> None:
        if self._table.traffic is not None:
            self._table.traffic.streams.clear()
        super().clear()


class CountTable(VehicleCounter):
    """``VehicleCounter`` plus, when ``tracking.enabled``, a ``TrafficCounter`` fed the same frames.

    Example:
        >>> table = CountTable(settings.counting, settings.tracking)
        >>> count, traffic = table.apply(frame, now=time.time())
        >>> table.snapshot("cam1")["unique_vehicles"]
        {'car': 3}
    """

    def __init__(self, counting: CountConfig, tracking: TrackingConfig) -> None:
        super().__init__(
            labels=counting.labels,
            min_confidence=counting.min_confidence,
            window_frames=counting.window_frames,
            max_gaps=counting.max_gaps,
            reorder_horizon=counting.reorder_horizon_frames,
        )
        self.traffic: TrafficCounter | None = TrafficCounter(tracking, counting.labels) if tracking.enabled else None
        self.streams = _Streams(self)

    @property
    def tracking(self) -> bool:
        return self.traffic is not None

    def apply(self, frame: FrameDetections, now: float) -> tuple[CountUpdate | None, list[TrafficUpdate]]:
        """Count one frame's boxes and, with tracking on, hand it to the stream's tracker.

        Args:
            frame: one frame's detections, in any order.
            now: the arrival clock: a missing frame is waited for ``tracking.reorder_wait_s`` on it.

        Returns:
            The box count update (None for a frame already applied) and the tracking updates that
            applied or stepped over frames (none while the frame waits for earlier ones).
        """
        update = self.update(frame)
        if update is None or self.traffic is None:
            return update, []
        updates = [self.traffic.update(frame, now)]
        updates += self._finish(frame.meta.stream_id, now)
        return update, [u for u in updates if u.frames_applied or u.frames_stepped_over]

    def skip(self, item: SkippedFrame) -> bool:
        """A frame dead-lettered upstream: the box counter counts it skipped, the tracker stops waiting for it."""
        if self.traffic is not None:
            self.traffic.stream(item.stream_id).skip(item.frame_index)
        return super().skip(item)

    def end(self, eos: EndOfStream, now: float) -> list[TrafficUpdate]:
        """Record a stream's length; once every frame was counted, its tracker applies what still waits."""
        self.end_of_stream(eos)
        return self._finish(eos.stream_id, now)

    def _finish(self, stream_id: str, now: float) -> list[TrafficUpdate]:
        """Every published frame arrived: nothing more will come, so step over the gaps now."""
        if self.traffic is None or not self._stream(stream_id).complete:
            return []
        traffic = self.traffic.stream(stream_id)
        if not len(traffic.reorder) and not traffic.reorder.skipped:
            return []
        update = traffic.flush(now, end=True)
        return [update] if update.frames_applied or update.frames_stepped_over else []

    def due(self, stream_ids: set[str], now: float) -> list[TrafficUpdate]:
        """Frames that waited ``reorder_wait_s`` (on ``now``) for a missing one, in streams with no new frame.

        Only for streams this replica owns: applying another replica's stream would fork its state.
        """
        updates = []
        for sid in self.overdue(stream_ids, now):
            assert self.traffic is not None
            update = self.traffic.streams[sid].flush(now)
            if update.frames_applied or update.frames_stepped_over:
                updates.append(update)
        return updates

    def overdue(self, stream_ids: set[str], now: float) -> list[str]:
        """Those of ``stream_ids`` whose oldest waiting frame has waited ``reorder_wait_s`` by ``now``."""
        if self.traffic is None:
            return []
        out = []
        for sid in sorted(stream_ids):
            traffic = self.traffic.streams.get(sid)
            if traffic is None or not len(traffic.reorder):
                continue
            if now - min(w.since for w in traffic.reorder.waiting.values()) >= traffic.reorder.wait_s:
                out.append(sid)
        return out

    def snapshot(self, stream_id: str) -> dict[str, Any]:
        snap = super().snapshot(stream_id)
        snap["box_totals"] = snap["totals"]
        if self.traffic is not None:
            traffic = self.traffic.stream(stream_id)
            snap.update(traffic.counts.to_dict())
            snap["frames_tracked"] = traffic.frames_applied
            snap["frames_stepped_over"] = traffic.frames_stepped_over
            snap["traffic"] = traffic.to_state()
        return snap

    def restore(self, stream_id: str, data: dict[str, Any]) -> None:
        super().restore(stream_id, data)
        if self.traffic is None:
            return
        state = data.get("traffic")
        if state is None:  # written with tracking off: this stream's tracking starts now
            self.traffic.streams.pop(stream_id, None)
            return
        try:
            self.traffic.restore(stream_id, state)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("stream %s: tracker state not restored (%s); its tracking starts afresh", stream_id, exc)
            self.traffic.streams.pop(stream_id, None)

    def table(self) -> dict[str, dict[str, Any]]:
        rows = super().table()
        for sid, row in rows.items():
            row["box_totals"] = row["totals"]
            if self.traffic is not None and sid in self.traffic.streams:
                traffic = self.traffic.streams[sid]
                row.update(traffic.counts.to_dict())
                row["frames_tracked"] = traffic.frames_applied
        return rows
