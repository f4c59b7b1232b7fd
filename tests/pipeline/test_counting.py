"""Count table: vehicles only, strictly above the threshold, each frame once, a moving window, snapshots."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from pipeline.codecs import decode_json, encode_json
from pipeline.config import COCO_VEHICLES
from pipeline.counting import AppliedFrames, StreamCounts, VehicleCounter, vehicles_in
from pipeline.errors import DecodeError
from pipeline.messages import Detections, EndOfStream, FrameDetections
from tests.pipeline.helpers import DoesNotRaise, mock_frame, vehicles

VEHICLES = frozenset(COCO_VEHICLES)


def make_counter(window_frames: int = 50, labels: tuple[str, ...] = COCO_VEHICLES, min_confidence: float = 0.5) -> VehicleCounter:
    return VehicleCounter(labels=labels, min_confidence=min_confidence, window_frames=window_frames)


def cars(stream_id: str, frame_index: int, n: int = 1, **kw: Any) -> FrameDetections:
    return mock_frame(stream_id, frame_index, vehicles(*[("car", 0.9)] * n), **kw)


# -- vehicles_in ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("detections", "labels", "min_confidence", "expected"),
    [
        (Detections.empty(), VEHICLES, 0.5, {}),
        (vehicles(("car", 0.9)), VEHICLES, 0.5, {"car": 1}),
        (vehicles(("car", 0.5)), VEHICLES, 0.5, {}),  # strictly above
        (vehicles(("car", 0.51)), VEHICLES, 0.5, {"car": 1}),
        (vehicles(("car", 0.49)), VEHICLES, 0.5, {}),
        (vehicles(("person", 0.99), ("dog", 0.9)), VEHICLES, 0.5, {}),  # not vehicles
        (vehicles(("car", 0.9), ("car", 0.8), ("truck", 0.6), ("bus", 0.4)), VEHICLES, 0.5, {"car": 2, "truck": 1}),
        (vehicles(*[(label, 0.9) for label in COCO_VEHICLES]), VEHICLES, 0.5, {label: 1 for label in COCO_VEHICLES}),
        (vehicles(("car", 0.9), ("bus", 0.9)), frozenset({"bus"}), 0.5, {"bus": 1}),  # configured labels only
        (vehicles(("Car", 0.9), ("car ", 0.9)), VEHICLES, 0.5, {}),  # exact label match
        (vehicles(("car", 0.2)), VEHICLES, 0.1, {"car": 1}),
        (vehicles(("car", 1.0)), VEHICLES, 1.0, {}),
    ],
)
def test_vehicles_in(detections: Detections, labels: frozenset[str], min_confidence: float, expected: dict[str, int]) -> None:
    assert vehicles_in(detections, labels, min_confidence) == Counter(expected)


# -- AppliedFrames ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("added", "watermark", "above"),
    [
        ([], 0, set()),
        ([0], 1, set()),
        ([0, 1, 2], 3, set()),
        ([2, 1, 0], 3, set()),  # compaction happens as soon as the gap closes
        ([1, 2, 5], 0, {1, 2, 5}),
        ([1, 2, 5, 0], 3, {5}),
        ([0, 1, 2, 5, 3, 4], 6, set()),
        ([0, 0, 1, 1], 2, set()),  # adding twice is harmless
        ([10, 20], 0, {10, 20}),
    ],
)
def test_applied_frames_watermark(added: list[int], watermark: int, above: set[int]) -> None:
    applied = AppliedFrames()
    for index in added:
        applied.add(index)
    assert (applied.watermark, applied.above) == (watermark, above)
    for index in range(max(added, default=0) + 2):
        assert (index in applied) == (index in added)


def test_applied_frames_skip_closes_gaps() -> None:
    applied = AppliedFrames()
    for index in (0, 1, 3, 4):
        applied.add(index)
    assert (applied.watermark, applied.above) == (2, {3, 4})
    applied.skip(2)  # the producer never published frame 2
    assert (applied.watermark, applied.above) == (5, set())


def test_applied_frames_stays_small_for_long_streams() -> None:
    applied = AppliedFrames()
    for index in range(10_000):
        applied.add(index)
    assert (applied.watermark, applied.above) == (10_000, set())


# -- VehicleCounter.update --------------------------------------------------------------------


def test_update_counts_a_frame() -> None:
    counter = make_counter()
    frame = mock_frame(
        "cam1", 0, vehicles(("car", 0.9), ("car", 0.7), ("truck", 0.55), ("person", 0.99), ("bus", 0.5)), capture_ts=12.5
    )
    update = counter.update(frame)
    assert update is not None
    assert update.to_dict() == {
        "type": "count",
        "stream_id": "cam1",
        "frame_index": 0,
        "capture_ts": 12.5,
        "in_frame": {"car": 2, "truck": 1},
        "totals": {"car": 2, "truck": 1},
        "moving": {"car": 2, "truck": 1},
        "frames_applied": 1,
        "complete": False,
    }
    json.dumps(update.to_dict())  # JSON-ready for the counts topic


def test_update_applies_each_frame_once() -> None:
    counter = make_counter()
    assert counter.update(cars("cam1", 0, 2)) is not None
    assert counter.update(cars("cam1", 1, 1)) is not None
    before = counter.table()
    snapshot = counter.snapshot("cam1")
    # A redelivered frame (same stream and index) changes nothing, whatever it carries now.
    assert counter.update(cars("cam1", 0, 2)) is None
    assert counter.update(cars("cam1", 1, 5)) is None
    assert counter.update(mock_frame("cam1", 0, Detections.empty())) is None
    assert counter.table() == before
    assert counter.snapshot("cam1") == snapshot
    assert before["cam1"]["totals"] == {"car": 3}
    assert before["cam1"]["frames_applied"] == 2


def test_update_out_of_order_frames() -> None:
    counter = make_counter(window_frames=50)
    for index in (5, 2, 9, 0, 1, 3):
        assert counter.update(cars("cam1", index)) is not None
    for index in (0, 9, 5):
        assert counter.update(cars("cam1", index)) is None
    state = counter.streams["cam1"]
    assert state.frames_applied == 6
    assert state.max_frame == 9
    assert state.totals == Counter(car=6)
    assert (state.applied.watermark, state.applied.above) == (4, {5, 9})
    assert state.moving() == Counter(car=6)


def test_update_capture_ts_is_the_latest_seen() -> None:
    counter = make_counter()
    counter.update(cars("cam1", 3, capture_ts=30.0))
    counter.update(cars("cam1", 1, capture_ts=10.0))
    assert counter.streams["cam1"].last_capture_ts == 30.0


@pytest.mark.parametrize(
    ("window", "order", "expected_moving", "window_keys"),
    [
        (3, [0, 1, 2, 3, 4], 3, [2, 3, 4]),
        (1, [0, 1, 2], 1, [2]),
        (10, [0, 1, 2], 3, [0, 1, 2]),
        (3, [4, 0, 1, 2, 3], 3, [2, 3, 4]),  # late frames older than the window count in totals only
        (3, [0, 1, 10], 1, [10]),  # a jump empties the window
        (3, [10, 9, 8, 7], 3, [8, 9, 10]),
    ],
)
def test_moving_window_covers_last_n_frames(window: int, order: list[int], expected_moving: int, window_keys: list[int]) -> None:
    counter = make_counter(window_frames=window)
    update = None
    for index in order:
        update = counter.update(cars("cam1", index))
    assert update is not None
    state = counter.streams["cam1"]
    assert sorted(state.window) == window_keys
    assert state.moving() == Counter(car=expected_moving)
    assert counter.table()["cam1"]["moving"] == {"car": expected_moving}
    assert state.totals == Counter(car=len(order))


def test_moving_window_reported_per_update() -> None:
    counter = make_counter(window_frames=2)
    moving = [counter.update(cars("cam1", i, n)).moving for i, n in enumerate([1, 2, 3, 0])]  # type: ignore[union-attr]
    assert moving == [{"car": 1}, {"car": 3}, {"car": 5}, {"car": 3}]


# -- end of stream ----------------------------------------------------------------------------


def test_end_of_stream_completes_when_all_frames_applied() -> None:
    counter = make_counter()
    counter.update(cars("cam1", 0))
    assert counter.end_of_stream(EndOfStream("cam1", frames_published=3)) is False
    assert counter.table()["cam1"]["frames_expected"] == 3
    assert counter.update(cars("cam1", 2)).complete is False  # type: ignore[union-attr]
    last = counter.update(cars("cam1", 1))
    assert last is not None and last.complete is True and last.frames_applied == 3
    assert counter.table()["cam1"]["complete"] is True


def test_end_of_stream_after_all_frames_is_complete_at_once() -> None:
    counter = make_counter()
    for index in range(4):
        counter.update(cars("cam1", index))
    assert counter.end_of_stream(EndOfStream("cam1", frames_published=4)) is True


@pytest.mark.parametrize(("published", "complete"), [(0, True), (1, False)])
def test_end_of_stream_of_unseen_stream(published: int, complete: bool) -> None:
    counter = make_counter()
    assert counter.end_of_stream(EndOfStream("cam9", frames_published=published)) is complete
    assert counter.table()["cam9"]["frames_applied"] == 0


def test_duplicates_do_not_complete_a_stream() -> None:
    counter = make_counter()
    counter.end_of_stream(EndOfStream("cam1", frames_published=2))
    counter.update(cars("cam1", 0))
    assert counter.update(cars("cam1", 0)) is None
    assert counter.table()["cam1"]["complete"] is False


# -- snapshot / restore -----------------------------------------------------------------------


def _fill(counter: VehicleCounter) -> None:
    for index in (0, 1, 2, 4, 7, 5):
        counter.update(mock_frame("cam1", index, vehicles(("car", 0.9), ("truck", 0.8 if index % 2 else 0.3))))
    counter.end_of_stream(EndOfStream("cam1", frames_published=10))


def test_snapshot_restore_round_trip_through_json() -> None:
    original = make_counter(window_frames=4)
    _fill(original)
    data = decode_json(encode_json(original.snapshot("cam1")))  # as it travels on the changelog
    restored = make_counter(window_frames=4)
    restored.restore("cam1", data)
    assert restored.table() == original.table()
    assert restored.snapshot("cam1") == original.snapshot("cam1")
    assert restored.streams["cam1"].window == original.streams["cam1"].window
    # Still rejects frames applied before the snapshot, below and above the watermark.
    for index in (0, 1, 2, 4, 5, 7):
        assert restored.update(cars("cam1", index)) is None
    assert restored.table() == original.table()
    # And carries on exactly like the original.
    for counter in (original, restored):
        counter.update(cars("cam1", 3))
        counter.update(cars("cam1", 6))
    assert restored.table() == original.table()
    assert restored.streams["cam1"].applied == original.streams["cam1"].applied


@pytest.mark.parametrize(
    ("data", "exception"),
    [
        ({}, DoesNotRaise()),
        (StreamCounts().to_dict(), DoesNotRaise()),
        ({"totals": {"car": "3"}, "window": {"7": {"car": 1}}, "applied_watermark": "2"}, DoesNotRaise()),
        ({"totals": {"car": "many"}}, pytest.raises(DecodeError, match="invalid count snapshot")),
        ({"window": {"7": ["car"]}}, pytest.raises(DecodeError)),  # was an AttributeError that stopped the stage
        ({"applied_runs": [1]}, pytest.raises(DecodeError)),
        ({"applied_runs": [0, 1]}, pytest.raises(DecodeError)),
        ({"applied_watermark": 2, "applied_runs": [1, 2, 3, 1]}, DoesNotRaise()),
        ({"applied_above": "12"}, DoesNotRaise()),  # a string iterates as digits: odd but harmless
        ({"frames_expected": "x"}, pytest.raises(DecodeError)),
    ],
)
def test_stream_counts_from_dict(data: dict[str, Any], exception: Any) -> None:
    with exception:
        state = StreamCounts.from_dict(data)
        assert StreamCounts.from_dict(state.to_dict()).to_dict() == state.to_dict()


def test_restore_replaces_state() -> None:
    counter = make_counter()
    counter.update(cars("cam1", 0, 5))
    counter.restore("cam1", StreamCounts().to_dict())
    assert counter.table()["cam1"]["totals"] == {}
    assert counter.update(cars("cam1", 0)) is not None


# -- several streams --------------------------------------------------------------------------


def test_streams_are_kept_apart() -> None:
    counter = make_counter(window_frames=2)
    counter.update(cars("north", 0, 2))
    counter.update(cars("south", 0, 1))  # same frame index, other stream: applied
    counter.update(mock_frame("south", 1, vehicles(("bus", 0.9))))
    counter.update(cars("north", 5, 1))
    counter.end_of_stream(EndOfStream("south", frames_published=2))
    table = counter.table()
    assert list(table) == ["north", "south"]
    assert table["north"] == {
        "totals": {"car": 3},
        "moving": {"car": 1},
        "frames_applied": 2,
        "frames_skipped": {},
        "frames_expected": None,
        "complete": False,
    }
    assert table["south"] == {
        "totals": {"bus": 1, "car": 1},
        "moving": {"bus": 1, "car": 1},
        "frames_applied": 2,
        "frames_skipped": {},
        "frames_expected": 2,
        "complete": True,
    }
    snapshot = counter.snapshot("south")
    fresh = make_counter(window_frames=2)
    fresh.restore("south", snapshot)
    assert fresh.table() == {"south": table["south"]}


# -- gaps: a frame that never comes must not grow the table or hold a stream open ---------------


SNAPSHOT_LIMIT = 4096
"""Bytes a stream's snapshot may take on the changelog, whatever arrives (issue 12)."""


