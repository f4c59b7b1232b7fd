"""TrafficCounter: exact counts on clean synthetic traffic, a small error on noisy traffic, exact resume from a snapshot."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config import COCO_VEHICLES, CountingLine, Settings, TrackingConfig, load_settings
from pipeline.lines import LineGeometry, anchors, segments_intersect
from pipeline.messages import EndOfStream, FrameDetections
from pipeline.traffic import StreamTraffic, TrafficCounter, TrafficUpdate, suppress_duplicates
from tests.pipeline.helpers import DoesNotRaise, mock_detections
from tests.pipeline.traffic_sim import HEIGHT, WIDTH, Noise, Scene, Vehicle, highway, render, true_crossings

GATE = CountingLine(name="gate", start=(0.1, 0.6), end=(1.0, 0.6), in_direction="up")
CONFIG = TrackingConfig(enabled=True, lines=(GATE,))


def count(frames: list[FrameDetections], config: TrackingConfig = CONFIG, stream_id: str = "sim") -> StreamTraffic:
    traffic = StreamTraffic(stream_id, config, COCO_VEHICLES)
    for frame in frames:
        traffic.update(frame)
    traffic.flush(frames[-1].meta.capture_ts if frames else 0.0, end=True)
    return traffic


def crossings(traffic: StreamTraffic, line: str = "gate") -> dict[str, int]:
    return {d: traffic.counts.crossings(line, d) for d in ("in", "out") if traffic.counts.crossings(line, d)}


def up(x: float, t0: float = 0.0, seconds: float = 3.0, **kw: Any) -> Vehicle:
    """A vehicle from below the frame's bottom edge to near its top, crossing y=0.6 going up."""
    return Vehicle.straight((x, 1.05), (x, 0.15), t0, t0 + seconds, **kw)


def down(x: float, t0: float = 0.0, seconds: float = 3.0, **kw: Any) -> Vehicle:
    return Vehicle.straight((x, 0.15), (x, 1.05), t0, t0 + seconds, **kw)


# -- geometry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p1", "p2", "q1", "q2", "expected"),
    [
        ((0.5, 0.7), (0.5, 0.5), (0.1, 0.6), (1.0, 0.6), True),
        ((0.05, 0.7), (0.05, 0.5), (0.1, 0.6), (1.0, 0.6), False),  # beside the line's end
        ((0.5, 0.7), (0.5, 0.6), (0.1, 0.6), (1.0, 0.6), True),  # touching
        ((0.5, 0.7), (0.5, 0.65), (0.1, 0.6), (1.0, 0.6), False),
        ((0.2, 0.6), (0.3, 0.6), (0.1, 0.6), (1.0, 0.6), True),  # collinear overlap
        ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), True),
    ],
)
def test_segments_intersect(p1: Any, p2: Any, q1: Any, q2: Any, expected: bool) -> None:
    assert segments_intersect(p1, p2, q1, q2) is expected


@pytest.mark.parametrize(
    ("start", "end", "direction", "point", "side"),
    [
        ((0.0, 0.5), (1.0, 0.5), "up", (0.5, 0.4), 1),
        ((0.0, 0.5), (1.0, 0.5), "up", (0.5, 0.6), -1),
        ((1.0, 0.5), (0.0, 0.5), "up", (0.5, 0.4), 1),  # the order of the points does not matter
        ((0.0, 0.5), (1.0, 0.5), "down", (0.5, 0.4), -1),
        ((0.5, 0.0), (0.5, 1.0), "right", (0.6, 0.5), 1),
        ((0.5, 0.0), (0.5, 1.0), "left", (0.6, 0.5), -1),
        ((0.0, 0.0), (1.0, 1.0), "up", (0.6, 0.4), 1),  # diagonal: up means the side with smaller y
        ((0.0, 0.5), (1.0, 0.5), "up", (0.5, 0.505), 0),  # within the hysteresis band (0.01 of the diagonal)
    ],
)
def test_side_of_line(start: Any, end: Any, direction: Any, point: Any, side: int) -> None:
    line = LineGeometry(CountingLine(name="l", start=start, end=end, in_direction=direction), WIDTH, HEIGHT)
    assert line.side(point, 0.01) == side


