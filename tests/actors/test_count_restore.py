"""A count replica restores only the changelog partitions it owns, from its checkpoint plus the tail."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from actors import stages
from actors.stages import CountWorker, prune_table, read_table
from bench.chaos import verify
from bench.restore import final_frames, preload_changelog, restore_partition, stream_snapshot
from cluster.clients import make_producer
from cluster.reading import read_all
from cluster.topics import check_copartitioned, create_topics
from pipeline.checkpoint import TableCheckpoint
from pipeline.codecs import decode_json, encode_detections
from pipeline.config import COMPACTED_STATE
from pipeline.errors import ConfigError
from tests.pipeline.traffic_sim import highway, render

pytestmark = pytest.mark.kafka


def test_restore_of_one_partition_reads_only_it_and_then_only_its_tail(make_settings) -> None:
    s = make_settings(counting__checkpoint_interval_s=3600)
    partition_of = preload_changelog(s, snapshots=300_000, streams=10)
    sizes = Counter(partition_of.values())
    partition = sizes.most_common(1)[0][0]
    mine = {sid for sid, p in partition_of.items() if p == partition}

    worker = restore_partition(s, partition)
    assert worker.restored_partitions == [partition]
    assert set(worker.counter.streams) == mine  # no stream of another partition
    for sid in mine:
        assert worker.counter.snapshot(sid)["frames_applied"] == final_frames(sid)  # the last snapshot won
    owned_records = worker.counters["restore_records"]
    # Only the owned partition was read: its share of the 300k records, not all of them.
    assert owned_records < 300_000
    assert owned_records >= (300_000 - 10) * len(mine) // 10
    print(
        f"\nrestore of C partition {partition} ({len(mine)} of 10 streams): {owned_records} records in {worker.restore_s[-1]:.2f}s"
    )

    # The restore left a checkpoint: the next one reads the tail after it, and the tail's tombstone deletes.
    gone, kept = sorted(mine)[0], sorted(mine)[-1]  # 10 streams over 6 partitions: the busiest has two or more
    producer = make_producer(s.kafka)
    try:
        producer.send(s.topics.counts_changelog.name, key=kept.encode(), value=stream_snapshot(s, kept, 40))
        producer.send(s.topics.counts_changelog.name, key=gone.encode(), value=None)
        producer.flush(timeout=30)
    finally:
        producer.close()
    worker.restore()
    assert worker.counters["restore_records"] - owned_records == 2
    print(f"restore from the checkpoint: 2 records in {worker.restore_s[-1]:.3f}s")
    assert worker.counter.snapshot(kept)["frames_applied"] == 40
    assert gone not in worker.counter.streams
    assert worker.consumer is not None
    worker.consumer.close()


def test_checkpoint_past_the_end_or_stale_is_ignored(make_settings) -> None:
    s = make_settings()
    partition_of = preload_changelog(s, snapshots=20, streams=2)
    sid, partition = next(iter(partition_of.items()))
    topic = s.topics.counts_changelog.name
    folder = CountWorker(s, "count-x").state_dir
    # A checkpoint of a topic deleted and recreated since: its offset is past the partition's end.
    TableCheckpoint(topic, partition, 10**9, {sid: {"bogus": 1}}).save(folder)
    worker = restore_partition(s, partition)
    assert worker.counter.snapshot(sid)["frames_applied"] == final_frames(sid)
    saved = json.loads((folder / f"{topic}-{partition}.checkpoint.json").read_text())
    assert saved["offset"] < 10**9 and saved["snapshots"][sid]["frames_applied"] == final_frames(sid)
    assert TableCheckpoint.load(folder, topic, partition, max_age_s=-1) is None  # older than allowed: ignored
    assert worker.consumer is not None
    worker.consumer.close()


def test_changelog_with_other_partition_count_fails_at_start_in_one_line(make_settings) -> None:
    s = make_settings(topics__counts_changelog__partitions=4)
    create_topics(s.kafka, s.topics.all())
    with pytest.raises(ConfigError, match=r"has 4 partitions and .* has 6: .*recreate"):
        check_copartitioned(s.kafka, s.topics.detections.name, s.topics.counts_changelog.name)
    worker = CountWorker(s, "count-0")
    try:
        with pytest.raises(ConfigError, match="as many partitions"):
            worker.start()
    finally:
        worker.close()


def test_counts_prune_tombstones_finished_unnamed_streams_only(make_settings) -> None:
    s = make_settings()
    create_topics(s.kafka, s.topics.all())
    rows = {"clip@r1": True, "clip@r2": False, "cam1": True}  # stream -> finished
    producer = make_producer(s.kafka)
    try:
        for sid, done in rows.items():
            producer.send(s.topics.counts_changelog.name, key=sid.encode(), value=stream_snapshot(s, sid, 3, complete=done))
        producer.flush(timeout=30)
    finally:
        producer.close()
    assert read_table(s)["clip@r1"]["complete"]
    assert prune_table(s) == ["clip@r1"]
    assert sorted(read_table(s)) == ["cam1", "clip@r2"]
    assert prune_table(s) == []


def test_the_broker_compacts_the_changelog_and_a_restore_after_it_reads_the_same_table(make_settings) -> None:
    """The changelog's own settings (``COMPACTED_STATE``) with its segments closed after 1 s instead of
    10 minutes: Kafka's log cleaner (which wakes every 15 s) drops the superseded snapshots, and a
    restore from offset 0 then reads far fewer records and gets every stream's last snapshot."""
    s = make_settings(counting__checkpoint_interval_s=0)
    spec = s.topics.counts_changelog
    config = COMPACTED_STATE | {"segment.ms": "1000", "min.cleanable.dirty.ratio": "0.01", "min.compaction.lag.ms": "0"}
    s = s.model_copy(
        update={"topics": s.topics.model_copy(update={"counts_changelog": spec.model_copy(update={"config": config})})}
    )
    partition_of = preload_changelog(s, snapshots=3000, streams=4)
    partition = Counter(partition_of.values()).most_common(1)[0][0]
    before = restore_partition(s, partition)
    read_before = before.counters["restore_records"]
    assert before.consumer is not None
    before.consumer.close()
    time.sleep(1.5)  # the segment holding the snapshots is now older than segment.ms: the next append rolls it
    sid = next(sid for sid, p in partition_of.items() if p == partition)
    producer = make_producer(s.kafka)
    try:
        producer.send(spec.name, key=sid.encode(), value=stream_snapshot(s, sid, final_frames(sid))).get(timeout=30)
    finally:
        producer.close()
    deadline = time.monotonic() + 90
    while True:
        after = restore_partition(s, partition)
        assert after.consumer is not None
        after.consumer.close()
        read_after = after.counters["restore_records"]
        if read_after < read_before // 10 or time.monotonic() > deadline:
            break
        time.sleep(3)
    print(f"\nchangelog partition {partition}: {read_before} records before compaction, {read_after} after")
    assert read_after < read_before // 10, "the log cleaner did not compact the changelog within 90 s"
    assert {sid: after.counter.snapshot(sid)["frames_applied"] for sid in after.counter.streams} == {
        sid: final_frames(sid) for sid, p in partition_of.items() if p == partition
    }


