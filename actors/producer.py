"""Producer: read a source with OpenCV, JPEG-encode each frame, publish to topic A.

Frames of one stream are spread round-robin over A's partitions (the study's data
parallelism within a stream); each carries its frame index so later stages can
restore per-stream order. A finite stream ends with an end-of-stream record.

A producer restarted on the same stream id resumes after what topic A already
holds (``stream_progress``): under exactly_once frames are published in short
transactions, so the committed frames are always a gap-free prefix and the resume
point is exact; under at_least_once the producer is idempotent and resumes from the
earliest frame that might be missing, so nothing is lost (repeats are absorbed downstream).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError

from cluster.clients import finish_transaction, make_consumer, make_producer, send_record
from cluster.reading import records_in_range
from cluster.topics import topic_partitions
from pipeline.codecs import decode_frame, encode_end_of_stream, encode_frame, encode_jpeg, fit_jpeg
from pipeline.config import Settings
from pipeline.errors import BrokerError, DecodeError, SourceError
from pipeline.messages import EndOfStream, FrameMeta
from pipeline.sources import SourceSpec, VideoSource

__all__ = ["ProducerResult", "FrameProducer", "Pacer", "StreamProgress", "stream_progress"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamProgress:
    """What topic A already holds of one stream."""

    next_index: int
    """Frames 0..next_index-1 are in the topic (committed)."""
    finished: bool
    """Its end-of-stream record is in the topic."""


def stream_progress(settings: Settings, stream_id: str, since_ms: int | None = None, window: int = 256) -> StreamProgress:
    """Scan the tail of every partition of A (committed records only) for one stream's frames.

    Frames go round-robin over the partitions and each partition keeps the order it was
    sent in, so the last frame of the stream in each partition bounds what is present.
    ``since_ms`` (when the stream cannot have begun earlier, e.g. the start of a run)
    bounds the scan; without it the scan goes back as far as it must.
    """
    topic = settings.topics.frames.name
    consumer = make_consumer(settings.kafka, group_id=None)
    last: list[int] = []
    finished = False
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        for p in parts:
            tp = TopicPartition(topic, p)
            consumer.assign([tp])
            begin, end = consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
            if since_ms is not None:
                at = consumer.offsets_for_times({tp: since_ms})[tp]
                begin = max(begin, at.offset) if at is not None else end
            found, span = -1, window
            while True:
                lo = max(begin, end - span)
                found, eos = _scan_partition(consumer, tp, lo, end, stream_id)
                finished = finished or eos
                if found >= 0 or eos or lo == begin:
                    break
                span *= 4
            last.append(found)
    finally:
        consumer.close()
    if not last:
        return StreamProgress(0, False)
    if finished or settings.processing_guarantee == "exactly_once":
        # The end marker follows every acknowledged frame; committed transactions leave no gaps.
        return StreamProgress(max(last) + 1, finished)
    return StreamProgress(min(last) + 1, finished)


def _scan_partition(consumer: Any, tp: Any, lo: int, end: int, stream_id: str) -> tuple[int, bool]:
    """Highest frame index of the stream in offsets [lo, end), and whether its end-of-stream is there."""
    highest, eos = -1, False
    for r in records_in_range(consumer, tp, lo, end, timeout_s=60):
        try:
            item = decode_frame(r.value, r.headers)
        except DecodeError:  # a poison record is the consumers' business, not ours
            continue
        if isinstance(item, EndOfStream):
            eos = eos or item.stream_id == stream_id
        elif item[0].stream_id == stream_id:
            highest = max(highest, item[0].frame_index)
    return highest, eos


@dataclass(frozen=True)
class ProducerResult:
    stream_id: str
    frames_published: int
    """Frames of the stream in topic A after this run, including those a predecessor published."""
    frames_skipped: int
    bytes_published: int
    wall_s: float
    first_ts: float | None
    last_ts: float | None
    frames_resumed: int = 0
    """Frames already in topic A when this producer started (published by a crashed predecessor)."""
    frames_downscaled: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Pacer:
    """Keeps a loop at a target rate; 0 means as fast as possible."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if self.period <= 0:
            return
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(self.next_at + self.period, now - self.period)


