"""Exactly-once against the real broker: aborted batches stay invisible, zombies are fenced,
producers resume after the frames already committed, oversize frames never vanish silently."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kafka.errors import KafkaError

from actors.failures import classify
from actors.producer import FrameProducer, stream_progress
from actors.stages import CountWorker, InterWorker, read_table
from cluster.clients import make_consumer, make_producer, send_record
from cluster.reading import read_all
from cluster.topics import create_topics
from pipeline.codecs import decode_frame, encode_frame, encode_jpeg
from pipeline.errors import SourceError
from pipeline.messages import EndOfStream, FrameMeta
from pipeline.sources import parse_source
from tests.conftest import build_settings, private_broker

pytestmark = pytest.mark.kafka


def _frames_in_a(settings: Any, stream_id: str) -> tuple[list[int], int]:
    """Frame indices of a stream in topic A (committed only) and its end-of-stream count."""
    indices, eos = [], 0
    # settled: a transaction just committed may not have its markers on every partition yet
    for r in read_all(settings.kafka, settings.topics.frames.name, settled=True):
        item = decode_frame(r.value, r.headers)
        if isinstance(item, EndOfStream):
            eos += item.stream_id == stream_id
        elif item[0].stream_id == stream_id:
            indices.append(item[0].frame_index)
    return sorted(indices), eos


def _capture_times(settings: Any, stream_id: str) -> dict[int, float]:
    """Capture time of each frame of a stream in topic A."""
    times = {}
    for r in read_all(settings.kafka, settings.topics.frames.name):
        item = decode_frame(r.value, r.headers)
        if not isinstance(item, EndOfStream) and item[0].stream_id == stream_id:
            times[item[0].frame_index] = item[0].capture_ts
    return times


def _read_uncommitted(settings: Any, topic: str) -> int:
    consumer = make_consumer(settings.kafka, topic, group_id=None, isolation_level="read_uncommitted", consumer_timeout_ms=3000)
    try:
        return sum(1 for _ in consumer)
    finally:
        consumer.close()


class FailsOnce(InterWorker):
    """Publishes a batch's outputs, then fails before committing, once."""

    failed = False

    def process(self, records: list[Any]) -> list[Any]:
        futures = super().process(records)
        if not FailsOnce.failed:
            FailsOnce.failed = True
            self.producer.flush()  # the outputs reach the broker inside the open transaction
            raise KafkaError("injected failure after the outputs were sent")
        return futures


def test_a_failed_batch_is_aborted_invisible_and_processed_again(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=8, model__name="sleep:1ms", inter__batch_size=4)
    create_topics(s.kafka, s.topics.all())
    FrameProducer(s, parse_source(highway, stream_id="hw")).run()
    worker = FailsOnce(s, "inter-0")
    worker.max_backoff_s = 0.1
    stats = worker.run(max_messages=9, timeout_s=60)
    assert FailsOnce.failed and stats["retries"] == 1 and stats["frames_out"] == 8
    committed = [r for r in read_all(s.kafka, s.topics.detections.name)]
    frames = Counter(r.key for r in committed)
    assert sum(frames.values()) == 9  # 8 frames + the end of stream, each exactly once
    assert _read_uncommitted(s, s.topics.detections.name) > 9  # the aborted copies exist, unseen
    count = CountWorker(s, "count-0").run(max_messages=9, timeout_s=60)
    assert count["duplicates"] == 0 and read_table(s)["hw"]["frames_applied"] == 8


def test_a_zombie_replica_is_fenced_by_its_successor(make_settings) -> None:
    s = make_settings(model__name="sleep:1ms")
    create_topics(s.kafka, s.topics.all())
    zombie, successor = InterWorker(s, "inter-0"), InterWorker(s, "inter-0")
    zombie.start()
    successor.start()  # same name, same transactional id: init_transactions bumps the epoch
    try:
        assert zombie.producer is not None
        zombie.producer.begin_transaction()
        zombie.producer.send(s.topics.detections.name, key=b"z", value=b"{}")
        with pytest.raises(KafkaError) as raised:
            zombie.producer.commit_transaction()
        # Fenced, whichever way kafka-python says it: as ProducerFencedError, or (when a background
        # request saw the fence first) as a bare KafkaError naming it. Either way the zombie stops.
        assert classify(raised.value) == "fatal", raised.value
    finally:
        zombie.close()
        successor.close()
    assert read_all(s.kafka, s.topics.detections.name) == []


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_a_restarted_producer_resumes_without_losing_a_frame(make_settings, highway: str, guarantee: str) -> None:
    s = make_settings(producer__max_frames=20, processing_guarantee=guarantee)
    create_topics(s.kafka, s.topics.all())
    spec = parse_source(highway, stream_id="cam")
    first = FrameProducer(s, spec)
    first.run(on_frame=lambda n: first.stop() if n == 8 else None)  # dies after 8 frames, before its end marker
    assert _frames_in_a(s, "cam") == (list(range(8)), 0)
    progress = stream_progress(s, "cam")
    assert progress.next_index <= 8 and not progress.finished
    time.sleep(1.0)  # the restart takes a while: the clip's clock must not
    again = FrameProducer(s, spec).run()
    indices, eos = _frames_in_a(s, "cam")
    assert set(indices) == set(range(20)) and eos == 1
    assert again["frames_published"] == 20
    captured = _capture_times(s, "cam")
    # The resumed frames go on from the last one in A at the video's 25 fps, as if nothing had stopped.
    assert [captured[i] - captured[0] for i in range(20)] == pytest.approx([i / 25 for i in range(20)], abs=1e-6)
    if guarantee == "exactly_once":
        assert indices == list(range(20)) and again["frames_resumed"] == 8
    # A third start finds the stream complete and publishes nothing.
    third = FrameProducer(s, spec).run()
    assert third["frames_resumed"] == 20 and _frames_in_a(s, "cam")[1] == 1


