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
  Faust recovers the table from that changelog on every partition assignment.
- The time-windowed moving count is a Faust hopping-window table (capture time),
  next to the frame-window moving count that the snapshot carries.

Delivery: Faust acks an event only after the agent has finished with it, flushes
its producer, then commits (at-least-once). A batch that fails ends the worker
process *before* its events are acked; the engine restarts it and it resumes at
the last commit. Faust's own exactly_once (a transaction per source partition)
crashes in faust-streaming 0.15.3, so this engine refuses it (see ``faust_guarantee``).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.loop import StageWorker
from actors.stages import CountWorker, CropWorker, InterWorker
from pipeline.codecs import Record, decode_json
from pipeline.config import Settings
from pipeline.errors import ConfigError, DecodeError

__all__ = ["FaustStage", "EventRecord", "CollectingProducer", "faust_guarantee", "settings_to_json", "settings_from_json"]

logger = logging.getLogger(__name__)

WORKERS: dict[str, type[StageWorker]] = {"inter": InterWorker, "crop": CropWorker, "count": CountWorker}

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
        raise ConfigError(f"processing_guarantee {wanted!r} has no Faust equivalent; Faust offers {sorted(FAUST_GUARANTEES)}") from None


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

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> _Sent:
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
            f"kafka.extra={sorted(settings.kafka.extra)}); use --engine ray for SSL/SASL or extra client settings")
    return [f"kafka://{h}" for h in settings.kafka.hosts()]


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
        source = self.topic(self.worker.input_topic)
        if stage == "count":
            self._build_tables(faust)
            self.app.agent(source, name=f"vapipe.{stage}")(self._count_agent)
        else:
            self.app.agent(source, name=f"vapipe.{stage}")(self._batch_agent)
        self.app.timer(0.5)(self._write_stats)

    # -- topics and tables ---------------------------------------------------
    def topic(self, name: str) -> Any:
        """A Faust topic that reads and writes raw bytes (no Faust codec, no pickle)."""
        if name not in self._topics:
            self._topics[name] = self.app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        return self._topics[name]

    def _build_tables(self, faust: Any) -> None:
        t = self.settings.topics
        if t.counts_changelog.partitions != t.detections.partitions:
            raise ConfigError(
                f"the Faust table needs topics.counts_changelog.partitions ({t.counts_changelog.partitions}) equal to "
                f"topics.detections.partitions ({t.detections.partitions}): Faust co-partitions a table with its source")
        changelog = self.app.topic(
            t.counts_changelog.name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
            partitions=t.counts_changelog.partitions, compacting=True, internal=False)
        self.table = self.app.Table("counts", key_type=bytes, value_type=bytes, default=None,
                                    partitions=t.detections.partitions, changelog_topic=changelog)
        cfg = self.settings.faust
        self.windowed = (
            self.app.Table("moving", key_type=str, value_type=int, default=int, partitions=t.detections.partitions)
            .hopping(cfg.window_s, cfg.window_step_s, expires=cfg.window_expires_s)
            .relative_to(lambda event: _capture_ts.get())
        )
        self._in_sync: dict[str, bytes | None] = {}
        self._windowed_view: dict[str, dict[str, int]] = {}

    # -- agents --------------------------------------------------------------
    async def _batch_agent(self, stream: Any) -> None:
        """InterConsumer and crop: a batch of events at a time, the worker's ``process`` in a thread."""
        cfg = getattr(self.settings, self.stage)
        async for events in stream.take_events(cfg.batch_size, within=cfg.poll_timeout_ms / 1000):
            records = [EventRecord.of(e) for e in events]
            try:
                # Detection and JPEG work block; a thread keeps Faust's heartbeats and fetches going.
                await asyncio.to_thread(self.worker.process, records)
                futures = [await self._send(topic, rec, partition) for topic, rec, partition in self.producer.take()]
                await asyncio.gather(*futures)
            except Exception as exc:
                self._die(exc, records)
            self._done(records)

    async def _count_agent(self, stream: Any) -> None:
        """Count: one event at a time, so every table write belongs to its own source partition."""
        counts_topic = self.settings.topics.counts.name
        changelog = self.settings.topics.counts_changelog.name
        async for event in stream.events():
            record = EventRecord.of(event)
            try:
                self._sync_from_table(record.key)
                self.worker.process([record])
                for topic, rec, partition in self.producer.take():
                    if topic == changelog:
                        self._put(rec)  # Faust writes the snapshot to the same changelog topic
                        continue
                    if topic == counts_topic:
                        self._window(rec)
                    await self._send(topic, rec, partition)
            except Exception as exc:
                self._die(exc, [record])
            self._done([record])

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
        w = self.worker
        w._dead_letters.clear()  # StageWorker keeps these for its own flush; Faust already sent them
        w.on_commit()
        with w._lock:
            w.counters["records_in"] += len(records)
            w._rate.append((time.monotonic(), w.counters["frames_in"]))
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
        self.worker.assigned = len(assigned)
        self.worker._lag = lag
        recovered = True
        if self.stage == "count":
            recovery = self.app.tables.recovery
            recovered = bool(getattr(recovery, "completed", None) and recovery.completed.is_set())
        self.worker.ready = bool(assigned) and not self.app.rebalancing and recovered
        out = self.worker.stats() | {
            "engine": "faust",
            "pid": os.getpid(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "crashed": self.crashed,
        }
        out["running"] = self.crashed is None and not self.stopped
        if self.stage == "count":
            out["latencies_ms"] = [round(v, 2) for v in self.worker.latencies_ms]  # type: ignore[attr-defined]
            out["moving_window"] = {"size_s": self.settings.faust.window_s, "step_s": self.settings.faust.window_step_s,
                                    "current": self._windowed_view}
        return out

    async def _write_stats(self) -> None:
        self._write_stats_now()

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
