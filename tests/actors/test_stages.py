"""Each stage worker run directly (no Ray) against the real broker, with the calibration or real model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from actors.producer import FrameProducer
from actors.stages import CountWorker, CropWorker, InterWorker, read_table
from cluster.clients import make_producer
from cluster.reading import read_all
from cluster.topics import create_topics
from pipeline.crop import load_index
from pipeline.sources import parse_source

pytestmark = pytest.mark.kafka


def _publish(settings, source: str, stream_id: str) -> dict:
    create_topics(settings.kafka, settings.topics.all())
    return FrameProducer(settings, parse_source(source, stream_id=stream_id)).run()


@pytest.mark.model
def test_stages_without_ray_count_every_frame_once(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=12)
    result = _publish(s, highway, "hw")
    assert result["frames_published"] == 12
    inter = InterWorker(s, "inter-0").run(max_messages=13, timeout_s=120)
    assert inter["frames_out"] == 12 and inter["end_of_streams"] == 1
    crop = CropWorker(s, "crop-0").run(max_messages=12, timeout_s=60)
    assert crop["frames_out"] == 12
    count = CountWorker(s, "count-0").run(max_messages=13, timeout_s=60)
    assert count["table"]["hw"]["frames_applied"] == 12 and count["table"]["hw"]["complete"]
    table = read_table(s)
    assert table["hw"]["frames_applied"] == 12 and table["hw"]["applied_watermark"] == 12
    index = load_index(Path(s.output_dir) / "crops")
    assert index and all(e["confidence"] > 0.7 for e in index.values())
    for entry in index.values():
        assert (Path(s.output_dir) / "crops" / entry["path"]).is_file()
        assert entry["path"].split("/")[0] == entry["label"]


def test_count_replica_restored_from_changelog_never_counts_twice(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=10, model__name="sleep:1ms")
    _publish(s, highway, "hw")
    InterWorker(s, "inter-0").run(max_messages=11, timeout_s=60)
    first = CountWorker(s, "count-0").run(max_messages=11, timeout_s=60)
    assert first["table"]["hw"]["frames_applied"] == 10
    # A replica in a fresh group re-reads all of C (a worst-case redelivery): the table must not move.
    replay = s.model_copy(update={"group_prefix": s.group_prefix + "-replay"})
    second = CountWorker(replay, "count-1").run(max_messages=11, timeout_s=60)
    assert second["restores"] >= 1
    assert second["duplicates"] == 10 and second["frames_out"] == 0
    assert read_table(s)["hw"]["frames_applied"] == 10


def test_poison_records_are_skipped_and_counted(make_settings, highway: str) -> None:
    s = make_settings(producer__max_frames=3, model__name="sleep:1ms")
    create_topics(s.kafka, s.topics.all())
    producer = make_producer(s.kafka)
    a = s.topics.frames.name
    producer.send(
        a,
        value=b"not a jpeg",
        headers=[
            ("vapipe-type", b"frame"),
            ("schema_version", b"1"),
            ("stream_id", b"x"),
            ("frame_index", b"0"),
            ("capture_ts", b"1.0"),
            ("width", b"2"),
            ("height", b"2"),
        ],
    )
    producer.send(a, value=b"\xff\xd8 no headers")
    producer.send(a, value=b"x", headers=[("vapipe-type", b"frame"), ("schema_version", b"99")])
    producer.send(s.topics.detections.name, key=b"x", value=b"{not json")
    producer.flush()
    producer.close()
    FrameProducer(s, parse_source(highway, stream_id="hw")).run()
    inter = InterWorker(s, "inter-0").run(max_messages=7, timeout_s=60)
    assert inter["poison"] == 3 and inter["dead_lettered"] == 3 and inter["frames_out"] == 3
    count = CountWorker(s, "count-0").run(max_messages=5, timeout_s=60)
    assert count["poison"] == 1 and count["dead_lettered"] == 1 and count["table"]["hw"]["frames_applied"] == 3
    poison_b = make_producer(s.kafka)
    poison_b.send(s.topics.detected_frames.name, value=b"junk", headers=[("vapipe-type", b"frame"), ("schema_version", b"1")])
    poison_b.flush()
    poison_b.close()
    crop = CropWorker(s, "crop-0").run(idle_timeout_s=5, timeout_s=60)
    assert crop["poison"] == 1 and crop["dead_lettered"] == 1 and crop["frames_out"] == 3
    dead = read_all(s.kafka, s.topics.dead_letter.name)
    assert len(dead) == 5
    by_value = {r.value: dict(r.headers) for r in dead}
    assert b"not a jpeg" in by_value and b"not a decodable image" in by_value[b"not a jpeg"]["vapipe-dlq-reason"]
    assert by_value[b"{not json"]["vapipe-dlq-stage"] == b"count"
    assert by_value[b"{not json"]["vapipe-dlq-origin"].startswith(s.topics.detections.name.encode() + b"/")
    assert b"unknown schema_version 99" in by_value[b"x"]["vapipe-dlq-reason"]


def test_crop_stage_holds_offsets_while_it_cannot_write_then_resumes(make_settings, highway: str, tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the output folder should be")
    s = make_settings(producer__max_frames=4, model__name="sleep:1ms", output_dir=str(blocker / "out"))
    _publish(s, highway, "hw")
    producer = make_producer(s.kafka)
    # Detections with one confident box per frame, so every frame needs a crop file.
    from pipeline.codecs import decode_frame, encode_detected_frame
    from pipeline.messages import Detections, FrameDetections

    box = Detections.from_records([{"label": "car", "class_id": 2, "confidence": 0.9, "box": [10, 10, 60, 60]}])
    for r in read_all(s.kafka, s.topics.frames.name):
        decoded = decode_frame(r.value, r.headers)
        if isinstance(decoded, tuple):
            meta, jpeg = decoded
            rec = encode_detected_frame(FrameDetections(meta, box), jpeg)
            producer.send(s.topics.detected_frames.name, key=rec.key, value=rec.value, headers=list(rec.headers))
    producer.flush()
    producer.close()
    worker = CropWorker(s, "crop-0")
    worker.max_backoff_s = 1.0
    fixer = threading.Timer(3.0, lambda: (blocker.unlink(), blocker.mkdir()))
    fixer.start()
    stats = worker.run(max_messages=4, timeout_s=60)
    fixer.join()
    assert stats["retries"] >= 1 and stats["frames_out"] == 4 and stats["last_error"] is None
    assert len(load_index(Path(s.output_dir) / "crops")) == 4


def test_producer_spreads_a_stream_over_every_partition_of_a_new_topic(make_settings, highway: str) -> None:
    # Regression: right after creating A, the producer's metadata listed only some partitions,
    # so whole replicas sat idle for a run.
    s = make_settings(producer__max_frames=30, model__name="sleep:1ms")
    _publish(s, highway, "hw")
    per_partition: dict[int, int] = {}
    for r in read_all(s.kafka, s.topics.frames.name):
        per_partition[r.partition] = per_partition.get(r.partition, 0) + 1
    assert sorted(per_partition) == list(range(s.topics.frames.partitions))
    assert {n for p, n in per_partition.items() if p != 0} == {5}  # 30 frames round-robin; EOS on 0
