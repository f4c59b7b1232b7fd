"""Create, list, describe and delete the pipeline's topics, as the config names them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

from cluster.clients import make_admin
from pipeline.config import KafkaConfig, TopicSpec
from pipeline.errors import BrokerError, ConfigError, TopicError

__all__ = [
    "TopicInfo",
    "create_topics",
    "list_topics",
    "describe_topics",
    "delete_topics",
    "topic_partitions",
    "check_copartitioned",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    replication_factor: int


def _spec_config(spec: TopicSpec, kafka: KafkaConfig) -> dict[str, str]:
    # Frames need a per-topic limit at least as large as the producer's.
    return {"max.message.bytes": str(kafka.max_message_bytes + 1024 * 1024)} | dict(spec.config)


def create_topics(kafka: KafkaConfig, specs: list[TopicSpec]) -> dict[str, str]:
    """Create missing topics; existing ones are left as they are. Idempotent.

    Returns:
        topic name -> "created" | "exists" (with a warning if its partition count differs).

    Raises:
        TopicError: the cluster has fewer brokers than a replication factor, or creation failed.
    """
    admin = make_admin(kafka)
    try:
        brokers = len(admin.describe_cluster()["brokers"])
        for spec in specs:
            if spec.replication_factor > brokers:
                raise TopicError(
                    f"topic {spec.name}: replication factor {spec.replication_factor} needs at least "
                    f"{spec.replication_factor} brokers, the cluster at {kafka.bootstrap_servers} has {brokers}"
                )
        existing = set(admin.list_topics())
        result: dict[str, str] = {}
        for spec in specs:
            if spec.name in existing:
                result[spec.name] = "exists"
                continue
            try:
                admin.create_topics(
                    [NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=_spec_config(spec, kafka))]
                )
                result[spec.name] = "created"
            except TopicAlreadyExistsError:  # created concurrently by another launcher
                result[spec.name] = "exists"
            except KafkaError as exc:
                raise TopicError(f"cannot create topic {spec.name}: {getattr(exc, 'message', None) or exc}") from None
        current = {t.name: t for t in _describe(admin, [s.name for s in specs])}
        for spec in specs:
            info = current.get(spec.name)
            if info and result[spec.name] == "exists" and info.partitions != spec.partitions:
                logger.warning("topic %s has %d partitions, config says %d", spec.name, info.partitions, spec.partitions)
        admin.wait_for_topics([s.name for s in specs], timeout_ms=15000)
        return result
    finally:
        admin.close()


def _describe(admin: Any, names: list[str]) -> list[TopicInfo]:
    out = []
    for t in admin.describe_topics(names):
        if t.get("error_code"):
            continue
        parts = t["partitions"]
        out.append(TopicInfo(t["name"], len(parts), len(parts[0]["replica_nodes"]) if parts else 0))
    return sorted(out, key=lambda i: i.name)


def list_topics(kafka: KafkaConfig) -> list[str]:
    admin = make_admin(kafka)
    try:
        return sorted(t for t in admin.list_topics() if not t.startswith("__"))
    finally:
        admin.close()


def describe_topics(kafka: KafkaConfig, names: list[str]) -> list[TopicInfo]:
    admin = make_admin(kafka)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            raise TopicError(f"no such topic(s) on {kafka.bootstrap_servers}: {', '.join(missing)}")
        return _describe(admin, names)
    finally:
        admin.close()


def delete_topics(kafka: KafkaConfig, names: list[str]) -> list[str]:
    """Delete the named topics that exist; returns those deleted."""
    admin = make_admin(kafka)
    try:
        present = [n for n in names if n in set(admin.list_topics())]
        if present:
            try:
                admin.delete_topics(present)
            except UnknownTopicOrPartitionError:
                pass
        return present
    finally:
        admin.close()


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


def check_copartitioned(cfg: KafkaConfig, source: str, changelog: str) -> None:
    """Fail at start, in one line, unless ``changelog`` has as many partitions as ``source``.

    Both are keyed by stream id with the same partitioner, so with equal counts the streams of
    source partition ``p`` keep their state in changelog partition ``p``, and a replica restores
    only the changelog partitions numbered like its own.

    Raises:
        ConfigError: the counts differ.
        BrokerError: a topic does not exist or the broker cannot be asked.
    """
    ours, theirs = len(topic_partitions(cfg, source)), len(topic_partitions(cfg, changelog))
    if ours != theirs:
        raise ConfigError(
            f"topic {changelog} has {theirs} partitions and {source} has {ours}: the count table's changelog must "
            f"have as many partitions as its source (both keyed by stream); recreate {changelog} with {ours} "
            f"partitions (topics.counts_changelog.partitions)"
        )
