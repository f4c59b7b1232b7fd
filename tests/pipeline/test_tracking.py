"""ByteTracker: ids per tracker, a lost-track buffer in seconds, and a JSON snapshot that resumes bit for bit."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest

from pipeline.assignment import box_iou, linear_assignment, match
from pipeline.config import TrackingConfig
from pipeline.messages import Detections
from pipeline.tracking import ByteTracker, TrackedObjects
from tests.pipeline.helpers import DoesNotRaise, mock_detections
from tests.pipeline.traffic_sim import Noise, Scene, Vehicle, highway, render

CONFIG = TrackingConfig(enabled=True)


def run(tracker: ByteTracker, frames: list[tuple[Detections, float]]) -> list[TrackedObjects]:
    return [tracker.update(d, ts, 640, 480) for d, ts in frames]


def moving_box(x0: float, step: float, n: int, fps: float = 25.0, t0: float = 0.0) -> list[tuple[Detections, float]]:
    """One car moving right by ``step`` px per frame."""
    return [(mock_detections([[x0 + i * step, 100, x0 + i * step + 40, 130]]), t0 + i / fps) for i in range(n)]


def scene_frames(seed: int = 1, duration: float = 12.0) -> list[tuple[Detections, float]]:
    scene = highway(seed, vehicles_per_direction=8, duration=duration)
    noise = Noise(jitter_px=1.5, miss_rate=0.05, false_rate=0.05, drop_rate=0.05, confidence_std=0.1, seed=seed)
    return [(f.detections, f.meta.capture_ts) for f in render(scene, noise)]


# -- assignment --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([[0, 0, 10, 10]], [[0, 0, 10, 10]], [[1.0]]),
        ([[0, 0, 10, 10]], [[5, 0, 15, 10]], [[50 / 150]]),
        ([[0, 0, 10, 10]], [[10, 10, 20, 20]], [[0.0]]),  # touching corners
        ([[0, 0, 10, 10]], [[0, 0, 0, 0]], [[0.0]]),  # no area
        ([], [[0, 0, 1, 1]], np.zeros((0, 1))),
    ],
)
def test_box_iou(a: list[list[float]], b: list[list[float]], expected: Any) -> None:
    np.testing.assert_allclose(box_iou(np.asarray(a), np.asarray(b)), np.asarray(expected))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 4), (6, 3)])
def test_linear_assignment_is_optimal(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.random(shape).round(1)  # rounding makes ties
        pairs = linear_assignment(cost)
        n, m = shape
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert len(pairs) == min(shape)
        assert sum(cost[r, c] for r, c in pairs) == pytest.approx(best)


@pytest.mark.parametrize(
    ("cost", "max_cost", "expected"),
    [
        ([[0.1, 0.9], [0.2, 0.95]], 0.8, ([(0, 0)], [1], [1])),
        ([[0.5, 0.1], [0.1, 0.5]], 0.8, ([(0, 1), (1, 0)], [], [])),
        ([[0.9]], 0.8, ([], [0], [0])),
        # the cheapest single pair (0,0) would block both others: more allowed pairs win
        ([[0.1, 0.3], [0.3, 0.9]], 0.5, ([(0, 1), (1, 0)], [], [])),
        (np.zeros((0, 3)), 0.5, ([], [], [0, 1, 2])),
    ],
)
def test_match(cost: Any, max_cost: float, expected: Any) -> None:
    assert match(np.asarray(cost, dtype=float), max_cost) == expected


# -- tracker behaviour -------------------------------------------------------------------------


def test_a_moving_car_keeps_one_id() -> None:
    out = run(ByteTracker(CONFIG), moving_box(0, 5, 50))
    assert {int(t) for o in out for t in o.track_id} == {1}
    assert all(len(o) == 1 for o in out)


def test_ids_are_per_tracker_not_global() -> None:
    a, b = ByteTracker(CONFIG), ByteTracker(CONFIG)
    run(a, moving_box(0, 5, 10))
    assert run(b, moving_box(300, -5, 10))[-1].track_id.tolist() == [1]


def test_a_one_frame_false_box_never_becomes_a_track() -> None:
    tracker = ByteTracker(CONFIG)
    frames = moving_box(0, 5, 5)
    frames[2] = (mock_detections([[5 * 2, 100, 5 * 2 + 40, 130], [400, 300, 440, 330]]), frames[2][1])
    out = run(tracker, frames)
    assert {int(t) for o in out for t in o.track_id} == {1}
    assert tracker.next_id == 2


def test_low_confidence_boxes_only_extend_tracks() -> None:
    cfg = TrackingConfig(high_threshold=0.5, low_threshold=0.1, new_track_threshold=0.6)
    frames = [(mock_detections([[i * 4, 100, i * 4 + 40, 130]], confidence=[0.9 if i < 5 else 0.2]), i / 25) for i in range(15)]
    frames.append((mock_detections([[400, 300, 440, 330]], confidence=[0.2]), 15 / 25))  # low and alone: no track
    out = run(ByteTracker(cfg), frames)
    assert [o.track_id.tolist() for o in out[3:15]] == [[1]] * 12
    assert len(out[15]) == 0


@pytest.mark.parametrize("fps", [5.0, 10.0, 25.0, 50.0])
@pytest.mark.parametrize(("gap_s", "same_id"), [(0.6, True), (1.4, False)])
def test_track_buffer_is_seconds_whatever_the_frame_rate(fps: float, gap_s: float, same_id: bool) -> None:
    """A car hidden for gap_s comes back with its id only if gap_s <= track_buffer_s (1 s), at any frame rate."""
    speed = 50.0  # px per second
    frames = []
    t = 0.0
    while t < 4.0:
        if not 1.0 < t < 1.0 + gap_s:
            x = speed * t
            frames.append((mock_detections([[x, 100, x + 60, 140]]), t))
        t += 1 / fps
    out = run(ByteTracker(CONFIG), frames)
    ids = {int(i) for o in out for i in o.track_id}
    assert (ids == {1}) is same_id


def test_dropped_frames_predict_over_the_real_interval() -> None:
    """A fast car seen only every 4th frame (75% dropped) still matches: the filter predicts over the gap."""
    frames = [f for i, f in enumerate(moving_box(0, 12, 60)) if i % 4 == 0 or i < 4]
    out = run(ByteTracker(CONFIG), frames)
    assert {int(i) for o in out for i in o.track_id} == {1}


def test_a_frame_stamped_before_the_last_is_taken_as_no_time_passing() -> None:
    """A camera clock stepping back must not stop counting, nor expire or predict the tracks backwards."""
    tracker = ByteTracker(CONFIG)
    frames = moving_box(0, 12, 6)
    run(tracker, frames[:5])
    back = tracker.update(frames[5][0], frames[4][1] - 30.0, 640, 480)
    assert tracker.last_ts == frames[4][1] and [int(i) for i in back.track_id] == [1]


def test_output_boxes_are_clipped_to_the_frame() -> None:
    frames = [(mock_detections([[600 + i, 100, 650 + i, 130]]), i / 25) for i in range(5)]
    out = run(ByteTracker(CONFIG), frames)
    assert out[-1].xyxy[0, 2] <= 640


# -- state -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 7, 40, 150, 270])
def test_restored_tracker_continues_exactly(split: int) -> None:
    """Snapshot to JSON text after ``split`` frames, restore, continue: same ids and boxes as a run that never stopped."""
    frames = scene_frames()
    assert len(frames) > split
    uninterrupted = ByteTracker(CONFIG)
    reference = run(uninterrupted, frames)
    first = ByteTracker(CONFIG)
    head = run(first, frames[:split])
    text = json.dumps(first.to_state())
    resumed = ByteTracker.from_state(CONFIG, json.loads(text))
    tail = run(resumed, frames[split:])
    assert len(head + tail) == len(reference)
    for got, want in zip(head + tail, reference, strict=True):
        assert got.track_id.tolist() == want.track_id.tolist()
        assert got.labels == want.labels
        assert np.array_equal(got.xyxy, want.xyxy)  # bit for bit
    assert resumed.to_state() == uninterrupted.to_state()


def test_state_is_plain_json_with_version_and_id_counter() -> None:
    tracker = ByteTracker(CONFIG)
    run(tracker, moving_box(0, 5, 10))
    state = tracker.to_state()
    assert json.loads(json.dumps(state)) == state
    assert state["version"] == 1 and state["next_id"] == 2
    assert set(state["tracks"][0]) >= {"id", "status", "x", "v", "p_xx", "p_xv", "p_vv", "hits", "votes"}


@pytest.mark.parametrize(
    ("state", "exception"),
    [
        ({"version": 1, "next_id": 1, "last_ts": None, "tracks": []}, DoesNotRaise()),
        ({"version": 2, "next_id": 1, "last_ts": None, "tracks": []}, pytest.raises(ValueError, match="version 2")),
        ({"next_id": 1, "tracks": []}, pytest.raises(ValueError, match="version None")),
    ],
)
def test_from_state_checks_the_version(state: dict[str, Any], exception: Any) -> None:
    with exception:
        ByteTracker.from_state(CONFIG, state)


def test_state_size_is_bounded_for_a_typical_scene() -> None:
    """A two-way road with ~8 vehicles in view: lost tracks expire, so the snapshot stays a few KB."""
    tracker = ByteTracker(CONFIG)
    sizes = []
    for d, ts in scene_frames(seed=2, duration=30.0):
        tracker.update(d, ts, 640, 480)
        sizes.append(len(json.dumps(tracker.to_state())))
    assert max(sizes) < 12_000, max(sizes)
    assert len(tracker.to_state()["tracks"]) <= 12


def test_class_is_the_most_frequent_label() -> None:
    labels = ["truck", "car", "car", "truck", "car", "car"]
    frames = [(mock_detections([[i * 5, 100, i * 5 + 40, 130]], labels=[lab]), i / 25) for i, lab in enumerate(labels)]
    out = run(ByteTracker(CONFIG), frames)
    assert out[-1].labels == ("car",)
    assert out[-1].class_id.tolist() == [0]  # mock_detections numbers boxes 0..n-1


def test_a_vehicle_standing_still_keeps_its_id() -> None:
    v = Vehicle.straight((0.5, 0.5), (0.5, 0.5), 0.0, 20.0)
    frames = [(f.detections, f.meta.capture_ts) for f in render_one(v, Noise(jitter_px=1.0, miss_rate=0.1, seed=3))]
    out = run(ByteTracker(CONFIG), frames)
    assert {int(i) for o in out for i in o.track_id} == {1}


def render_one(vehicle: Vehicle, noise: Noise) -> list[Any]:
    return render(Scene([vehicle], duration=vehicle.path[-1][0]), noise)
