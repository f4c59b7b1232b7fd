"""Producer: read a source with OpenCV, JPEG-encode each frame, publish to topic A.

Frames of one stream are spread round-robin over A's partitions (the study's data
parallelism within a stream); each carries its frame index so later stages can
restore per-stream order. A finite stream ends with an end-of-stream record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kafka.errors import KafkaError, MessageSizeTooLargeError

from actors.kafka_io import make_producer, send_record, topic_partitions
from pipeline.codecs import encode_end_of_stream, encode_frame, encode_jpeg
from pipeline.config import Settings
from pipeline.errors import BrokerError, SourceError
from pipeline.messages import EndOfStream, FrameMeta
from pipeline.sources import SourceSpec, VideoSource

__all__ = ["ProducerResult", "FrameProducer", "Pacer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProducerResult:
    stream_id: str
    frames_published: int
    frames_skipped: int
    bytes_published: int
    wall_s: float
    first_ts: float | None
    last_ts: float | None

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

    def __init__(self, settings: Settings, spec: SourceSpec, name: str | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.name = name or f"producer-{spec.stream_id}"
        self.published = 0
        self.skipped = 0
        self._stop = threading.Event()

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "stage": "producer", "stream_id": self.spec.stream_id,
                "frames_out": self.published, "frames_skipped": self.skipped}

    def stop(self) -> None:
        self._stop.set()

    def run(self, on_frame: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Publish every frame, then the end-of-stream record; returns a ``ProducerResult`` dict.

        Raises:
            SourceError: the source cannot be opened (before anything is published).
            BrokerError: the broker is unreachable or did not acknowledge a frame.
        """
        cfg = self.settings
        source = VideoSource(self.spec, max_frames=cfg.producer.max_frames).open()
        topic = cfg.topics.frames.name
        # Short metadata age: a just-created topic's partitions show up within a second.
        producer = make_producer(cfg.kafka, enable_idempotence=True, metadata_max_age_ms=1000)
        t0 = time.time()
        first_ts: float | None = None
        last_ts: float | None = None
        size = 0
        futures: list[Any] = []
        try:
            partitions = topic_partitions(cfg.kafka, topic)
            self._await_partitions(producer, topic, partitions)
            pacer = Pacer(cfg.producer.fps)
            for frame in source:
                if self._stop.is_set():
                    break
                pacer.wait()
                ts = time.time()
                h, w = frame.image.shape[:2]
                # Published frames are numbered without gaps (a skipped unreadable frame takes no
                # index), so the count table's applied-set watermark always advances.
                meta = FrameMeta(self.spec.stream_id, self.published, ts, w, h)
                jpeg = encode_jpeg(frame.image, cfg.producer.jpeg_quality)
                if len(jpeg) > cfg.kafka.max_message_bytes:
                    raise SourceError(
                        f"frame {meta.key} is {len(jpeg)} bytes as JPEG, above kafka.max_message_bytes="
                        f"{cfg.kafka.max_message_bytes}: lower producer.jpeg_quality or raise the limit"
                    )
                partition = partitions[meta.frame_index % len(partitions)]
                futures.append(send_record(producer, topic, encode_frame(meta, jpeg), partition=partition))
                size += len(jpeg)
                first_ts = ts if first_ts is None else first_ts
                last_ts = ts
                self.published += 1
                if on_frame is not None:
                    on_frame(self.published)
                if len(futures) >= 256:
                    self._confirm(producer, futures)
            self._confirm(producer, futures)
            self.skipped = source.frames_skipped
            eos = EndOfStream(self.spec.stream_id, self.published, self.skipped)
            self._confirm(producer, [send_record(producer, topic, encode_end_of_stream(eos), partition=partitions[0])])
        finally:
            source.close()
            producer.close()
        return ProducerResult(self.spec.stream_id, self.published, self.skipped, size, time.time() - t0, first_ts, last_ts).to_dict()

    def _await_partitions(self, producer: Any, topic: str, partitions: list[int], timeout_s: float = 30.0) -> None:
        """Wait until this producer's metadata knows every partition, so frames spread over all of them."""
        deadline = time.monotonic() + timeout_s
        while not set(partitions) <= set(producer.partitions_for(topic) or ()):
            if time.monotonic() > deadline:
                raise BrokerError(f"producer metadata still lacks partitions of {topic} after {timeout_s:.0f}s")
            time.sleep(0.2)

    def _confirm(self, producer: Any, futures: list[Any]) -> None:
        producer.flush()
        for future in futures:
            try:
                future.get(timeout=60)
            except MessageSizeTooLargeError as exc:
                raise BrokerError(f"{self.spec.stream_id}: the broker refused a frame as too large: {exc}") from None
            except KafkaError as exc:
                raise BrokerError(f"{self.spec.stream_id}: frame not acknowledged by {self.settings.kafka.bootstrap_servers}: {exc}") from None
        futures.clear()
