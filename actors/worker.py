"""One consumer loop for every stage: poll, decode, call the core, produce, flush, commit.

``processing_guarantee: exactly_once`` (the default): a batch's output records and
its input offsets go to Kafka in one transaction (consume-transform-produce, KIP-98
and KIP-447), so a crash either publishes the whole batch and its offsets or none
of it; consumers read committed records only. Each replica's transactional id is
stable (``<group>.<actor name>``), so a restarted actor fences the zombie it replaces.

``at_least_once``: offsets are committed only after every output record is
acknowledged by the broker and every sink write succeeded, so a crash loses nothing;
sinks and the count table are idempotent, so a redelivery changes nothing.

- Poison records (that do not decode) go to the dead-letter topic with the reason
  and their origin in headers, are counted, and never stop the stage.
- A batch whose outputs were not acknowledged (broker gone) or whose sink failed
  (disk full) is not committed: the worker rewinds to the batch's first offsets,
  backs off, reports the problem in its stats, and retries until it succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError
from kafka.structs import OffsetAndMetadata

from cluster.clients import finish_transaction, send_offsets_in_transaction
from pipeline.config import Settings
from pipeline.errors import BrokerError, DecodeError, SinkError

__all__ = ["StageWorker", "ErrorPolicy"]

logger = logging.getLogger(__name__)

ErrorPolicy = Callable[[Exception, Any], bool]
"""on_error(exc, record) -> True to skip the record and go on, False to stop the stage."""


def default_on_error(exc: Exception, record: Any) -> bool:
    """Skip poison records; stop on anything else."""
    where = f"{record.topic}[{record.partition}]@{record.offset}" if record is not None else "batch"
    if isinstance(exc, DecodeError):
        logger.warning("skipping poison record %s: %s", where, exc)
        return True
    logger.error("stage failed on %s: %s", where, exc)
    return False


class StageWorker:
    """Base of the InterConsumer, crop and count workers. Subclasses implement ``process``.

    Lifecycle: ``start()`` creates the Kafka clients (and loads models), ``run()``
    loops until ``stop()``, a message or time limit, or an idle timeout.
    """

    stage: str = "stage"
    input_topic_attr: str = "frames"

    def __init__(self, settings: Settings, name: str, on_error: ErrorPolicy = default_on_error) -> None:
        self.settings = settings
        self.name = name
        self.on_error = on_error
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {
            "records_in": 0, "frames_in": 0, "frames_out": 0, "poison": 0, "dead_lettered": 0,
            "commit_failures": 0, "retries": 0,
        }
        self._dead_letters: list[Any] = []
        self._failures_in_a_row = 0
        self._needs_rewind_hook = False
        self.max_backoff_s = 30.0
        self._rate: deque[tuple[float, int]] = deque(maxlen=30)
        self.started_at: float | None = None
        self.running = False
        self.last_error: str | None = None
        self._lag: int | None = None
        self.ready = False
        self._rejoin = threading.Event()
        self.assigned = 0
        """Partitions this worker owns, as of its last poll."""
        """True once the clients exist, the model is loaded and the first poll joined the group."""

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
        return {}

    @property
    def exactly_once(self) -> bool:
        return self.settings.processing_guarantee == "exactly_once"

    @property
    def transactional_id(self) -> str:
        """Stable per replica: Ray restarts an actor under the same name, and the new one fences the old."""
        return f"{self.settings.group(self.stage)}.{self.name}"

    def on_commit(self) -> None:
        """The batch is durable: publish its effects to stats."""

    def on_rewind(self) -> None:
        """Undo in-memory effects of a batch that was not committed (the count table reloads its changelog)."""

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        from cluster.clients import make_consumer

        if self.consumer is not None:
            return
        self.producer = self._make_producer()
        self.consumer = make_consumer(
            self.settings.kafka,
            group_id=self.settings.group(self.stage),
            client_id=self.name,
            max_poll_interval_ms=600000,
            **self.consumer_options(),
        )
        self.subscribe()
        self.setup()
        self.started_at = time.time()

    def _make_producer(self) -> KafkaProducer:
        from cluster.clients import make_producer

        if not self.exactly_once:
            return make_producer(self.settings.kafka)
        producer = make_producer(self.settings.kafka, transactional_id=self.transactional_id)
        producer.init_transactions()  # aborts what a crashed predecessor left open
        return producer

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
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing is best effort
                    logger.debug("close failed", exc_info=True)
        self.consumer = self.producer = None

    def run(self, max_messages: int | None = None, timeout_s: float | None = None, idle_timeout_s: float | None = None) -> dict[str, Any]:
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
                if self._rejoin.is_set():
                    self._rejoin.clear()
                    self.consumer.unsubscribe()
                    self.subscribe()
                limit = cfg.batch_size
                if max_messages is not None:
                    limit = min(limit, max_messages - self.counters["records_in"])
                polled = self.consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=limit)
                records = [r for batch in polled.values() for r in batch]
                self.ready = True
                if not records:
                    self._measure_lag()
                    continue
                self.handle(records)
                last_record = time.monotonic()
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.running = False
            self.close()
        return self.stats()

    def handle(self, records: list[Any]) -> None:
        """Process one polled batch, publish its outputs, then commit its offsets (in one transaction
        under exactly_once).

        On a broker or sink failure nothing is committed (the transaction is aborted):
        rewind, back off, retry later.
        """
        counters_before = dict(self.counters)
        try:
            if self.producer is None:  # dropped after a failed abort: a new one aborts the old transaction
                self.producer = self._make_producer()
            if self._needs_rewind_hook:
                self.on_rewind()
                self._needs_rewind_hook = False
            if self.exactly_once:
                self.producer.begin_transaction()
            futures = self.process(records) + self._dead_letters
            self._dead_letters = []
            if self.exactly_once:
                assert self.consumer is not None
                send_offsets_in_transaction(self.producer, self.offsets(records), self.consumer.group_metadata())
                finish_transaction(self.producer, commit=True)
            elif futures:
                self.producer.flush(timeout=60)
            for future in futures:
                future.get(timeout=60)
        except ProducerFencedError:
            raise  # a newer instance of this replica owns the transactional id: this one is a zombie
        except (KafkaError, SinkError, BrokerError) as exc:
            self._dead_letters = []
            self.counters.update(counters_before)  # the batch will be counted when it succeeds
            if self.exactly_once:
                self._abort()
            self._retry_later(records, exc)
            return
        if self._failures_in_a_row:
            logger.warning("%s: recovered after %d failed attempts", self.name, self._failures_in_a_row)
            self._failures_in_a_row, self.last_error = 0, None
        if not self.exactly_once:
            self.commit(records)
        self.batch_done(records)
        self._measure_lag()

    def batch_done(self, records: list[Any]) -> None:
        """The batch and its outputs are durable: publish its effects to stats.

        The Faust engine, whose agents call ``process`` themselves, calls this too.
        """
        self._dead_letters = []
        self.on_commit()
        with self._lock:
            self.counters["records_in"] += len(records)
            self._rate.append((time.monotonic(), self.counters["frames_in"]))

    def report_position(self, assigned: int, lag: int | None) -> None:
        """Partitions owned and records left in them, for stats (the Faust engine measures its own)."""
        self.assigned = assigned
        self._lag = lag

    def _abort(self) -> None:
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

    def _retry_later(self, records: list[Any], exc: Exception) -> None:
        self._failures_in_a_row += 1
        self.counters["retries"] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        backoff = min(2 ** (self._failures_in_a_row - 1), self.max_backoff_s)
        logger.warning("%s: batch not committed (%s); retrying in %.0fs", self.name, self.last_error, backoff)
        self.rewind(records)
        self._needs_rewind_hook = True
        self._stop.wait(backoff)

    def rewind(self, records: list[Any]) -> None:
        """Seek back to the first offset of each partition in the batch, so it is polled again."""
        assert self.consumer is not None
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first[tp] = min(first.get(tp, r.offset), r.offset)
        owned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in owned:  # a partition lost to a rebalance is redelivered to its new owner anyway
                self.consumer.seek(tp, offset)

    @staticmethod
    def offsets(records: list[Any]) -> dict[TopicPartition, OffsetAndMetadata]:
        """The offsets to commit after a batch: one past its last record in each partition."""
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            if tp not in offsets or offsets[tp].offset <= r.offset:
                offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
        return offsets

    def commit(self, records: list[Any]) -> None:
        assert self.consumer is not None
        try:
            self.consumer.commit(self.offsets(records))
        except CommitFailedError as exc:
            # The group rebalanced under us: another member will redeliver; sinks are idempotent.
            self.counters["commit_failures"] += 1
            logger.warning("%s: commit failed after a rebalance, records will be redelivered: %s", self.name, exc)

    def decode_or_skip(self, record: Any, decode: Callable[[Any], Any]) -> Any | None:
        """Decode a record; a poison record is counted and skipped (None) if the policy allows."""
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
        assert self.producer is not None
        headers = list(record.headers or []) + [
            ("vapipe-dlq-reason", str(exc).encode()[:1000]),
            ("vapipe-dlq-stage", self.stage.encode()),
            ("vapipe-dlq-origin", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self._dead_letters.append(self.producer.send(
            self.settings.topics.dead_letter.name, key=record.key, value=record.value, headers=headers))
        self.counters["dead_lettered"] += 1

    # -- observability -------------------------------------------------------
    def _measure_lag(self) -> None:
        """Records left in this worker's partitions; measured on the loop's own thread (clients are not thread-safe)."""
        consumer = self.consumer
        if consumer is None:
            return
        total = 0
        try:
            for tp in consumer.assignment():
                high = consumer.highwater(tp)
                if high is not None:
                    total += max(high - consumer.position(tp, timeout_ms=1000), 0)
        except Exception:  # best effort: stats must never break the loop
            logger.debug("lag measurement failed", exc_info=True)
            return
        self.report_position(len(consumer.assignment()), total)

    def fps(self) -> float:
        with self._lock:
            if len(self._rate) < 2:
                return 0.0
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "running": self.running,
            "ready": self.ready,
            "assigned": self.assigned,
            **self.counters,
            "fps": round(self.fps(), 2),
            "lag": self._lag,
            "uptime_s": round(time.time() - self.started_at, 1) if self.started_at else 0.0,
            "last_error": self.last_error,
            **self.extra_stats(),
        }
