"""Streams added and removed while a pipeline runs, through the compacted control topic.

``declare``/``withdraw`` write a stream's declaration or its tombstone (``vapipe streams add/remove``);
``declared`` folds the topic into the streams declared now (``vapipe streams list``); a running
``vapipe run --follow`` tails the topic with ``StreamCommands`` from where it stood when the run
started, and ``apply_stream_commands`` has its engine (Ray or Faust) start or stop a producer per command.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from kafka import TopicPartition
from kafka.errors import KafkaError

from cluster.clients import make_consumer, make_producer, send_record
from cluster.reading import read_all
from cluster.topics import create_topics
from pipeline.config import Settings
from pipeline.errors import BrokerError, DecodeError, SourceError
from pipeline.live import redact_url
from pipeline.sources import SourceSpec, parse_source
from pipeline.streams import StreamCommand, decode_stream_command, encode_stream_command

if TYPE_CHECKING:
    from actors.launcher import RunPlan

__all__ = ["declare", "withdraw", "declared", "StreamCommands", "ProducerHost", "apply_stream_commands"]

logger = logging.getLogger(__name__)


def _write(settings: Settings, commands: list[StreamCommand]) -> None:
    create_topics(settings.kafka, [settings.topics.streams])
    producer = make_producer(settings.kafka, enable_idempotence=True)
    try:
        futures = [send_record(producer, settings.topics.streams.name, encode_stream_command(c)) for c in commands]
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    except KafkaError as exc:
        raise BrokerError(f"stream command not written to {settings.kafka.bootstrap_servers}: {exc}") from None
    finally:
        producer.close()


def declare(settings: Settings, streams: dict[str, str]) -> None:
    """Declare streams (id -> source): a running ``vapipe run --follow`` starts a producer for each."""
    _write(settings, [StreamCommand(sid, source) for sid, source in streams.items()])


def withdraw(settings: Settings, stream_ids: list[str]) -> None:
    """Remove streams: a running ``vapipe run --follow`` stops each one's producer and its stream ends."""
    _write(settings, [StreamCommand(sid, None) for sid in stream_ids])


def declared(settings: Settings) -> dict[str, str]:
    """The streams declared now (id -> source with its password redacted), from the control topic."""
    create_topics(settings.kafka, [settings.topics.streams])
    state: dict[str, str | None] = {}
    for record in read_all(settings.kafka, settings.topics.streams.name, timeout_s=30):
        try:
            command = decode_stream_command(record.key, record.value)
        except DecodeError as exc:
            logger.warning("ignoring a record of %s: %s", settings.topics.streams.name, exc)
            continue
        state[command.stream_id] = command.source
    return {sid: redact_url(source) for sid, source in sorted(state.items()) if source is not None}


class StreamCommands:
    """Tails the control topic: the commands written after ``before`` (partition -> offset; default its end now)."""

    def __init__(self, settings: Settings, before: dict[int, int] | None = None) -> None:
        topic = settings.topics.streams.name
        create_topics(settings.kafka, [settings.topics.streams])
        self.consumer: Any = make_consumer(settings.kafka, group_id=None)
        tps = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [0])]
        self.consumer.assign(tps)
        ends = self.consumer.end_offsets(tps)
        for tp in tps:
            self.consumer.seek(tp, (before or {}).get(tp.partition, ends[tp]))

    @staticmethod
    def end(settings: Settings) -> dict[int, int]:
        """Where the control topic ends now (partition -> offset), to read what is written after."""
        create_topics(settings.kafka, [settings.topics.streams])
        consumer = make_consumer(settings.kafka, group_id=None)
        try:
            topic = settings.topics.streams.name
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [0])]
            return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
        finally:
            consumer.close()

    def poll(self) -> list[StreamCommand]:
        out = []
        for batch in self.consumer.poll(timeout_ms=0).values():
            for record in batch:
                try:
                    out.append(decode_stream_command(record.key, record.value))
                except DecodeError as exc:
                    logger.warning("ignoring a stream command: %s", exc)
        return out

    def close(self) -> None:
        self.consumer.close()


class ProducerHost(Protocol):
    """An engine's running workers, as far as stream commands go (Ray actors or Faust processes)."""

    def add_producer(self, settings: Settings, spec: SourceSpec, since_ms: int | None) -> None:
        """Start publishing one more stream."""
        ...

    def remove_producer(self, stream_id: str) -> bool:
        """End one stream: its producer publishes its end and finishes; False if none runs."""
        ...


def apply_stream_commands(
    settings: Settings, plan: RunPlan, workers: ProducerHost, commands: StreamCommands, since_ms: int | None
) -> None:
    """Start a producer for each stream declared since the last tick, and end each one removed."""
    running = {s.stream_id for s in plan.sources}
    for command in commands.poll():
        sid = command.stream_id
        if command.source is None:
            if workers.remove_producer(sid):
                logger.warning("stream %s removed: its producer ends the stream", sid)
            continue
        if sid in running:
            logger.warning("stream %s is already running: not added again", sid)
            continue
        try:
            spec = parse_source(command.source, stream_id=sid)
        except SourceError as exc:
            logger.error("stream %s not added: %s", sid, exc)
            continue
        plan.sources.append(spec)
        running.add(sid)
        workers.add_producer(settings, spec, None if spec.live else since_ms)
        logger.warning("stream %s added: %s", sid, spec.display)