def test_anchor_is_bottom_centre_of_the_visible_box() -> None:
    got = anchors(mock_detections([[600, 100, 700, 200]]).xyxy, 640, 480, "bottom_center")
    assert got.tolist() == [[620 / 640, 200 / 480]]
    assert anchors(mock_detections([[0, 100, 40, 200]]).xyxy, 640, 480, "center").tolist() == [[20 / 640, 150 / 480]]


@pytest.mark.parametrize(
    ("line", "exception"),
    [
        ({"name": "a", "start": [0.25, 0.6], "end": [1.0, 0.6]}, DoesNotRaise()),
        ({"name": "a", "start": [0.5, 0.0], "end": [0.5, 1.0], "in_direction": "left"}, DoesNotRaise()),
        (
            {"name": "a", "start": [0.5, 0.0], "end": [0.5, 1.0], "in_direction": "up"},
            pytest.raises(ValidationError, match="vertical"),
        ),
        (
            {"name": "a", "start": [0.0, 0.5], "end": [1.0, 0.5], "in_direction": "right"},
            pytest.raises(ValidationError, match="horizontal"),
        ),
        ({"name": "a", "start": [0.2, 0.2], "end": [0.2, 0.2]}, pytest.raises(ValidationError, match="same start and end")),
        ({"name": "a", "start": [0.2, 1.2], "end": [0.4, 0.2]}, pytest.raises(ValidationError, match=r"\[0, 1\]")),
        ({"name": "a", "start": [0.2, 0.2], "end": [0.4, 0.2], "in_direction": "north"}, pytest.raises(ValidationError)),
    ],
)
def test_counting_line_validation(line: dict[str, Any], exception: Any) -> None:
    with exception:
        CountingLine.model_validate(line)


def test_tracking_settings_from_yaml_and_flags(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "tracking:\n  enabled: true\n  lines:\n"
        "    - {name: north, start: [0.25, 0.6], end: [1.0, 0.6], in_direction: up, streams: [cam1]}\n"
        "    - {name: all, start: [0.0, 0.5], end: [1.0, 0.5]}\n"
    )
    settings = load_settings(path, overrides={"tracking": {"min_hits": 5}}, environ={})
    assert settings.tracking.enabled and settings.tracking.min_hits == 5
    assert [line.name for line in settings.tracking.lines_for("cam1")] == ["north", "all"]
    assert [line.name for line in settings.tracking.lines_for("cam2")] == ["all"]


def test_tracking_is_off_by_default() -> None:
    assert Settings().tracking.enabled is False and Settings().tracking.lines == ()


@pytest.mark.parametrize(
    ("tree", "exception"),
    [
        ({"low_threshold": 0.6, "high_threshold": 0.5}, pytest.raises(ValidationError, match="low_threshold")),
        ({"lines": [{"name": "a", "start": [0, 0.5], "end": [1, 0.5]}] * 2}, pytest.raises(ValidationError, match="unique")),
        ({"track_buffer_s": 0}, pytest.raises(ValidationError)),
        ({"min_hits": 1}, DoesNotRaise()),
    ],
)
def test_tracking_config_validation(tree: dict[str, Any], exception: Any) -> None:
    with exception:
        TrackingConfig.model_validate(tree)


# -- accuracy on synthetic traffic ------------------------------------------------------------