def _run_stream(counter: VehicleCounter, frames: int, missing: set[int], skipped: set[int]) -> int:
    """Apply frames 0..frames-1 except ``missing``; mark ``skipped`` as dead-lettered. Returns the largest snapshot."""
    from pipeline.messages import SkippedFrame

    largest = 0
    for index in range(frames):
        if index in skipped:
            assert counter.skip(SkippedFrame("cam1", index, "poison"))
        elif index not in missing:
            counter.update(cars("cam1", index, 1 + index % 3))
        if index % 97 == 0 or index == frames - 1:  # every snapshot the count stage would write, sampled
            largest = max(largest, len(encode_json(counter.snapshot("cam1"))))
    counter.end_of_stream(EndOfStream("cam1", frames_published=frames))
    return largest


def test_a_dead_lettered_frame_closes_its_gap_and_the_stream_completes() -> None:
    counter = make_counter()
    largest = _run_stream(counter, 20_000, missing=set(), skipped={5})
    state = counter.streams["cam1"]
    assert (state.applied.watermark, state.applied.ranges) == (20_000, [])
    assert state.skipped == {"poison": 1} and state.frames_applied == 19_999 and state.complete
    assert largest <= SNAPSHOT_LIMIT
    snapshot = counter.snapshot("cam1")
    assert snapshot["frames_skipped"] == {"poison": 1} and snapshot["complete"] is True


