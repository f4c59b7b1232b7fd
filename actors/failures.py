"""What a stage does when something goes wrong: each failure is classified where it is decided.

Like Kafka Streams' deserialization and production exception handlers, one function,
``classify``, says which of three kinds a failure is:

- ``permanent``: the record can never succeed, however often it is retried -- it does not decode
  (``DecodeError``), or an output it causes is above the broker's size limit
  (``RecordTooLargeError``, ``MessageSizeTooLargeError``). It goes to the dead-letter topic as it
  came, with the reason and its origin in headers; its offset is committed and the stage moves on.
  A frame dead-lettered by the InterConsumer is also announced on topic C as skipped, so the count
  table does not wait for it.
- ``transient``: the batch may succeed later -- the broker is gone or slow (any other
  ``KafkaError``, timeouts), or a sink failed (``SinkError``: disk full). The batch is aborted,
  rewound to the group's committed offsets and retried with capped, jittered exponential
  backoff; ``retries`` and ``last_error`` show it in the worker's stats.
- ``fatal``: the stage must stop -- a newer instance of this replica fenced it
  (``ProducerFencedError``), a secured broker refused it (``AuthorizationError``: its user has no ACL
  for a topic, group or transactional id; ``refusal`` says which), or a bug (anything else).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from typing import Any, Literal

import kafka.errors
from kafka import KafkaProducer
from kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    FencedInstanceIdError,
    GroupAuthorizationFailedError,
    IllegalGenerationError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    RebalanceInProgressError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    UnknownMemberIdError,
)

from pipeline.errors import AccessDeniedError, BrokerError, DecodeError, RecordTooLargeError, SinkError

__all__ = ["FailureKind", "classify", "stale_membership", "refusal", "ErrorPolicy", "default_on_error", "DeadLetters", "Backoff"]

logger = logging.getLogger(__name__)

FailureKind = Literal["permanent", "transient", "fatal"]

PERMANENT: tuple[type[BaseException], ...] = (
    DecodeError,
    RecordTooLargeError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
"""Failures of one record that no retry can fix: dead-letter it, commit, move on."""

FATAL: tuple[type[BaseException], ...] = (ProducerFencedError, AuthorizationError, AccessDeniedError)
"""Errors after which this replica must stop: another instance owns its transactional id, or the
broker's ACLs refuse this stage's user something (retrying cannot change that)."""

STALE_MEMBERSHIP: tuple[type[BaseException], ...] = (
    CommitFailedError,
    UnknownMemberIdError,
    IllegalGenerationError,
    RebalanceInProgressError,
    FencedInstanceIdError,
)
"""Transient failures that only a fresh join of the consumer group ends."""

TRANSIENT: tuple[type[BaseException], ...] = (KafkaError, SinkError, BrokerError, TimeoutError, ConnectionError)
"""Failures of the batch's surroundings (broker, sink): abort, rewind, back off, retry."""


def classify(exc: BaseException) -> FailureKind:
    """Say whether a failure is ``permanent`` (dead-letter the record), ``transient`` (retry the
    batch later) or ``fatal`` (stop the stage).

    Example:
        >>> classify(DecodeError("not JSON")), classify(SinkError("disk full")), classify(KeyError("bug"))
        ('permanent', 'transient', 'fatal')
    """
    exc = named_failure(exc)
    if isinstance(exc, PERMANENT):
        return "permanent"
    if isinstance(exc, FATAL):
        return "fatal"
    if isinstance(exc, TRANSIENT):
        return "transient"
    return "fatal"


_ERROR_STATE = re.compile(r"in an error state: \[Error -?\d+\] (\w+)")


def stale_membership(exc: BaseException) -> bool:
    """The group no longer knows this consumer as it was: its generation or member id is stale.

    A transactional offset commit under stale group metadata fails (kafka-python raises
    ``CommitFailedError`` for it), and fails again on every retry until the consumer rejoins:
    its own heartbeat may not have learnt yet that it was dropped.

    Example:
        >>> stale_membership(CommitFailedError("consumer group metadata mismatch")), stale_membership(TimeoutError())
        (True, False)
    """
    return isinstance(named_failure(exc), STALE_MEMBERSHIP)