CLEAN_SCENES: list[tuple[str, list[Vehicle], dict[str, int], dict[str, int]]] = [
    # (name, vehicles, expected crossings, expected {unique, moving, stationary at the end})
    ("one car up", [up(0.5)], {"in": 1}, {"unique": 1, "moving": 1}),
    ("one car down", [down(0.5)], {"out": 1}, {"unique": 1, "moving": 1}),
    ("both directions", [up(0.4), down(0.7, t0=0.5)], {"in": 1, "out": 1}, {"unique": 2, "moving": 2}),
    ("beside the end of the line", [up(0.04)], {}, {"unique": 1, "moving": 1}),
    ("parked on the line", [Vehicle.straight((0.5, 0.6), (0.5, 0.6), 0.0, 9.0)], {}, {"unique": 1, "moving": 0, "stationary": 1}),
    (
        "parked beside the lane while traffic passes",
        [Vehicle.straight((0.25, 0.62), (0.25, 0.62), 0.0, 9.0), up(0.6, t0=1.0), up(0.6, t0=4.0)],
        {"in": 2},
        {"unique": 3, "moving": 2, "stationary": 1},
    ),
    ("two cars side by side", [up(0.47), up(0.53)], {"in": 2}, {"unique": 2, "moving": 2}),
    (
        "one overtakes the other at the line",
        [up(0.45, seconds=4.0), up(0.515, t0=0.6, seconds=2.2)],
        {"in": 2},
        {"unique": 2, "moving": 2},
    ),
    ("occluded while crossing", [up(0.5, hidden=((1.1, 1.8),))], {"in": 1}, {"unique": 1, "moving": 1}),
    (
        "slow cyclist",
        [Vehicle.straight((0.6, 0.8), (0.6, 0.4), 0.0, 10.0, label="bicycle", size=(16.0, 30.0))],
        {"in": 1},
        {"unique": 1, "moving": 1},
    ),
    ("truck", [up(0.5, label="truck", size=(90.0, 120.0))], {"in": 1}, {"unique": 1, "moving": 1}),
    ("enters and leaves at the frame's right edge", [up(0.99)], {"in": 1}, {"unique": 1, "moving": 1}),
    (
        "stops on the line, then drives on",
        [Vehicle(((0.0, 0.5, 0.95), (1.5, 0.5, 0.6), (5.0, 0.5, 0.6), (6.5, 0.5, 0.15)))],
        {"in": 1},
        {"unique": 1, "moving": 1},
    ),
    (
        "turns back after crossing",
        [Vehicle(((0.0, 0.5, 0.95), (1.5, 0.5, 0.45), (3.0, 0.5, 0.95)))],
        {"in": 1, "out": 1},
        {"unique": 1, "moving": 1},
    ),
]


@pytest.mark.parametrize(("name", "vehicles", "expected", "totals"), CLEAN_SCENES, ids=[s[0] for s in CLEAN_SCENES])
def test_clean_scenes_are_counted_exactly(
    name: str, vehicles: list[Vehicle], expected: dict[str, int], totals: dict[str, int]
) -> None:
    assert dict(true_crossings(vehicles, GATE)) == expected  # the scene means what its name says
    frames = render(Scene(vehicles, duration=max(v.path[-1][0] for v in vehicles)))
    traffic = count(frames)
    assert crossings(traffic) == expected
    assert sum(traffic.counts.unique_vehicles.values()) == totals["unique"]
    assert sum(traffic.counts.moving_vehicles.values()) == totals["moving"]
    assert sum(traffic.counts.stationary_vehicles.values()) == totals.get("stationary", 0)


@pytest.mark.parametrize(
    "noise",
    [
        Noise(jitter_px=2.0, seed=1),
        Noise(drop_rate=0.3, seed=2),  # dropped frames: the counter waits for them, then steps over
        Noise(miss_rate=0.2, seed=3),
        Noise(confidence_std=0.15, seed=4),
    ],
    ids=["jitter", "dropped frames", "missed boxes", "confidence noise"],
)
def test_clean_scenes_survive_one_kind_of_noise(noise: Noise) -> None:
    """Every clean scene with one kind of trouble still gives its exact crossings."""
    for name, vehicles, expected, _ in CLEAN_SCENES:
        frames = render(Scene(vehicles, duration=max(v.path[-1][0] for v in vehicles)), noise)
        assert crossings(count(frames)) == expected, name


def test_class_of_a_crossing_is_per_vehicle() -> None:
    traffic = count(render(Scene([up(0.3, label="truck", size=(80.0, 90.0)), up(0.7, label="car"), up(0.5, t0=3, label="bus")])))
    assert traffic.counts.to_dict()["line_crossings"] == {"gate": {"in": {"bus": 1, "car": 1, "truck": 1}, "out": {}}}