def test_a_frame_that_never_comes_is_given_up_after_the_horizon() -> None:
    # Before: every frame after the hole went into a flat list, ~100 KB after 20k frames and
    # past the 8 MB record limit after ~12 h at 25 fps, so every count batch then failed.
    counter = make_counter(window_frames=5)
    largest = _run_stream(counter, 20_000, missing={5}, skipped=set())
    state = counter.streams["cam1"]
    assert state.skipped == {"lost_gap": 1} and state.complete
    assert state.applied.watermark == 20_000 and largest <= SNAPSHOT_LIMIT
    assert counter.update(cars("cam1", 5)) is None  # arrives after being given up: not counted


@pytest.mark.parametrize("missing_every", [2, 6, 50, 1500])
def test_many_holes_keep_the_snapshot_bounded(missing_every: int) -> None:
    counter = make_counter(window_frames=5)
    largest = _run_stream(counter, 20_000, missing=set(range(1, 20_000, missing_every)), skipped=set())
    state = counter.streams["cam1"]
    assert len(state.applied.ranges) <= state.applied.max_gaps and state.applied.held <= state.applied.horizon
    assert largest <= SNAPSHOT_LIMIT
    assert state.frames_applied + state.frames_skipped <= 20_000


def test_reordered_frames_within_the_horizon_are_all_counted() -> None:
    import random

    order = list(range(2000))
    rng = random.Random(12)
    for start in range(0, 2000, 64):  # six partitions in parallel: frames arrive shuffled within a batch
        chunk = order[start : start + 64]
        rng.shuffle(chunk)
        order[start : start + 64] = chunk
    counter = make_counter()
    for index in order:
        assert counter.update(cars("cam1", index)) is not None
    state = counter.streams["cam1"]
    assert state.frames_applied == 2000 and state.skipped == {} and state.applied.watermark == 2000


