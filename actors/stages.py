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

from actors.worker import StageWorker
from cluster.clients import make_producer, send_record
from cluster.reading import read_all, read_partitions
from cluster.topics import check_copartitioned
from pipeline.checkpoint import TableCheckpoint
from pipeline.codecs import (
    DecodeLimits,
    Record,
    check_jpeg,
    decode_detected_frame,
    decode_detections,
    decode_frame,
    decode_jpeg,
    decode_json,
    encode_detections,
    encode_json,
    encode_outputs,
    encode_skipped,
    frame_position,
    record_size,
)
from pipeline.count_table import CountTable, prunable
from pipeline.crop import CropSink, crop_detections
from pipeline.detector import Detector, is_calibration, make_detector
from pipeline.errors import DecodeError, RecordTooLargeError
from pipeline.inference import BatchDetector, JpegDetector, StageTimes, as_jpeg_detector
from pipeline.messages import EndOfStream, FrameDetections, FrameMeta, SkippedFrame, SkipReason
from pipeline.stats import LatencyHistogram

__all__ = ["InterWorker", "CropWorker", "CountWorker", "WORKERS", "read_table", "prune_table"]

logger = logging.getLogger(__name__)


class InterWorker(StageWorker):
    """Consumes frames from A, detects in batches, publishes to B (frame + boxes) and C (boxes).

    Per record only what must be per record is done: the headers are parsed once (into
    ``FrameMeta``) and B carries them on as they came; the JPEG is checked, not decoded (the
    detector decodes the batch, and the calibration detector not at all); the detections
    become JSON once for both outputs. Decode, inference and post-processing are timed apart.
    """

    stage = "inter"
    input_topic_attr = "frames"

    def __init__(self, *args: Any, detector: Detector | JpegDetector | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.detector: JpegDetector | None = None if detector is None else as_jpeg_detector(detector, self.limits)
        self.counters.update(detections=0, end_of_streams=0)
        self.times = StageTimes()
        self.timings = {phase: LatencyHistogram() for phase in ("decode", "inference", "post")}
        """Per-frame milliseconds of each phase, from ``times``' own clocks batch by batch (for metrics)."""

    @property
    def inference_s(self) -> float:
        return self.times.inference_s

    def setup(self) -> None:
        if self.detector is None:
            model = self.settings.model
            if model.runtime == "batched" and not is_calibration(model.name):
                self.detector = BatchDetector(model, self.limits)
            else:
                self.detector = as_jpeg_detector(make_detector(model), self.limits)
        load = getattr(self.detector, "load", None)
        if load is not None:
            load()

    def process(self, records: list[Any]) -> list[Any]:
        assert self.producer is not None and self.detector is not None
        producer = self.producer
        topics = self.settings.topics
        b_topic, c_topic = topics.detected_frames.name, topics.detections.name
        frames: list[tuple[Any, FrameMeta, bytes]] = []
        futures: list[Any] = []
        for record in records:
            decoded = self.decode_or_skip(record, self._decode)
            if decoded is None:
                continue
            if isinstance(decoded, EndOfStream):
                self.counters["end_of_streams"] += 1
                futures.append(send_record(producer, c_topic, encode_detections(decoded)))
                continue
            frames.append((record, *decoded))
        if not frames:
            return futures
        before = (self.times.decode_s, self.times.inference_s, self.times.postprocess_s)
        results = self.detector.detect_jpegs([jpeg for _, _, jpeg in frames], self.times)
        after = (self.times.decode_s, self.times.inference_s, self.times.postprocess_s)
        for hist, t0, t1 in zip(self.timings.values(), before, after, strict=True):
            if t1 > t0:  # a phase this detector has (the calibration detector decodes nothing)
                hist.record((t1 - t0) * 1000 / len(frames), n=len(frames))
        per_frame_ms = (after[1] - before[1]) * 1000 / len(frames)
        limit = self.settings.kafka.max_message_bytes
        model = self.detector.name
        counters = self.counters
        for (record, meta, jpeg), detections in zip(frames, results, strict=True):
            if isinstance(detections, DecodeError):  # the JPEG's data is corrupt: poison, as in decode_or_skip
                counters["poison"] += 1
                if not self.on_error(detections, record):
                    raise detections
                self.dead_letter(record, detections)
                continue
            counters["frames_in"] += 1
            detected, c_record = encode_outputs(FrameDetections(meta, detections, model, per_frame_ms), jpeg, record.headers)
            size = record_size(detected)
            if size > limit:  # would fail on every retry: a permanent failure of this record
                self.give_up(
                    record,
                    RecordTooLargeError(
                        f"frame {meta.key} with {len(detections)} detections makes a {size}-byte record on "
                        f"{b_topic}, above kafka.max_message_bytes={limit}"
                    ),
                )
                continue
            futures.append(send_record(producer, b_topic, detected))
            futures.append(send_record(producer, c_topic, c_record))
            counters["detections"] += len(detections)
            counters["frames_out"] += 1
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

    def _decode(self, record: Any) -> tuple[FrameMeta, bytes] | EndOfStream:
        """Headers parsed once; the JPEG checked against them (magic, size, pixels) but not decoded."""
        decoded = decode_frame(record.value, record.headers, self.limits)
        if isinstance(decoded, EndOfStream):
            return decoded
        meta, jpeg = decoded
        check_jpeg(jpeg, self.limits, expect=(meta.width, meta.height))
        return meta, jpeg

    def extra_stats(self) -> dict[str, Any]:
        times = self.times.to_dict()
        return {
            "model": getattr(self.detector, "name", None),
            **{k: round(v, 3) for k, v in times.items()},
            "timings": {phase: hist.to_dict() for phase, hist in self.timings.items()},
        }


class CropWorker(StageWorker):
    """Consumes B and writes every box above the crop threshold under ``<output>/crops/<label>/``."""

    stage = "crop"
    input_topic_attr = "detected_frames"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crops_by_label: Counter[str] = Counter()
        self._pending_crops: Counter[str] = Counter()
        self.sink = CropSink(
            Path(self.settings.output_dir) / "crops",
            writer=self.name,
            jpeg_quality=self.settings.crops.jpeg_quality,
            index_segment_bytes=self.settings.crops.index_segment_bytes,
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


def _snapshot_limits(settings: Any) -> DecodeLimits:
    # Snapshots are our own records: read any that fit a record, so the oversized ones an older
    # vapipe wrote (a flat applied list, up to the record limit) still restore, into ranges.
    decoding = settings.decoding.model_dump() | {
        "max_json_bytes": max(settings.decoding.max_json_bytes, settings.kafka.max_message_bytes)
    }
    return DecodeLimits(**decoding)


def apply_changelog(table: dict[str, dict[str, Any]], records: list[Any], limits: DecodeLimits) -> None:
    """Replay changelog records onto ``table`` (stream id -> snapshot): last write wins, a tombstone deletes."""
    for r in records:
        key = r.key.decode(errors="replace") if r.key else ""
        if r.value is None:
            table.pop(key, None)
            continue
        try:
            table[key] = decode_json(r.value, limits)
        except DecodeError as exc:
            logger.warning("ignoring a bad changelog record %s: %s", key, exc)


def read_table(settings: Any) -> dict[str, dict[str, Any]]:
    """The whole count table (every stream's last snapshot), read from the changelog topic."""
    table: dict[str, dict[str, Any]] = {}
    apply_changelog(
        table, read_all(settings.kafka, settings.topics.counts_changelog.name, settled=True), _snapshot_limits(settings)
    )
    return table


def prune_table(settings: Any) -> list[str]:
    """Tombstone the finished unnamed streams (``pipeline.count_table.prunable``) on the changelog.

    Compaction then removes their snapshots, and each count replica drops them at its next
    restore. Returns the stream ids pruned.
    """
    gone = prunable(read_table(settings))
    if not gone:
        return gone
    producer = make_producer(settings.kafka)
    try:
        futures = [
            send_record(producer, settings.topics.counts_changelog.name, Record(key=sid.encode(), value=None)) for sid in gone
        ]
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=60)
    finally:
        producer.close()
    return gone


class CountWorker(StageWorker):
    """Consumes C (keyed by stream) and keeps the vehicle table, backed by a compacted changelog.

    C and the changelog are both keyed by stream and have as many partitions (checked at
    start), so the streams of C partition ``p`` have their snapshots in changelog partition
    ``p``. After every assignment, once the consumer's positions are the group's stable
    committed offsets (the first batch after it), a replica restores the changelog
    partitions numbered like the C partitions it owns, each from its local checkpoint
    (``pipeline.checkpoint``) or offset 0, and nothing else. The snapshot of each touched
    stream is written (and acknowledged) before the input offsets are committed, and the
    snapshot records which frames were applied, so a redelivered frame is never counted twice.
    """

    stage = "count"
    input_topic_attr = "detections"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counter = CountTable(self.settings.counting, self.settings.tracking)
        self.owned: set[str] = set()
        """Streams this replica applied frames of since its last restore: the only ones it may flush when idle."""
        self.counters.update(duplicates=0, restores=0, restore_records=0)
        self.latency = LatencyHistogram()
        """Publish to count applied, every frame this replica counted (bounded, mergeable)."""
        self.last_applied_ts: float | None = None
        self.restore_s: list[float] = []
        """Seconds each restore took (the last 32), for stats and the soak benchmark."""
        self.restored_partitions: list[int] = []
        """Changelog partitions the last restore read."""
        self.state_dir = Path(self.settings.output_dir) / "state" / self.settings.group("count")
        self._partition_of: dict[str, int] = {}
        """Stream id -> changelog partition, for every stream in the table."""
        self._changelog_next: dict[int, int] = {}
        """Changelog partition -> the offset after the last snapshot the table holds (committed)."""
        self._pending_snapshots: list[tuple[str, Any]] = []
        self._last_checkpoint = time.monotonic()

    def setup(self) -> None:
        t = self.settings.topics
        check_copartitioned(self.settings.kafka, t.detections.name, t.counts_changelog.name)

    def subscribe(self) -> None:
        assert self.consumer is not None
        worker = self

        class Restore(ConsumerRebalanceListener):
            """Restores are deferred to the first batch after an assignment: by then the consumer's
            positions are the group's stable committed offsets (a read_committed consumer waits for
            pending transactional commits), so the table matches the offsets it resumes from."""

            def on_partitions_revoked(self, revoked: Any) -> None:
                worker.owned.clear()

            def on_partitions_assigned(self, assigned: Any) -> None:
                worker.owned.clear()
                worker.counter.streams.clear()
                worker.restore_pending()

        self.consumer.subscribe([self.input_topic], listener=Restore())

    def on_rewind(self) -> None:
        # The failed batch may have changed the table in memory only: go back to what is durable.
        self.counter.streams.clear()
        self.restore()

    def owned_partitions(self) -> list[int]:
        """The C partitions this replica owns, hence the changelog partitions it restores."""
        assert self.consumer is not None
        return sorted(tp.partition for tp in self.consumer.assignment() if tp.topic == self.input_topic)

    def restore(self) -> None:
        """Rebuild the table of the owned partitions: checkpoint (if any) plus the changelog after it.

        Raises:
            BrokerError: the changelog could not be read (transient: the batch is retried, restore first).
        """
        self._restore(use_checkpoints=self.settings.counting.checkpoint_interval_s > 0)

    def _restore(self, use_checkpoints: bool) -> None:
        t0 = time.perf_counter()
        self.owned.clear()
        self.counter.streams.clear()
        self._partition_of.clear()
        self._changelog_next.clear()
        self._pending_snapshots.clear()
        topic = self.settings.topics.counts_changelog.name
        partitions = self.owned_partitions()
        tables: dict[int, dict[str, dict[str, Any]]] = {p: {} for p in partitions}
        starts = dict.fromkeys(partitions, 0)
        limits = _snapshot_limits(self.settings)
        if use_checkpoints:
            max_age_s = _delete_retention_s(self.settings) / 2
            for p in partitions:
                cp = TableCheckpoint.load(self.state_dir, topic, p, max_age_s, limits)
                if cp is not None:
                    tables[p], starts[p] = cp.snapshots, cp.offset
        records, ends = read_partitions(self.settings.kafka, topic, starts, settled=True)
        if any(starts[p] > ends.get(p, 0) for p in partitions):  # the topic was recreated since
            logger.warning("%s: a checkpoint of %s is past the partition's end; reading it from the start", self.name, topic)
            return self._restore(use_checkpoints=False)
        for r in records:
            apply_changelog(tables.setdefault(r.partition, {}), [r], limits)
        self._load(tables, ends)
        self.counters["restore_records"] += len(records)
        self.restore_s = (self.restore_s + [round(time.perf_counter() - t0, 4)])[-32:]
        self.restored_partitions = partitions
        self.counters["restores"] += 1
        self.checkpoint(force=True)

    def _load(self, tables: dict[int, dict[str, dict[str, Any]]], ends: dict[int, int]) -> None:
        for p, table in tables.items():
            for stream_id, snapshot in table.items():
                try:
                    self.counter.restore(stream_id, snapshot)
                except DecodeError as exc:  # a bad snapshot must not stop the stage on every restart
                    logger.error("%s: ignoring the changelog snapshot of %r: %s", self.name, stream_id, exc)
                    continue
                self._partition_of[stream_id] = p
        self._changelog_next = dict(ends)

    def checkpoint(self, force: bool = False) -> None:
        """Write the owned table partitions to local checkpoints, at most every ``checkpoint_interval_s``.

        Only called when the table equals the committed changelog (after a restore or a durable
        batch). A checkpoint that cannot be written is logged and skipped: it is only a shortcut.
        """
        interval = self.settings.counting.checkpoint_interval_s
        if interval <= 0 or (not force and time.monotonic() - self._last_checkpoint < interval):
            return
        self._last_checkpoint = time.monotonic()
        topic = self.settings.topics.counts_changelog.name
        by_partition: dict[int, dict[str, dict[str, Any]]] = {p: {} for p in self._changelog_next}
        for stream_id, p in self._partition_of.items():
            if p in by_partition and stream_id in self.counter.streams:
                by_partition[p][stream_id] = self.counter.snapshot(stream_id)
        for p, snapshots in by_partition.items():
            try:
                TableCheckpoint(topic, p, self._changelog_next[p], snapshots).save(self.state_dir)
            except OSError as exc:
                logger.warning("%s: cannot write the checkpoint of %s[%d]: %s", self.name, topic, p, exc)

    def on_commit(self) -> None:
        """The batch is durable: its snapshots are part of the table as of their changelog offsets."""
        for stream_id, future in self._pending_snapshots:
            meta = future.get(timeout=0)  # acknowledged: the delivery waited for every future
            if meta is None:  # the Faust shell sends snapshots itself (its table restores them)
                continue
            self._partition_of[stream_id] = meta.partition
            self._changelog_next[meta.partition] = max(self._changelog_next.get(meta.partition, 0), meta.offset + 1)
        self._pending_snapshots.clear()
        self.checkpoint()

    def process(self, records: list[Any]) -> list[Any]:
        assert self.producer is not None
        topics = self.settings.topics
        touched: set[str] = set()
        # Only this batch's snapshots: the last one was committed (on_commit took them) or failed (restore
        # follows), and the Faust shell, which sends snapshots itself, never commits them here.
        self._pending_snapshots = []
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
            published_at = item.meta.published_at
            update, traffic = self.counter.apply(item, now)
            if update is None:
                self.counters["duplicates"] += 1
                continue
            touched.add(update.stream_id)
            self.owned.add(update.stream_id)
            self.counters["frames_out"] += 1
            self.latency.record((now - published_at) * 1000)
            self.last_applied_ts = now
            rec = Record(key=update.stream_id.encode(), value=encode_json(update.to_dict()))
            futures.append(send_record(self.producer, topics.counts.name, rec))
            futures += self._send_traffic(traffic)
        if not records:  # an idle flush (on_idle): frames that waited too long for a missing one
            traffic = self.counter.due(self.owned, now)
            touched.update(u.stream_id for u in traffic)
            futures += self._send_traffic(traffic)
        if touched and not self.delivery.transactional:
            # At least once, a snapshot must not land before the count records it covers: a replica
            # that died between the two would restore those frames as applied, take their redelivery
            # for duplicates and never send their records. (Exactly once, the transaction orders them.)
            for future in futures:
                future.get(timeout=self.settings.kafka.ack_timeout_s)
        for stream_id in sorted(touched):
            snap = Record(key=stream_id.encode(), value=encode_json(self.counter.snapshot(stream_id)))
            future = send_record(self.producer, topics.counts_changelog.name, snap)
            self._pending_snapshots.append((stream_id, future))
            futures.append(future)
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
            "restore_s": list(self.restore_s),
            "restored_partitions": list(self.restored_partitions),
        }


def _delete_retention_s(settings: Any) -> float:
    """How long the changelog keeps tombstones (``delete.retention.ms``; Kafka's default is a day)."""
    return float(settings.topics.counts_changelog.config.get("delete.retention.ms", 86400000)) / 1000


WORKERS: dict[str, type[StageWorker]] = {"inter": InterWorker, "crop": CropWorker, "count": CountWorker}
"""Stage name -> worker class, for every engine's shell."""
