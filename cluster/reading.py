"""Reading topics from outside a consumer group: whole topics, offset ranges and a group's lag.

Used by the count table's restore, the producer's resume scan, the run's completion
check and the benchmarks, which all judge the pipeline from what Kafka holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from cluster.clients import make_admin, make_consumer
from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError

__all__ = ["read_all", "read_partitions", "end_offsets", "records_in_range", "group_lag", "GroupView", "describe_group"]


def read_all(cfg: KafkaConfig, topic: str, timeout_s: float = 60.0, settled: bool = False) -> list[Any]:
    """Every committed record of a topic, from the beginning to the current end, with a group-less consumer.

    ``settled``: read to the end of every transaction already written, waiting for open ones to
    commit or abort. A committed-only reader's end is otherwise the first open transaction, and a
    state restore must not miss a snapshot whose input offsets are already committed (the
    transaction's markers reach the offsets topic and the changelog one after the other).

    Raises:
        BrokerError: the topic could not be read to its end within ``timeout_s``.
    """
    return read_partitions(cfg, topic, None, timeout_s=timeout_s, settled=settled)[0]


def read_partitions(
    cfg: KafkaConfig,
    topic: str,
    starts: dict[int, int] | None,
    timeout_s: float = 60.0,
    settled: bool = False,
) -> tuple[list[Any], dict[int, int]]:
    """The committed records of some partitions of a topic, each from its start offset to its current end.

    A count replica restores only the changelog partitions it owns, each from its local
    checkpoint's offset (0 without one), so a restore reads what it needs and not the topic's
    whole history. ``starts=None`` reads every partition from the beginning. A start offset
    below the partition's first offset (compaction or retention removed records) reads from the
    first; one past the end reads nothing.

    Returns:
        the records, and each partition's end offset (where the next read should start).

    Raises:
        BrokerError: the partitions could not be read to their end within ``timeout_s``.
    """
    consumer = make_consumer(cfg, group_id=None)
    try:
        known = sorted(consumer.partitions_for_topic(topic) or [])
        wanted = known if starts is None else [p for p in sorted(starts) if p in known]
        tps = [TopicPartition(topic, p) for p in wanted]
        if not tps:
            return [], {}
        consumer.assign(tps)
        ends = _written_ends(cfg, tps) if settled else consumer.end_offsets(tps)
        firsts = consumer.beginning_offsets(tps)
        for tp in tps:
            start = 0 if starts is None else starts[tp.partition]
            consumer.seek(tp, min(max(start, firsts[tp]), ends[tp]))
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise BrokerError(f"timed out reading {topic} to its end from {cfg.bootstrap_servers}")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records, {tp.partition: ends[tp] for tp in tps}
    finally:
        consumer.close()


def _written_ends(cfg: KafkaConfig, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """End offsets including open transactions' records (the high watermark, not the stable offset)."""
    probe = make_consumer(cfg, group_id=None, isolation_level="read_uncommitted")
    try:
        return dict(probe.end_offsets(tps))
    finally:
        probe.close()


def end_offsets(consumer: KafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    partitions = consumer.partitions_for_topic(topic) or set()
    return dict(consumer.end_offsets([TopicPartition(topic, p) for p in sorted(partitions)]))


def records_in_range(consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, timeout_s: float) -> Iterator[Any]:
    """The records of one partition in offsets [start, end), polled by an assigned consumer.

    Stops at ``end`` or after ``timeout_s``; the caller checks ``consumer.position(tp) >= end``
    to know which.
    """
    consumer.assign([tp])
    consumer.seek(tp, start)
    deadline = time.monotonic() + timeout_s
    while consumer.position(tp) < end and time.monotonic() < deadline:
        yield from (r for r in consumer.poll(timeout_ms=200).get(tp, []) if r.offset < end)


def _records_between(
    consumer: KafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]], timeout_s: float = 3.0
) -> dict[TopicPartition, int]:
    """Data records (committed, not markers) in offsets [start, end) of each partition.

    All partitions are read at once: a range holding only a transaction marker returns no record,
    so a poll waits out its whole timeout, once for all of them rather than once per partition.
    A partition not read to its end within ``timeout_s`` counts at least one.
    """
    consumer.assign(list(ranges))
    found = dict.fromkeys(ranges, 0)
    for tp, (start, _) in ranges.items():
        consumer.seek(tp, start)
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < end for tp, (_, end) in ranges.items()) and time.monotonic() < deadline:
        for tp, batch in consumer.poll(timeout_ms=50).items():
            found[tp] += sum(1 for r in batch if r.offset < ranges[tp][1])
    return {tp: n if consumer.position(tp) >= ranges[tp][1] else max(n, 1) for tp, n in found.items()}


def group_lag(cfg: KafkaConfig, group_id: str, topics: Iterable[str]) -> dict[str, int]:
    """Records not yet committed by ``group_id``, per topic.

    End offset minus committed offset, except that a small gap is counted record by record:
    transaction markers take offsets too, so a fully consumed transactional topic sits one
    or more offsets short of its end forever.
    """
    admin = make_admin(cfg)
    # A short fetch wait: the ranges read here are a few records at most, usually only markers.
    probe = make_consumer(cfg, group_id=None, fetch_max_wait_ms=50)
    try:
        committed = admin.list_group_offsets({group_id: None}).get(group_id, {})
        lag: dict[str, int] = {}
        small: dict[TopicPartition, tuple[int, int]] = {}
        for topic in topics:
            lag[topic] = 0
            for tp, end in end_offsets(probe, topic).items():
                meta = committed.get(tp)
                done = getattr(meta, "offset", meta) if meta is not None else 0
                gap = max(end - (done if isinstance(done, int) and done >= 0 else 0), 0)
                if 0 < gap <= 16:
                    small[tp] = (end - gap, end)
                else:
                    lag[topic] += gap
        if small:
            for tp, n in _records_between(probe, small).items():
                lag[tp.topic] += n
        return lag
    finally:
        probe.close()
        admin.close()


@dataclass(frozen=True)
class GroupView:
    """What a group's coordinator says about one topic: the group's state and who owns which partition."""

    state: str
    """``Stable``, ``Empty``, ``PreparingRebalance``, ``CompletingRebalance`` or ``Dead``."""
    owners: dict[str, set[int]]
    """Client id of each member -> the topic's partitions assigned to it."""
    partitions: set[int]
    """Every partition of the topic."""

    @property
    def unowned(self) -> set[int]:
        """Partitions no member was given."""
        return self.partitions - set().union(*self.owners.values())


def describe_group(cfg: KafkaConfig, group_id: str, topic: str) -> GroupView:
    """The coordinator's view of ``group_id`` for ``topic`` (DescribeGroups).

    Raises:
        KafkaError: the coordinator could not be asked.
    """
    admin = make_admin(cfg)
    try:
        group = admin.describe_groups([group_id])[group_id]
        partitions = {p["partition_index"] for t in admin.describe_topics([topic]) for p in t["partitions"]}
    finally:
        admin.close()
    owners: dict[str, set[int]] = {}
    for member in group.get("members") or []:
        assignment = member.get("member_assignment") or {}
        given = {p for a in assignment.get("assigned_partitions", []) if a["topic"] == topic for p in a["partitions"]}
        owners.setdefault(str(member["client_id"]), set()).update(given)
    return GroupView(str(group.get("group_state")), owners, partitions)