def test_a_forged_far_frame_index_holds_one_range_and_loses_nothing() -> None:
    counter = make_counter()
    counter.update(cars("cam1", 10**12))
    for index in range(5000):
        counter.update(cars("cam1", index))
    state = counter.streams["cam1"]
    assert state.applied.ranges == [[10**12, 10**12 + 1]] and state.skipped == {}
    assert counter.snapshot("cam1")["applied_runs"] == [10**12 - 5000, 1]


def test_a_redelivered_skip_marker_counts_once_and_never_after_the_frame() -> None:
    from pipeline.messages import SkippedFrame

    counter = make_counter()
    assert counter.skip(SkippedFrame("cam1", 1, "too_large"))
    assert not counter.skip(SkippedFrame("cam1", 1, "too_large"))
    counter.update(cars("cam1", 0))
    assert not counter.skip(SkippedFrame("cam1", 0, "poison"))  # applied already
    counter.end_of_stream(EndOfStream("cam1", frames_published=2))
    assert counter.table()["cam1"]["complete"] and counter.table()["cam1"]["frames_skipped"] == {"too_large": 1}


def test_old_snapshots_with_a_flat_applied_list_restore_into_ranges() -> None:
    counter = make_counter()
    counter.restore("cam1", {"applied_watermark": 3, "applied_above": [5, 6, 7, 9], "frames_applied": 7})
    applied = counter.streams["cam1"].applied
    assert (applied.watermark, applied.ranges) == (3, [[5, 8], [9, 10]])
    snapshot = counter.snapshot("cam1")
    assert "applied_above" not in snapshot and snapshot["applied_runs"] == [2, 3, 1, 1]


