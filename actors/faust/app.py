"""The three consumer stages as faust-streaming agents, one Faust app (= consumer group) per stage.

Thin shells again: each agent turns Faust events into the record shape the Ray
engine's stage workers take (``actors.stages``), calls the *same* worker's
``process`` (decode, detect/crop/count, dead-letter), and sends what the worker
would have produced through Faust's producer. Nothing of decode, detect, crop or
count is written twice; the topics and the message format are the Ray engine's.

- Values and keys travel as raw bytes (``value_serializer="raw"``); Faust never
  pickles or wraps a record, so a Ray stage can feed a Faust stage and back.
- The vehicle table is a Faust ``Table`` whose changelog *is* the Ray engine's
  compacted ``topics.counts_changelog`` (key = stream id, value = the counter's
  JSON snapshot), so ``vapipe counts`` and the run summary read both engines alike.
  Faust recovers the table from that changelog on every partition assignment, up to
  the last record a read_committed consumer receives (``actors.faust.recovery``: the
  Ray engine's transactions end a partition with a marker, which Faust waited for).
- The time-windowed moving count is a Faust hopping-window table (capture time),
  next to the frame-window moving count that the snapshot carries.

Delivery: at-least-once. An agent finishes an event only once everything it
produced, table changelog writes included, is acknowledged by the broker; Faust
acks it then and commits later. A batch that fails ends the worker process
*before* its events are acked; the engine restarts it and it resumes at the last
commit. Two faust-streaming behaviours would lose records, and are worked around
here: its pre-commit flush can return with table writes unsent
(``_keep_changelog_sends``), and after a rebalance it can skip records and commit
past them (``hold_faust_gaps``, ``SkippedRecords``). Faust's own exactly_once (a
transaction per source partition) crashes in faust-streaming 0.15.3, so this
engine refuses it (see ``faust_guarantee``).
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.faust.recovery import read_committed, recover_to_last_record, recovery_waiting
from actors.stages import WORKERS
from pipeline.codecs import Record, decode_json
from pipeline.config import Settings, TopicSpec
from pipeline.errors import BrokerError, ConfigError, DecodeError, PipelineError

__all__ = [
    "FaustStage",
    "EventRecord",
    "CollectingProducer",
    "SkippedRecords",
    "faust_guarantee",
    "hold_faust_gaps",
    "moving_changelog",
    "settings_to_json",
    "settings_from_json",
]

logger = logging.getLogger(__name__)


FAUST_GUARANTEES = {"at_least_once": "at_least_once"}
"""vapipe's processing_guarantee values the Faust engine runs, and Faust's name for each."""

FAUST_EXACTLY_ONCE_BROKEN = (
    "faust-streaming 0.15.3's processing_guarantee='exactly_once' crashes on partition assignment "
    "(KeyError in its assignor's group_for_topic; upstream issue faust-streaming/faust#440), "
    "so the Faust engine runs at_least_once only: add --set processing_guarantee=at_least_once, "
    "or use --engine ray for exactly-once"
)

_capture_ts: contextvars.ContextVar[float] = contextvars.ContextVar("vapipe_capture_ts", default=0.0)


def faust_guarantee(settings: Settings) -> str:
    """Faust's processing_guarantee for the configured one.

    Raises:
        ConfigError: a guarantee Faust does not offer.
    """
    wanted = str(settings.processing_guarantee)
    if wanted == "exactly_once":
        raise ConfigError(FAUST_EXACTLY_ONCE_BROKEN)
    try:
        return FAUST_GUARANTEES[wanted]
    except KeyError:
        raise ConfigError(
            f"processing_guarantee {wanted!r} has no Faust equivalent; Faust offers {sorted(FAUST_GUARANTEES)}"
        ) from None


def moving_changelog(settings: Settings) -> TopicSpec:
    """The changelog of the count stage's hopping-window table, under the name Faust gives it.

    The engine creates it before any worker starts. Left to Faust, each worker declares
    it on start-up, and a worker whose metadata predates the topic failed its first
    window write (``PartitionsMismatch``: 0 partitions) and had to be restarted.
    """
    source = settings.topics.detections
    return TopicSpec(
        name=f"{settings.group('count')}-moving-changelog",
        partitions=source.partitions,
        replication_factor=source.replication_factor,
        config={"cleanup.policy": "compact,delete", "retention.ms": str(int(settings.faust.window_expires_s * 1000))},
    )


def settings_to_json(settings: Settings) -> str:
    """Settings for a worker process, secrets included (``model_dump_json`` would mask them)."""
    data = settings.model_dump(mode="json")
    password = settings.kafka.sasl_password
    data["kafka"]["sasl_password"] = password.get_secret_value() if password is not None else None
    return json.dumps(data)


def settings_from_json(text: str) -> Settings:
    return Settings.model_validate(json.loads(text))


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


class _Sent:
    """What ``KafkaProducer.send`` returns, for the worker's bookkeeping; the real send happens later."""

    def get(self, timeout: float | None = None) -> None:
        return None


