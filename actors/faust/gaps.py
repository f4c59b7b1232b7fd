"""Records faust-streaming skips after a rebalance, found from offsets and read back from Kafka.

When a partition's next record is more than one offset past the last one read, Faust's
consumer marks the offsets in between as done (``Consumer._add_gap``), so a later commit
passes them; after a rebalance it can hand an agent a prefetched record from further on
(faust#216, faust#221). ``hold_faust_gaps`` stops that, ``SkippedRecords`` finds and reads
the skipped records so the agent processes them before releasing the hole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Settings
from pipeline.errors import BrokerError

__all__ = ["EventRecord", "hold_faust_gaps", "SkippedRecords"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A Faust event in the shape the stage workers read (kafka-python's ConsumerRecord fields)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @classmethod
    def of(cls, event: Any) -> EventRecord:
        m = event.message
        return cls(m.topic, m.partition, m.offset, m.key, m.value, [(k, v) for k, v in (m.headers or [])])


def hold_faust_gaps() -> None:
    """Stop faust-streaming from treating offsets it never delivered as processed.

    When a partition's next record is more than one offset past the last one read,
    Faust's consumer marks the offsets in between as done (``Consumer._add_gap``, meant
    for compacted and transactional topics), so a later commit passes them. After a
    rebalance it can hand an agent a prefetched record from further on (faust#216,
    faust#221). Seen here: a count worker restarted after a SIGKILL applied frame 21,
    then 29, and frames 22 to 28 were committed but never counted. With the gap held,
    Faust cannot commit past a hole; the agent reads the hole's records itself
    (``SkippedRecords``), processes them, then releases it (``release_gap``).
    """
    from faust.transport.consumer import Consumer

    if hasattr(Consumer, "release_gap"):
        return
    release = Consumer._add_gap

    async def hold(self: Any, tp: Any, offset_from: int, offset_to: int) -> None:
        logger.info("faust skipped %s offsets %d..%d; the agent reads them itself", tp, offset_from, offset_to - 1)

    Consumer.release_gap = release  # type: ignore[attr-defined]
    Consumer._add_gap = hold  # type: ignore[method-assign]


class SkippedRecords:
    """Finds the records Faust skipped in a partition and reads them straight from Kafka.

    The agent knows the next offset it should see in each of its partitions: the group's
    committed offset after an assignment, then one past the last record it was given.
    Any record further on means records were skipped; they are read with kafka-python
    (committed records only, so transaction markers, which take offsets, read as
    nothing) and processed before the record that revealed the hole.
    """

    def __init__(self, settings: Settings, group: str, topic: str) -> None:
        self.settings = settings
        self.group = group
        self.topic = topic
        self._next: dict[int, int] = {}
        self._reader: Any = None
        self._offsets: Any = None
        self.records_read = 0

    def forget(self) -> None:
        """A rebalance: Faust restarts every partition at its committed offset."""
        self._next.clear()

    def advance(self, records: list[EventRecord]) -> bool:
        """Move past ``records`` if each follows on from the last one seen in its partition.

        The per-event fast path, without I/O: False, moving nothing, when a partition is new
        since the last rebalance or a record lies past a hole; then ``find`` (blocking) decides.
        """
        seen: dict[int, int] = {}
        for r in records:
            expected = seen.get(r.partition, self._next.get(r.partition))
            if expected is None or r.offset > expected:
                return False
            seen[r.partition] = max(expected, r.offset + 1)
        self._next.update(seen)
        return True

    def find(self, records: list[EventRecord]) -> tuple[list[EventRecord], list[tuple[int, int, int]]]:
        """The skipped records before ``records`` and the holes they fill, as (partition, start, end)."""
        skipped: list[EventRecord] = []
        holes: list[tuple[int, int, int]] = []
        for r in records:
            expected = self._next.get(r.partition)
            if expected is None:
                expected = self._start(r.partition)
            if r.offset > expected:
                skipped += self._read(r.partition, expected, r.offset)
                holes.append((r.partition, expected, r.offset))
            self._next[r.partition] = max(expected, r.offset + 1)
        if holes:
            logger.warning("%s: read %d records Faust skipped at %s", self.topic, len(skipped), holes)
        return skipped, holes

    def _start(self, partition: int) -> int:
        """Where Faust resumes a partition: the group's committed offset, else the log's start."""
        from kafka import TopicPartition

        from cluster.clients import make_consumer

        if self._offsets is None:
            self._offsets = make_consumer(self.settings.kafka, group_id=self.group)
        tp = TopicPartition(self.topic, partition)
        committed = self._offsets.committed(tp)
        return int(committed) if committed is not None else int(self._offsets.beginning_offsets([tp])[tp])

    def _read(self, partition: int, start: int, end: int) -> list[EventRecord]:
        from kafka import TopicPartition

        from cluster.clients import make_consumer
        from cluster.reading import records_in_range

        if self._reader is None:
            self._reader = make_consumer(self.settings.kafka, group_id=None)
        tp = TopicPartition(self.topic, partition)
        found = [
            EventRecord(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []))
            for r in records_in_range(self._reader, tp, start, end, timeout_s=60)
        ]
        if self._reader.position(tp) < end:
            raise BrokerError(
                f"could not read the records Faust skipped in {self.topic}[{partition}] {start}..{end - 1} within 60s"
            )
        self.records_read += len(found)
        return found