def test_frames_of_a_crashed_producer_transaction_are_never_seen(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=6)
    create_topics(s.kafka, s.topics.all())
    topic = s.topics.frames.name
    crashed = make_producer(s.kafka, transactional_id=f"vapipe-producer.{topic}.cam")
    crashed.init_transactions()
    crashed.begin_transaction()
    jpeg = encode_jpeg(__import__("numpy").zeros((8, 8, 3), dtype="uint8"))
    for i in range(3):
        send_record(crashed, topic, encode_frame(FrameMeta("cam", i, 1.0, 8, 8), jpeg))
    crashed.flush()  # in the log, never committed: the producer "dies" here
    result = FrameProducer(s, parse_source(highway, stream_id="cam")).run()
    assert result["frames_resumed"] == 0
    assert _frames_in_a(s, "cam") == (list(range(6)), 1)
    crashed.close(timeout=1)


def test_an_oversize_frame_fails_clearly_or_is_downscaled(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=3, kafka__max_message_bytes=12000)
    create_topics(s.kafka, s.topics.all())
    with pytest.raises(SourceError, match="above kafka.max_message_bytes=12000"):
        FrameProducer(s, parse_source(highway, stream_id="big")).run()
    s2 = make_settings(producer__max_frames=3, kafka__max_message_bytes=12000, producer__oversize="downscale")
    create_topics(s2.kafka, s2.topics.all())
    result = FrameProducer(s2, parse_source(highway, stream_id="big")).run()
    assert result["frames_published"] == 3 and result["frames_downscaled"] == 3
    records = [r for r in read_all(s2.kafka, s2.topics.frames.name) if r.value and len(r.value) > 100]
    assert len(records) == 3 and all(len(r.value) <= 12000 for r in records)


def test_a_producer_whose_commit_is_not_acknowledged_settles_it_and_publishes_every_frame_once(
    tmp_path: Path, highway: str
) -> None:
    """The broker frozen (SIGSTOP) for 5 s under an open transaction, with a 2 s ack timeout: the
    producer's commit times out, a new producer under the same transactional id settles the old
    transaction once the broker is back (the thawed broker may still commit it, or it is aborted and
    the frames are sent again); topic A then holds each frame once, and the run does not fail."""
    with private_broker(tmp_path / "kafka") as broker:
        s = build_settings(broker.bootstrap, tmp_path, "synthetic:1ms", producer__max_frames=30, kafka__ack_timeout_s=2)
        create_topics(s.kafka, s.topics.all())
        pid = broker.status().pid
        assert pid is not None
        producer = FrameProducer(s, parse_source(highway, stream_id="cam"))
        thawed: list[threading.Timer] = []

        def freeze(n: int) -> None:
            if n == 10:
                os.kill(pid, signal.SIGSTOP)
                thawed.append(threading.Timer(5.0, os.kill, (pid, signal.SIGCONT)))
                thawed[0].start()

        try:
            result = producer.run(on_frame=freeze)
        finally:
            for timer in thawed:
                timer.join()
        assert producer.recovered >= 1 and result["frames_published"] == 30
        assert _frames_in_a(s, "cam") == (list(range(30)), 1)


class DroppedFromItsGroup(InterWorker):
    """A member its group dropped without its heartbeat noticing: every transactional offset commit
    carries a generation the group no longer has, until the worker joins the group again."""

    def start(self) -> None:
        self.subscriptions = 0
        super().start()
        assert self.consumer is not None
        current = self.consumer.group_metadata

        def stale() -> Any:
            meta = current()
            return meta if self.subscriptions > 1 else meta._replace(generation_id=meta.generation_id + 1000)

        self.consumer.group_metadata = stale  # type: ignore[method-assign]

    def subscribe(self) -> None:
        self.subscriptions += 1
        super().subscribe()


def test_a_member_its_group_dropped_rejoins_and_commits_each_batch_once(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=4, model__name="sleep:1ms")
    create_topics(s.kafka, s.topics.all())
    FrameProducer(s, parse_source(highway, stream_id="hw")).run()
    worker = DroppedFromItsGroup(s, "inter-0")
    worker.max_backoff_s = 0.2
    stats = worker.run(max_messages=5, timeout_s=60)
    # The stale commit is refused (CommitFailedError) and aborted; the retry after the rejoin commits.
    assert worker.subscriptions == 2 and stats["retries"] >= 1 and stats["frames_out"] == 4, stats
    assert len(read_all(s.kafka, s.topics.detections.name)) == 5  # 4 frames and the end of stream, once each


class LeftOut(InterWorker):
    """A member whose first join left it without partitions (its subscription missed the topic, as a
    join before the topic's metadata arrived does), while nobody else owns them."""

    def subscribe(self) -> None:
        assert self.consumer is not None
        first = not hasattr(self, "joined")
        self.joined = True
        self.consumer.subscribe([f"{self.input_topic}.not-yet"] if first else [self.input_topic])


def test_a_member_left_without_partitions_nobody_owns_rejoins_by_itself(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=3, model__name="sleep:1ms", kafka__session_timeout_ms=6000)
    create_topics(s.kafka, s.topics.all())
    FrameProducer(s, parse_source(highway, stream_id="hw")).run()
    worker = LeftOut(s, "inter-0")
    stats = worker.run(max_messages=4, timeout_s=60)
    assert worker.rejoins == 1 and stats["frames_out"] == 3, stats
