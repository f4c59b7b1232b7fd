"""The count stage's state as Faust tables: the vehicle table on the shared changelog, and a
hopping-window table of vehicles over capture time.

The vehicle table's changelog *is* the Ray engine's ``topics.counts_changelog`` (key = stream id,
value = the counter's JSON snapshot), so either engine reads the other's table. The stage
worker's counter stays the one place counting happens; ``CountTables`` keeps it in step with
the Faust table and hands back every changelog write, for the agent to await before it acks.

Restores: Faust already recovers only the table partitions assigned to a worker (it
co-partitions the table with C, checked below), and it gains the changelog's compaction settings
(``topics.counts_changelog.config``: the active segment closes every 10 minutes) like the Ray
engine does. It keeps no local checkpoint: the table's store is ``memory://``, so a worker
replays its partitions from their first offset; a ``rocksdb://`` store would keep offsets
locally (Faust's own checkpoint) but needs a native dependency the project does not ship.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any

from actors.stages import CountWorker
from pipeline.codecs import Record, decode_json
from pipeline.config import Settings, TopicSpec
from pipeline.errors import ConfigError, DecodeError

__all__ = ["CountTables", "moving_changelog"]

_capture_ts: contextvars.ContextVar[float] = contextvars.ContextVar("vapipe_capture_ts", default=0.0)


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


class CountTables:
    """The Faust ``Table`` of per-stream snapshots and the hopping-window table, for one count worker."""

    def __init__(self, app: Any, settings: Settings, worker: CountWorker) -> None:
        self.app = app
        self.settings = settings
        self.worker = worker
        self._build()

    def _build(self) -> None:
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
        self.changelog_sends: list[Any] = []
        self._keep_sends(self.table)
        self._keep_sends(self.windowed.table)
        self.in_sync: dict[str, bytes | None] = {}
        self.windowed_view: dict[str, dict[str, int]] = {}

    def _keep_sends(self, table: Any) -> None:
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
            self.changelog_sends.append(fut)
            return fut

        table.send_changelog = send_and_keep

    def sync(self, key: bytes | None) -> None:
        """Make the worker's counter hold the Table's state for this stream (the Table is the truth)."""
        if not key:
            return
        stream_id = key.decode("utf-8", "replace")
        raw = self.table.get(key)
        if stream_id in self.in_sync and self.in_sync[stream_id] is raw:
            return
        counter = self.worker.counter
        if raw is None:
            counter.streams.pop(stream_id, None)
        else:
            counter.restore(stream_id, decode_json(raw))
        self.in_sync[stream_id] = raw

    def put(self, rec: Record) -> None:
        assert rec.key is not None and rec.value is not None
        self.table[rec.key] = rec.value
        self.in_sync[rec.key.decode("utf-8", "replace")] = rec.value

    def put_outside_event(self, rec: Record, partition: int) -> None:
        """``put`` from a timer: Faust derives a write's changelog partition from the current event, and
        a timer has none, so write the store and send the changelog record to ``partition`` by hand."""
        assert rec.key is not None and rec.value is not None
        self.table.data[rec.key] = rec.value
        self.table.send_changelog(partition, rec.key, rec.value, key_serializer="raw", value_serializer="raw")
        self.in_sync[rec.key.decode("utf-8", "replace")] = rec.value

    def window(self, rec: Record) -> None:
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
        view = self.windowed_view.setdefault(stream_id, {})
        for label, n in (update.get("in_frame") or {}).items():
            key = f"{stream_id}/{label}"
            self.windowed[key] += int(n)
            view[label] = int(self.windowed[key][last_window])

    def take_sends(self) -> list[Any]:
        """The delivery futures of the changelog writes made since the last call."""
        out, self.changelog_sends = self.changelog_sends, []
        return out
