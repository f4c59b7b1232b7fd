"""Kafka client factories and transaction helpers with the project's defaults and one-line failures.

Every client gets a bounded bootstrap timeout, so an unreachable broker fails
within ``kafka.connect_timeout_s`` with a message naming the address.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
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
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
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


def send_record(producer: KafkaProducer, topic: str, record: Record, partition: int | None = None) -> Any:
    """Send a core ``Record``; returns the future so callers can flush and check acks in bulk."""
    return producer.send(
        topic,
        key=record.key,
        value=record.value,
        headers=list(record.headers),
        partition=partition,
    )
