"""Kafka client factories with the project's defaults and one-line failures.

Every client gets a bounded bootstrap timeout, so an unreachable broker fails
within ``kafka.connect_timeout_s`` with a message naming the address.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from pipeline.codecs import Record
from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError

__all__ = [
    "client_kwargs",
    "make_producer",
    "make_consumer",
    "make_admin",
    "check_broker",
    "send_record",
    "topic_partitions",
    "read_all",
    "end_offsets",
    "group_lag",
    "records_in_range",
    "finish_transaction",
    "send_offsets_in_transaction",
]

logger = logging.getLogger(__name__)


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection settings shared by producers, consumers and the admin client."""
    timeout_ms = int(cfg.connect_timeout_s * 1000)
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.hosts(),
        "security_protocol": cfg.security_protocol,
        "bootstrap_timeout_ms": timeout_ms,
        "reconnect_backoff_max_ms": 2000,
    }
    if cfg.sasl_mechanism:
        kwargs["sasl_mechanism"] = cfg.sasl_mechanism
        kwargs["sasl_plain_username"] = cfg.sasl_username
        kwargs["sasl_plain_password"] = cfg.sasl_password.get_secret_value() if cfg.sasl_password else None
    if cfg.ssl_cafile:
        kwargs["ssl_cafile"] = cfg.ssl_cafile
    kwargs.update(cfg.extra)
    return kwargs


def _unreachable(cfg: KafkaConfig, exc: Exception) -> BrokerError:
    return BrokerError(
        f"Kafka broker unreachable at {cfg.bootstrap_servers} (waited {cfg.connect_timeout_s:g}s): "
        f"{type(exc).__name__}; start one with `vapipe kafka start` or set kafka.bootstrap_servers"
    )


def make_producer(cfg: KafkaConfig, **overrides: Any) -> KafkaProducer:
    """A producer with the study's settings (linger 5 ms, snappy) and frame-sized requests."""
    kwargs = client_kwargs(cfg) | {
        "linger_ms": cfg.linger_ms,
        "compression_type": None if cfg.compression_type == "none" else cfg.compression_type,
        "max_request_size": cfg.max_message_bytes,
        "acks": "all",
        "retries": 10,
        "request_timeout_ms": 30000,
    }
    kwargs.update(overrides)
    try:
        return KafkaProducer(**kwargs)
    except (KafkaConnectionError, KafkaTimeoutError) as exc:
        raise _unreachable(cfg, exc) from None


def finish_transaction(producer: KafkaProducer, commit: bool, timeout_s: float = 60.0) -> None:
    """Commit (or abort) the producer's open transaction, giving up after ``timeout_s``.

    kafka-python's ``commit_transaction`` and ``abort_transaction`` wait without a limit; a
    request lost while the broker restarts would hold a stage forever. Raises
    ``KafkaTimeoutError`` instead, so the caller can drop the producer and let a new one
    (same transactional id) abort what is left.
    """
    manager = producer._transaction_manager  # same steps as KafkaProducer.commit_transaction, with a timeout
    result = manager.begin_commit() if commit else manager.begin_abort()
    producer._sender.wakeup()
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        raise KafkaTimeoutError(f"transaction {'commit' if commit else 'abort'} not acknowledged within {timeout_s:g}s")


def send_offsets_in_transaction(producer: KafkaProducer, offsets: Any, group_metadata: Any, timeout_s: float = 60.0) -> None:
    """``send_offsets_to_transaction`` with a time limit (see ``finish_transaction``)."""
    result = producer._transaction_manager.send_offsets_to_transaction(offsets, group_metadata)
    producer._sender.wakeup()
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        raise KafkaTimeoutError(f"transaction offsets not acknowledged within {timeout_s:g}s")


