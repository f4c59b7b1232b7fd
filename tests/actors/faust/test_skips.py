"""The Faust agents' guard against records faust-streaming skips (``SkippedRecords``), on the real broker.

Faust can hand an agent a later record of a partition and count the ones in between
as done; the guard must notice from the offsets alone, read exactly the skipped
records, and read nothing for offsets that transaction markers took.
"""

from __future__ import annotations

from typing import Any

import pytest
from kafka import OffsetAndMetadata, TopicPartition

from actors.faust.gaps import EventRecord, SkippedRecords
from cluster.clients import make_consumer, make_producer, send_record
from cluster.topics import create_topics
from pipeline.codecs import Record

pytestmark = pytest.mark.kafka


def _publish(settings: Any, topic: str, n: int, transactional: bool = False) -> None:
    """``n`` records to partition 0; with ``transactional`` each in its own transaction (a marker after each)."""
    producer = make_producer(settings.kafka, **({"transactional_id": f"{topic}.test"} if transactional else {}))
    if transactional:
        producer.init_transactions()
    for i in range(n):
        if transactional:
            producer.begin_transaction()
        send_record(producer, topic, Record(key=b"s", value=str(i).encode()), partition=0)
        if transactional:
            producer.commit_transaction()
    producer.flush()
    producer.close()


def _event(topic: str, offset: int) -> EventRecord:
    return EventRecord(topic, 0, offset, b"s", b"")


def test_skipped_records_are_found_from_offsets_and_read_back(make_settings) -> None:
    s = make_settings()
    create_topics(s.kafka, s.topics.all())
    topic = s.topics.detections.name
    _publish(s, topic, 10)
    group = s.group("count")
    # The group committed offset 2: Faust should resume there.
    committer = make_consumer(s.kafka, group_id=group)
    committer.assign([TopicPartition(topic, 0)])
    committer.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "", -1)})
    committer.close()

    guard = SkippedRecords(s, group, topic)
    # The first record after an assignment is 4: offsets 2 and 3 were skipped.
    skipped, holes = guard.find([_event(topic, 4)])
    assert [(r.offset, r.value) for r in skipped] == [(2, b"2"), (3, b"3")]
    assert holes == [(0, 2, 4)]
    # In order: nothing to read, and no lookup needed.
    assert guard.advance([_event(topic, 5), _event(topic, 6)])
    assert not guard.advance([_event(topic, 9)])  # a hole: find must read it
    # 6 then 9: 7 and 8 were skipped (the case seen after a SIGKILL and a rebalance).
    skipped, holes = guard.find([_event(topic, 9)])
    assert [r.value for r in skipped] == [b"7", b"8"] and holes == [(0, 7, 9)]
    # A record from before (Faust going back after a rebalance) is no hole.
    assert guard.find([_event(topic, 3)]) == ([], [])
    # After a rebalance the guard starts again from the committed offset.
    guard.forget()
    assert not guard.advance([_event(topic, 3)])  # a new assignment: find must look up the committed offset
    skipped, _ = guard.find([_event(topic, 3)])
    assert [r.offset for r in skipped] == [2]


def test_offsets_taken_by_transaction_markers_read_as_nothing(make_settings) -> None:
    s = make_settings()
    create_topics(s.kafka, s.topics.all())
    topic = s.topics.detections.name
    _publish(s, topic, 3, transactional=True)  # records at 0, 2, 4; markers at 1, 3, 5
    guard = SkippedRecords(s, s.group("count"), topic)  # no commit yet: start at the log's start
    assert guard.find([_event(topic, 0)]) == ([], [])
    skipped, holes = guard.find([_event(topic, 2)])
    assert skipped == [] and holes == [(0, 1, 2)]
