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
    # C: the poison record, the skip marker the InterConsumer sent for stream x's frame 0, 3 frames, end of stream.
    count = CountWorker(s, "count-0").run(max_messages=6, timeout_s=60)
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


class ManyBoxes:
    """Finds nothing, except ``boxes`` boxes in frames ``size`` wide: a frame whose B record is too large."""

    name = "many-boxes"

    def __init__(self, width: int, boxes: int) -> None:
        self.width, self.boxes = width, boxes

    def detect(self, images: list) -> list:
        import numpy as np

        from pipeline.messages import Detections

        out = []
        for image in images:
            n = self.boxes if image.shape[1] == self.width else 0
            out.append(
                Detections(
                    xyxy=np.tile(np.asarray([[1.5, 2.5, 30.5, 40.5]], np.float32), (n, 1)),
                    confidence=np.full(n, 0.875, np.float32),
                    class_id=np.full(n, 2, np.int64),
                    labels=("car",) * n,
                )
            )
        return out


def test_every_poison_record_is_dead_lettered_once_and_the_stream_still_completes(make_settings) -> None:
    import json

    import numpy as np

    from pipeline.codecs import encode_end_of_stream, encode_frame, encode_jpeg
    from pipeline.messages import EndOfStream, FrameMeta
    from tests.pipeline.helpers import gradient_image
    from tests.pipeline.test_codecs import jpeg_declaring, png_bomb

    s = make_settings(kafka__max_message_bytes=256 * 1024)
    create_topics(s.kafka, s.topics.all())
    good = encode_jpeg(gradient_image(48, 64))
    noise = encode_jpeg(np.random.default_rng(5).integers(0, 256, (240, 320, 3), dtype=np.uint8), 95)
    assert 50_000 < len(noise) < 200_000  # fits A, but not with 3000 boxes in B's detections header

    def frame(index: int, value: bytes, width: int = 64, height: int = 48, **forged: bytes) -> tuple:
        rec = encode_frame(FrameMeta("hw", index, 1000.0 + index, width, height), value)
        headers = [(k, forged.get(k, v)) for k, v in rec.headers]
        return rec.key, value, headers

    a_records = [
        frame(0, good),
        frame(1, png_bomb(), 20000, 20000),  # a decompression bomb: never decoded
        frame(2, b"GIF89a not a jpeg"),
        frame(3, jpeg_declaring(20000, 20000)),  # a JPEG bomb whose headers claim 64x48
        frame(4, good, capture_ts=b"nan"),  # forged header: still placeable, so its gap closes
        frame(5, noise, 320, 240),  # its B record (3000 boxes) is above the 256 KB limit
        frame(6, good),
        frame(7, good),
        (b"hw/x", good, None),  # no headers at all: dead-lettered, no gap to close
    ]
    producer = make_producer(s.kafka)
    for i, (key, value, headers) in enumerate(a_records):
        producer.send(s.topics.frames.name, key=key, value=value, headers=headers, partition=i % 6)
    eos = encode_end_of_stream(EndOfStream("hw", frames_published=8))
    producer.send(s.topics.frames.name, key=eos.key, value=eos.value, headers=list(eos.headers), partition=0)
    producer.send(s.topics.detections.name, key=b"hw", value=b"[" * 100000)  # deep JSON on C
    deep_b = frame(6, good)[2] + [("model", b"m"), ("detections", b"[" * 100000)]
    producer.send(s.topics.detected_frames.name, key=b"hw/6", value=good, headers=deep_b)
    producer.flush()
    producer.close()

    inter = InterWorker(s, "inter-0", detector=ManyBoxes(320, 3000)).run(max_messages=10, timeout_s=60)
    assert inter["records_in"] == 10 and inter["frames_out"] == 3 and inter["retries"] == 0
    assert inter["dead_lettered"] == 6 and inter["skip_markers"] == 5
    count = CountWorker(s, "count-0").run(max_messages=10, timeout_s=60)  # 3 frames, 5 markers, EOS, deep JSON
    assert count["dead_lettered"] == 1 and count["retries"] == 0 and count["skip_markers"] == 5
    table = read_table(s)["hw"]
    assert table["complete"] and table["frames_applied"] == 3
    assert table["frames_skipped"] == {"poison": 4, "too_large": 1}
    assert table["applied_watermark"] == 8 and table["applied_runs"] == []
    crop = CropWorker(s, "crop-0").run(max_messages=4, timeout_s=60)
    assert crop["dead_lettered"] == 1 and crop["frames_out"] == 3 and crop["retries"] == 0
    dead = read_all(s.kafka, s.topics.dead_letter.name)
    reasons = sorted((dict(r.headers)["vapipe-dlq-stage"].decode(), dict(r.headers)["vapipe-dlq-error"].decode()) for r in dead)
    assert reasons == [("count", "DecodeError"), ("crop", "DecodeError")] + [("inter", "DecodeError")] * 5 + [
        ("inter", "RecordTooLargeError")
    ]
    too_large = next(r for r in dead if dict(r.headers)["vapipe-dlq-error"] == b"RecordTooLargeError")
    assert too_large.value == noise and b"above kafka.max_message_bytes" in dict(too_large.headers)["vapipe-dlq-reason"]
    markers = [json.loads(r.value) for r in read_all(s.kafka, s.topics.detections.name) if b'"skipped"' in (r.value or b"")]
    assert sorted(m["frame_index"] for m in markers) == [1, 2, 3, 4, 5]


def test_a_commit_that_timed_out_after_landing_does_not_run_the_batch_twice(make_settings, highway: str) -> None:
    from collections import Counter

    from kafka.errors import KafkaTimeoutError

    from pipeline.codecs import decode_detections
    from pipeline.messages import FrameDetections

    s = make_settings(producer__max_frames=6, model__name="sleep:1ms")
    _publish(s, highway, "hw")
    worker = InterWorker(s, "inter-0")
    worker.max_backoff_s = 0.5
    complete = worker.delivery.complete
    timed_out: list[int] = []

    def lands_then_times_out(consumer, records, futures) -> None:
        complete(consumer, records, futures)  # the transaction and its offsets are committed...
        if not timed_out:
            timed_out.append(len(records))
            raise KafkaTimeoutError("commit acknowledgement timed out")  # ...but this replica never hears it

    worker.delivery.complete = lands_then_times_out  # type: ignore[method-assign]
    stats = worker.run(idle_timeout_s=3, timeout_s=60)
    assert timed_out and stats["retries"] == 1
    on_c = Counter(
        item.meta.frame_index
        for item in (decode_detections(r.value) for r in read_all(s.kafka, s.topics.detections.name))
        if isinstance(item, FrameDetections)
    )
    # Before: the worker seeked back to the batch's first offsets and published the batch again.
    assert on_c == Counter(range(6))