NOISY = Noise(jitter_px=1.5, miss_rate=0.1, false_rate=0.05, drop_rate=0.05, confidence_std=0.1)
NOISY_MAX_ERROR = 0.05
"""Stated bound: on busy noisy synthetic highways the crossing count is within 5% of the truth."""


def test_noisy_highway_count_error_is_small() -> None:
    errors = []
    true_total = 0
    for seed in range(3):
        scene = highway(seed, vehicles_per_direction=15, duration=30.0)
        line = CountingLine(name="gate", start=(0.0, 0.6), end=(1.0, 0.6), in_direction="up")
        truth = true_crossings(scene.vehicles, line)
        frames = render(scene, Noise(**{**NOISY.__dict__, "seed": seed}))
        traffic = count(frames, TrackingConfig(enabled=True, lines=(line,)), scene.stream_id)
        got = Counter({d: traffic.counts.crossings("gate", d) for d in ("in", "out")})
        errors += [abs(got[d] - truth[d]) for d in ("in", "out")]
        true_total += sum(truth.values())
        assert sum(traffic.counts.stationary_vehicles.values()) == 2  # the two parked cars, never moving
    assert sum(errors) / true_total <= NOISY_MAX_ERROR, (errors, true_total)


# -- order, restore, size ----------------------------------------------------------------------


def shuffled(frames: list[FrameDetections], seed: int, spread: float = 5.0) -> list[FrameDetections]:
    """Arrival order of several InterConsumers: each frame up to ``spread`` frames early or late."""
    rng = random.Random(seed)
    return sorted(frames, key=lambda f: f.meta.frame_index + rng.uniform(0, spread))


def feed(traffic: StreamTraffic, frames: list[FrameDetections], fps: float = 25.0) -> list[dict[str, Any]]:
    """Arrival time = position in the arrival order / fps (the reorder wait is measured on it)."""
    return [traffic.update(f, now=n / fps).to_dict() for n, f in enumerate(frames)]


def test_out_of_order_arrival_counts_like_in_order() -> None:
    scene = highway(5, vehicles_per_direction=8, duration=15.0)
    frames = render(scene, Noise(jitter_px=1.0, seed=5))
    in_order = StreamTraffic(scene.stream_id, CONFIG, COCO_VEHICLES)
    out_of_order = StreamTraffic(scene.stream_id, CONFIG, COCO_VEHICLES)
    a = feed(in_order, frames)
    b = feed(out_of_order, shuffled(frames, seed=5))
    assert [c for u in a for c in u["crossings"]] == [c for u in b for c in u["crossings"]]
    assert a[-1]["line_crossings"] == b[-1]["line_crossings"] and a[-1]["unique_vehicles"] == b[-1]["unique_vehicles"]
    assert out_of_order.frames_stepped_over == 0


@pytest.mark.parametrize("split", [3, 120, 250])
def test_restored_counter_continues_exactly(split: int) -> None:
    """Snapshot to JSON text mid-stream (frames waiting in the reorder buffer), restore, continue: same updates."""
    scene = highway(6, vehicles_per_direction=8, duration=12.0)
    frames = shuffled(render(scene, Noise(jitter_px=1.0, miss_rate=0.05, drop_rate=0.05, seed=6)), seed=6)
    uninterrupted = StreamTraffic(scene.stream_id, CONFIG, COCO_VEHICLES)
    reference = feed(uninterrupted, frames)
    first = StreamTraffic(scene.stream_id, CONFIG, COCO_VEHICLES)
    head = [first.update(f, now=n / 25).to_dict() for n, f in enumerate(frames[:split])]
    text = json.dumps(first.to_state())
    resumed = StreamTraffic.from_state(scene.stream_id, CONFIG, COCO_VEHICLES, json.loads(text))
    tail = [resumed.update(f, now=(split + n) / 25).to_dict() for n, f in enumerate(frames[split:])]
    assert head + tail == reference
    assert resumed.to_state() == uninterrupted.to_state()
    assert sum(reference[-1]["line_crossings"]["gate"]["in"].values()) > 0