def named_failure(exc: BaseException) -> BaseException:
    """The failure a transactional producer's error state names, as its own class.

    Once a background request of a transactional kafka-python producer fails (a newer instance
    fenced it), every later call raises a bare ``KafkaError`` that only names that failure
    ("... in an error state: [Error 90] ProducerFencedError"). Taken as transient, a fenced zombie
    would drop its producer and start a new one under its transactional id, fencing its successor.

    Example:
        >>> type(named_failure(KafkaError("... in an error state: [Error 90] ProducerFencedError"))).__name__
        'ProducerFencedError'
    """
    if type(exc) is not KafkaError:
        return exc
    match = _ERROR_STATE.search(str(exc))
    named = getattr(kafka.errors, match.group(1), None) if match else None
    if isinstance(named, type) and issubclass(named, KafkaError) and named is not KafkaError:
        return named(str(exc))
    return exc


def refusal(exc: BaseException, user: str | None, stage: str) -> AccessDeniedError | None:
    """One line saying what a secured broker refused, or None when ``exc`` is no refusal.

    Example:
        >>> str(refusal(TopicAuthorizationFailedError("vapipe.A.frames"), "crop", "crop"))  # doctest: +ELLIPSIS
        "stage crop (Kafka user 'crop') refused by the broker: no ACL lets it write or read the topic ..."
    """
    if not isinstance(exc, AuthorizationError):
        return None
    what = {
        TopicAuthorizationFailedError: "write or read the topic",
        GroupAuthorizationFailedError: "use the consumer group",
        TransactionalIdAuthorizationFailedError: "use the transactional id",
    }.get(type(exc), "do this")
    detail = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
    return AccessDeniedError(
        f"stage {stage} (Kafka user {user!r}) refused by the broker: no ACL lets it {what} {detail} "
        f"({type(exc).__name__}); each role may use only its own topics, group and transactional ids (docs/security.md)"
    )


ErrorPolicy = Callable[[Exception, Any], bool]
"""on_error(exc, record) -> True to dead-letter the record and go on, False to stop the stage."""


def where(record: Any) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}" if record is not None else "batch"


def default_on_error(exc: Exception, record: Any) -> bool:
    """Dead-letter records that failed permanently; stop on anything else."""
    if classify(exc) == "permanent":
        logger.warning("dead-lettering %s: %s", where(record), exc)
        return True
    logger.error("stage failed on %s: %s", where(record), exc)
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
            ("vapipe-dlq-error", type(exc).__name__.encode()),
            ("vapipe-dlq-stage", self.stage.encode()),
            ("vapipe-dlq-origin", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self.pending.append(producer.send(self.topic, key=record.key, value=record.value, headers=headers))

    def follow(self, future: Any) -> None:
        """A record sent because of a dead letter (a skipped-frame marker): acknowledged with the batch."""
        self.pending.append(future)

    def take(self) -> list[Any]:
        out, self.pending = self.pending, []
        return out


class Backoff:
    """Capped exponential backoff over consecutive failed batches: about 1, 2, 4, ... ``max_s`` seconds.

    ``jitter`` spreads each wait by up to that fraction either way, so replicas that failed together
    (the broker went away) do not all come back in the same instant.
    """

    def __init__(self, max_s: float = 30.0, jitter: float = 0.0) -> None:
        self.max_s = max_s
        self.jitter = jitter
        self.failures_in_a_row = 0

    def failed(self) -> float:
        """Record a failure; returns how long to wait before the retry."""
        self.failures_in_a_row += 1
        wait = float(min(2 ** (self.failures_in_a_row - 1), self.max_s))
        if self.jitter:
            wait *= 1 + random.uniform(-self.jitter, self.jitter)
        return wait

    def succeeded(self) -> int:
        """Record a success; returns how many failures it ended (0 when there were none)."""
        ended, self.failures_in_a_row = self.failures_in_a_row, 0
        return ended
