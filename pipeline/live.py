"""Live cameras: URLs without their secrets, and a camera that reconnects for as long as the run lasts.

A network camera drops out, freezes or restarts; peer systems that end the stream at the first
failed read lose the camera for good. ``LiveCamera`` reads a camera in a thread of its own, so a
read that hangs (a frozen server) cannot hang the producer: no new frame for ``stall_s`` and the
connection is abandoned; it reconnects with capped, jittered exponential backoff (tenacity) until
told to stop, and reports the time it was away as a ``Gap`` so the producer can number on and
mark the frames it missed as skipped (reason ``disconnected``).

A URL's user info (``rtsp://admin:secret@host/live``) never becomes part of a stream id, and every
URL that is logged, reported or put in an error goes through ``redact_url`` first.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import tenacity

from pipeline.errors import SourceError

__all__ = [
    "SUPPORTED_SCHEMES",
    "redact_url",
    "url_stream_name",
    "check_scheme",
    "missed_frames",
    "Gap",
    "Decimator",
    "BehindGate",
    "CameraStatus",
    "camera_line",
    "LiveCamera",
]

logger = logging.getLogger(__name__)

SUPPORTED_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
"""URL schemes a live source may use (what OpenCV's FFmpeg backend reads)."""
_SECRET_QUERY_KEY = re.compile(r"pass|pwd|token|secret|key|auth|sig|credential", re.I)
MAX_GAP_FRAMES = 100_000
"""Most frames one outage is recorded as (about an hour at 25 f/s), so a camera that was away for
days does not flood topic C with skip markers; the capture times still tell the real gap."""


def redact_url(uri: str) -> str:
    """The URL with any password or token replaced by ``***``: ``rtsp://***@host/live``.

    Anything that is not a URL with a scheme is returned unchanged.

    Example:
        >>> redact_url("rtsp://admin:secret@cam.local:554/live?token=abc&ch=1")
        'rtsp://***@cam.local:554/live?token=***&ch=1'
    """
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"***@{host}" if "@" in parts.netloc else parts.netloc
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # unparseable: say nothing of it beyond its scheme
        return uri.split("://", 1)[0] + "://***"


def url_stream_name(uri: str) -> str:
    """The part of a URL a default stream id is made of: host, port and path, never user info or query."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return f"{host}{parts.path}"


def check_scheme(uri: str) -> None:
    """Raise SourceError, naming the supported schemes, for a URL scheme OpenCV will not read."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise SourceError(f"unsupported URL scheme {scheme!r} in {redact_url(uri)}: use one of {', '.join(SUPPORTED_SCHEMES)}")


def missed_frames(gap_s: float, fps: float) -> int:
    """Frames a camera at ``fps`` showed while it was away for ``gap_s`` (between two frames received).

    Example:
        >>> missed_frames(5.0, 10.0)  # frames 5 s apart at 10 f/s: 49 between them
        49
    """
    if fps <= 0 or not math.isfinite(gap_s) or gap_s <= 0:
        return 0
    return max(0, min(round(gap_s * fps) - 1, MAX_GAP_FRAMES))


class Decimator:
    """Takes a camera's frames at ``fps`` at most (0: every frame), by when each was grabbed.

    A camera cannot be slowed down the way a file can: waiting between reads only lets its frames
    queue up and grow the latency, so frames above the rate are passed over instead (not skipped:
    they never get an index), as Frigate's ``detect.fps`` does.

    Example:
        >>> d = Decimator(10)
        >>> [d.take(t / 25) for t in range(6)]  # a 25 f/s camera taken at 10 f/s
        [True, False, True, False, True, False]
    """

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.next_at: float | None = None

    def take(self, ts: float) -> bool:
        if self.period <= 0:
            return True
        slack = self.period / 2  # grab times jitter: a frame up to half a period early is on time
        if self.next_at is not None and ts < self.next_at - slack:
            return False
        self.next_at = ts + self.period if self.next_at is None else max(self.next_at + self.period, ts)
        return True


class BehindGate:
    """Real-time mode: publish a frame only if what waits ahead of it clears within ``max_lag_s``.

    When input outruns the pipeline, a lossless source queues frames and latency grows without
    bound; DeepStream's leaky queues and Frigate drop frames instead. The producer tells the gate
    how many of its frames are published but not yet taken by the InterConsumers (``pending``),
    how old the oldest is, and how many have been taken so far; the gate estimates the rate they
    are taken at (while some wait) and admits a frame while ``(pending + 1) / rate <= max_lag_s``
    (the frame itself taken too: the time to clear what waits ahead of it includes the frame in
    the model, and its own turn) and the oldest has not waited longer than that; until the rate is measured (over busy time only),
    while at most one frame waits (admitting by age alone let the first second's frames queue for
    seconds). Refused frames are dropped at the source (skipped,
    reason ``behind``); once the backlog clears every frame is admitted again.

    Example:
        >>> gate = BehindGate(max_lag_s=1.0)
        >>> gate.observe(0.0, consumed=0, pending=5); gate.observe(2.0, consumed=6, pending=5)
        >>> gate.admit(pending=2, oldest_age_s=0.3), gate.admit(pending=5, oldest_age_s=0.3)  # 3 f/s taken
        (True, False)
    """

    def __init__(self, max_lag_s: float, window_s: float = 5.0) -> None:
        self.max_lag_s = max_lag_s
        self.window_s = window_s
        self.busy: list[tuple[float, int]] = []
        """(seconds, frames taken) of recent intervals that began with frames waiting."""
        self.last: tuple[float, int, bool] | None = None

    def observe(self, now: float, consumed: int, pending: int) -> None:
        """``consumed``: this stream's frames taken so far; ``pending``: published and not yet taken."""
        if self.last is not None and self.last[2] and now > self.last[0]:
            self.busy.append((now - self.last[0], consumed - self.last[1]))
            while len(self.busy) > 1 and sum(dt for dt, _ in self.busy[1:]) >= self.window_s:
                self.busy.pop(0)
        self.last = (now, consumed, pending > 0)

    def rate(self) -> float | None:
        """Frames taken per second of busy time (idle spells say nothing of it); None until measured."""
        seconds = sum(dt for dt, _ in self.busy)
        taken = sum(n for _, n in self.busy)
        if seconds < 0.5 or taken <= 0:
            return None
        return taken / seconds

    def admit(self, pending: int, oldest_age_s: float | None) -> bool:
        if pending <= 0:
            return True
        if oldest_age_s is not None and oldest_age_s > self.max_lag_s:
            return False
        rate = self.rate()
        if rate is None:  # not measured yet (a second of busy time): one frame in flight at most
            return pending <= 1
        return (pending + 1) / rate <= self.max_lag_s


@dataclass(frozen=True, slots=True)
class Gap:
    """A camera was away: ``frames`` frames are missing between the last frame before and the next."""

    frames: int
    since: float
    """When the last frame before the gap was grabbed (Unix seconds)."""
    until: float
    """When the first frame after it was grabbed."""


CameraState = Literal["connecting", "connected", "reconnecting", "stopped"]


@dataclass
class CameraStatus:
    """What ``vapipe status`` shows of a camera."""

    state: CameraState = "connecting"
    since: float = 0.0
    """When it entered this state (Unix seconds)."""
    attempts: int = 0
    """Connection attempts that failed in the current outage."""
    last_frame_ts: float | None = None
    """When the last frame was grabbed."""
    reconnects: int = 0
    """Outages it came back from."""
    last_error: str | None = None
    """Why it is not connected: set before it turns ``reconnecting`` (``no frame for 2s``, the stream
    ended, a decoder error), then the last failed attempt's error; None while connected."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, now: float) -> str:
        """``connected, last frame 0.1s ago`` or ``reconnecting for 12s (4 attempts): no frame for 2s, last frame 13s ago``."""
        age = "no frame yet" if self.last_frame_ts is None else f"last frame {now - self.last_frame_ts:.1f}s ago"
        if self.state == "reconnecting":
            why = f": {self.last_error}" if self.last_error else ""
            return f"reconnecting for {now - self.since:.0f}s ({self.attempts} attempts){why}, {age}"
        return f"{self.state}, {age}"


def camera_line(status: dict[str, Any], now: float | None = None) -> str:
    """``CameraStatus.line`` of a status as a worker reports it (a dict)."""
    known = {k: v for k, v in status.items() if k in CameraStatus.__dataclass_fields__}
    return CameraStatus(**known).line(time.time() if now is None else now)


@dataclass(frozen=True, slots=True)
class _Ended:
    """A connection's last item: why it ended."""

    reason: str


class LiveCamera:
    """A camera's frames for as long as ``stop`` is not set: reconnects on failure or freeze, never ends.

    Args:
        open_source: opens a fresh connection and returns an iterable of frames (each with a
            ``grabbed_ts``), raising SourceError when the camera cannot be reached.
        fps: frames per second the stream is numbered at, to size a gap in frames.
        stall_s: no new frame for this long and the connection is abandoned.
        backoff_max_s: cap of the wait between connection attempts.
        stop: set to end the iteration (between frames, or during a wait).
        name: for logs (a stream id, never a URL).
        on_quiet: called, on the iterating thread, whenever no frame is at hand (a wait for the next
            one, the camera lost): the producer commits the frames it holds in an open transaction.

    Example:
        >>> for item in LiveCamera(lambda: VideoSource(spec).open(), 10, 5, 30, threading.Event(), "cam1"):
        ...     publish(item) if isinstance(item, Frame) else mark_skipped(item.frames)
    """

    def __init__(
        self,
        open_source: Callable[[], Any],
        fps: float,
        stall_s: float,
        backoff_max_s: float,
        stop: threading.Event,
        name: str,
        first: Any = None,
        on_quiet: Callable[[], None] | None = None,
    ) -> None:
        self.open_source = open_source
        self.on_quiet = on_quiet
        self.fps = fps
        self.stall_s = stall_s
        self.backoff_max_s = backoff_max_s
        self.stop = stop
        self.name = name
        self.status = CameraStatus(since=time.time())
        self._first = first
        """An already open source to read first (the one opened to check the camera)."""

    def __iter__(self) -> Iterator[Any]:
        last_ts: float | None = None
        while not self.stop.is_set():
            source = self._first if self._first is not None else self._connect()
            self._first = None
            if source is None:
                break
            after_outage = last_ts is not None
            for frame in self._read(source):
                if after_outage and last_ts is not None:  # the first frame since the camera came back
                    after_outage = False
                    gap = missed_frames(frame.grabbed_ts - last_ts, self.fps)
                    if gap:
                        yield Gap(gap, last_ts, frame.grabbed_ts)
                last_ts = frame.grabbed_ts
                yield frame
            if not self.stop.is_set():
                self._lost()
        self.status.state, self.status.since = "stopped", time.time()

    def _set(self, state: CameraState) -> None:
        if self.status.state != state:
            self.status.state, self.status.since = state, time.time()

    def _quiet(self) -> None:
        if self.on_quiet is not None:
            self.on_quiet()

    def _lost(self) -> None:
        """The connection is gone: ``status.last_error`` already says why (``_read`` set it)."""
        self._quiet()
        self.status.reconnects += 1
        self.status.attempts = 0
        self._set("reconnecting")
        logger.warning("%s: camera lost (%s); reconnecting", self.name, self.status.last_error)

    def _connect(self) -> Any:
        """A new connection, after as many attempts as it takes; None once stopped."""

        def failed(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.status.attempts += 1
            self.status.last_error = str(exc)
            logger.warning("%s: reconnect attempt %d failed: %s", self.name, self.status.attempts, exc)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(SourceError),
            wait=tenacity.wait_exponential_jitter(initial=0.5, max=self.backoff_max_s, jitter=0.5),
            stop=tenacity.stop_when_event_set(self.stop),
            sleep=self._sleep,
            before_sleep=failed,
            reraise=True,
        )
        try:
            return retrying(self.open_source)
        except SourceError:
            return None  # stopped while the camera was away

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)  # a stop ends the wait at once

    def _read(self, source: Any) -> Iterator[Any]:
        """Frames of one connection until it fails, ends or stalls; the read runs in its own thread.

        Whichever way it ends, ``status.last_error`` says why before this returns (so before the
        camera reads as reconnecting). A frozen camera is caught by one of two clocks, both at
        ``stall_s``: this thread's, when no frame is at hand for that long, or the source's own
        (FFmpeg's read timeout), which ends the stream; either way the reason is the same
        ``no frame for <stall_s>s``.
        """
        frames: queue.Queue[Any] = queue.Queue(maxsize=64)
        abandoned = threading.Event()
        stalled = f"no frame for {self.stall_s:g}s"

        def offer(item: Any) -> bool:
            while not abandoned.is_set():
                try:
                    frames.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def reader() -> None:
            # Only this connection's end reaches the status, through the queue: a reader abandoned
            # for a stall that fails later must not overwrite the reason of a newer connection.
            reason = "the stream ended"
            try:
                asked = time.monotonic()
                for frame in source:
                    if not offer(frame):
                        return
                    asked = time.monotonic()
                if time.monotonic() - asked >= 0.9 * self.stall_s:  # the source's own read timeout
                    reason = stalled
            except Exception as exc:  # a decoder error ends this connection, not the camera
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                source.close()  # here, not in the caller: closing under a running read would crash
                offer(_Ended(reason))

        threading.Thread(target=reader, name=f"camera-{self.name}", daemon=True).start()
        self._set("connected")
        self.status.attempts = 0
        self.status.last_error = None
        waited = 0.0
        try:
            while not self.stop.is_set():
                try:
                    item = frames.get(timeout=min(0.5, self.stall_s))
                except queue.Empty:
                    self._quiet()
                    waited += min(0.5, self.stall_s)
                    if waited >= self.stall_s:
                        self.status.last_error = stalled
                        return
                    continue
                if isinstance(item, _Ended):
                    self.status.last_error = item.reason
                    return
                waited = 0.0
                self.status.last_frame_ts = item.grabbed_ts
                yield item
        finally:
            abandoned.set()