@pytest.mark.parametrize(
    ("state", "stream_id", "match"),
    [({"version": 2}, "sim", "version 2"), ({"version": 1, "stream_id": "other"}, "sim", "stream 'other'")],
)
def test_restore_refuses_foreign_state(state: dict[str, Any], stream_id: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StreamTraffic.from_state(stream_id, CONFIG, COCO_VEHICLES, state)


BUSY_HIGHWAY_MAX_SNAPSHOT_BYTES = 64_000
"""Measured: median ~18 KB, largest ~49 KB (when a dropped frame nobody marked holds 32 frames back); clean and in order ~9 KB."""


def test_snapshot_of_a_busy_highway_stays_small() -> None:
    """~20 vehicles in view at once, frames out of order: the snapshot is bounded (lost tracks expire)."""
    scene = highway(7, vehicles_per_direction=60, duration=60.0)
    frames = shuffled(render(scene, NOISY), seed=7)
    traffic = StreamTraffic(scene.stream_id, CONFIG, COCO_VEHICLES)
    sizes = []
    for n, frame in enumerate(frames):
        traffic.update(frame, now=n / 25)
        if n % 25 == 0:
            sizes.append(len(json.dumps(traffic.to_state())))
    assert max(sizes) <= BUSY_HIGHWAY_MAX_SNAPSHOT_BYTES, max(sizes)
    assert sizes[-1] < 2 * sorted(sizes)[len(sizes) // 2]  # no growth with time


# -- counter over streams ----------------------------------------------------------------------


def test_streams_have_their_own_ids_lines_and_counts() -> None:
    only_cam1 = CountingLine(name="cam1-only", start=(0.1, 0.6), end=(1.0, 0.6), streams=("cam1",))
    counter = TrafficCounter(TrackingConfig(enabled=True, lines=(GATE, only_cam1)), COCO_VEHICLES)
    updates: list[TrafficUpdate] = []
    for sid in ("cam1", "cam2"):
        for frame in render(Scene([up(0.5)], duration=3.5, stream_id=sid)):
            updates.append(counter.update(frame))
        counter.end_of_stream(EndOfStream(sid, frames_published=88), now=100.0)
    table = counter.table()
    assert table["cam1"]["line_crossings"] == {"gate": {"in": {"car": 1}, "out": {}}, "cam1-only": {"in": {"car": 1}, "out": {}}}
    assert table["cam2"]["line_crossings"] == {"gate": {"in": {"car": 1}, "out": {}}}
    assert {c.track_id for u in updates for c in u.crossings} == {1}
    assert counter.streams["cam1"].tracker.next_id == counter.streams["cam2"].tracker.next_id


def test_redelivered_frames_change_nothing() -> None:
    frames = render(Scene([up(0.5)], duration=3.5))
    traffic = StreamTraffic("sim", CONFIG, COCO_VEHICLES)
    for frame in frames:
        traffic.update(frame)
    before = traffic.to_state()
    again = [traffic.update(f) for f in frames[:10]]
    assert {u.pushed for u in again} == {"late"} and traffic.to_state()["counts"] == before["counts"]


def test_only_configured_labels_are_tracked() -> None:
    people = [Vehicle.straight((0.5, 0.9), (0.5, 0.2), 0, 3, label="person")]
    traffic = count(render(Scene(people, duration=3.5)))
    assert traffic.counts.to_dict()["unique_vehicles"] == {} and traffic.tracker.next_id == 1


def test_suppress_duplicates_keeps_the_more_confident_box() -> None:
    d = mock_detections(
        [[0, 0, 40, 30], [1, 0, 41, 30], [100, 0, 140, 30]], confidence=[0.36, 0.38, 0.5], labels=["truck", "car", "car"]
    )
    kept = suppress_duplicates(d)
    assert kept.labels == ("car", "car") and kept.confidence.tolist() == pytest.approx([0.38, 0.5])
