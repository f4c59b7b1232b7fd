"""The three consumer stages as plain classes: InterConsumer (YOLO), crop, count.

Each is a thin shell: decode with ``pipeline.codecs``, call the core
(``pipeline.detector``, ``pipeline.crop``, ``pipeline.counting``), produce, and
let ``StageWorker`` commit. ``actors.launcher`` makes them Ray actors.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import MessageSizeTooLargeError

from actors.failures import classify
from actors.worker import StageWorker
from cluster.clients import send_record
from cluster.reading import read_all
from pipeline.codecs import (
    DecodeLimits,
    Record,
    decode_detected_frame,
    decode_detections,
    decode_frame,
    decode_jpeg,
    decode_json,
    encode_detected_frame,
    encode_detections,
    encode_json,
    encode_skipped,
    frame_position,
    record_size,
)
from pipeline.count_table import CountTable
from pipeline.crop import CropSink, crop_detections
from pipeline.detector import Detector, make_detector
from pipeline.errors import DecodeError, RecordTooLargeError
from pipeline.messages import EndOfStream, FrameDetections, FrameMeta, SkippedFrame, SkipReason
from pipeline.stats import LatencyHistogram

__all__ = ["InterWorker", "CropWorker", "CountWorker", "WORKERS", "read_table"]

logger = logging.getLogger(__name__)


class InterWorker(StageWorker):
    """Consumes frames from A, detects in batches, publishes to B (frame + boxes) and C (boxes)."""

    stage = "inter"
    input_topic_attr = "frames"

    def __init__(self, *args: Any, detector: Detector | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.detector = detector
        self.counters.update(detections=0, end_of_streams=0)
        self.inference_s = 0.0

    def setup(self) -> None:
        if self.detector is None:
            self.detector = make_detector(self.settings.model)
        load = getattr(self.detector, "load", None)
        if load is not None:
            load()

    def process(self, records: list[Any]) -> list[Any]:
        assert self.producer is not None and self.detector is not None
        topics = self.settings.topics
        frames: list[tuple[Any, tuple[FrameMeta, bytes, Any]]] = []
        futures: list[Any] = []
        for record in records:
            decoded = self.decode_or_skip(record, self._decode)
            if decoded is None:
                continue
            if isinstance(decoded, EndOfStream):
                self.counters["end_of_streams"] += 1
                futures.append(send_record(self.producer, topics.detections.name, encode_detections(decoded)))
                continue
            frames.append((record, decoded))
        if frames:
            t0 = time.perf_counter()
            results = self.detector.detect([image for _, (_, _, image) in frames])
            elapsed = time.perf_counter() - t0
            self.inference_s += elapsed
            per_frame_ms = elapsed * 1000 / len(frames)
            limit = self.settings.kafka.max_message_bytes
            for (record, (meta, jpeg, _)), detections in zip(frames, results, strict=True):
                self.counters["frames_in"] += 1
                result = FrameDetections(meta, detections, model=self.detector.name, inference_ms=per_frame_ms)
                detected = encode_detected_frame(result, jpeg)
                size = record_size(detected)
                if size > limit:  # would fail on every retry: a permanent failure of this record
                    self.give_up(
                        record,
                        RecordTooLargeError(
                            f"frame {meta.key} with {len(detections)} detections makes a {size}-byte record on "
                            f"{topics.detected_frames.name}, above kafka.max_message_bytes={limit}"
                        ),
                    )
                    continue
                futures.append(send_record(self.producer, topics.detected_frames.name, detected))
                futures.append(send_record(self.producer, topics.detections.name, encode_detections(result)))
                self.counters["detections"] += len(detections)
                self.counters["frames_out"] += 1
        return futures

    def give_up(self, record: Any, exc: Exception) -> None:
        """Dead-letter a record that failed permanently after decoding, if the error policy allows."""
        self.counters["poison"] += 1
        if not self.on_error(exc, record):
            raise exc
        self.dead_letter(record, exc)

    def dead_letter(self, record: Any, exc: Exception) -> None:
        """Dead-letter the frame and, when its headers still say which it was, tell the count stage
        (a skipped marker on C) that this frame index will never come, so its gap closes at once."""
        super().dead_letter(record, exc)
        position = frame_position(record.headers)
        if position is None:
            return
        assert self.producer is not None
        reason: SkipReason = "too_large" if isinstance(exc, RecordTooLargeError | MessageSizeTooLargeError) else "poison"
        marker = encode_skipped(SkippedFrame(position[0], position[1], reason))
        self.dead_letters.follow(send_record(self.producer, self.settings.topics.detections.name, marker))
        self.counters["skip_markers"] += 1

    def _decode(self, record: Any) -> tuple[FrameMeta, bytes, Any] | EndOfStream:
        decoded = decode_frame(record.value, record.headers, self.limits)
        if isinstance(decoded, EndOfStream):
            return decoded
        meta, jpeg = decoded
        return meta, jpeg, decode_jpeg(jpeg, self.limits, expect=(meta.width, meta.height))

    def extra_stats(self) -> dict[str, Any]:
        return {"model": getattr(self.detector, "name", None), "inference_s": round(self.inference_s, 3)}


class CropWorker(StageWorker):
    """Consumes B and writes every box above the crop threshold under ``<output>/crops/<label>/``."""

    stage = "crop"
    input_topic_attr = "detected_frames"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crops_by_label: Counter[str] = Counter()
        self._pending_crops: Counter[str] = Counter()
        self.sink = CropSink(
            Path(self.settings.output_dir) / "crops", writer=self.name, jpeg_quality=self.settings.crops.jpeg_quality
        )

    def process(self, records: list[Any]) -> list[Any]:
        for record in records:
            decoded = self.decode_or_skip(record, self._decode)
            if decoded is None:
                continue
            result, image = decoded
            crops = crop_detections(image, result.detections, self.settings.crops.min_confidence)
            self.sink.write(result.meta, crops)
            self._pending_crops.update(c.label for c in crops)
            self.counters["frames_in"] += 1
            self.counters["frames_out"] += 1
        return []

    def _decode(self, record: Any) -> tuple[FrameDetections, Any] | None:
        decoded = decode_detected_frame(record.value, record.headers, self.limits)
        if isinstance(decoded, EndOfStream):
            return None  # end markers on B carry nothing to crop
        result, jpeg = decoded
        return result, decode_jpeg(jpeg, self.limits, expect=(result.meta.width, result.meta.height))

    def on_commit(self) -> None:
        self.crops_by_label.update(self._pending_crops)
        self._pending_crops.clear()

    def on_rewind(self) -> None:
        self._pending_crops.clear()

    def extra_stats(self) -> dict[str, Any]:
        return {"crops": dict(self.crops_by_label)}


def read_table(settings: Any) -> dict[str, dict[str, Any]]:
    """The whole count table (every stream's last snapshot), read from the changelog topic."""
    table: dict[str, dict[str, Any]] = {}
    # Snapshots are our own records: read any that fit a record, so the oversized ones an older
    # vapipe wrote (a flat applied list, up to the record limit) still restore, into ranges.
    decoding = settings.decoding.model_dump() | {
        "max_json_bytes": max(settings.decoding.max_json_bytes, settings.kafka.max_message_bytes)
    }
    limits = DecodeLimits(**decoding)
    for r in read_all(settings.kafka, settings.topics.counts_changelog.name, settled=True):
        key = r.key.decode(errors="replace") if r.key else ""
        if r.value is None:
            table.pop(key, None)
            continue
        try:
            table[key] = decode_json(r.value, limits)
        except DecodeError as exc:
            logger.warning("ignoring a bad changelog record %s: %s", key, exc)
    return table


class CountWorker(StageWorker):
    """Consumes C (keyed by stream) and keeps the vehicle table, backed by a compacted changelog.

    On every partition assignment the table is re-read from the changelog, so a
    restarted or rebalanced replica resumes from the last committed state. The
    snapshot of each touched stream is written (and acknowledged) before the
    input offsets are committed, and the snapshot records which frames were
    applied, so a redelivered frame is never counted twice.
    """

    stage = "count"
    input_topic_attr = "detections"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter = CountTable(self.settings.counting, self.settings.tracking)
        self.owned: set[str] = set()
        """Streams this replica applied frames of since its last restore: the only ones it may flush when idle."""
        self.counters.update(duplicates=0, restores=0)
        self.latency = LatencyHistogram()
        """Capture to count applied, every frame this replica counted (bounded, mergeable)."""
        self.last_applied_ts: float | None = None

    def subscribe(self) -> None:
        assert self.consumer is not None
        worker = self

        class Restore(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                pass

            def on_partitions_assigned(self, assigned: Any) -> None:
                try:
                    worker.restore()
                except Exception as exc:  # the broker restarting: restore before the next batch instead
                    if classify(exc) != "transient":
                        raise
                    logger.warning("%s: table restore failed (%s); retrying before the next batch", worker.name, exc)
                    worker.counter.streams.clear()
                    worker.restore_pending()

        self.consumer.subscribe([self.input_topic], listener=Restore())

    def on_rewind(self) -> None:
        # The failed batch may have changed the table in memory only: go back to what is durable.
        self.counter.streams.clear()
        self.restore()

    def restore(self) -> None:
        self.owned.clear()
        for stream_id, snapshot in read_table(self.settings).items():
            try:
                self.counter.restore(stream_id, snapshot)
            except DecodeError as exc:  # a bad snapshot must not stop the stage on every restart
                logger.error("%s: ignoring the changelog snapshot of %r: %s", self.name, stream_id, exc)
        self.counters["restores"] += 1

    def process(self, records: list[Any]) -> list[Any]:
        assert self.producer is not None
        topics = self.settings.topics
        touched: set[str] = set()
        futures: list[Any] = []
        now = time.time()
        for record in records:
            item = self.decode_or_skip(record, lambda r: decode_detections(r.value, self.limits))
            if item is None:
                continue
            if isinstance(item, EndOfStream):
                traffic = self.counter.end(item, now)
                touched.add(item.stream_id)
                futures += self._send_traffic(traffic)
                continue
            if isinstance(item, SkippedFrame):
                if self.counter.skip(item):
                    self.counters["skip_markers"] += 1
                    touched.add(item.stream_id)
                continue
            self.counters["frames_in"] += 1
            update, traffic = self.counter.apply(item, now)
            if update is None:
                self.counters["duplicates"] += 1
                continue
            touched.add(update.stream_id)
            self.owned.add(update.stream_id)
            self.counters["frames_out"] += 1
            self.latency.record((now - update.capture_ts) * 1000)
            self.last_applied_ts = now
            rec = Record(key=update.stream_id.encode(), value=encode_json(update.to_dict()))
            futures.append(send_record(self.producer, topics.counts.name, rec))
            futures += self._send_traffic(traffic)
        if not records:  # an idle flush (on_idle): frames that waited too long for a missing one
            traffic = self.counter.due(self.owned, now)
            touched.update(u.stream_id for u in traffic)
            futures += self._send_traffic(traffic)
        for stream_id in sorted(touched):
            snap = Record(key=stream_id.encode(), value=encode_json(self.counter.snapshot(stream_id)))
            futures.append(send_record(self.producer, topics.counts_changelog.name, snap))
        return futures

    def _send_traffic(self, updates: list[Any]) -> list[Any]:
        """Tracking updates go to the counts topic too, as ``"type": "traffic"`` records."""
        assert self.producer is not None
        topic = self.settings.topics.counts.name
        return [
            send_record(self.producer, topic, Record(key=u.stream_id.encode(), value=encode_json(u.to_dict()))) for u in updates
        ]

    def on_idle(self) -> None:
        """No record came: apply frames of owned streams that waited ``tracking.reorder_wait_s`` for a missing one."""
        if self.counter.overdue(self.owned, time.time()):
            self.handle([])

    def extra_stats(self) -> dict[str, Any]:
        return {
            "table": self.counter.table(),
            "latency_ms": self.latency.summary(),
            "latency_histogram": self.latency.to_dict(),
            "last_applied_ts": self.last_applied_ts,
        }


WORKERS: dict[str, type[StageWorker]] = {"inter": InterWorker, "crop": CropWorker, "count": CountWorker}
"""Stage name -> worker class, for every engine's shell."""