class FrameProducer:
    """Publishes one source to topic A. A plain class; ``vapipe run`` makes it a Ray actor."""

    def __init__(self, settings: Settings, spec: SourceSpec, name: str | None = None, since_ms: int | None = None) -> None:
        """``since_ms``: the stream has no frames in topic A older than this (bounds the resume scan)."""
        self.settings = settings
        self.spec = spec
        self.since_ms = since_ms
        self.name = name or f"producer-{spec.stream_id}"
        self.published = 0
        self.skipped = 0
        self._stop = threading.Event()

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": "producer",
            "stream_id": self.spec.stream_id,
            "frames_out": self.published,
            "frames_skipped": self.skipped,
        }

    def stop(self) -> None:
        self._stop.set()

    def run(self, on_frame: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Publish every frame not yet in topic A, then the end-of-stream record; returns a ``ProducerResult`` dict.

        Raises:
            SourceError: the source cannot be opened (before anything is published), or a
                frame is above the broker's message limit and ``producer.oversize`` is ``fail``.
            BrokerError: the broker is unreachable or did not acknowledge a frame.
        """
        cfg = self.settings
        source = VideoSource(self.spec, max_frames=cfg.producer.max_frames).open()
        topic = cfg.topics.frames.name
        transactional = cfg.processing_guarantee == "exactly_once"
        t0 = time.time()
        first_ts: float | None = None
        last_ts: float | None = None
        size = downscaled = 0
        futures: list[Any] = []
        producer: Any = None
        try:
            progress = stream_progress(cfg, self.spec.stream_id, self.since_ms)
            resumed = self.published = progress.next_index
            if progress.finished:
                logger.warning("%s: already complete in %s (%d frames); nothing to publish", self.spec.stream_id, topic, resumed)
                return ProducerResult(self.spec.stream_id, resumed, 0, 0, 0.0, None, None, resumed).to_dict()
            if resumed:
                logger.warning("%s: resuming after frame %d already in %s", self.spec.stream_id, resumed - 1, topic)
            # Short metadata age: a just-created topic's partitions show up within a second.
            options: dict[str, Any] = {"enable_idempotence": True, "metadata_max_age_ms": 1000}
            if transactional:
                # One id per stream: a restarted producer fences its predecessor and aborts its open transaction.
                options["transactional_id"] = f"vapipe-producer.{topic}.{self.spec.stream_id}"
            producer = make_producer(cfg.kafka, **options)
            if transactional:
                producer.init_transactions()
            batch = _Transaction(producer, transactional, cfg.producer.transaction_ms / 1000)
            partitions = topic_partitions(cfg.kafka, topic)
            self._await_partitions(producer, topic, partitions)
            pacer = Pacer(cfg.producer.fps)
            live = self.spec.kind in ("url", "webcam")
            to_skip = 0 if live else resumed  # a file replays from its start; a camera just goes on
            for frame in source:
                if self._stop.is_set():
                    break
                if to_skip:
                    to_skip -= 1
                    continue
                if futures and pacer.period >= batch.period_s:
                    self._confirm(batch, futures)  # a slow source: make each frame visible before waiting
                pacer.wait()
                ts = time.time()
                jpeg, w, h = self._encode(frame.image, self.published)
                downscaled += (w, h) != (frame.image.shape[1], frame.image.shape[0])
                # Published frames are numbered without gaps (a skipped unreadable frame takes no
                # index), so the count table's applied-set watermark always advances.
                meta = FrameMeta(self.spec.stream_id, self.published, ts, w, h)
                partition = partitions[meta.frame_index % len(partitions)]
                batch.begin()
                futures.append(send_record(producer, topic, encode_frame(meta, jpeg), partition=partition))
                size += len(jpeg)
                first_ts = ts if first_ts is None else first_ts
                last_ts = ts
                self.published += 1
                if on_frame is not None:
                    on_frame(self.published)
                if batch.due(len(futures)):
                    self._confirm(batch, futures)
            self._confirm(batch, futures)
            if not self._stop.is_set():
                self.skipped = source.frames_skipped
                eos = EndOfStream(self.spec.stream_id, self.published, self.skipped)
                batch.begin()
                futures.append(send_record(producer, topic, encode_end_of_stream(eos), partition=partitions[0]))
                self._confirm(batch, futures)
        finally:
            source.close()
            if producer is not None:
                producer.close()
        return ProducerResult(
            self.spec.stream_id, self.published, self.skipped, size, time.time() - t0, first_ts, last_ts, resumed, downscaled
        ).to_dict()

    def _encode(self, image: Any, index: int) -> tuple[bytes, int, int]:
        """JPEG bytes within the broker's limit, with the width and height they encode."""
        cfg = self.settings
        limit = cfg.kafka.max_message_bytes - 4096  # headers and record overhead
        jpeg = encode_jpeg(image, cfg.producer.jpeg_quality)
        if len(jpeg) <= limit:
            return jpeg, image.shape[1], image.shape[0]
        if cfg.producer.oversize == "downscale":
            fitted = fit_jpeg(image, cfg.producer.jpeg_quality, limit)
            if fitted is not None:
                logger.warning("%s: frame %d downscaled to fit kafka.max_message_bytes", self.spec.stream_id, index)
                return fitted
        raise SourceError(
            f"frame {self.spec.stream_id}/{index} is {len(jpeg)} bytes as JPEG, above kafka.max_message_bytes="
            f"{cfg.kafka.max_message_bytes}: lower producer.jpeg_quality, raise the limit or set producer.oversize=downscale"
        )

    def _await_partitions(self, producer: Any, topic: str, partitions: list[int], timeout_s: float = 30.0) -> None:
        """Wait until this producer's metadata knows every partition, so frames spread over all of them."""
        deadline = time.monotonic() + timeout_s
        while not set(partitions) <= set(producer.partitions_for(topic) or ()):
            if time.monotonic() > deadline:
                raise BrokerError(f"producer metadata still lacks partitions of {topic} after {timeout_s:.0f}s")
            time.sleep(0.2)

    def _confirm(self, batch: _Transaction, futures: list[Any]) -> None:
        """Make the frames sent so far durable (commit their transaction) and check every acknowledgement."""
        try:
            batch.commit()
        except KafkaError as exc:
            raise BrokerError(
                f"{self.spec.stream_id}: frames not committed to {self.settings.kafka.bootstrap_servers}: {exc}"
            ) from None
        for future in futures:
            try:
                future.get(timeout=60)
            except MessageSizeTooLargeError as exc:
                raise BrokerError(f"{self.spec.stream_id}: the broker refused a frame as too large: {exc}") from None
            except KafkaError as exc:
                raise BrokerError(
                    f"{self.spec.stream_id}: frame not acknowledged by {self.settings.kafka.bootstrap_servers}: {exc}"
                ) from None
        futures.clear()


class _Transaction:
    """Groups published frames: one Kafka transaction per ~``period_s`` or 64 frames (exactly_once),
    or plain flushes every 256 frames (at_least_once)."""

    def __init__(self, producer: Any, transactional: bool, period_s: float) -> None:
        self.producer = producer
        self.transactional = transactional
        self.period_s = period_s
        self.open_since: float | None = None

    def begin(self) -> None:
        if self.open_since is None:
            if self.transactional:
                self.producer.begin_transaction()
            self.open_since = time.monotonic()

    def due(self, pending: int) -> bool:
        if not self.transactional:
            return pending >= 256
        return self.open_since is not None and (pending >= 64 or time.monotonic() - self.open_since >= self.period_s)

    def commit(self) -> None:
        if self.open_since is None:
            return
        if self.transactional:
            finish_transaction(self.producer, commit=True)
        else:
            self.producer.flush()
        self.open_since = None


def publish_streams(
    settings: Settings, specs: list[SourceSpec], on_frame: Callable[[str], Callable[[int], None]] | None = None
) -> dict[str, dict[str, Any]]:
    """Publish every source from this process, one thread per stream (``vapipe produce``).

    ``on_frame(stream_id)`` gives each stream's per-frame callback (a progress bar).

    Raises:
        PipelineError: the first stream that failed, after every stream has stopped.
    """
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def one(spec: SourceSpec) -> None:
        try:
            results[spec.stream_id] = FrameProducer(settings, spec).run(on_frame=on_frame(spec.stream_id) if on_frame else None)
        except BaseException as exc:  # surfaced below as one line
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(spec,), daemon=True) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
