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
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError

from cluster.clients import finish_transaction, make_admin, make_consumer, make_producer, send_record
from cluster.reading import records_in_range
from cluster.topics import topic_partitions
from pipeline.codecs import (
    Record,
    decode_frame,
    encode_end_of_stream,
    encode_frame,
    encode_jpeg,
    encode_skipped,
    fit_jpeg,
)
from pipeline.config import Settings
from pipeline.errors import BrokerError, DecodeError, SourceError
from pipeline.live import BehindGate, Decimator, Gap, LiveCamera
from pipeline.messages import EndOfStream, FrameMeta, SkippedFrame, SkipReason
from pipeline.sources import NOMINAL_FPS, CaptureClock, Frame, SourceSpec, VideoSource

__all__ = ["ProducerResult", "FrameProducer", "Pacer", "StreamProgress", "stream_progress"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamProgress:
    """What topic A already holds of one stream."""

    next_index: int
    """Frames 0..next_index-1 are in the topic (committed)."""
    finished: bool
    """Its end-of-stream record is in the topic."""
    last_capture_ts: float | None = None
    """Capture time of the highest frame found: a resumed recording's clock goes on from it."""


def stream_progress(settings: Settings, stream_id: str, since_ms: int | None = None, window: int = 256) -> StreamProgress:
    """Scan the tail of every partition of A (committed records only) for one stream's frames.

    Frames go round-robin over the partitions and each partition keeps the order it was
    sent in, so the last frame of the stream in each partition bounds what is present.
    ``since_ms`` (when the stream cannot have begun earlier, e.g. the start of a run)
    bounds the scan; without it the scan goes back as far as it must.
    """
    topic = settings.topics.frames.name
    consumer = make_consumer(settings.kafka, group_id=None)
    last: list[tuple[int, float]] = []
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
                found, found_ts, eos = _scan_partition(consumer, tp, lo, end, stream_id)
                finished = finished or eos
                if found >= 0 or eos or lo == begin:
                    break
                span *= 4
            last.append((found, found_ts))
    finally:
        consumer.close()
    if not last:
        return StreamProgress(0, False)
    # The end marker follows every acknowledged frame and committed transactions leave no gaps;
    # at least once, frames after the lowest partition's last may be missing: they are published again.
    index, ts = max(last) if finished or settings.processing_guarantee == "exactly_once" else min(last)
    return StreamProgress(index + 1, finished, ts if index >= 0 else None)


def _scan_partition(consumer: Any, tp: Any, lo: int, end: int, stream_id: str) -> tuple[int, float, bool]:
    """Highest frame index of the stream in offsets [lo, end), its capture time, and whether its end-of-stream is there."""
    highest, highest_ts, eos = -1, 0.0, False
    for r in records_in_range(consumer, tp, lo, end, timeout_s=60):
        try:
            item = decode_frame(r.value, r.headers)
        except DecodeError:  # a poison record is the consumers' business, not ours
            continue
        if isinstance(item, EndOfStream):
            eos = eos or item.stream_id == stream_id
        elif item[0].stream_id == stream_id and item[0].frame_index > highest:
            highest, highest_ts = item[0].frame_index, item[0].capture_ts
    return highest, highest_ts, eos


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
    frames_disconnected: int = 0
    """Frame indices a camera was away for (marked skipped on topic C, reason ``disconnected``)."""
    frames_behind: int = 0
    """Frames dropped at the source in real-time mode while the pipeline was behind (reason ``behind``)."""

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
        self.settings = settings.for_role("producer")  # its Kafka user may write topic A only
        self.spec = spec
        self.since_ms = since_ms
        self.name = name or f"producer-{spec.stream_id}"
        self.published = 0
        self.skipped = 0
        self.disconnected = 0
        self.behind = 0
        self.camera: LiveCamera | None = None
        self._stop = threading.Event()
        self._end = False
        self.recovered = 0
        """Transactions whose commit failed and that a new producer settled (``kafka.ack_timeout_s``)."""
        self.batch: _Transaction | None = None
        """The open transaction (and the producer) of a running ``run``."""
        self._rate: deque[tuple[float, int]] = deque(maxlen=10)
        """(time, published) at the last ``stats`` calls (about one a second): the camera's frames/s."""

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": "producer",
            "stream_id": self.spec.stream_id,
            "frames_out": self.published,
            "frames_skipped": self.skipped + self.disconnected + self.behind,
            "camera": None if self.camera is None else self.camera.status.to_dict(),
            "fps": self._fps(),
        }

    def _fps(self) -> float:
        """Frames published per second over the last ~10 stats calls."""
        self._rate.append((time.monotonic(), self.published))
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return round((n1 - n0) / (t1 - t0), 2) if t1 > t0 else 0.0

    def stop(self, end: bool = False) -> None:
        """Stop publishing. A camera's stream then ends (its end-of-stream is published); a file's
        ends only with ``end`` (the stream was removed), else a later run resumes it."""
        self._end = self._end or end
        self._stop.set()

    def pause(self, seconds: float) -> None:
        """Wait before publishing (a stream that joins a step load later); returns early when stopped."""
        if seconds > 0:
            self._stop.wait(seconds)

    def run(self, on_frame: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Publish every frame not yet in topic A, then the end-of-stream record; returns a ``ProducerResult`` dict.

        Raises:
            SourceError: the source cannot be opened (before anything is published), or a
                frame is above the broker's message limit and ``producer.oversize`` is ``fail``.
            BrokerError: the broker is unreachable or did not acknowledge a frame.
        """
        cfg = self.settings
        live = self.spec.live
        if live:  # a camera: bounded waits, every frame numbered across reconnects; max_frames counts published ones
            source = VideoSource(self.spec, timeout_s=cfg.producer.stall_s).open()
        else:
            source = VideoSource(self.spec, max_frames=cfg.producer.max_frames).open()
        topic = cfg.topics.frames.name
        transactional = cfg.processing_guarantee == "exactly_once"
        t0 = time.time()
        first_ts: float | None = None
        last_ts: float | None = None
        size = downscaled = 0
        futures: list[Any] = []
        frames: Any = None
        backlog: _Backlog | None = None
        try:
            # Short metadata age: a just-created topic's partitions show up within a second.
            options: dict[str, Any] = {"enable_idempotence": True, "metadata_max_age_ms": 1000}
            if transactional:
                # One id per stream: a restarted producer fences its predecessor and aborts its open transaction.
                options["transactional_id"] = f"vapipe-producer.{topic}.{self.spec.stream_id}"

            def new_producer() -> Any:
                made = make_producer(cfg.kafka, **options)
                if transactional:
                    made.init_transactions()
                return made

            def landed(indices: list[int]) -> bool:  # frame indices of one transaction, -1 its end-of-stream
                now = stream_progress(cfg, self.spec.stream_id, self.since_ms)
                return now.finished or now.next_index > max(indices)

            # Made before the scan below: init_transactions settles a predecessor's last transaction
            # (its markers written, or aborted), so the committed frames the scan reads are all there.
            batch = self.batch = _Transaction(
                new_producer, transactional, cfg.producer.transaction_ms / 1000, landed, cfg.kafka.ack_timeout_s
            )
            # A named camera goes on numbering from its last run, however long ago that was.
            since_ms = None if live and self.spec.explicit_id else self.since_ms
            progress = stream_progress(cfg, self.spec.stream_id, since_ms)
            resumed = self.published = progress.next_index
            if progress.finished and not live:
                logger.warning("%s: already complete in %s (%d frames); nothing to publish", self.spec.stream_id, topic, resumed)
                return ProducerResult(self.spec.stream_id, resumed, 0, 0, 0.0, None, None, resumed).to_dict()
            if resumed:
                logger.warning("%s: resuming after frame %d already in %s", self.spec.stream_id, resumed - 1, topic)
            partitions = topic_partitions(cfg.kafka, topic)
            self._await_partitions(batch.producer, topic, partitions)
            pacer = Pacer(0 if live else cfg.producer.fps)  # a camera is decimated instead (``_camera``)
            to_skip = 0 if live else resumed  # a file replays from its start; a camera just goes on
            clock = CaptureClock()
            # A camera may be away longer than the transaction timeout (kafka-python's 60 s), and the
            # broker would abort a transaction left open meanwhile (its frames lost, this producer
            # fenced): whatever is open commits as soon as the camera keeps us waiting.
            frames = self._camera(source, lambda: self._confirm(batch, futures)) if live else iter(source)
            this_run = 0
            realtime = cfg.producer.mode == "realtime"
            backlog = _Backlog(cfg) if realtime else None
            gate = BehindGate(cfg.producer.max_lag_s)
            # A camera's next frame may be a whole period away: a frame left in an open transaction
            # waits for it (500 ms at 2 f/s, invisible to read_committed consumers). Commit each frame
            # when frames come slower than the transaction period, and always in real-time mode.
            commit_each = realtime or (0 < cfg.producer.fps <= 1000 / cfg.producer.transaction_ms)
            for frame in frames:
                if self._stop.is_set():
                    break
                if isinstance(frame, Gap):
                    batch.begin()  # the markers commit with the first frame after the outage
                    futures += self._skip_gap(frame)
                    continue
                if live and cfg.producer.max_frames is not None and this_run >= cfg.producer.max_frames:
                    break
                this_run += 1
                if to_skip:
                    to_skip -= 1
                    if not to_skip and progress.last_capture_ts is not None:
                        clock.continue_from(frame, progress.last_capture_ts)  # the last frame already in A
                    continue
                if futures and pacer.period >= batch.period_s:
                    self._confirm(batch, futures)  # a slow source: make each frame visible before waiting
                pacer.wait()
                if backlog is not None and not self._admit(backlog, gate):
                    batch.begin()
                    futures.append(self._skip_one("behind"))
                    if batch.due(len(futures)):  # a long spell behind must not hold one transaction open
                        self._confirm(batch, futures)
                    continue
                jpeg, w, h = self._encode(frame.image, self.published)
                downscaled += (w, h) != (frame.image.shape[1], frame.image.shape[0])
                ts = time.time()
                # Published frames are numbered without gaps (a skipped unreadable frame takes no
                # index), so the count table's applied-set watermark always advances.
                meta = FrameMeta(self.spec.stream_id, self.published, clock.capture_ts(frame), w, h, publish_ts=ts)
                partition = partitions[meta.frame_index % len(partitions)]
                batch.begin()
                futures.append(batch.send(topic, encode_frame(meta, jpeg), partition, meta.frame_index))
                if backlog is not None:
                    backlog.add(futures[-1], ts)
                size += len(jpeg)
                first_ts = ts if first_ts is None else first_ts
                last_ts = ts
                self.published += 1
                if on_frame is not None:
                    on_frame(self.published)
                if batch.due(len(futures)) or (live and commit_each):
                    self._confirm(batch, futures)
            self._confirm(batch, futures)
            if not self._stop.is_set() or live or self._end:  # a camera's stream ends when it is stopped
                self.skipped = source.frames_skipped
                eos = EndOfStream(self.spec.stream_id, self.published, self.skipped + self.disconnected + self.behind)
                batch.begin()
                futures.append(batch.send(topic, encode_end_of_stream(eos), partitions[0], -1))
                self._confirm(batch, futures)
        finally:
            if backlog is not None:
                backlog.close()
            if self.camera is not None:
                # The camera's reader thread owns its connection and closes it: releasing a capture
                # under a running read crashes FFmpeg. Closing the generator lets the thread go.
                self.camera.stop.set()
                frames.close()
            else:
                source.close()
            if self.batch is not None:
                self.batch.close()
                self.recovered = self.batch.recovered
                self.batch = None
        return ProducerResult(
            self.spec.stream_id,
            self.published,
            self.skipped + self.disconnected + self.behind,
            size,
            time.time() - t0,
            first_ts,
            last_ts,
            resumed,
            downscaled,
            self.disconnected,
            self.behind,
        ).to_dict()

    def _camera(self, source: VideoSource, on_quiet: Callable[[], None]) -> Iterator[Frame | Gap]:
        """A camera's frames at ``producer.fps`` at most, reconnecting for as long as the producer runs;
        ``on_quiet`` whenever no frame is at hand."""
        cfg = self.settings.producer
        rate = min(cfg.fps or math.inf, source.native_fps or math.inf)
        rate = NOMINAL_FPS if math.isinf(rate) else rate
        spec, stall_s = self.spec, cfg.stall_s
        self.camera = LiveCamera(
            lambda: VideoSource(spec, timeout_s=stall_s).open(),
            fps=rate,
            stall_s=stall_s,
            backoff_max_s=cfg.reconnect_max_s,
            stop=self._stop,
            name=spec.stream_id,
            first=source,
            on_quiet=on_quiet,
        )
        decimate = Decimator(cfg.fps)
        for item in self.camera:
            if isinstance(item, Gap) or decimate.take(item.grabbed_ts):
                yield item

    def _admit(self, backlog: _Backlog, gate: BehindGate) -> bool:
        """Real-time mode: whether this frame can be processed within ``max_lag_s`` of now."""
        now = time.time()
        pending, oldest_age = backlog.refresh(now)
        gate.observe(now, backlog.consumed, pending)
        return gate.admit(pending, oldest_age)

    def _skip_one(self, reason: SkipReason) -> Any:
        """Number a frame that is not published, and tell the count table at once (a marker on C)."""
        marker = encode_skipped(SkippedFrame(self.spec.stream_id, self.published, reason))
        self.published += 1
        self.behind += reason == "behind"
        self.disconnected += reason == "disconnected"
        assert self.batch is not None
        return self.batch.send(self.settings.topics.detections.name, marker)

    def _skip_gap(self, gap: Gap) -> list[Any]:
        """Number on over a camera's outage: each missed index is marked skipped on topic C, so the
        count table closes it at once (the path dead-lettered frames take) and the stream still completes."""
        first = self.published
        futures = [self._skip_one("disconnected") for _ in range(gap.frames)]
        logger.warning(
            "%s: camera away %.1fs: frames %d-%d marked skipped (disconnected)",
            self.spec.stream_id,
            gap.until - gap.since,
            first,
            first + gap.frames - 1,
        )
        return futures

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
            resent = batch.commit()
        except (KafkaError, BrokerError) as exc:
            raise BrokerError(
                f"{self.spec.stream_id}: frames not committed to {self.settings.kafka.bootstrap_servers}: {exc}"
            ) from None
        if resent is not None:  # the records were sent again by a new producer: check those sends
            futures[:] = resent
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


class _Backlog:
    """This stream's frames published and not yet taken by the InterConsumers: by their group's
    committed offsets on topic A (asked at most every ``every_s``), for real-time mode."""

    def __init__(self, settings: Settings, every_s: float = 0.25) -> None:
        self.admin = make_admin(settings.kafka)
        self.group = settings.group("inter")
        self.topic = settings.topics.frames.name
        self.every_s = every_s
        self.unresolved: list[tuple[Any, float]] = []
        """(send future, publish time) of frames whose offset is not known yet."""
        self.waiting: dict[int, list[tuple[int, float]]] = {}
        """partition -> (offset, publish time) of frames not yet taken, in offset order."""
        self.committed: dict[int, int] = {}
        self.consumed = 0
        self.checked = 0.0

    def add(self, future: Any, publish_ts: float) -> None:
        self.unresolved.append((future, publish_ts))

    def refresh(self, now: float) -> tuple[int, float | None]:
        """How many frames wait, and how long the oldest has waited (None when none does)."""
        still = []
        for future, ts in self.unresolved:
            if not future.is_done:
                still.append((future, ts))
            elif future.succeeded():
                self.waiting.setdefault(future.value.partition, []).append((future.value.offset, ts))
        self.unresolved = still
        if now - self.checked >= self.every_s:
            self.checked = now
            try:
                offsets = self.admin.list_group_offsets({self.group: None}).get(self.group, {})
            except KafkaError as exc:  # the gate goes on with what it knew
                logger.debug("committed offsets of %s not read: %s", self.group, exc)
                offsets = {}
            for tp, meta in offsets.items():
                if tp.topic == self.topic:
                    self.committed[tp.partition] = int(getattr(meta, "offset", meta))
        for partition, frames in self.waiting.items():
            done = self.committed.get(partition, 0)
            taken = 0
            while taken < len(frames) and frames[taken][0] < done:
                taken += 1
            if taken:
                del frames[:taken]
                self.consumed += taken
        times = [ts for _, ts in self.unresolved] + [frames[0][1] for frames in self.waiting.values() if frames]
        pending = len(self.unresolved) + sum(len(f) for f in self.waiting.values())
        return pending, (now - min(times)) if times else None

    def close(self) -> None:
        self.admin.close()


class _Transaction:
    """Groups published frames: one Kafka transaction per ~``period_s`` or 64 frames (exactly_once),
    or plain flushes every 256 frames (at_least_once).

    Exactly once, it keeps the records of the open transaction: a commit that fails (its
    coordinator died, or did not answer within ``kafka.ack_timeout_s``) is recovered by a new
    producer under the same transactional id (which fences the old one and settles its
    transaction), then, unless topic A shows the transaction landed after all, by sending the
    records again in a new transaction.
    """

    def __init__(
        self,
        make: Callable[[], Any],
        transactional: bool,
        period_s: float,
        landed: Callable[[list[int]], bool],
        ack_timeout_s: float = 60.0,
        attempts: int = 5,
    ) -> None:
        self.make, self.transactional, self.period_s = make, transactional, period_s
        self.landed = landed
        """Whether the records at these indices (frames on A; -1 the end-of-stream) are in topic A, committed."""
        self.ack_timeout_s, self.attempts = ack_timeout_s, attempts
        self.producer: Any = make()
        self.open_since: float | None = None
        self.sent: list[tuple[str, Record, int | None, int | None]] = []
        """(topic, record, partition, index on A: a frame's, -1 the end-of-stream, None off A) of the open transaction."""
        self.recovered = 0

    def begin(self) -> None:
        if self.open_since is None:
            if self.transactional:
                self.producer.begin_transaction()
            self.open_since = time.monotonic()

    def send(self, topic: str, record: Record, partition: int | None = None, frame_index: int | None = None) -> Any:
        """Send one record in the open transaction (``begin`` first)."""
        if self.transactional:
            self.sent.append((topic, record, partition, frame_index))
        return send_record(self.producer, topic, record, partition=partition)

    def due(self, pending: int) -> bool:
        if not self.transactional:
            return pending >= 256
        return self.open_since is not None and (pending >= 64 or time.monotonic() - self.open_since >= self.period_s)

    def commit(self) -> list[Any] | None:
        """Commit the open transaction; returns the send futures that replace the caller's when the
        records had to be sent again (None otherwise).

        Raises:
            KafkaError: the commit failed ``attempts`` times.
        """
        if self.open_since is None:
            return None
        if not self.transactional:
            self.producer.flush()
            self.open_since = None
            return None
        resent: list[Any] | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                if self.producer is None:
                    resent = self._recover()
                    if resent is None:  # it had landed: no transaction is open
                        resent = []
                        break
                finish_transaction(self.producer, commit=True, timeout_s=self.ack_timeout_s)
                break
            except (KafkaError, BrokerError) as exc:
                if attempt == self.attempts:
                    raise
                logger.warning("transaction commit failed (%s); a new producer settles it (attempt %d)", exc, attempt)
                self._drop_producer()
                time.sleep(min(2.0**attempt, 10.0))
        self.open_since = None
        self.sent.clear()
        return resent

    def _drop_producer(self) -> None:
        if self.producer is not None:
            try:
                self.producer.close(timeout=0)
            except Exception:  # a new producer under the same id fences it either way
                logger.debug("closing the failed producer", exc_info=True)
        self.producer = None

    def _recover(self) -> list[Any] | None:
        """A new producer (fencing the old one); the open transaction's records sent again in a new
        one, or None when topic A shows they landed."""
        self.producer = self.make()  # init_transactions: the old transaction is now committed or aborted
        self.recovered += 1
        on_a = [i for _, _, _, i in self.sent if i is not None]
        if on_a and self.landed(on_a):
            logger.warning("the transaction had landed after all: its %d records are in topic A", len(on_a))
            return None
        self.producer.begin_transaction()
        return [send_record(self.producer, t, r, partition=p) for t, r, p, _ in self.sent]

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()


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
