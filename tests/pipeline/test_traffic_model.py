"""The real model on the start of the shared highway video: the counter finds its first crossing, in any arrival order.

Kept short (50 frames, ~15 s on a 2-core machine): the whole video belongs to
``scripts/count_accuracy.py`` and ``docs/results/counting/README.md``.
"""

from __future__ import annotations

import random

import cv2
import pytest

from pipeline.config import COCO_VEHICLES, CountingLine, ModelConfig, TrackingConfig
from pipeline.detector import make_detector
from pipeline.messages import FrameDetections, FrameMeta
from pipeline.traffic import StreamTraffic

pytestmark = pytest.mark.model

FRAMES = 50
"""The first vehicle crosses the hand-counted line at about frame 38 (no vehicle is on it at frame 0)."""
LINE = CountingLine(name="highway", start=(0.25, 0.6), end=(1.0, 0.6), in_direction="up")


@pytest.fixture(scope="module")
def highway_frames(model_path: str, highway: str) -> list[FrameDetections]:
    capture = cv2.VideoCapture(highway)
    images = []
    while len(images) < FRAMES:
        ok, image = capture.read()
        assert ok, f"cannot read frame {len(images)} of {highway}"
        images.append(image)
    capture.release()
    detector = make_detector(ModelConfig(name=model_path, device="cpu", min_confidence=0.1))
    frames = []
    for index, image in enumerate(images):
        meta = FrameMeta("highway", index, 1000.0 + index / 25, image.shape[1], image.shape[0])
        frames.append(FrameDetections(meta=meta, detections=detector.detect([image])[0]))
    return frames


def test_first_crossing_of_the_highway_video(highway_frames: list[FrameDetections]) -> None:
    config = TrackingConfig(enabled=True, lines=(LINE,))
    in_order = StreamTraffic("highway", config, COCO_VEHICLES)
    events = [c for f in highway_frames for c in in_order.update(f).crossings]
    assert [(c.direction, c.label) for c in events] == [("in", "car")]
    assert 30 <= events[0].frame_index <= 45

    rng = random.Random(0)
    arrival = sorted(highway_frames, key=lambda f: f.meta.frame_index + rng.uniform(0, 8))
    shuffled = StreamTraffic("highway", config, COCO_VEHICLES)
    shuffled_events = [c for n, f in enumerate(arrival) for c in shuffled.update(f, now=n / 25).crossings]
    shuffled_events += shuffled.flush(FRAMES / 25, end=True).crossings
    assert shuffled_events == events
    assert shuffled.to_state()["tracker"] == in_order.to_state()["tracker"]
