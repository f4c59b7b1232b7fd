"""`vapipe annotate` renders a stream from topic B and the count stage's tracking updates (real broker, no Ray)."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from actors.annotate import annotate_stream, read_tracking
from actors.producer import FrameProducer
from actors.stages import CountWorker, InterWorker
from cluster.topics import create_topics
from pipeline.sources import parse_source
from tests.integration.test_pipeline import TRACKING

pytestmark = pytest.mark.kafka


def test_annotate_writes_every_frame_of_the_stream_with_its_tracks(make_settings, highway: str, tmp_path: Path) -> None:
    frames = 12
    s = make_settings(producer__max_frames=frames, model__name="synthetic:1ms", **TRACKING)
    create_topics(s.kafka, s.topics.all())
    FrameProducer(s, parse_source(highway, stream_id="hw")).run()
    InterWorker(s, "inter-0").run(max_messages=frames + 1, timeout_s=60)
    count = CountWorker(s, "count-0").run(max_messages=frames + 1, timeout_s=60)
    assert count["table"]["hw"]["frames_tracked"] == frames

    tracks, running = read_tracking(s, "hw")
    assert sorted(tracks) == list(range(frames)) and running.lines == ("highway",)

    out = tmp_path / "hw.mp4"
    result = annotate_stream(s, "hw", out)
    assert result.frames == result.tracked_frames == frames
    video = cv2.VideoCapture(str(out))
    try:
        assert video.isOpened()
        assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
        ok, image = video.read()
        assert ok and image.shape[:2] == (240, 320)
    finally:
        video.release()
    assert annotate_stream(s, "hw", tmp_path / "first.mp4", max_frames=3).frames == 3
