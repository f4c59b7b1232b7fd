"""Failures without a broker: classification, dead letters, backoff, rewinds and isolating a poison record."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    TopicAuthorizationFailedError,
)

from actors.delivery import Delivery, batch_offsets
from actors.failures import Backoff, DeadLetters, classify, default_on_error
from actors.stages import InterWorker
from actors.worker import StageWorker
from pipeline.config import KafkaConfig, Settings
from pipeline.errors import AccessDeniedError, BrokerError, DecodeError, RecordTooLargeError, SinkError


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, topic: str, **kwargs: Any) -> str:
        self.sent.append({"topic": topic, **kwargs})
        return f"future-{len(self.sent)}"


def record(offset: int, partition: int = 0, topic: str = "A") -> Any:
    return SimpleNamespace(topic=topic, partition=partition, offset=offset, key=b"k", value=b"v", headers=[("h", b"1")])


def test_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    backoff = Backoff(max_s=5)
    assert [backoff.failed() for _ in range(5)] == [1, 2, 4, 5, 5]
    assert backoff.succeeded() == 5 and backoff.succeeded() == 0 and backoff.failed() == 1


def test_dead_letter_keeps_the_record_and_says_why_where_and_from_which_stage() -> None:
    producer, letters = RecordingProducer(), DeadLetters("dlq", "count")
    letters.send(producer, record(41, partition=3), DecodeError("not JSON"))  # type: ignore[arg-type]
    (sent,) = producer.sent
    assert sent["topic"] == "dlq" and sent["key"] == b"k" and sent["value"] == b"v"
    headers = dict(sent["headers"])
    assert headers["h"] == b"1" and headers["vapipe-dlq-reason"] == b"not JSON"
    assert headers["vapipe-dlq-stage"] == b"count" and headers["vapipe-dlq-origin"] == b"A/3/41"
    assert letters.take() == ["future-1"] and letters.take() == []


@pytest.mark.parametrize(
    ("exc", "skip"), [(DecodeError("bad"), True), (SinkError("disk full"), False), (ValueError("bug"), False)]
)
def test_only_poison_records_are_skipped_by_default(exc: Exception, skip: bool) -> None:
    assert default_on_error(exc, record(0)) is skip


def test_batch_offsets_are_one_past_the_last_record_of_each_partition() -> None:
    offsets = batch_offsets([record(5), record(3), record(9, partition=1), record(4)])
    assert {(tp.partition, meta.offset) for tp, meta in offsets.items()} == {(0, 6), (1, 10)}


# -- classification: permanent (dead-letter, commit, go on), transient (retry), fatal (stop) -------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (DecodeError("nested too deep"), "permanent"),
        (RecordTooLargeError("B record above the limit"), "permanent"),
        (MessageSizeTooLargeError("client-side size check"), "permanent"),
        (KafkaTimeoutError("commit timed out"), "transient"),
        (KafkaConnectionError(), "transient"),
        (SinkError("disk full"), "transient"),
        (BrokerError("broker gone"), "transient"),
        (ProducerFencedError("a newer instance"), "fatal"),
        # A fenced producer's later calls: a bare KafkaError naming the fence, still fatal.
        (
            KafkaError("Cannot execute transactional method because we are in an error state: [Error 90] ProducerFencedError"),
            "fatal",
        ),
        (
            KafkaError("Cannot execute transactional method because we are in an error state: [Error 7] RequestTimedOutError"),
            "transient",
        ),
        (KafkaError("in an error state: [Error 1] NotAClass"), "transient"),
        (TopicAuthorizationFailedError("vapipe.A.frames"), "fatal"),  # a secured broker's ACLs: retrying cannot help
        (GroupAuthorizationFailedError("vapipe-inter"), "fatal"),
        (AccessDeniedError("refused by the broker"), "fatal"),
        (ValueError("a bug"), "fatal"),
        (RecursionError(), "fatal"),  # decoders are total: one reaching the loop is a bug
    ],
)
def test_classify(exc: Exception, kind: str) -> None:
    assert classify(exc) == kind
    assert default_on_error(exc, record(0)) is (kind == "permanent")


def test_backoff_jitter_stays_within_its_fraction() -> None:
    waits = [Backoff(max_s=8, jitter=0.2).failed() for _ in range(200)]
    assert all(0.8 <= w <= 1.2 for w in waits) and len(set(waits)) > 1


# -- the loop: rewind to what the group committed; a permanent failure is isolated -------------------


class FakeConsumer:
    """Owns partition A/0; ``committed`` is what the broker holds for the group."""

    def __init__(self, committed: int | None) -> None:
        self.tp = TopicPartition("A", 0)
        self.committed_offset = committed
        self.seeks: list[int] = []
        self.unreachable = False

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        if self.unreachable:
            raise KafkaTimeoutError("coordinator unreachable")
        return self.committed_offset

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append(offset)

    def highwater(self, tp: TopicPartition) -> None:
        return None


class FakeDelivery(Delivery):
    """Commits to the fake consumer; ``fail`` scripts the next completions' exceptions."""

    def __init__(self, consumer: FakeConsumer) -> None:
        super().__init__(KafkaConfig(), "fake")
        self.fake_consumer = consumer
        self.producer = RecordingProducer()  # type: ignore[assignment]
        self.committed_batches: list[list[int]] = []
        self.fail: list[tuple[Exception, bool]] = []
        """(exception, whether the commit landed on the broker before it was raised)"""
        self.aborts = 0

    def complete(self, consumer: Any, records: list[Any], futures: list[Any]) -> None:
        landed, exc = True, None
        if self.fail:
            exc, landed = self.fail.pop(0)
        if landed:
            self.fake_consumer.committed_offset = max(r.offset for r in records) + 1
            self.committed_batches.append([r.offset for r in records])
        if exc is not None:
            raise exc

    def abort(self) -> None:
        self.aborts += 1