@pytest.mark.parametrize(
    ("added", "max_gaps", "horizon", "watermark", "ranges", "lost"),
    [
        ([1, 3, 5], 2, 100, 2, [[3, 4], [5, 6]], 1),  # a third gap gives up the lowest
        ([2, 3, 4], 10, 2, 5, [], 2),  # three held above the gap, horizon 2: given up
        ([2, 3], 10, 2, 0, [[2, 4]], 0),
        ([1, 0], 1, 1, 2, [], 0),
    ],
)
def test_applied_frames_bounds(
    added: list[int], max_gaps: int, horizon: int, watermark: int, ranges: list[list[int]], lost: int
) -> None:
    applied = AppliedFrames(max_gaps=max_gaps, horizon=horizon)
    assert sum(applied.add(i) for i in added) == lost
    assert (applied.watermark, applied.ranges) == (watermark, ranges)


def test_an_old_unbounded_snapshot_restores_bounded_with_its_lost_frame_counted() -> None:
    counter = make_counter()
    old = {"applied_watermark": 5, "applied_above": list(range(6, 20_000)), "frames_applied": 19_999, "frames_expected": 20_000}
    counter.restore("cam1", old)
    state = counter.streams["cam1"]
    assert (state.applied.watermark, state.applied.ranges) == (20_000, [])
    assert state.skipped == {"lost_gap": 1} and state.complete
