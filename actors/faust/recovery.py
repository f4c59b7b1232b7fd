"""Faust table recovery on changelogs written with Kafka transactions, and why a recovery waits.

The count table's changelog is shared with the Ray engine, whose default is exactly-once:
its count actors write the changelog in Kafka transactions, and every transaction ends with
a commit (or abort) marker. A marker takes an offset but is never handed to a consumer, so
after a Ray exactly-once run a changelog partition's last offset holds a marker, not a record.

faust-streaming 0.15.3 decides that a changelog partition is recovered when it has received
the record at ``end offset - 1`` (``Recovery._build_highwaters``; its "FIXME the -1"). Only
under its own exactly_once does it give up on that offset, and only after two idle polls
(``detect_aborted_tx``). Under at_least_once it waited for the marker's offset forever: the
count worker never became ready (issue 19). Its consumer also read uncommitted records, so a
recovery would have applied the snapshots of transactions the Ray engine aborted.

- ``recover_to_last_record`` makes a recovery wait for the last record a read_committed
  consumer receives, found by reading the partition's tail.
- ``read_committed`` makes Faust's consumer skip aborted records, as the Ray engine's does.
- ``recovery_waiting`` says in one line which changelog partitions a recovery still waits
  for, and how long it has received nothing, for the worker's stats and the launcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError, PipelineError

__all__ = ["last_record_offsets", "recover_to_last_record", "read_committed", "recovery_waiting"]

logger = logging.getLogger(__name__)

TAIL_TIMEOUT_S = 30.0
"""Longest a tail read of one changelog partition may take (Faust allows its highwater step 90 s)."""


def last_record_offsets(
    kafka: KafkaConfig, partitions: list[tuple[str, int]], timeout_s: float = TAIL_TIMEOUT_S
) -> dict[tuple[str, int], int]:
    """Offset of the last record a read_committed consumer receives, per partition.

    Transaction markers and aborted records take offsets but are never received, so this is
    below ``end offset - 1`` wherever a transaction ended the partition. A partition with no
    record to receive gets ``beginning offset - 1`` (nothing to wait for).

    Raises:
        BrokerError: a partition's tail could not be read within ``timeout_s``.

    Example:
        >>> last_record_offsets(settings.kafka, [("vapipe.counts-changelog", 2)])  # doctest: +SKIP
        {('vapipe.counts-changelog', 2): 91}
    """
    from kafka import TopicPartition

    from cluster.clients import make_consumer

    consumer = make_consumer(kafka, group_id=None)  # read_committed, like every vapipe consumer
    try:
        tps = [TopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        begins = consumer.beginning_offsets(tps)
        ends = consumer.end_offsets(tps)  # the last stable offset, for a read_committed consumer
        return {(tp.topic, tp.partition): _last_record(consumer, tp, begins[tp], ends[tp], timeout_s) for tp in tps}
    finally:
        consumer.close()


def _last_record(consumer: Any, tp: Any, begin: int, end: int, timeout_s: float) -> int:
    """Read backwards from ``end`` in growing steps until a step holds a record."""
    from cluster.reading import records_in_range

    stop, step = end, 1
    while stop > begin:
        start = max(begin, stop - step)
        offsets = [r.offset for r in records_in_range(consumer, tp, start, stop, timeout_s)]
        if consumer.position(tp) < stop:
            raise BrokerError(f"could not read {tp.topic}[{tp.partition}] offsets {start}..{stop - 1} within {timeout_s:.0f}s")
        if offsets:
            return max(offsets)
        stop, step = start, step * 8
    return begin - 1


def recover_to_last_record(app: Any, kafka: KafkaConfig) -> None:
    """Make ``app``'s table recovery wait for each changelog partition's last record, not its last offset.

    Replaces ``Recovery._build_highwaters`` (once per process; apps without ``vapipe_kafka``
    keep Faust's). Faust's highwater is ``end offset - 1``, which a transaction's marker
    holds after a Ray exactly-once run: recovery then never completed.
    """
    from faust.tables.recovery import Recovery

    app.vapipe_kafka = kafka
    if hasattr(Recovery, "faust_build_highwaters"):
        return
    Recovery.faust_build_highwaters = Recovery._build_highwaters  # type: ignore[attr-defined]

    async def build_highwaters(self: Any, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        kafka = getattr(self.app, "vapipe_kafka", None)
        if kafka is None:
            return await Recovery.faust_build_highwaters(self, consumer, tps, destination, title)  # type: ignore[attr-defined]
        tps = sorted(tps)
        last = await asyncio.to_thread(last_record_offsets, kafka, [(tp.topic, tp.partition) for tp in tps])
        highwaters = {tp: last[(tp.topic, tp.partition)] for tp in tps}
        self.log.info(
            "Highwater (last record) for %s changelog partitions:\n%s", title, self._highwater_logtable(highwaters, title=title)
        )
        destination.clear()
        destination.update(highwaters)

    Recovery._build_highwaters = build_highwaters  # type: ignore[method-assign]


def read_committed() -> None:
    """Make Faust's worker consumers read committed records only, as the Ray engine's consumers do.

    faust-streaming reads uncommitted records unless it runs its own exactly_once, so records
    of transactions the Ray engine aborted (changelog snapshots, detections on C) would be read
    as if committed. Skipped over, their offsets are gaps that ``SkippedRecords`` reads back
    as nothing, as it already does for markers.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if hasattr(AIOKafkaConsumerThread, "faust_create_worker_consumer"):
        return
    create = AIOKafkaConsumerThread._create_worker_consumer
    AIOKafkaConsumerThread.faust_create_worker_consumer = create  # type: ignore[attr-defined]

    def create_read_committed(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        # aiokafka keeps the constructor's isolation_level here and reads it in start().
        if getattr(consumer, "_isolation_level", None) is None:
            raise PipelineError("aiokafka's consumer has no _isolation_level: cannot make Faust read committed records only")
        consumer._isolation_level = "read_committed"
        return consumer

    AIOKafkaConsumerThread._create_worker_consumer = create_read_committed  # type: ignore[method-assign]


def recovery_waiting(recovery: Any, now: float | None = None) -> tuple[str, float] | None:
    """What an unfinished table recovery waits for, in one line, and seconds since it last received a record.

    None when no active changelog partition has records left to receive.

    Example:
        >>> recovery_waiting(app.tables.recovery)  # doctest: +SKIP
        ('recovering the table: vapipe.counts-changelog[2] at offset 91, waiting for 92 (nothing received for 35s)', 35.2)
    """
    now = time.monotonic() if now is None else now
    remaining = sorted(tp for tp, n in recovery.active_remaining().items() if n > 0)
    if not remaining:
        return None
    started = getattr(recovery, "_recovery_started_at", None) or now
    received = getattr(recovery, "_active_events_received_at", {})
    last = max([started] + [received[tp] for tp in remaining if received.get(tp) is not None])
    idle_s = max(now - last, 0.0)
    where = ", ".join(
        f"{tp.topic}[{tp.partition}] at offset {recovery.active_offsets.get(tp)}, "
        f"waiting for {recovery.active_highwaters.get(tp)}"
        for tp in remaining
    )
    return f"recovering the table: {where} (nothing received for {idle_s:.0f}s)", idle_s
