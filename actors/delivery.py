"""How a stage's batch becomes durable: its outputs and its input offsets, under either guarantee.

``processing_guarantee: exactly_once`` (the default): a batch's output records and its input
offsets go to Kafka in one transaction (consume-transform-produce, KIP-98 and KIP-447), so a
crash either publishes the whole batch and its offsets or none of it. Each replica's
transactional id is stable (``<group>.<actor name>``), so a restarted actor fences the zombie
it replaces.

``at_least_once``: offsets are committed only after every output record is acknowledged by the
broker and every sink write succeeded; sinks and the count table are idempotent, so a
redelivery changes nothing.

Like quix-streams' ``Checkpoint``: the consumer loop calls ``begin`` before a batch,
``complete`` after it, and ``abort`` when it failed; the guarantee is this class's business.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata

from cluster.clients import finish_transaction, make_producer, send_offsets_in_transaction
from pipeline.config import KafkaConfig

__all__ = [
    "Delivery",
    "TransactionalDelivery",
    "AtLeastOnceDelivery",
    "make_delivery",
    "batch_offsets",
    "stage_transactional_id",
    "fence",
]

logger = logging.getLogger(__name__)


def batch_offsets(records: list[Any]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after a batch: one past its last record in each partition."""
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        if tp not in offsets or offsets[tp].offset <= r.offset:
            offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
    return offsets


class Delivery:
    """Owns the stage's producer; ``complete`` makes a batch durable or raises."""

    transactional = False

    def __init__(self, kafka: KafkaConfig, name: str) -> None:
        self.kafka = kafka
        self.name = name
        self.producer: KafkaProducer | None = None
        self.commit_failures = 0
        """At-least-once commits refused after a rebalance (the records are redelivered)."""

    def _new_producer(self) -> KafkaProducer:
        return make_producer(self.kafka)

    def open(self) -> KafkaProducer:
        """The producer, created on first use and again after a failed abort dropped it."""
        if self.producer is None:
            self.producer = self._new_producer()
        return self.producer

    def begin(self) -> None:
        """Before a batch's first output record."""
        self.open()

    def complete(self, consumer: KafkaConsumer, records: list[Any], futures: list[Any]) -> None:
        """Make the batch's outputs and input offsets durable; raises ``KafkaError`` if they are not."""
        raise NotImplementedError

    def abort(self) -> None:
        """The batch failed: nothing of it may become visible."""

    def settle(self) -> None:
        """Before the committed offsets are read after a failed batch: the batch's fate is known."""

    def close(self) -> None:
        if self.producer is not None:
            try:
                self.producer.close()
            except Exception:  # closing is best effort
                logger.debug("close failed", exc_info=True)
        self.producer = None


class AtLeastOnceDelivery(Delivery):
    """Flush, wait for every ack, then commit the input offsets."""

    def complete(self, consumer: KafkaConsumer, records: list[Any], futures: list[Any]) -> None:
        if futures:
            self.open().flush(timeout=self.kafka.ack_timeout_s)
        for future in futures:
            future.get(timeout=self.kafka.ack_timeout_s)
        if not records:
            return  # a batch of timed outputs only (an idle flush): no input offsets to commit
        try:
            consumer.commit(batch_offsets(records))
        except CommitFailedError as exc:
            # The group rebalanced under us: another member will redeliver; sinks are idempotent.
            self.commit_failures += 1
            logger.warning("%s: commit failed after a rebalance, records will be redelivered: %s", self.name, exc)


class TransactionalDelivery(Delivery):
    """One Kafka transaction per batch: outputs plus ``send_offsets_to_transaction``."""

    transactional = True

    def __init__(self, kafka: KafkaConfig, name: str, transactional_id: str) -> None:
        super().__init__(kafka, name)
        self.transactional_id = transactional_id

    def _new_producer(self) -> KafkaProducer:
        producer = make_producer(
            self.kafka, transactional_id=self.transactional_id, retry_backoff_ms=self.kafka.transaction_retry_backoff_ms
        )
        producer.init_transactions()  # aborts what a crashed predecessor left open, fences a zombie
        return producer

    def begin(self) -> None:
        self.open().begin_transaction()

    def complete(self, consumer: KafkaConsumer, records: list[Any], futures: list[Any]) -> None:
        producer = self.open()
        if records:  # an idle flush has outputs but no input offsets
            send_offsets_in_transaction(producer, batch_offsets(records), consumer.group_metadata(), self.kafka.ack_timeout_s)
        finish_transaction(producer, commit=True, timeout_s=self.kafka.ack_timeout_s)
        for future in futures:
            future.get(timeout=self.kafka.ack_timeout_s)

    def settle(self) -> None:
        """A dropped producer's transaction (a commit that timed out may still land) is settled by its
        successor's ``init_transactions``, which waits until the coordinator has committed or aborted
        it: only then do the group's committed offsets say whether the batch has to run again."""
        self.open()

    def abort(self) -> None:
        """Abort the open transaction; if even that fails, drop the producer (its successor aborts it)."""
        if self.producer is None:
            return
        try:
            finish_transaction(self.producer, commit=False, timeout_s=10)
        except Exception as exc:  # broker gone, or the transaction is in a fatal state
            logger.warning("%s: abort failed (%s); recreating the transactional producer", self.name, exc)
            try:
                self.producer.close(timeout=1)
            except Exception:
                logger.debug("close failed", exc_info=True)
            self.producer = None


def stage_transactional_id(group: str, name: str) -> str:
    """A stage replica's transactional id: stable per replica, so Ray's restart of an actor (same
    name) fences the instance it replaces."""
    return f"{group}.{name}"


def fence(kafka: KafkaConfig, transactional_id: str) -> None:
    """Abort now whatever a dead holder of ``transactional_id`` left open, and fence it.

    A replica killed for good is never followed by a successor under its id, and the broker would
    abort its open transaction only after the transaction timeout (kafka-python's 60 s), holding
    back every read_committed consumer of the partitions it wrote to until then.
    """
    producer = make_producer(kafka, transactional_id=transactional_id, retry_backoff_ms=kafka.transaction_retry_backoff_ms)
    try:
        producer.init_transactions()  # bumps the epoch: the coordinator aborts the open transaction first
    finally:
        producer.close(timeout=5)


def make_delivery(guarantee: str, kafka: KafkaConfig, name: str, transactional_id: str) -> Delivery:
    if guarantee == "exactly_once":
        return TransactionalDelivery(kafka, name, transactional_id)
    return AtLeastOnceDelivery(kafka, name)
