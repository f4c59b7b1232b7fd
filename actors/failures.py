"""What a stage does when something goes wrong: dead letters for poison records, backoff for failed batches.

Two classes of failure, as Kafka Streams separates its deserialization and production
exception handlers:

- a record that cannot be decoded will never succeed: it goes to the dead-letter topic as it
  came, with the reason and its origin in headers, and the stage moves on;
- a batch whose outputs were not acknowledged (broker gone) or whose sink failed (disk full)
  may succeed later: it is rewound and retried with capped exponential backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer

from pipeline.errors import DecodeError

__all__ = ["ErrorPolicy", "default_on_error", "DeadLetters", "Backoff"]

logger = logging.getLogger(__name__)

ErrorPolicy = Callable[[Exception, Any], bool]
"""on_error(exc, record) -> True to dead-letter the record and go on, False to stop the stage."""


def default_on_error(exc: Exception, record: Any) -> bool:
    """Dead-letter poison records; stop on anything else."""
    where = f"{record.topic}[{record.partition}]@{record.offset}" if record is not None else "batch"
    if isinstance(exc, DecodeError):
        logger.warning("skipping poison record %s: %s", where, exc)
        return True
    logger.error("stage failed on %s: %s", where, exc)
    return False


class DeadLetters:
    """Sends poison records to the dead-letter topic within the current batch (its transaction)."""

    def __init__(self, topic: str, stage: str) -> None:
        self.topic = topic
        self.stage = stage
        self.pending: list[Any] = []
        """Futures of this batch's dead letters: they must be acknowledged before the batch commits."""

    def send(self, producer: KafkaProducer, record: Any, exc: Exception) -> None:
        """Send the record as it came, plus why and where from."""
        headers = list(record.headers or []) + [
            ("vapipe-dlq-reason", str(exc).encode()[:1000]),
            ("vapipe-dlq-stage", self.stage.encode()),
            ("vapipe-dlq-origin", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self.pending.append(producer.send(self.topic, key=record.key, value=record.value, headers=headers))

    def take(self) -> list[Any]:
        out, self.pending = self.pending, []
        return out


class Backoff:
    """Capped exponential backoff over consecutive failed batches: 1, 2, 4, ... ``max_s`` seconds."""

    def __init__(self, max_s: float = 30.0) -> None:
        self.max_s = max_s
        self.failures_in_a_row = 0

    def failed(self) -> float:
        """Record a failure; returns how long to wait before the retry."""
        self.failures_in_a_row += 1
        return float(min(2 ** (self.failures_in_a_row - 1), self.max_s))

    def succeeded(self) -> int:
        """Record a success; returns how many failures it ended (0 when there were none)."""
        ended, self.failures_in_a_row = self.failures_in_a_row, 0
        return ended
