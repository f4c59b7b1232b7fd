"""Drawing tracks, lines and running counts (pure OpenCV)."""

from __future__ import annotations

import numpy as np

from pipeline.annotate import RunningCounts, draw_frame, track_color
from pipeline.config import CountingLine
from tests.pipeline.helpers import mock_detections

LINE = CountingLine(name="gate", start=(0.25, 0.6), end=(1.0, 0.6))


def _crossing(track_id: int, frame_index: int, direction: str = "in") -> dict:
    return {"line": "gate", "direction": direction, "label": "car", "track_id": track_id, "frame_index": frame_index}


def test_running_counts_are_as_of_each_frame_and_ignore_redelivered_crossings() -> None:
    running = RunningCounts(["gate"])
    for crossing in (_crossing(4, 38), _crossing(4, 38), _crossing(7, 82), _crossing(9, 60, "out")):
        running.add(crossing)
    assert running.at(0) == {"gate": {"in": 0, "out": 0}}
    assert running.at(38) == {"gate": {"in": 1, "out": 0}}
    assert running.at(90) == {"gate": {"in": 2, "out": 1}}


def test_draw_frame_draws_on_a_copy_in_track_colours() -> None:
    image = np.zeros((240, 320, 3), dtype=np.uint8)
    out = draw_frame(image, tracks=[[3, "car", 100.0, 100.0, 150.0, 140.0]], lines=[LINE], counts={"gate": {"in": 2, "out": 0}})
    assert not image.any() and out.shape == image.shape
    assert tuple(out[120, 100]) == track_color(3)  # the box's left edge
    assert out[int(0.6 * 239), 200].any()  # the line
    assert track_color(3) != track_color(4)


def test_without_tracks_the_detections_are_drawn() -> None:
    image = np.zeros((240, 320, 3), dtype=np.uint8)
    detections = mock_detections(xyxy=[[10, 10, 60, 60]], confidence=[0.9], class_id=[2])
    out = draw_frame(image, detections=detections, caption="hw #0")
    assert out[35, 10].any()