class _Killed(BaseException):
    """The replica's process dies (ray.kill): nothing after this line of its batch runs."""


def test_at_least_once_a_replica_killed_before_its_snapshot_lands_repeats_count_records_not_counts(
    make_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At least once, a count batch's records are acknowledged, then its snapshot is sent, then its
    offsets committed. A replica killed between the first two leaves records on the counts topic that
    no durable snapshot covers: its successor restores the table without those frames, applies them
    once (again), and sends their records again. The table is right; the counts topic holds the same
    record twice, which the judge must tell apart from a frame counted twice."""
    s = make_settings(processing_guarantee="at_least_once", count__batch_size=8, counting__checkpoint_interval_s=0)
    create_topics(s.kafka, s.topics.all())
    frames = render(highway(2, vehicles_per_direction=2, duration=8.0))[:20]
    sid = frames[0].meta.stream_id
    producer = make_producer(s.kafka)
    try:
        for frame in frames:
            rec = encode_detections(frame)
            producer.send(s.topics.detections.name, key=rec.key, value=rec.value, headers=list(rec.headers))
        producer.flush(timeout=30)
    finally:
        producer.close()

    real_send = stages.send_record

    def dies_before_the_snapshot(producer: Any, topic: str, record: Any, partition: int | None = None) -> Any:
        if topic == s.topics.counts_changelog.name:
            raise _Killed
        return real_send(producer, topic, record, partition)

    monkeypatch.setattr(stages, "send_record", dies_before_the_snapshot)
    with pytest.raises(_Killed):
        CountWorker(s, "count-0").run(timeout_s=30)
    monkeypatch.setattr(stages, "send_record", real_send)
    landed = {int(u["frame_index"]) for u in (decode_json(r.value) for r in read_all(s.kafka, s.topics.counts.name))}
    assert 0 < len(landed) <= 8 and sid not in read_table(s)  # the first batch's records, and no snapshot

    successor = CountWorker(s, "count-0").run(timeout_s=60, idle_timeout_s=3)
    assert successor["duplicates"] == 0  # nothing of the lost batch was in the table it restored
    row = verify(s, sid, len(frames))
    assert row["lost"] == 0 and row["frames_counted"] == len(frames), row
    assert row["duplicates_on_counts"] == len(landed), row  # the same records, sent twice
    assert row["counted_twice"] == 0 and row["table_frames_applied"] == len(frames), row  # counted once