def make_consumer(cfg: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer that commits by hand (after outputs are acknowledged), starts at the earliest
    record and reads committed records only."""
    kwargs = client_kwargs(cfg) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_bytes": max(cfg.max_message_bytes * 2, 52428800),
        "max_partition_fetch_bytes": cfg.max_message_bytes,
        "session_timeout_ms": 20000,
        "heartbeat_interval_ms": 2000,
        # A topic created moments before subscribing may be missing from the first metadata;
        # refresh often so the group rebalances onto it within seconds, not minutes.
        "metadata_max_age_ms": 5000,
        # Records of aborted or open transactions are never seen: a crashed exactly-once
        # stage leaves no half-written batch for the next stage to count.
        "isolation_level": "read_committed",
    }
    kwargs.update(overrides)
    try:
        return KafkaConsumer(*topics, **kwargs)
    except (KafkaConnectionError, KafkaTimeoutError) as exc:
        raise _unreachable(cfg, exc) from None


def make_admin(cfg: KafkaConfig) -> KafkaAdminClient:
    kwargs = client_kwargs(cfg) | {"request_timeout_ms": int(max(cfg.connect_timeout_s, 5) * 1000)}
    try:
        return KafkaAdminClient(**kwargs)
    except (KafkaConnectionError, KafkaTimeoutError) as exc:
        raise _unreachable(cfg, exc) from None
    except KafkaError as exc:
        raise BrokerError(f"Kafka broker at {cfg.bootstrap_servers} refused the admin client: {exc}") from None


def check_broker(cfg: KafkaConfig) -> dict[str, Any]:
    """Ask the cluster to describe itself; returns {'cluster_id', 'brokers': [...]}.

    Raises:
        BrokerError: unreachable within ``cfg.connect_timeout_s``.
    """
    admin = make_admin(cfg)
    try:
        return dict(admin.describe_cluster())
    except KafkaError as exc:
        raise _unreachable(cfg, exc) from None
    finally:
        admin.close()


def read_all(cfg: KafkaConfig, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every record of a topic, from the beginning to the current end, with a group-less consumer.

    Raises:
        BrokerError: the topic could not be read to its end within ``timeout_s``.
    """
    import time

    consumer = make_consumer(cfg, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise BrokerError(f"timed out reading {topic} to its end from {cfg.bootstrap_servers}")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def topic_partitions(cfg: KafkaConfig, topic: str) -> list[int]:
    """A topic's partitions as the broker's controller knows them.

    A producer's own metadata can list only some partitions of a topic created moments
    before; spreading frames over that subset would leave the replicas that own the
    others idle for the whole run.

    Raises:
        BrokerError: the topic does not exist.
    """
    admin = make_admin(cfg)
    try:
        for t in admin.describe_topics([topic]):
            if t.get("name") == topic and not t.get("error_code") and t.get("partitions"):
                return sorted(p["partition_index"] for p in t["partitions"])
    except KafkaError as exc:
        raise BrokerError(f"cannot describe topic {topic} on {cfg.bootstrap_servers}: {exc}") from None
    finally:
        admin.close()
    raise BrokerError(f"topic {topic} does not exist on {cfg.bootstrap_servers}: run `vapipe topics create`")


def send_record(producer: KafkaProducer, topic: str, record: Record, partition: int | None = None) -> Any:
    """Send a core ``Record``; returns the future so callers can flush and check acks in bulk."""
    return producer.send(
        topic,
        key=record.key,
        value=record.value,
        headers=list(record.headers),
        partition=partition,
    )


def end_offsets(consumer: KafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    partitions = consumer.partitions_for_topic(topic) or set()
    return dict(consumer.end_offsets([TopicPartition(topic, p) for p in sorted(partitions)]))


def records_in_range(consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, timeout_s: float) -> Iterator[Any]:
    """The records of one partition in offsets [start, end), polled by an assigned consumer.

    Stops at ``end`` or after ``timeout_s``; the caller checks ``consumer.position(tp) >= end``
    to know which.
    """
    import time

    consumer.assign([tp])
    consumer.seek(tp, start)
    deadline = time.monotonic() + timeout_s
    while consumer.position(tp) < end and time.monotonic() < deadline:
        yield from (r for r in consumer.poll(timeout_ms=200).get(tp, []) if r.offset < end)


def _records_between(consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, timeout_s: float = 3.0) -> int:
    """Data records (committed, not markers) in offsets [start, end) of one partition."""
    found = sum(1 for _ in records_in_range(consumer, tp, start, end, timeout_s))
    return found if consumer.position(tp) >= end else max(found, 1)


def group_lag(cfg: KafkaConfig, group_id: str, topics: Iterable[str]) -> dict[str, int]:
    """Records not yet committed by ``group_id``, per topic.

    End offset minus committed offset, except that a small gap is counted record by record:
    transaction markers take offsets too, so a fully consumed transactional topic sits one
    or more offsets short of its end forever.
    """
    admin = make_admin(cfg)
    probe = make_consumer(cfg, group_id=None)
    try:
        committed = admin.list_group_offsets({group_id: None}).get(group_id, {})
        lag: dict[str, int] = {}
        for topic in topics:
            ends = end_offsets(probe, topic)
            total = 0
            for tp, end in ends.items():
                meta = committed.get(tp)
                done = getattr(meta, "offset", meta) if meta is not None else 0
                gap = max(end - (done if isinstance(done, int) and done >= 0 else 0), 0)
                total += _records_between(probe, tp, end - gap, end) if 0 < gap <= 16 else gap
            lag[topic] = total
        return lag
    finally:
        probe.close()
        admin.close()
