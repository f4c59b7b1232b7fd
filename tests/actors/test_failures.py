"""Dead letters and backoff, without a broker: what a stage does with poison records and failed batches."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from actors.delivery import batch_offsets
from actors.failures import Backoff, DeadLetters, default_on_error
from pipeline.errors import DecodeError, SinkError


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
