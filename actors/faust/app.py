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
(``tables.CountTables``), and after a rebalance it can skip records and commit
past them (``gaps.hold_faust_gaps``, ``gaps.SkippedRecords``). Faust's own exactly_once (a
transaction per source partition) crashes in faust-streaming 0.15.3, so this
engine refuses it (see ``faust_guarantee``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from actors.faust.gaps import EventRecord, SkippedRecords, hold_faust_gaps
from actors.faust.recovery import read_committed, recover_to_last_record, recovery_waiting
from actors.faust.tables import CountTables
from actors.stages import WORKERS, CountWorker
from pipeline.codecs import Record
from pipeline.config import KafkaConfig, Settings
from pipeline.errors import ConfigError, PipelineError

__all__ = ["FaustStage", "CollectingProducer", "faust_guarantee", "settings_to_json", "settings_from_json"]

logger = logging.getLogger(__name__)


FAUST_GUARANTEES = {"at_least_once": "at_least_once"}
"""vapipe's processing_guarantee values the Faust engine runs, and Faust's name for each."""

FAUST_EXACTLY_ONCE_BROKEN = (
    "faust-streaming 0.15.3's processing_guarantee='exactly_once' crashes on partition assignment "
    "(KeyError in its assignor's group_for_topic; upstream issue faust-streaming/faust#440), "
    "so the Faust engine runs at_least_once only: add --set processing_guarantee=at_least_once, "
    "or use --engine ray for exactly-once"
)


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


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reveal(v) for v in value]
    return value


def settings_to_json(settings: Settings) -> str:
    """Settings for a worker process, secrets included (``model_dump_json`` would mask them); the
    engine writes them to a file only its user can read (0600), never on a command line."""
    return json.dumps(_reveal(settings.model_dump(mode="python")), default=str)


def settings_from_json(text: str) -> Settings:
    return Settings.model_validate(json.loads(text))


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
    if settings.kafka.extra:
        raise ConfigError(
            f"the Faust engine cannot pass kafka.extra={sorted(settings.kafka.extra)} to aiokafka; "
            "use the typed kafka settings or --engine ray"
        )
    return [f"kafka://{h}" for h in settings.kafka.hosts()]


def broker_credentials(kafka: KafkaConfig) -> Any:
    """The typed kafka settings (TLS, SASL/SCRAM, mTLS) as Faust credentials for aiokafka; None for PLAINTEXT."""
    import ssl

    import faust

    from cluster.clients import client_kwargs

    if kafka.security_protocol == "PLAINTEXT":
        return None
    kwargs = client_kwargs(kafka)  # the same checks and password file as the Ray engine's clients
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kwargs["ssl_cafile"])
        context.check_hostname = kafka.ssl_check_hostname
        if kwargs["ssl_certfile"]:
            context.load_cert_chain(kwargs["ssl_certfile"], kwargs["ssl_keyfile"])
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=kwargs["sasl_plain_username"],
        password=kwargs["sasl_plain_password"],
        ssl_context=context,
        mechanism=kafka.sasl_mechanism,
    )


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
        self.settings = settings = settings.for_role(stage)  # type: ignore[arg-type]  # inter, crop or count
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
            broker_credentials=broker_credentials(settings.kafka),
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
            # Every table is declared below, before the worker starts: no second's wait for late ones.
            TableManager="actors.faust.prompt:TableManager",
        )
        self._topics: dict[str, Any] = {}
        hold_faust_gaps()
        read_committed()
        self.skips = SkippedRecords(settings, settings.group(stage), self.worker.input_topic)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        source = self.topic(self.worker.input_topic)
        self.count_tables: CountTables | None = None
        if stage == "count":
            assert isinstance(self.worker, CountWorker)
            self.count_tables = CountTables(self.app, settings, self.worker)
            recover_to_last_record(self.app, settings.kafka)
            self.app.agent(source, name=f"vapipe.{stage}")(self._count_agent)
        else:
            self.app.agent(source, name=f"vapipe.{stage}")(self._batch_agent)
        self._stream_partitions: dict[str, int] = {}
        """The partition of C (and of the changelog, co-partitioned) each counted stream came on."""
        if stage == "count" and settings.tracking.enabled:
            self.app.timer(max(settings.tracking.reorder_wait_s / 2, 0.05))(self._idle_flush)
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
        tables = self.count_tables
        assert tables is not None
        async for event in stream.events():
            records = [EventRecord.of(event)]
            sends: list[Any] = []
            try:
                skipped, holes = await self._skipped_before(records)
                records = skipped + records  # all of one partition: the event's table writes go to its changelog partition
                for record in records:
                    tables.sync(record.key)
                    if record.key:
                        self._stream_partitions[record.key.decode("utf-8", "replace")] = record.partition
                    self.worker.process([record])
                    for topic, rec, partition in self.producer.take():
                        if topic == changelog:
                            tables.put(rec)  # Faust writes the snapshot to the same changelog topic
                            continue
                        if topic == counts_topic:
                            tables.window(rec)
                        sends.append(await self._send(topic, rec, partition))
                sends += tables.take_sends()
                # Delivered before the event is acked, so no commit can pass an unwritten count.
                await asyncio.gather(*sends)
                await self._release(holes)
            except Exception as exc:
                self._die(exc, records)
            self._done(records)

    async def _idle_flush(self) -> None:
        """The Ray shell's ``CountWorker.on_idle`` for Faust: apply the frames of this worker's streams that
        waited ``tracking.reorder_wait_s`` for a missing one while no record came to carry them.

        Only streams whose partition this worker holds now, each synced from the Table first (the Table
        is the truth); the snapshots go to each stream's own changelog partition. Runs between events on
        the event loop, so it never interleaves with the count agent's synchronous work.
        """
        worker, tables = self.worker, self.count_tables
        assert isinstance(worker, CountWorker) and tables is not None
        if self.app.rebalancing:
            return
        held = {tp.partition for tp in self._assignment()}
        worker.owned = {sid for sid in worker.owned if self._stream_partitions.get(sid) in held}
        if not worker.counter.overdue(worker.owned, time.time()):
            return
        changelog = self.settings.topics.counts_changelog.name
        try:
            for sid in worker.owned:
                tables.sync(sid.encode())
            worker.process([])
            sends = []
            for topic, rec, partition in self.producer.take():
                if topic == changelog:
                    assert rec.key is not None
                    tables.put_outside_event(rec, self._stream_partitions[rec.key.decode("utf-8", "replace")])
                else:
                    sends.append(await self._send(topic, rec, partition))
            await asyncio.gather(*sends, *tables.take_sends())
        except Exception as exc:
            self._die(exc, [])

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
                "current": self.count_tables.windowed_view if self.count_tables is not None else {},
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
        # Ends when the app stops (the worker writes the last stats): a task left running held the
        # worker's exit for a second (mode waits for every task before closing its loop).
        while not self.stopped and not self.app.should_stop:
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
