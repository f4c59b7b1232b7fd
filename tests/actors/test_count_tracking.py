"""CountWorker with tracking on: what one batch sends and resuming from it (driven directly, no broker); the idle flush (real broker)."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from actors.faust.gaps import EventRecord  # kafka-python's ConsumerRecord fields
from actors.stages import CountWorker, read_table
from cluster.clients import make_producer
from cluster.topics import create_topics
from pipeline.codecs import decode_json, encode_detections
from pipeline.config import CountingLine, Settings, TrackingConfig
from pipeline.messages import EndOfStream, FrameDetections
from pipeline.traffic import TrafficCounter
from tests.pipeline.traffic_sim import highway, render

GATE = CountingLine(name="gate", start=(0.1, 0.6), end=(1.0, 0.6), in_direction="up")
SETTINGS = Settings(tracking=TrackingConfig(enabled=True, lines=(GATE,), reorder_wait_s=60.0, reorder_max_frames=64))


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    def send(self, topic: str, key: Any = None, value: bytes = b"", **_: Any) -> None:
        self.sent.append((topic, key, value))


def _records(frames: list[FrameDetections | EndOfStream]) -> list[EventRecord]:
    out = []
    for offset, item in enumerate(frames):
        enc = encode_detections(item)
        out.append(EventRecord(SETTINGS.topics.detections.name, 0, offset, enc.key, enc.value, list(enc.headers)))
    return out


def _worker(settings: Settings = SETTINGS) -> tuple[CountWorker, _Producer]:
    worker = CountWorker(settings, "count-0")
    producer = _Producer()
    worker.producer = producer
    return worker, producer


def test_one_snapshot_per_stream_per_batch_and_a_takeover_resumes_the_tracks() -> None:
    frames = render(highway(2, vehicles_per_direction=5, duration=10.0))
    sid = frames[0].meta.stream_id
    rng = random.Random(1)
    shuffled = [f for _, f in sorted(((i + rng.uniform(0, 6), f) for i, f in enumerate(frames)), key=lambda p: p[0])]
    records = _records([*shuffled, EndOfStream(sid, len(frames))])
    worker, producer = _worker()
    batches = [records[i : i + 64] for i in range(0, len(records), 64)]
    for n, batch in enumerate(batches):
        if n == 2:  # another replica takes the stream over from the last snapshot
            last = [v for t, _, v in producer.sent if t == SETTINGS.topics.counts_changelog.name][-1]
            worker, producer = _worker()
            worker.counter.restore(sid, decode_json(last))
        before = len(producer.sent)
        worker.process(batch)
        sent = producer.sent[before:]
        assert sum(t == SETTINGS.topics.counts_changelog.name for t, _, _ in sent) == 1  # one snapshot, not one per frame
    updates = [decode_json(v) for t, _, v in producer.sent if t == SETTINGS.topics.counts.name]
    assert {u["type"] for u in updates} == {"count", "traffic"}
    snapshot = decode_json([v for t, _, v in producer.sent if t == SETTINGS.topics.counts_changelog.name][-1])

    reference = TrafficCounter(SETTINGS.tracking, SETTINGS.counting.labels)
    for frame in frames:
        reference.update(frame)
    want = reference.table()[sid]
    assert snapshot["unique_vehicles"] == want["unique_vehicles"]
    assert snapshot["line_crossings"] == want["line_crossings"] and want["line_crossings"]["gate"]["in"]
    assert snapshot["frames_tracked"] == len(frames) and snapshot["box_totals"] == snapshot["totals"]
    assert worker.stats()["table"][sid]["unique_vehicles"] == want["unique_vehicles"]


def test_an_idle_batch_applies_frames_that_waited_too_long() -> None:
    frames = render(highway(2, vehicles_per_direction=2, duration=8.0))[:10]
    settings = SETTINGS.model_copy(update={"tracking": SETTINGS.tracking.model_copy(update={"reorder_wait_s": 0.05})})
    worker, producer = _worker(settings)
    worker.process(_records(frames[:4] + frames[5:]))
    sid = frames[0].meta.stream_id
    assert worker.stats()["table"][sid]["frames_tracked"] == 4
    time.sleep(0.06)
    worker.process([])  # what on_idle runs in a batch of its own
    assert worker.stats()["table"][sid]["frames_tracked"] == 9
    traffic = [decode_json(v) for t, _, v in producer.sent if t == settings.topics.counts.name]
    assert traffic[-1]["type"] == "traffic" and traffic[-1]["frames_stepped_over"] == [4]


def publish_twenty_frames_without_the_eighth(settings: Settings) -> str:
    """Twenty frames of one stream on C, frame 7 lost upstream (say, dead-lettered) and no end of
    stream to complete it: only an idle flush can apply the frames after it. Returns the stream id."""
    create_topics(settings.kafka, settings.topics.all())
    frames = render(highway(2, vehicles_per_direction=2, duration=8.0))[:20]
    producer = make_producer(settings.kafka)
    for frame in frames:
        if frame.meta.frame_index != 7:
            rec = encode_detections(frame)
            producer.send(settings.topics.detections.name, key=rec.key, value=rec.value, headers=list(rec.headers))
    producer.flush()
    producer.close()
    return frames[0].meta.stream_id


IDLE_FLUSH = {"tracking__enabled": True, "tracking__lines": [GATE.model_dump()], "tracking__reorder_wait_s": 0.5}
"""Tracking on, with a reorder wait short enough for a test to see the idle flush."""


@pytest.mark.kafka
@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_an_idle_replica_flushes_a_stream_whose_missing_frame_never_comes(make_settings, guarantee: str) -> None:
    """Real broker: the idle flush is a batch of its own (outputs, no input offsets) under either guarantee."""
    s = make_settings(processing_guarantee=guarantee, **IDLE_FLUSH)
    sid = publish_twenty_frames_without_the_eighth(s)
    stats = CountWorker(s, "count-0").run(timeout_s=30, idle_timeout_s=4)
    assert stats["table"][sid]["frames_tracked"] == 19 and stats["retries"] == 0
    snapshot = read_table(s)[sid]
    assert snapshot["frames_tracked"] == 19 and snapshot["frames_stepped_over"] == 1


def test_at_least_once_a_snapshot_is_sent_only_after_the_count_records_it_covers_are_acknowledged() -> None:
    """A replica that died with the snapshot on Kafka but not the count records would restore those
    frames as applied and never send their records: at least once, nothing orders the two but this."""
    events: list[tuple[str, str]] = []

    class Acked:
        def __init__(self, topic: str) -> None:
            self.topic = topic

        def get(self, timeout: float | None = None) -> None:
            events.append(("acked", self.topic))

    class Producer:
        def send(self, topic: str, **_: Any) -> Acked:
            events.append(("sent", topic))
            return Acked(topic)

    frames = render(highway(2, vehicles_per_direction=5, duration=10.0))[:8]
    settings = SETTINGS.model_copy(update={"processing_guarantee": "at_least_once"})
    worker = CountWorker(settings, "count-0")
    worker.producer = Producer()
    worker.process(_records(frames))
    counts, changelog = settings.topics.counts.name, settings.topics.counts_changelog.name
    before = events[: events.index(("sent", changelog))]
    sent = before.count(("sent", counts))  # a count record per frame (and the tracker's updates)
    assert sent >= len(frames) and before.count(("acked", counts)) == sent  # every one acknowledged first
