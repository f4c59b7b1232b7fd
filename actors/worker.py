"""One consumer loop for every stage: poll, decode, call the core, produce, then make the batch durable.

The loop's jobs are split the way quix-streams splits its consumer, sink and checkpoint:

- ``StageWorker`` (here): lifecycle and the poll loop; subclasses implement ``process``;
- ``actors.delivery``: outputs and input offsets made durable under the configured guarantee;
- ``actors.failures``: which failures are permanent, transient or fatal; dead letters; backoff;
- ``actors.meter``: counters, rate and position for ``stats``.

A batch whose outputs were not acknowledged (broker gone) or whose sink failed (disk full)
is not committed: the worker rewinds to the group's committed offsets (not the batch's first
offsets: a commit that timed out may have landed), backs off, reports the problem in its
stats, and retries until it succeeds. A record that can never succeed (it does not decode, or
its output is above the broker's size limit) is dead-lettered and committed, and the stage
moves on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import TopicAuthorizationFailedError

from actors.delivery import Delivery, batch_offsets, make_delivery, stage_transactional_id
from actors.failures import Backoff, DeadLetters, ErrorPolicy, classify, default_on_error, refusal, stale_membership
from actors.meter import StageMeter
from cluster.clients import make_consumer
from cluster.reading import describe_group
from pipeline.codecs import DecodeLimits
from pipeline.config import ROLES, Role, Settings
from pipeline.errors import DecodeError
from pipeline.stats import WorkerStats

__all__ = ["StageWorker", "ErrorPolicy"]

logger = logging.getLogger(__name__)

COMMITTED_TIMEOUT_MS = 10000
"""How long a rewind waits for the group's committed offsets before trying again later."""


