"""How long a count replica takes to restore its table, against a changelog with a long history.

``vapipe bench restore`` preloads the changelog with ``snapshots`` records over ``streams``
streams (each stream's snapshot rewritten again and again, as a camera that ran for days
leaves it before compaction), then restores the table partitions of one C partition three
ways, side by side in one run: the whole changelog from offset 0 (what every replica did
before), only the owned partition from offset 0, and the owned partition from a local
checkpoint plus a tail of new snapshots.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import TopicPartition

from actors.stages import CountWorker, read_table
from cluster.clients import make_consumer, make_producer
from cluster.topics import create_topics
from pipeline.codecs import encode_json
from pipeline.config import Settings
from pipeline.count_table import CountTable
from pipeline.messages import Detections, EndOfStream, FrameDetections, FrameMeta

__all__ = ["RestoreResult", "stream_snapshot", "preload_changelog", "restore_partition", "measure_restore"]

logger = logging.getLogger(__name__)


def stream_snapshot(settings: Settings, stream_id: str, frames: int, complete: bool = False) -> bytes:
    """A real count-table snapshot of a stream that applied ``frames`` frames (one car each), ended if ``complete``."""
    table = CountTable(settings.counting, settings.tracking)
    boxes = Detections(
        xyxy=np.asarray([[0, 0, 10, 10]], dtype=np.float32),
        confidence=np.asarray([0.9], dtype=np.float32),
        class_id=np.asarray([2], dtype=np.int64),
        labels=("car",),
    )
    for i in range(frames):
        table.apply(FrameDetections(FrameMeta(stream_id, i, 1000.0 + i, 64, 48), boxes, "bench", 0.0), now=1000.0 + i)
    if complete:
        table.end(EndOfStream(stream_id, frames), now=1000.0 + frames)
    return encode_json(table.snapshot(stream_id))


def preload_changelog(settings: Settings, snapshots: int, streams: int) -> dict[str, int]:
    """Write ``snapshots`` changelog records over ``streams`` streams; each stream's last one says it applied
    ``final_frames(stream)`` frames, every earlier one 1 frame. Returns stream id -> changelog partition."""
    create_topics(settings.kafka, [settings.topics.detections, settings.topics.counts_changelog])
    topic = settings.topics.counts_changelog.name
    ids = [f"soak-{i:02d}" for i in range(streams)]
    early = {sid: stream_snapshot(settings, sid, 1) for sid in ids}
    producer = make_producer(settings.kafka, linger_ms=50, batch_size=1024 * 1024)
    try:
        partition_of: dict[str, int] = {}
        last: dict[str, Any] = {}
        for n in range(snapshots - streams):
            sid = ids[n % streams]
            producer.send(topic, key=sid.encode(), value=early[sid])
        for sid in ids:
            last[sid] = producer.send(topic, key=sid.encode(), value=stream_snapshot(settings, sid, final_frames(sid)))
        producer.flush(timeout=300)
        for sid, future in last.items():
            partition_of[sid] = future.get(timeout=60).partition
        return partition_of
    finally:
        producer.close()


def final_frames(stream_id: str) -> int:
    """How many frames the preloaded table says a stream applied (distinct per stream)."""
    return 2 + int(stream_id.rsplit("-", 1)[-1])


def restore_partition(settings: Settings, partition: int, name: str = "count-bench") -> CountWorker:
    """A count worker that owns C partition ``partition`` only (assigned, no group), restored once."""
    worker = CountWorker(settings, name)
    worker.consumer = make_consumer(settings.kafka, group_id=None)
    worker.consumer.assign([TopicPartition(settings.topics.detections.name, partition)])
    worker.restore()
    return worker


@dataclass(frozen=True)
class RestoreResult:
    snapshots: int
    streams: int
    partition: int
    whole_s: float
    owned_s: float
    owned_records: int
    checkpoint_s: float
    tail_records: int

    def lines(self) -> list[str]:
        return [
            f"changelog: {self.snapshots} snapshots over {self.streams} streams; restoring C partition {self.partition}",
            f"  whole changelog from offset 0 (before):   {self.whole_s:7.2f} s",
            f"  owned partition from offset 0:            {self.owned_s:7.2f} s  ({self.owned_records} records)",
            f"  owned partition from checkpoint + tail:   {self.checkpoint_s:7.3f} s  ({self.tail_records} records)",
            f"  ratio whole / checkpoint: {self.whole_s / max(self.checkpoint_s, 1e-6):.0f}x",
        ]


def measure_restore(settings: Settings, snapshots: int = 300_000, streams: int = 10, tail: int = 1000) -> RestoreResult:
    """Preload, then time the three restores of the busiest partition in one run."""
    partition_of = preload_changelog(settings, snapshots, streams)
    partition = Counter(partition_of.values()).most_common(1)[0][0]
    t0 = time.perf_counter()
    read_table(settings)
    whole_s = time.perf_counter() - t0
    shutil.rmtree(CountWorker(settings, "count-bench").state_dir, ignore_errors=True)
    worker = restore_partition(settings, partition)
    owned_s, owned_records = worker.restore_s[-1], worker.counters["restore_records"]
    sid = next(s for s, p in partition_of.items() if p == partition)
    producer = make_producer(settings.kafka)
    try:
        value = stream_snapshot(settings, sid, final_frames(sid))
        for _ in range(tail):
            producer.send(settings.topics.counts_changelog.name, key=sid.encode(), value=value)
        producer.flush(timeout=60)
    finally:
        producer.close()
    worker.restore()
    assert worker.consumer is not None
    worker.consumer.close()
    tail_records = worker.counters["restore_records"] - owned_records
    return RestoreResult(snapshots, streams, partition, whole_s, owned_s, owned_records, worker.restore_s[-1], tail_records)
