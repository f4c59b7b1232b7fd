"""Faust table recovery on changelogs written with Kafka transactions.

Issue 19: after a Ray exactly-once run every changelog partition the Ray count actors
wrote ends with a transaction marker; Faust's recovery waited for a record at the
marker's offset and the count worker never became ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition

from actors.faust.recovery import last_record_offsets, recover_to_last_record
from cluster.clients import make_consumer, make_producer, send_record
from cluster.topics import create_topics
from pipeline.codecs import Record
from pipeline.config import Settings

CHANGELOG = "vapipe.counts-changelog"


def _publish(settings: Settings, topic: str, partition: int, n: int, how: str) -> None:
    """``n`` records to one partition: ``plain``, each in a committed transaction, or all in one aborted one."""
    if how == "plain":
        producer = make_producer(settings.kafka)
    else:
        producer = make_producer(settings.kafka, transactional_id=f"{topic}.{partition}.{how}")
        producer.init_transactions()
    if how == "aborted":
        producer.begin_transaction()
    for i in range(n):
        if how == "committed":
            producer.begin_transaction()
        send_record(producer, topic, Record(key=b"s", value=str(i).encode()), partition=partition)
        if how == "committed":
            producer.commit_transaction()
    if how == "aborted":
        producer.flush()
        producer.abort_transaction()
    producer.flush()
    producer.close()


@pytest.mark.kafka
def test_recovery_waits_for_the_last_record_not_the_marker_after_it(make_settings) -> None:
    from faust.tables.recovery import Recovery
    from faust.types import TP

    s = make_settings()
    create_topics(s.kafka, s.topics.all())
    topic = s.topics.counts_changelog.name  # partitioned as topic C
    _publish(s, topic, 0, 3, "committed")  # records at 0, 2, 4; commit markers at 1, 3, 5 (a Ray exactly-once run)
    _publish(s, topic, 0, 2, "aborted")  # 6, 7 aborted, abort marker at 8: never received
    _publish(s, topic, 1, 3, "plain")  # 0, 1, 2 (a Faust or at-least-once run)
    _publish(s, topic, 2, 1, "aborted")  # nothing to receive at all
    probe = make_consumer(s.kafka, group_id=None)
    ends = {tp.partition: end for tp, end in probe.end_offsets([TopicPartition(topic, p) for p in range(3)]).items()}
    probe.close()
    assert ends == {0: 9, 1: 3, 2: 2}  # Faust's highwater would be 8, 2 and 1: 8 and 1 never arrive

    assert last_record_offsets(s.kafka, [(topic, 0), (topic, 1), (topic, 2)]) == {(topic, 0): 4, (topic, 1): 2, (topic, 2): -1}

    # Faust's Recovery, as the count worker patches it, computes those highwaters.
    app = SimpleNamespace()
    recover_to_last_record(app, s.kafka)
    recovery = SimpleNamespace(app=app, log=logging.getLogger("test"), _highwater_logtable=lambda h, title: "")
    highwaters: Counter[Any] = Counter()
    asyncio.run(Recovery._build_highwaters(recovery, None, {TP(topic, 0), TP(topic, 1), TP(topic, 2)}, highwaters, "active"))
    assert dict(highwaters) == {TP(topic, 0): 4, TP(topic, 1): 2, TP(topic, 2): -1}


def test_faust_worker_consumers_read_committed_records_only(tmp_path) -> None:
    from actors.faust.app import FaustStage

    async def isolation() -> str:
        s = Settings.model_validate({"output_dir": str(tmp_path), "processing_guarantee": "at_least_once"})
        thread = FaustStage(s, "count", "count-0").app.consumer._thread
        consumer = thread._create_worker_consumer(thread.transport)  # not started: no connection
        return str(consumer._isolation_level)

    assert asyncio.run(isolation()) == "read_committed"  # faust-streaming's default is read_uncommitted