class StageWorker:
    """Base of the InterConsumer, crop and count workers. Subclasses implement ``process``.

    Lifecycle: ``start()`` creates the Kafka clients (and loads models), ``run()``
    loops until ``stop()``, a message or time limit, or an idle timeout.
    """

    stage: str = "stage"
    input_topic_attr: str = "frames"

    def __init__(self, settings: Settings, name: str, on_error: ErrorPolicy = default_on_error) -> None:
        # Every client of this stage acts as its role (kafka.credentials.<stage>), so the broker's
        # ACLs let it do only this stage's job.
        self.settings = settings = settings.for_role(cast(Role, self.stage)) if self.stage in ROLES else settings
        os.umask(settings.umask_bits())  # this actor's crops and files: 0750 folders, 0640 files by default
        self.name = name
        self.on_error = on_error
        self.consumer: KafkaConsumer | None = None
        self.delivery: Delivery = make_delivery(settings.processing_guarantee, settings.kafka, name, self.transactional_id)
        self.dead_letters = DeadLetters(settings.topics.dead_letter.name, self.stage)
        self.limits = DecodeLimits(**settings.decoding.model_dump())
        """Bounds every decoder of this stage checks before parsing (``decoding`` settings)."""
        self.backoff = Backoff(jitter=0.2)
        self.meter = StageMeter()
        self._stop = threading.Event()
        self._rejoin = threading.Event()
        self._needs_rewind_hook = False
        self._rewind_pending: dict[TopicPartition, int] = {}
        """Partitions of a failed batch (and its first offsets) still to be sought back to their committed offsets."""
        self.running = False
        self.ready = False
        """True once the clients exist, the model is loaded and the first poll joined the group."""
        self.last_error: str | None = None
        self._idle_since: float | None = None
        """Since when this member has owned no partition (None: it owns some)."""
        self.rejoins = 0
        """Times this member rejoined its group because it was left without partitions others lacked."""

    # -- to override ---------------------------------------------------------
    @property
    def input_topic(self) -> str:
        return str(getattr(self.settings.topics, self.input_topic_attr).name)

    @property
    def stage_settings(self) -> Any:
        return getattr(self.settings, self.stage)

    def setup(self) -> None:
        """Load models or state after the clients exist."""

    def process(self, records: list[Any]) -> list[Any]:
        """Handle a batch; return producer futures that must succeed before committing."""
        raise NotImplementedError

    def consumer_options(self) -> dict[str, Any]:
        return {}

    def extra_stats(self) -> dict[str, Any]:
        """Stage-specific ``WorkerStats`` fields."""
        return {}

    def on_commit(self) -> None:
        """The batch is durable: publish its effects to stats."""

    def on_rewind(self) -> None:
        """Undo in-memory effects of a batch that was not committed (the count table reloads its changelog)."""

    def on_idle(self) -> None:
        """A poll returned nothing; a stage with timed work (the count stage's reorder wait) may ``handle([])``."""

    # -- shared state --------------------------------------------------------
    @property
    def counters(self) -> dict[str, int]:
        return self.meter.counters

    @property
    def producer(self) -> KafkaProducer | None:
        """The producer of the current batch's outputs (the Faust shell puts a collecting one here)."""
        return self.delivery.producer

    @producer.setter
    def producer(self, producer: Any) -> None:
        self.delivery.producer = producer

    @property
    def max_backoff_s(self) -> float:
        return self.backoff.max_s

    @max_backoff_s.setter
    def max_backoff_s(self, seconds: float) -> None:
        self.backoff.max_s = seconds

    @property
    def exactly_once(self) -> bool:
        return self.settings.processing_guarantee == "exactly_once"

    @property
    def transactional_id(self) -> str:
        """Stable per replica: Ray restarts an actor under the same name, and the new one fences the old."""
        return stage_transactional_id(self.settings.group(self.stage), self.name)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self.consumer is not None:
            return
        self.delivery.open()  # under exactly_once this fences a zombie predecessor right away
        self.consumer = make_consumer(
            self.settings.kafka,
            group_id=self.settings.group(self.stage),
            client_id=self.name,
            max_poll_interval_ms=600000,
            **self.consumer_options(),
        )
        self.subscribe()
        self._idle_since = None  # a new member: its own join gets half a session before the check
        self.setup()
        self.meter.started_at = time.time()

    def subscribe(self) -> None:
        assert self.consumer is not None
        self.consumer.subscribe([self.input_topic])

    def rejoin(self) -> None:
        """Leave and rejoin the group on the loop's thread (a member left out of an assignment)."""
        self._rejoin.set()

    def stop(self) -> None:
        """Ask ``run`` to finish its current batch, commit, and return."""
        self._stop.set()

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:  # closing is best effort
                logger.debug("close failed", exc_info=True)
        self.consumer = None
        self.delivery.close()

    def run(
        self, max_messages: int | None = None, timeout_s: float | None = None, idle_timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Consume until stopped, ``max_messages`` records, ``timeout_s`` seconds, or ``idle_timeout_s`` without records."""
        self.start()
        assert self.consumer is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_record = time.monotonic()
        cfg = self.stage_settings
        self.running = True
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if max_messages is not None and self.counters["records_in"] >= max_messages:
                    break
                if idle_timeout_s is not None and time.monotonic() - last_record >= idle_timeout_s:
                    break
                if not self._settle_position():
                    self._stop.wait(self.backoff.failed())
                    continue
                if self._rejoin.is_set():
                    self._rejoin.clear()
                    self.consumer.unsubscribe()
                    self.subscribe()
                limit = cfg.batch_size
                if max_messages is not None:
                    limit = min(limit, max_messages - self.counters["records_in"])
                try:
                    records = self._poll_batch(limit, cfg.poll_timeout_ms, cfg.batch_wait_ms)
                except Exception as exc:  # the broker restarting, or a rebalance callback that met it
                    if classify(exc) != "transient":
                        raise
                    self.last_error = f"{type(exc).__name__}: {exc} (polling)"
                    logger.warning("%s: poll failed (%s); retrying", self.name, self.last_error)
                    self._stop.wait(self.backoff.failed())
                    continue
                self.ready = True
                self.meter.polled([r.timestamp for r in records if r.timestamp is not None and r.timestamp >= 0])
                if not records:
                    self._measure_lag()
                    self._check_membership()
                    self.on_idle()
                    continue
                self.handle(records)
                last_record = time.monotonic()
        except Exception as exc:
            denied = refusal(exc, self.settings.kafka.sasl_username, self.stage)
            self.last_error = str(denied) if denied else f"{type(exc).__name__}: {exc}"
            if denied:
                logger.error("%s: %s", self.name, denied)
                raise denied from exc
            raise
        finally:
            self.running = False
            self.close()
        return self.stats()

    def _check_membership(self) -> None:
        """Rejoin when this member owns nothing while its topic has partitions nobody owns.

        Seen with kafka-python under load: a member whose assignment came back empty (the first
        join ran before the topic's metadata arrived) stays empty, and the records wait forever;
        a member the group dropped without noticing waits the same way. Only while idle and
        without partitions, at most every half session, does it ask the coordinator (a
        DescribeGroups): an idle member of a group with more members than partitions stays put.
        """
        assert self.consumer is not None
        if self.consumer.assignment():
            self._idle_since = None
            return
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
            return
        if now - self._idle_since < self.settings.kafka.session_timeout_ms / 2000:
            return
        self._idle_since = now
        try:
            view = describe_group(self.settings.kafka, self.settings.group(self.stage), self.input_topic)
        except Exception as exc:  # the coordinator is away: the next idle poll asks again
            logger.debug("%s: group not described: %s", self.name, exc)
            return
        if view.state not in ("Stable", "Empty"):
            return  # a rebalance under way hands partitions out anyway
        given = view.owners.get(self.name)
        if view.unowned or given or given is None:
            why = (
                f"partitions {sorted(view.unowned)} have no owner"
                if view.unowned
                else "the group counts it out"
                if given is None
                else f"the group gave it {sorted(given)}"
            )
            logger.warning("%s: owns no partition of %s while %s; rejoining", self.name, self.input_topic, why)
            self.rejoins += 1
            self._rejoin.set()

    def _poll_batch(self, limit: int, timeout_ms: int, wait_ms: int) -> list[Any]:
        """Up to ``limit`` records from every assigned partition (so a batch spans streams); once the
        first arrive, keep polling at most ``wait_ms`` to fill the batch, so a slow stream never
        holds the others back for longer."""
        assert self.consumer is not None
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=limit)
        if not polled and self.input_topic in self.consumer._client.cluster.unauthorized_topics:
            # kafka-python only logs a subscription the broker refuses; a stage would idle forever
            raise TopicAuthorizationFailedError(self.input_topic)
        records = [r for batch in polled.values() for r in batch]
        deadline = time.monotonic() + wait_ms / 1000
        while records and len(records) < limit and (left := deadline - time.monotonic()) > 0:
            polled = self.consumer.poll(timeout_ms=max(1, int(left * 1000)), max_records=limit - len(records))
            records += [r for batch in polled.values() for r in batch]
        return records

    def handle(self, records: list[Any]) -> bool:
        """Process one polled batch, then make its outputs and offsets durable (one transaction
        under exactly_once). Returns whether the batch is durable.

        A failure is classified (``actors.failures.classify``) and nothing of the batch is
        committed (the transaction is aborted). Transient (broker, sink): rewind to the group's
        committed offsets, back off, retry later. Permanent (a record that can never succeed):
        the records are handled again one by one, each in its own transaction, so the one that
        fails is dead-lettered and committed and the others go through. Fatal: raise.
        """
        assert self.consumer is not None
        counters_before = dict(self.counters)
        try:
            if self._needs_rewind_hook:
                self.on_rewind()
                self._needs_rewind_hook = False
            self.delivery.begin()
            started = time.monotonic()
            futures = self.process(records) + self.dead_letters.take()
            self.meter.handled(started)  # the stage's own work: per-batch commit costs shrink as batches grow
            self.delivery.complete(self.consumer, records, futures)
        except Exception as exc:
            kind = classify(exc)
            if kind == "fatal":
                raise  # a zombie (fenced by a newer instance of this replica) or a bug
            self.dead_letters.take()
            self.meter.rollback(counters_before)  # the batch will be counted when it succeeds
            self.delivery.abort()
            self._needs_rewind_hook = True  # in-memory effects of the failed batch are undone first
            if kind == "permanent":
                return self._isolate(records, exc)
            if stale_membership(exc):
                logger.warning("%s: the group no longer knows this member as it was (%s); rejoining", self.name, exc)
                self._rejoin.set()
            self._retry_later(records, exc)
            return False
        ended = self.backoff.succeeded()
        if ended:
            logger.warning("%s: recovered after %d failed attempts", self.name, ended)
            self.last_error = None
        self.counters["commit_failures"] = self.delivery.commit_failures
        self.batch_done(records)
        self._measure_lag()
        return True

    def _isolate(self, records: list[Any], exc: Exception) -> bool:
        """A record of the batch failed permanently: find it by handling the records one at a time."""
        if len(records) > 1:
            logger.warning("%s: a record of this batch can never succeed (%s); handling them one by one", self.name, exc)
            # all() stops at the first record that failed transiently: it rewound to the committed offsets
            return all(self.handle([record]) for record in records)
        (record,) = records
        if not self.on_error(exc, record):
            raise exc
        before = dict(self.counters)
        self.counters["poison"] += 1
        try:
            self.delivery.begin()
            self.dead_letter(record, exc)
            self.delivery.complete(self.consumer, records, self.dead_letters.take())
        except Exception as again:
            if classify(again) != "transient":
                raise
            self.dead_letters.take()
            self.meter.rollback(before)
            self.delivery.abort()
            self._retry_later(records, again)
            return False
        self.batch_done(records)
        return True

    def restore_pending(self) -> None:
        """In-memory state must be rebuilt (``on_rewind``) before the next batch is processed."""
        self._needs_rewind_hook = True

    def batch_done(self, records: list[Any]) -> None:
        """The batch and its outputs are durable: publish its effects to stats.

        The Faust engine, whose agents call ``process`` themselves, calls this too.
        """
        self.dead_letters.take()
        self.on_commit()
        self.meter.batch_done(len(records))

    def report_position(self, assigned: int, lag: int | None) -> None:
        """Partitions owned and records left in them, for stats (the Faust engine measures its own)."""
        self.meter.position(assigned, lag)

    @property
    def assigned(self) -> int:
        return self.meter.assigned

    def _retry_later(self, records: list[Any], exc: Exception) -> None:
        self.counters["retries"] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        wait_s = self.backoff.failed()
        logger.warning("%s: batch not committed (%s); retrying in %.0fs", self.name, self.last_error, wait_s)
        self._rewind_pending = self._batch_starts(records)
        self._settle_position()
        self._stop.wait(wait_s)

    def _settle_position(self) -> bool:
        """Finish a pending rewind; returns False while the committed offsets cannot be read."""
        if not self._rewind_pending:
            return True
        try:
            self.delivery.settle()  # a commit that timed out may land yet: read the offsets after it did or not
            self.rewind_to(self._rewind_pending)
        except Exception as exc:  # broker still gone: polling now would skip the failed batch
            if classify(exc) == "fatal":
                raise
            self.last_error = f"{type(exc).__name__}: {exc} (reading committed offsets)"
            logger.warning("%s: cannot read the committed offsets yet: %s", self.name, exc)
            return False
        self._rewind_pending = {}
        return True

    @staticmethod
    def _batch_starts(records: list[Any]) -> dict[TopicPartition, int]:
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        return first

    def rewind(self, records: list[Any]) -> None:
        """Seek each partition of the batch back to the group's committed offset, so whatever was not
        committed is polled again.

        Not to the batch's first offset: after a commit (or abort) that timed out, the commit may
        have landed on the broker all the same, and the batch would then run twice.
        """
        self.rewind_to(self._batch_starts(records))

    def rewind_to(self, starts: dict[TopicPartition, int]) -> None:
        """Seek to the committed offset of each partition in ``starts`` still owned; ``starts`` (the
        failed batch's first offsets) only where the group has committed nothing yet.

        Raises:
            KafkaError: the committed offsets could not be read (nothing was moved).
        """
        assert self.consumer is not None
        owned = self.consumer.assignment()
        targets: dict[TopicPartition, int] = {}
        for tp, first in starts.items():
            if tp not in owned:  # a partition lost to a rebalance is redelivered to its new owner anyway
                continue
            committed = self.consumer.committed(tp, timeout_ms=COMMITTED_TIMEOUT_MS)
            targets[tp] = first if committed is None else committed
        for tp, offset in targets.items():
            self.consumer.seek(tp, offset)

    offsets = staticmethod(batch_offsets)

    def decode_or_skip(self, record: Any, decode: Callable[[Any], Any]) -> Any | None:
        """Decode a record; a poison record is counted and dead-lettered (None) if the policy allows."""
        try:
            return decode(record)
        except DecodeError as exc:
            self.counters["poison"] += 1
            if self.on_error(exc, record):
                self.dead_letter(record, exc)
                return None
            raise

    def dead_letter(self, record: Any, exc: Exception) -> None:
        """Send the record as it came, plus why and where from, to the dead-letter topic."""
        producer = self.producer
        assert producer is not None
        self.dead_letters.send(producer, record, exc)
        self.counters["dead_lettered"] += 1

    # -- observability -------------------------------------------------------
    def _measure_lag(self) -> None:
        """Records left in this worker's partitions; measured on the loop's own thread (clients are not thread-safe)."""
        consumer = self.consumer
        if consumer is None:
            return
        per_partition: dict[str, int] = {}
        try:
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is not None:
                    per_partition[str(tp.partition)] = max(high - consumer.position(tp, timeout_ms=1000), 0)
        except Exception:  # best effort: stats must never break the loop
            logger.debug("lag measurement failed", exc_info=True)
            return
        self.meter.position(len(consumer.assignment()), sum(per_partition.values()), per_partition)

    def fps(self) -> float:
        return self.meter.fps()

    def worker_stats(self) -> WorkerStats:
        return WorkerStats(
            name=self.name,
            stage=self.stage,
            running=self.running,
            ready=self.ready,
            assigned=self.meter.assigned,
            fps=round(self.meter.fps(), 2),
            lag=self.meter.lag,
            partition_lag=dict(self.meter.partition_lag),
            lag_s=self.meter.lag_s,
            busy=self.meter.busy(),
            uptime_s=self.meter.uptime_s(),
            last_error=self.last_error,
            **self.counters,
            **self.extra_stats(),
        )

    def stats(self) -> dict[str, Any]:
        """``worker_stats()`` as the JSON-safe dict that crosses process boundaries."""
        return self.worker_stats().to_dict()