class CollectingProducer:
    """Stands in for the worker's KafkaProducer: ``process`` hands it records, the agent sends them with Faust."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Record, int | None]] = []

    def send(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> _Sent:
        self.sent.append((topic, Record(key=key, value=value, headers=tuple(headers or ())), partition))
        return _Sent()

    def take(self) -> list[tuple[str, Record, int | None]]:
        out, self.sent = self.sent, []
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Nothing buffered here: the agent awaits Faust's sends."""

    def close(self) -> None:
        """Nothing to close."""


def _broker_urls(settings: Settings) -> list[str]:
    if settings.kafka.security_protocol != "PLAINTEXT" or settings.kafka.extra:
        raise ConfigError(
            f"the Faust engine connects with PLAINTEXT only (kafka.security_protocol={settings.kafka.security_protocol!r}, "
            f"kafka.extra={sorted(settings.kafka.extra)}); use --engine ray for SSL/SASL or extra client settings"
        )
    return [f"kafka://{h}" for h in settings.kafka.hosts()]


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


class FaustStage:
    """One Faust worker of one stage: the Faust app, its agent, and the reused stage worker.

    Args:
        settings: the pipeline's settings (same as the Ray engine's).
        stage: ``inter``, ``crop`` or ``count``.
        name: worker name (``count-1``), also the Kafka client id.
        stats_path: JSON file rewritten every half second with this worker's stats.

    Example:
        >>> FaustStage(settings, "count", "count-0", Path("stats/count-0.json")).app.main()  # doctest: +SKIP
    """

    def __init__(self, settings: Settings, stage: str, name: str, stats_path: Path | None = None) -> None:
        import faust

        if stage not in WORKERS:
            raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(WORKERS)}")
        self.settings = settings
        self.stage = stage
        self.name = name
        self.stats_path = stats_path
        self.worker = WORKERS[stage](settings, name)
        self.producer = CollectingProducer()
        self.worker.producer = self.producer  # type: ignore[assignment]
        self.started_at = time.time()
        self.crashed: str | None = None
        self.stopped = False
        """Set once the Faust worker has shut down, for the last stats written."""
        self._positions: dict[int, int] = {}
        self._progress_at = time.monotonic()
        """When this worker last finished a batch, or last got partitions (for the stuck check)."""
        self._assigned_at: float | None = None
        self._revoked_at: float | None = None
        """When the group last gave this worker partitions and last took them (a rebalance starting)."""
        cfg = settings.faust
        detections = settings.topics.detections
        datadir = Path(settings.output_dir).resolve() / "faust-data" / name
        datadir.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            settings.group(stage),
            broker=_broker_urls(settings),
            broker_client_id=name,
            processing_guarantee=faust_guarantee(settings),
            web_enabled=False,
            datadir=str(datadir),
            store="memory://",
            key_serializer="raw",
            value_serializer="raw",
            topic_partitions=detections.partitions,
            topic_allow_declare=True,
            table_standby_replicas=cfg.standby_replicas,
            broker_commit_interval=cfg.commit_interval_s,
            # The same group liveness as the Ray engine's consumers (Faust's own default is 60 s).
            broker_session_timeout=settings.kafka.session_timeout_ms / 1000,
            broker_heartbeat_interval=settings.kafka.heartbeat_interval_ms / 1000,
            producer_linger_ms=settings.kafka.linger_ms,
            producer_compression_type=None if settings.kafka.compression_type == "none" else settings.kafka.compression_type,
            producer_max_request_size=settings.kafka.max_message_bytes,
            producer_acks=-1,
            consumer_max_fetch_size=settings.kafka.max_message_bytes,
            consumer_auto_offset_reset="earliest",
            broker_max_poll_records=getattr(settings, stage).batch_size * 4,
            stream_wait_empty=True,
        )
        self._topics: dict[str, Any] = {}
        hold_faust_gaps()
        read_committed()
        self.skips = SkippedRecords(settings, settings.group(stage), self.worker.input_topic)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        source = self.topic(self.worker.input_topic)
        if stage == "count":
            self._build_tables(faust)
            recover_to_last_record(self.app, settings.kafka)
            self.app.agent(source, name=f"vapipe.{stage}")(self._count_agent)
        else:
            self.app.agent(source, name=f"vapipe.{stage}")(self._batch_agent)
        self._stats_task: asyncio.Future[None] | None = None
        self.app.timer(0.5)(self._write_stats)  # starts the writer if no assignment has yet
        self.app.timer(5.0)(self._restart_if_stuck)
        self.app.on_partitions_assigned.connect(self._on_assigned)

    async def _on_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        self.skips.forget()
        self._revoked_at = time.monotonic()

    async def _on_assigned(self, app: Any, assigned: Any, **kwargs: Any) -> None:
        self._progress_at = time.monotonic()  # table recovery and the first fetch are not a stall
        self._assigned_at = self._progress_at
        self._start_stats()

    async def _restart_if_stuck(self) -> None:
        """End a worker that owns waiting records and has processed none for ``faust.stuck_after_s``.

        Seen once in CI: a count worker restarted after a SIGKILL processed one record, then
        nothing for four minutes with 133 records waiting, and logged nothing. The engine
        restarts the process and it resumes at the last commit, as after any failure; the
        tasks' stacks go to the worker's log, for finding the cause.
        """
        stats = self.stats()
        idle_s = time.monotonic() - self._progress_at
        if not stats["ready"] or not stats["lag"] or idle_s < self.settings.faust.stuck_after_s:
            return
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(limit=12, file=stacks)
        logger.error("%s: stuck, task stacks:\n%s", self.name, stacks.getvalue())
        self._die(PipelineError(f"no record processed for {idle_s:.0f}s with {stats['lag']} waiting"), [])

    # -- topics and tables ---------------------------------------------------
    def topic(self, name: str) -> Any:
        """A Faust topic that reads and writes raw bytes (no Faust codec, no pickle)."""
        if name not in self._topics:
            self._topics[name] = self.app.topic(
                name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
            )
        return self._topics[name]

    def _build_tables(self, faust: Any) -> None:
        t = self.settings.topics
        if t.counts_changelog.partitions != t.detections.partitions:
            raise ConfigError(
                f"the Faust table needs topics.counts_changelog.partitions ({t.counts_changelog.partitions}) equal to "
                f"topics.detections.partitions ({t.detections.partitions}): Faust co-partitions a table with its source"
            )
        changelog = self.app.topic(
            t.counts_changelog.name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=t.counts_changelog.partitions,
            compacting=True,
            internal=False,
        )
        self.table = self.app.Table(
            "counts",
            key_type=bytes,
            value_type=bytes,
            default=None,
            partitions=t.detections.partitions,
            changelog_topic=changelog,
        )
        cfg = self.settings.faust
        moving = moving_changelog(self.settings)
        assert moving.name == f"{self.app.conf.id}-moving-changelog"  # Faust's own name for the table's changelog
        self.windowed = (
            self.app.Table("moving", key_type=str, value_type=int, default=int, partitions=t.detections.partitions)
            .hopping(cfg.window_s, cfg.window_step_s, expires=cfg.window_expires_s)
            .relative_to(lambda event: _capture_ts.get())
        )
        self._changelog_sends: list[Any] = []
        self._keep_changelog_sends(self.table)
        self._keep_changelog_sends(self.windowed.table)
        self._in_sync: dict[str, bytes | None] = {}
        self._windowed_view: dict[str, dict[str, int]] = {}

    def _keep_changelog_sends(self, table: Any) -> None:
        """Keep the delivery future of every changelog write the table makes, for the agent to await.

        Faust buffers table writes (``send_soon``) and, before a commit, drains that
        buffer with ``ProducerBuffer.flush``, which gives up after 0.1 s without a
        send and never waits for the message it is sending. On a busy machine a
        commit could then pass an event whose table write was still unsent, and a
        worker killed right after lost that frame. Awaiting the writes before the
        event is acked closes the gap.
        """
        send_changelog = table.send_changelog

        def send_and_keep(*args: Any, **kwargs: Any) -> Any:
            fut = send_changelog(*args, **kwargs)
            self._changelog_sends.append(fut)
            return fut

        table.send_changelog = send_and_keep

    # -- agents --------------------------------------------------------------
    async def _batch_agent(self, stream: Any) -> None:
        """InterConsumer and crop: a batch of events at a time, the worker's ``process`` in a thread."""
        cfg = getattr(self.settings, self.stage)
        async for events in stream.take_events(cfg.batch_size, within=cfg.poll_timeout_ms / 1000):
            records = [EventRecord.of(e) for e in events]
            try:
                skipped, holes = await self._skipped_before(records)
                records = skipped + records
                # Detection and JPEG work block; a thread keeps Faust's heartbeats and fetches going.
                await asyncio.to_thread(self.worker.process, records)
                futures = [await self._send(topic, rec, partition) for topic, rec, partition in self.producer.take()]
                await asyncio.gather(*futures)
                await self._release(holes)
            except Exception as exc:
                self._die(exc, records)
            self._done(records)

    async def _count_agent(self, stream: Any) -> None:
        """Count: one event at a time, so every table write belongs to its own source partition."""
        counts_topic = self.settings.topics.counts.name
        changelog = self.settings.topics.counts_changelog.name
        async for event in stream.events():
            records = [EventRecord.of(event)]
            sends: list[Any] = []
            try:
                skipped, holes = await self._skipped_before(records)
                records = skipped + records  # all of one partition: the event's table writes go to its changelog partition
                for record in records:
                    self._sync_from_table(record.key)
                    self.worker.process([record])
                    for topic, rec, partition in self.producer.take():
                        if topic == changelog:
                            self._put(rec)  # Faust writes the snapshot to the same changelog topic
                            continue
                        if topic == counts_topic:
                            self._window(rec)
                        sends.append(await self._send(topic, rec, partition))
                sends += self._changelog_sends
                self._changelog_sends = []
                # Delivered before the event is acked, so no commit can pass an unwritten count.
                await asyncio.gather(*sends)
                await self._release(holes)
            except Exception as exc:
                self._die(exc, records)
            self._done(records)

    async def _skipped_before(self, records: list[EventRecord]) -> tuple[list[EventRecord], list[tuple[int, int, int]]]:
        if self.skips.advance(records):
            return [], []
        return await asyncio.to_thread(self.skips.find, records)  # reads Kafka: off the event loop

    async def _release(self, holes: list[tuple[int, int, int]]) -> None:
        """Let Faust commit past offsets whose records this agent read and processed itself."""
        if not holes:
            return
        from faust.types import TP

        consumer = self.app.consumer
        for partition, start, end in holes:
            await type(consumer).release_gap(consumer, TP(self.worker.input_topic, partition), start, end - 1)

    async def _send(self, topic: str, rec: Record, partition: int | None) -> Any:
        return await self.topic(topic).send(key=rec.key, value=rec.value, headers=list(rec.headers), partition=partition)

    # -- the table -----------------------------------------------------------
    def _sync_from_table(self, key: bytes | None) -> None:
        """Make the worker's counter hold the Table's state for this stream (the Table is the truth)."""
        if not key:
            return
        stream_id = key.decode("utf-8", "replace")
        raw = self.table.get(key)
        if stream_id in self._in_sync and self._in_sync[stream_id] is raw:
            return
        counter = self.worker.counter  # type: ignore[attr-defined]
        if raw is None:
            counter.streams.pop(stream_id, None)
        else:
            counter.restore(stream_id, decode_json(raw))
        self._in_sync[stream_id] = raw

    def _put(self, rec: Record) -> None:
        assert rec.key is not None and rec.value is not None
        self.table[rec.key] = rec.value
        self._in_sync[rec.key.decode("utf-8", "replace")] = rec.value

    def _window(self, rec: Record) -> None:
        """Add an applied frame's vehicles to the hopping-window table, at its capture time."""
        try:
            update = decode_json(rec.value)
        except DecodeError:
            return
        ts = float(update.get("capture_ts") or time.time())
        _capture_ts.set(ts)
        # The oldest hopping window that holds this frame: the vehicles of the last window_s seconds.
        last_window = self.windowed.table.window.earliest(ts)
        stream_id = str(update.get("stream_id"))
        view = self._windowed_view.setdefault(stream_id, {})
        for label, n in (update.get("in_frame") or {}).items():
            key = f"{stream_id}/{label}"
            self.windowed[key] += int(n)
            view[label] = int(self.windowed[key][last_window])

    # -- bookkeeping ---------------------------------------------------------
    def _done(self, records: list[EventRecord]) -> None:
        """Outputs are acknowledged (or buffered for Faust's pre-commit flush): publish the batch's effects."""
        self.worker.batch_done(records)  # its dead letters went out with the batch's other records
        self._progress_at = time.monotonic()
        for r in records:
            self._positions[r.partition] = max(self._positions.get(r.partition, -1), r.offset + 1)

    def _die(self, exc: Exception, records: list[EventRecord]) -> None:
        """End the process before Faust acks the failed events: the engine restarts it from the last commit."""
        where = ", ".join(sorted({f"{r.topic}[{r.partition}]@{r.offset}" for r in records})[:3])
        self.crashed = f"{type(exc).__name__}: {exc}"
        logger.error("%s: batch at %s failed, exiting so it is redelivered: %s", self.name, where, self.crashed, exc_info=exc)
        self.worker.last_error = self.crashed
        self._write_stats_now()
        os._exit(3)

    def _assignment(self) -> list[Any]:
        try:
            return [tp for tp in self.app.consumer.assignment() if tp.topic == self.worker.input_topic]
        except Exception:  # consumer not started yet
            return []

    def stats(self) -> dict[str, Any]:
        assigned = self._assignment()
        lag = 0
        for tp in assigned:
            try:
                high = self.app.consumer.highwater(tp)
            except Exception:
                high = None
            if high is not None and tp.partition in self._positions:  # a partition not read yet shows no lag
                lag += max(int(high) - self._positions[tp.partition], 0)
        self.worker.report_position(len(assigned), lag)
        recovered = True
        if self.stage == "count":
            recovery = self.app.tables.recovery
            recovered = bool(getattr(recovery, "completed", None) and recovery.completed.is_set())
        self.worker.ready = bool(assigned) and not self.app.rebalancing and recovered
        waiting, stuck = self._waiting(assigned, recovered)
        out = self.worker.stats() | {
            "engine": "faust",
            "pid": os.getpid(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "crashed": self.crashed,
            "skipped_read": self.skips.records_read,  # records Faust skipped, read back and processed
            "waiting": waiting,  # why it is not ready, in one line
            "stuck": stuck,  # set when it cannot become ready: the launcher stops waiting
        }
        out["running"] = self.crashed is None and not self.stopped
        if self.stage == "count":
            out["moving_window"] = {
                "size_s": self.settings.faust.window_s,
                "step_s": self.settings.faust.window_step_s,
                "current": self._windowed_view,
            }
        return out

    def _waiting(self, assigned: list[Any], recovered: bool) -> tuple[str | None, str | None]:
        """Why this worker is not ready, and why it cannot become ready, if it knows.

        It cannot when its table recovery has received nothing for ``faust.stuck_after_s``
        since the group last settled (Faust waited for a transaction marker forever, issue 19).
        A rebalance in progress is never stuck: it may wait on a member still loading its model.
        """
        if self.worker.ready:
            return None, None
        if not assigned:
            return f"no partition of {self.worker.input_topic} assigned yet", None
        if recovered:
            return "rebalancing", None
        state = recovery_waiting(self.app.tables.recovery)
        if state is None:
            return "table recovery starting", None
        reason, idle_s = state
        settled = self._assigned_at is not None and (self._revoked_at is None or self._revoked_at <= self._assigned_at)
        if not settled or min(idle_s, time.monotonic() - (self._assigned_at or 0.0)) < self.settings.faust.stuck_after_s:
            return reason, None
        return reason, f"{reason}; gave up after faust.stuck_after_s={self.settings.faust.stuck_after_s:.0f}s"

    async def _write_stats(self) -> None:
        self._start_stats()

    def _start_stats(self) -> None:
        """Write the stats every half second from now on, table recovery included.

        Faust starts an app's timers only once its first table recovery has completed
        (``App.on_started``), so a count worker whose recovery hung wrote no stats at all
        and the launcher could only say "not ready: count-0" (issue 19). The writer starts
        at the first partition assignment, which comes before recovery.
        """
        if self._stats_task is None:
            self._stats_task = asyncio.ensure_future(self._stats_loop())

    async def _stats_loop(self) -> None:
        while not self.stopped:
            self._write_stats_now()
            await asyncio.sleep(0.5)

    def _write_stats_now(self) -> None:
        if self.stats_path is None:
            return
        try:
            data = json.dumps(self.stats(), default=str)
        except Exception:  # stats must never break the worker
            logger.debug("stats failed", exc_info=True)
            return
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(data)
        tmp.replace(self.stats_path)
