"""Live cameras without a network: URLs without secrets, gaps in frames, decimation, and reconnecting."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext as does_not_raise

import numpy as np
import pytest

from pipeline.counting import VehicleCounter
from pipeline.errors import DecodeError, SourceError
from pipeline.live import BehindGate, CameraStatus, Decimator, Gap, LiveCamera, missed_frames, redact_url
from pipeline.messages import Detections, FrameDetections, FrameMeta, SkippedFrame
from pipeline.sources import Frame, parse_source
from pipeline.streams import StreamCommand, decode_stream_command, encode_stream_command


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://admin:secret@cam.local/live", "rtsp://***@cam.local/live"),
        ("rtsp://admin@cam.local:554/live", "rtsp://***@cam.local:554/live"),
        ("rtsp://cam.local/live", "rtsp://cam.local/live"),
        ("http://cam/x.mjpg?user=a&password=secret&ch=2", "http://cam/x.mjpg?user=a&password=***&ch=2"),
        ("https://cam/x?token=secret", "https://cam/x?token=***"),
        ("video.mp4", "video.mp4"),
    ],
)
def test_redact_url_hides_passwords_and_tokens(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("text", "stream_id", "explicit", "expectation"),
    [
        ("rtsp://admin:secret@cam.local:554/live", "cam.local-554-live", False, does_not_raise()),
        ("cam1=rtsp://admin:secret@cam.local/live", "cam1", True, does_not_raise()),
        ("http://cam/x.mjpg?token=secret", "cam-x.mjpg", False, does_not_raise()),
        ("ftp://cam/live", None, False, pytest.raises(SourceError, match="unsupported URL scheme 'ftp'.*rtsp, rtsps")),
        ("cam1=gopher://admin:secret@cam/x", None, False, pytest.raises(SourceError, match=r"\*\*\*@cam")),
    ],
)
def test_a_url_stream_id_never_holds_its_credentials(text: str, stream_id: str | None, explicit: bool, expectation) -> None:
    with expectation as raised:
        spec = parse_source(text)
        assert spec.stream_id == stream_id and spec.explicit_id is explicit
        assert "secret" not in spec.stream_id and "secret" not in spec.display
        assert "secret" not in spec.for_run("r1").stream_id
    if raised is not None:
        assert "secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("gap_s", "fps", "expected"), [(0.1, 10, 0), (5.0, 10, 49), (1.0, 25, 24), (3.0, 0, 0), (1e9, 25, 100_000)]
)
def test_missed_frames(gap_s: float, fps: float, expected: int) -> None:
    assert missed_frames(gap_s, fps) == expected


def test_decimator_takes_a_camera_at_the_target_rate() -> None:
    taken = Decimator(10)
    assert sum(taken.take(i / 25) for i in range(250)) in (100, 101)  # 10 s of a 25 f/s camera
    every = Decimator(0)
    assert all(every.take(i / 25) for i in range(10))


class _FakeConnection:
    """A camera connection: ``frames`` frames at ``fps``, then it ends, or hangs (a frozen server).

    ``silent_s``: it hangs that long and then ends (what FFmpeg's read timeout does), or then
    raises ``fails``.
    """

    def __init__(
        self, frames: int, fps: float, hang: bool = False, silent_s: float = 0.0, fails: Exception | None = None
    ) -> None:
        self.frames, self.fps, self.hang, self.closed = frames, fps, hang, False
        self.silent_s, self.fails = silent_s, fails

    def __iter__(self):
        for i in range(self.frames):
            time.sleep(1 / self.fps)
            yield Frame(i, np.zeros((4, 4, 3), np.uint8), time.time())
        if self.hang:
            time.sleep(3)
        time.sleep(self.silent_s)
        if self.fails is not None:
            raise self.fails

    def close(self) -> None:
        self.closed = True


def test_live_camera_reconnects_after_failures_and_stalls_and_reports_the_gap() -> None:
    plan = [_FakeConnection(5, 50), SourceError("refused"), SourceError("refused"), _FakeConnection(5, 50, hang=True)]
    plan += [_FakeConnection(5, 50)]
    opened = []

    def open_source():
        item = plan.pop(0) if plan else _FakeConnection(1000, 50)
        if isinstance(item, Exception):
            raise item
        opened.append(item)
        return item

    stop = threading.Event()
    camera = LiveCamera(open_source, fps=50, stall_s=0.5, backoff_max_s=0.2, stop=stop, name="cam")
    items = []
    for item in camera:
        items.append(item)
        if sum(isinstance(i, Frame) for i in items) >= 15:
            stop.set()
    gaps = [i for i in items if isinstance(i, Gap)]
    assert len(gaps) == 2  # after the refused connections, and after the stall
    assert all(g.frames >= 1 for g in gaps)
    assert camera.status.reconnects == 2 and camera.status.state == "stopped"
    assert opened[0].closed


def test_a_camera_reads_as_reconnecting_only_with_the_reason_why() -> None:
    """A frozen camera is caught by whichever clock runs out first, the camera's own (no frame at
    hand for ``stall_s``) or the source's read timeout (the stream ends after ``stall_s`` without a
    frame): the reason is the same, and it is set before the camera reads as reconnecting."""
    stall_s = 0.5
    plan = [
        _FakeConnection(3, 50),  # ends: the server closed it
        _FakeConnection(3, 50, silent_s=stall_s),  # frozen, and the source's read timeout ends it
        _FakeConnection(3, 50, silent_s=1.0, fails=RuntimeError("late")),  # frozen: the camera's clock abandons it
        _FakeConnection(1000, 50),
    ]
    seen: list[tuple[str, str | None]] = []
    stop = threading.Event()

    def open_source():
        seen.append((camera.status.state, camera.status.last_error))  # what `vapipe status` shows meanwhile
        return plan.pop(0)

    camera = LiveCamera(open_source, fps=50, stall_s=stall_s, backoff_max_s=0.2, stop=stop, name="cam")
    last_frames = 0
    for item in camera:
        if len(seen) == 2 and isinstance(item, Frame) and item.index == 0:
            time.sleep(3 * stall_s)  # busy publishing: the camera's own clock does not run, the source's does
        if len(seen) == 4 and isinstance(item, Frame):
            last_frames += 1
            if last_frames >= 75:  # 1.5 s: past the abandoned connection's late failure
                stop.set()
    assert seen == [
        ("connecting", None),
        ("reconnecting", "the stream ended"),
        ("reconnecting", "no frame for 0.5s"),
        ("reconnecting", "no frame for 0.5s"),
    ]
    assert camera.status.last_error is None  # the abandoned reader's late failure is no error of the new connection


def test_camera_status_line() -> None:
    status = CameraStatus(state="reconnecting", since=100.0, attempts=4, last_frame_ts=99.0, last_error="no frame for 2s")
    assert status.line(112.0) == "reconnecting for 12s (4 attempts): no frame for 2s, last frame 13.0s ago"
    assert CameraStatus(state="connected", last_frame_ts=111.9).line(112.0) == "connected, last frame 0.1s ago"


def test_a_frame_past_a_streams_end_reopens_it() -> None:
    """A named camera's second run numbers on after its first run's end: the table counts it, complete again only at its new end."""
    from pipeline.messages import EndOfStream

    counter = VehicleCounter(labels=("car",), min_confidence=0.5, window_frames=10)
    for i in range(3):
        counter.update(FrameDetections(FrameMeta("cam1", i, float(i), 4, 4), Detections.empty()))
    assert counter.end_of_stream(EndOfStream("cam1", 3))
    counter.skip(SkippedFrame("cam1", 3, "disconnected"))
    assert not counter.streams["cam1"].complete
    counter.update(FrameDetections(FrameMeta("cam1", 4, 4.0, 4, 4), Detections.empty()))
    assert counter.end_of_stream(EndOfStream("cam1", 5))
    assert counter.table()["cam1"]["frames_skipped"] == {"disconnected": 1}


@pytest.mark.parametrize(
    ("pending", "oldest_age_s", "admitted"),
    [(0, None, True), (2, 0.3, True), (3, 0.3, False), (4, 0.3, False), (1, 1.5, False)],
)
def test_behind_gate_admits_what_clears_within_max_lag(pending: int, oldest_age_s: float | None, admitted: bool) -> None:
    gate = BehindGate(max_lag_s=1.0)
    gate.observe(0.0, consumed=0, pending=5)
    gate.observe(2.0, consumed=6, pending=5)  # 3 frames/s taken while frames waited: 2 ahead + itself = 1 s
    assert gate.rate() == 3.0
    assert gate.admit(pending, oldest_age_s) is admitted


def test_behind_gate_without_a_measured_rate_holds_one_frame_in_flight_and_measures_busy_time_only() -> None:
    gate = BehindGate(max_lag_s=1.0)
    assert gate.admit(1, 0.5) and not gate.admit(2, 0.5) and not gate.admit(1, 1.5)
    gate.observe(0.0, consumed=0, pending=3)
    gate.observe(2.0, consumed=2, pending=3)
    gate.observe(3.0, consumed=5, pending=0)  # the backlog cleared: every frame is admitted again
    gate.observe(10.0, consumed=5, pending=0)  # an idle spell says nothing of the rate
    assert gate.rate() == pytest.approx(5 / 3) and gate.admit(0, None)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            b"cam1",
            b'{"type":"stream","schema_version":1,"stream_id":"cam1","source":"rtsp://h/x"}',
            StreamCommand("cam1", "rtsp://h/x"),
        ),
        (b"cam1", None, StreamCommand("cam1", None)),
        (None, None, DecodeError),
        (b"cam1", b'{"type":"stream","schema_version":1}', DecodeError),
        (b"cam1", b"[1]", DecodeError),
    ],
)
def test_stream_commands_round_trip_and_reject_junk(key, value, expected) -> None:
    if expected is DecodeError:
        with pytest.raises(DecodeError):
            decode_stream_command(key, value)
        return
    assert decode_stream_command(key, value) == expected
    record = encode_stream_command(expected)
    assert decode_stream_command(record.key, record.value) == expected
    assert not record.headers  # a password may travel in the value only