class ScriptedStage(StageWorker):
    """Fails permanently on the offsets in ``poison``; records every batch it processed."""

    stage = "inter"

    def __init__(self, consumer: FakeConsumer, poison: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__(Settings(), "inter-0")
        self.consumer = consumer  # type: ignore[assignment]
        self.delivery = FakeDelivery(consumer)
        self.backoff.max_s = 0  # no waiting in tests
        self.poison = poison
        self.processed: list[list[int]] = []

    def process(self, records: list[Any]) -> list[Any]:
        self.processed.append([r.offset for r in records])
        for r in records:
            if r.offset in self.poison:
                raise RecordTooLargeError(f"record {r.offset} too large")
            self.counters["frames_out"] += 1
        return []


def test_a_commit_that_timed_out_but_landed_is_not_run_twice() -> None:
    consumer = FakeConsumer(committed=5)
    stage = ScriptedStage(consumer)
    stage.delivery.fail = [(KafkaTimeoutError("commit timed out"), True)]  # type: ignore[attr-defined]
    assert stage.handle([record(5), record(6), record(7)]) is False
    # Before: seek to 5, the batch's first offset, so 5-7 ran (and were published) twice.
    assert consumer.seeks == [8] and stage.counters["retries"] == 1
    assert stage.delivery.committed_batches == [[5, 6, 7]]  # type: ignore[attr-defined]


def test_a_commit_that_did_not_land_is_retried_from_the_committed_offset() -> None:
    consumer = FakeConsumer(committed=5)
    stage = ScriptedStage(consumer)
    stage.delivery.fail = [(KafkaTimeoutError("commit timed out"), False)]  # type: ignore[attr-defined]
    assert stage.handle([record(5), record(6)]) is False
    assert consumer.seeks == [5] and stage.counters["frames_out"] == 0  # rolled back until it succeeds


def test_nothing_committed_yet_rewinds_to_the_batch_start() -> None:
    consumer = FakeConsumer(committed=None)
    stage = ScriptedStage(consumer)
    stage.delivery.fail = [(SinkError("disk full"), False)]  # type: ignore[attr-defined]
    assert stage.handle([record(3), record(4)]) is False
    assert consumer.seeks == [3]


def test_a_rewind_that_cannot_read_the_committed_offsets_holds_polling_until_it_can() -> None:
    consumer = FakeConsumer(committed=5)
    consumer.unreachable = True
    stage = ScriptedStage(consumer)
    stage.delivery.fail = [(KafkaTimeoutError("commit timed out"), False)]  # type: ignore[attr-defined]
    assert stage.handle([record(5)]) is False
    assert consumer.seeks == [] and stage._settle_position() is False
    assert "reading committed offsets" in (stage.last_error or "")
    consumer.unreachable = False
    assert stage._settle_position() is True and consumer.seeks == [5]
    assert stage._settle_position() is True and consumer.seeks == [5]  # done once


def test_a_permanent_failure_dead_letters_only_its_record_and_commits_the_rest() -> None:
    consumer = FakeConsumer(committed=5)
    stage = ScriptedStage(consumer, poison={6})
    assert stage.handle([record(5), record(6), record(7)]) is True
    assert stage.processed == [[5, 6, 7], [5], [6], [7]]
    assert stage.delivery.committed_batches == [[5], [6], [7]]  # type: ignore[attr-defined]
    (letter,) = stage.delivery.producer.sent  # type: ignore[union-attr]
    assert letter["topic"] == stage.settings.topics.dead_letter.name
    assert dict(letter["headers"])["vapipe-dlq-error"] == b"RecordTooLargeError"
    assert stage.counters["dead_lettered"] == 1 and stage.counters["frames_out"] == 2
    assert stage.counters["retries"] == 0 and consumer.seeks == []  # nothing retried, nothing rewound


def test_a_transient_failure_while_isolating_stops_at_the_committed_offset() -> None:
    consumer = FakeConsumer(committed=5)
    stage = ScriptedStage(consumer, poison={6})
    original = stage.delivery.complete

    def complete(consumer_: Any, records: list[Any], futures: list[Any]) -> None:
        if [r.offset for r in records] == [7]:
            raise KafkaTimeoutError("broker gone")
        original(consumer_, records, futures)

    stage.delivery.complete = complete  # type: ignore[method-assign]
    assert stage.handle([record(5), record(6), record(7)]) is False
    assert stage.delivery.committed_batches == [[5], [6]]  # type: ignore[attr-defined]
    assert consumer.seeks == [7] and stage.counters["retries"] == 1


# -- the InterConsumer's permanent failures, without a broker ---------------------------------------


def test_inter_dead_letters_poison_and_oversized_frames_and_announces_their_gaps_on_c() -> None:
    from pipeline.codecs import decode_detections, encode_frame, encode_jpeg
    from pipeline.messages import FrameMeta, SkippedFrame
    from tests.actors.test_stages import ManyBoxes
    from tests.pipeline.helpers import gradient_image

    settings = Settings().model_copy(update={"kafka": KafkaConfig(max_message_bytes=64 * 1024)})
    inter = InterWorker(settings, "inter-0", detector=ManyBoxes(96, 2000))
    inter.delivery.producer = RecordingProducer()  # type: ignore[assignment]

    def a_record(offset: int, index: int, width: int, value: bytes | None = None, **forged: bytes) -> Any:
        jpeg = encode_jpeg(gradient_image(48, width)) if value is None else value
        rec = encode_frame(FrameMeta("s", index, 1.0, width, 48), jpeg)
        headers = [(k, forged.get(k, v)) for k, v in rec.headers]
        return SimpleNamespace(topic="A", partition=0, offset=offset, key=rec.key, value=jpeg, headers=headers)

    records = [
        a_record(0, 0, 64),
        a_record(1, 1, 64, value=b"\x89PNG not a jpeg"),
        a_record(2, 2, 96),  # 2000 boxes: B record above 64 KB
        a_record(3, 3, 64, schema_version=b"9"),
        SimpleNamespace(topic="A", partition=0, offset=4, key=b"k", value=b"x", headers=[]),
    ]
    inter.process(records)
    sent = inter.delivery.producer.sent  # type: ignore[union-attr]
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for s in sent:
        by_topic.setdefault(s["topic"], []).append(s)
    topics = settings.topics
    assert len(by_topic[topics.detected_frames.name]) == 1  # frame 0 only
    assert [dict(s["headers"])["vapipe-dlq-error"] for s in by_topic[topics.dead_letter.name]] == [
        b"DecodeError",
        b"DecodeError",
        b"DecodeError",
        b"RecordTooLargeError",
    ]
    on_c = [decode_detections(s["value"]) for s in by_topic[topics.detections.name]]
    assert [c for c in on_c if isinstance(c, SkippedFrame)] == [
        SkippedFrame("s", 1, "poison"),
        SkippedFrame("s", 3, "poison"),
        SkippedFrame("s", 2, "too_large"),
    ]
    assert sum(1 for c in on_c if not isinstance(c, SkippedFrame)) == 1
    assert inter.counters["dead_lettered"] == 4 and inter.counters["skip_markers"] == 3
    assert inter.counters["frames_out"] == 1 and len(inter.dead_letters.take()) == 7  # 4 letters + 3 markers
