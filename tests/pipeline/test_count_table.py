"""CountTable: box totals as before, tracking beside them in one snapshot that resumes exactly."""

from __future__ import annotations

import json
import random

from pipeline.config import COCO_VEHICLES, CountConfig, CountingLine, TrackingConfig
from pipeline.count_table import TRAFFIC_KEYS, CountTable, readable
from pipeline.messages import EndOfStream, FrameDetections
from pipeline.traffic import TrafficCounter
from tests.pipeline.traffic_sim import highway, render

GATE = CountingLine(name="gate", start=(0.1, 0.6), end=(1.0, 0.6), in_direction="up")
TRACKING = TrackingConfig(enabled=True, lines=(GATE,), reorder_wait_s=30.0, reorder_max_frames=64)
COUNTING = CountConfig()


def _frames() -> list[FrameDetections]:
    return render(highway(1, vehicles_per_direction=6, duration=12.0))


def _reference(frames: list[FrameDetections]) -> dict:
    counter = TrafficCounter(TRACKING, COCO_VEHICLES)
    for frame in frames:
        counter.update(frame)
    return counter.table()[frames[0].meta.stream_id]


def _shuffled(frames: list[FrameDetections], seed: int = 3, spread: int = 8) -> list[FrameDetections]:
    """Out of order as several InterConsumers deliver them: each frame at most ``spread`` places off."""
    rng = random.Random(seed)
    keyed = sorted(((i + rng.uniform(0, spread), f) for i, f in enumerate(frames)), key=lambda p: p[0])
    return [f for _, f in keyed]


def test_tracking_off_keeps_the_box_table_and_names_its_totals() -> None:
    table = CountTable(COUNTING, TrackingConfig())
    frames = _frames()[:20]
    for frame in frames:
        count, traffic = table.apply(frame, now=0.0)
        assert count is not None and traffic == []
    snap = table.snapshot(frames[0].meta.stream_id)
    assert snap["box_totals"] == snap["totals"] and snap["totals"]
    assert not set(TRAFFIC_KEYS) & set(snap) and "traffic" not in snap


def test_shuffled_frames_snapshotted_mid_stream_count_like_one_in_order_pass() -> None:
    frames = _frames()
    sid = frames[0].meta.stream_id
    expected = _reference(frames)
    assert sum(expected["line_crossings"]["gate"]["in"].values()) >= 3  # the scene has traffic to count
    table = CountTable(COUNTING, TRACKING)
    arrivals = _shuffled(frames)
    for n, frame in enumerate(arrivals):
        table.apply(frame, now=float(n) * 0.01)
        if n % 17 == 5:  # a replica takes the stream over from the changelog record
            snap = json.loads(json.dumps(table.snapshot(sid)))
            table = CountTable(COUNTING, TRACKING)
            table.restore(sid, snap)
        if n % 23 == 0:  # a redelivered frame changes nothing
            count, traffic = table.apply(arrivals[max(n - 3, 0)], now=float(n) * 0.01)
            assert count is None and traffic == []
    updates = table.end(EndOfStream(sid, len(frames)), now=len(frames) * 0.01)
    snap = table.snapshot(sid)
    assert not updates or all(u.frames_applied or u.frames_stepped_over for u in updates)
    for key in TRAFFIC_KEYS:
        if key != "stationary_vehicles":
            assert snap[key] == expected[key], key
    assert snap["frames_tracked"] == len(frames) and snap["frames_stepped_over"] == 0
    assert "traffic" not in readable(snap) and readable(snap)["unique_vehicles"] == expected["unique_vehicles"]


def test_end_of_stream_steps_over_a_frame_that_never_comes() -> None:
    frames = _frames()[:40]
    sid = frames[0].meta.stream_id
    table = CountTable(COUNTING, TRACKING)
    lost = 10
    for frame in frames:
        if frame.meta.frame_index != lost:
            table.apply(frame, now=0.0)
    assert table.snapshot(sid)["frames_tracked"] == lost  # frames after the hole wait for it
    # The stream had 39 published frames (frame 10 skipped by the producer): all counted, so nothing more can come.
    updates = table.end(EndOfStream(sid, len(frames) - 1), now=0.0)
    assert updates and updates[0].frames_stepped_over == [lost]
    assert table.snapshot(sid)["frames_tracked"] == len(frames) - 1


def test_an_idle_owned_stream_is_flushed_after_the_wait() -> None:
    frames = _frames()[:12]
    sid = frames[0].meta.stream_id
    table = CountTable(COUNTING, TRACKING.model_copy(update={"reorder_wait_s": 2.0}))
    for frame in frames[:3] + frames[4:]:
        table.apply(frame, now=100.0)
    assert table.overdue({sid}, 101.0) == [] and table.due({sid}, 101.0) == []
    assert table.overdue(set(), 103.0) == []  # not owned: never flushed here
    (update,) = table.due({sid}, 102.5)
    assert update.frames_stepped_over == [3] and update.frames_applied == list(range(4, 12))
    assert update.tracks and all(len(row) == 6 for rows in update.tracks.values() for row in rows)


def test_dropping_a_stream_drops_its_tracks() -> None:
    frames = _frames()[:10]
    sid = frames[0].meta.stream_id
    table = CountTable(COUNTING, TRACKING)
    for frame in frames:
        table.apply(frame, now=0.0)
    assert table.traffic is not None and sid in table.traffic.streams
    table.streams.pop(sid, None)
    assert sid not in table.traffic.streams
    table.apply(frames[0], now=0.0)
    table.streams.clear()
    assert not table.traffic.streams
