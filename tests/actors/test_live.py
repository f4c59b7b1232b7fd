"""Live cameras against a real RTSP server (GStreamer, scripts/rtsp_server.py) and the real broker.

The camera is stopped and started again, or frozen, while the producer runs; the stages then run
directly (no Ray, calibration detector) and every published frame must be counted once, the outage
marked skipped (``disconnected``), and the password must appear in no record, file or log line.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from actors.producer import FrameProducer
from actors.stages import CountWorker, InterWorker, read_table
from cluster.reading import read_all
from cluster.rtsp import RtspServer
from cluster.topics import create_topics
from pipeline.codecs import decode_detections, decode_frame
from pipeline.live import camera_line
from pipeline.messages import EndOfStream, SkippedFrame
from pipeline.sources import parse_source
from tests.conftest import CAMERA_FPS as FPS
from tests.conftest import CAMERA_PASSWORD as PASSWORD

pytestmark = [pytest.mark.kafka, pytest.mark.rtsp]


def _settings(make_settings: Any, **overrides: Any) -> Any:
    defaults = {"model__name": "sleep:1ms", "producer__fps": FPS, "producer__stall_s": 2.0, "producer__reconnect_max_s": 1.0}
    s = make_settings(**(defaults | overrides))
    create_topics(s.kafka, s.topics.all())
    return s


def _produce_with(settings: Any, source: str, during: Any) -> tuple[dict[str, Any], FrameProducer]:
    """Run the producer in a thread while ``during(producer)`` acts on the camera; returns its result."""
    producer = FrameProducer(settings, parse_source(source))
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out.update(producer.run())
        except BaseException as exc:  # surfaced below
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        during(producer)
    except BaseException:
        producer.stop()  # a failed check must not leave the producer reconnecting to a stopped camera
        raise
    finally:
        thread.join(timeout=120)
    if "error" in out:
        raise out["error"]
    return out, producer


def _wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _count_everything(settings: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Inter and count over what the producer published; returns the stream's table row."""
    frames = result["frames_published"] - result["frames_disconnected"]
    InterWorker(settings, "inter-0").run(max_messages=frames + 1, timeout_s=120)
    CountWorker(settings, "count-0").run(max_messages=frames + result["frames_disconnected"] + 1, timeout_s=120)
    return read_table(settings)[result["stream_id"]]


def _assert_no_secret(settings: Any, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """The password is in no Kafka key, header or JSON value, no file under the output folder, no log line."""
    secret = PASSWORD.encode()
    for spec in (settings.topics.frames, settings.topics.detections, settings.topics.counts, settings.topics.counts_changelog):
        for r in read_all(settings.kafka, spec.name, timeout_s=10):
            assert secret not in (r.key or b"")
            assert all(secret not in k.encode() + v for k, v in r.headers or [])
            if spec is not settings.topics.frames:
                assert secret not in (r.value or b"")
    for path in Path(settings.output_dir).rglob("*"):
        assert PASSWORD not in str(path)
        if path.is_file():
            assert secret not in path.read_bytes()
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err + caplog.text


AWAY_S = 5
TRANSACTION_TIMEOUT_MS = 2000
"""The producer's transaction timeout in the outage test, shorter than the outage (kafka-python's is 60 s)."""


def test_a_camera_that_goes_away_comes_back_and_every_frame_is_counted_once(
    make_settings, camera: RtspServer, caplog, capfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage outlasts the producer's transaction timeout: a frame left in an open transaction
    while the camera is away would be aborted by the broker (lost, the producer fenced). Every frame
    published before the outage must already be committed while the camera is still away."""
    caplog.set_level(logging.INFO)
    s = _settings(make_settings, producer__max_frames=30)
    away_s = AWAY_S
    assert away_s * 1000 > TRANSACTION_TIMEOUT_MS

    def outage(producer: FrameProducer) -> None:
        _wait_for(lambda: producer.published >= 10)
        camera.stop()
        started = time.monotonic()
        _wait_for(lambda: producer.camera is not None and producer.camera.status.state == "reconnecting")
        published = producer.published
        visible = [r for r in read_all(s.kafka, s.topics.frames.name, timeout_s=10) if r.value]
        assert len(visible) == published, f"{published - len(visible)} published frames still uncommitted while away"
        time.sleep(max(0.0, away_s - (time.monotonic() - started)))
        assert producer.camera is not None and producer.camera.status.state == "reconnecting"
        assert producer.camera.status.attempts >= 1
        camera.start()

    with monkeypatch.context() as patched:  # the producer's transactions only: the stages keep the default
        patched.setitem(KafkaProducer.DEFAULT_CONFIG, "transaction_timeout_ms", TRANSACTION_TIMEOUT_MS)
        result, _ = _produce_with(s, f"cam1={camera.url}", outage)
    assert result["stream_id"] == "cam1"
    gap = result["frames_disconnected"]
    assert gap >= (away_s - 1) * FPS  # numbered on over the outage
    assert result["frames_published"] == 30 + gap
    # Topic A holds every published frame once, numbered 0..N-1 except the outage; C marks the outage.
    indices = sorted(
        m.frame_index
        for m, _ in (decode_frame(r.value, r.headers) for r in read_all(s.kafka, s.topics.frames.name, timeout_s=10) if r.value)
    )
    assert len(indices) == len(set(indices)) == 30 and indices[-1] == 30 + gap - 1
    markers = [decode_detections(r.value) for r in read_all(s.kafka, s.topics.detections.name, timeout_s=10)]
    skipped = sorted(m.frame_index for m in markers if isinstance(m, SkippedFrame))
    assert len(skipped) == gap and set(skipped).isdisjoint(indices) and skipped == list(range(skipped[0], skipped[0] + gap))
    row = _count_everything(s, result)
    assert row["frames_applied"] == 30 and row["frames_skipped"] == {"disconnected": gap} and row["complete"]
    _assert_no_secret(s, caplog, capfd)


def test_a_frozen_camera_is_reconnected_after_stall_s(make_settings, camera: RtspServer) -> None:
    """A frozen camera is caught by the producer's clock or by FFmpeg's read timeout, whichever runs
    out first on a busy machine (both are ``stall_s``): either way ``vapipe status`` says why."""
    s = _settings(make_settings, producer__max_frames=25)
    seen: dict[str, Any] = {}

    def reconnecting(producer: FrameProducer) -> bool:
        status = producer.stats()["camera"]  # one report: its state and its reason together
        if status is None or status["state"] != "reconnecting":
            return False
        seen["status"] = status
        return True

    def freeze(producer: FrameProducer) -> None:
        _wait_for(lambda: producer.published >= 5)
        camera.freeze()  # the connection stays open; nothing more is sent
        frozen_at = time.monotonic()
        try:
            _wait_for(lambda: reconnecting(producer), 20)
            seen["after_s"] = time.monotonic() - frozen_at
        finally:
            camera.thaw()

    result, _ = _produce_with(s, f"cam1={camera.url}", freeze)
    assert 1.5 <= seen["after_s"] <= 8  # stall_s is 2 s
    assert seen["status"]["last_error"] == "no frame for 2s", seen["status"]
    assert ": no frame for 2s," in camera_line(seen["status"])  # what `vapipe status` shows
    assert result["frames_disconnected"] > 0
    row = _count_everything(s, result)
    assert row["frames_applied"] == 25 and row["complete"]


def test_a_named_camera_numbers_on_across_runs_and_each_run_is_counted(make_settings, camera: RtspServer) -> None:
    s = _settings(make_settings, producer__max_frames=8)
    first, _ = _produce_with(s, f"cam1={camera.url}", lambda p: None)
    assert first["frames_published"] == 8
    InterWorker(s, "inter-0").run(max_messages=9, timeout_s=60)
    assert CountWorker(s, "count-0").run(max_messages=9, timeout_s=60)["table"]["cam1"]["complete"]
    second, _ = _produce_with(s, f"cam1={camera.url}", lambda p: None)
    assert second["frames_resumed"] == 8 and second["frames_published"] == 16
    InterWorker(s, "inter-0").run(max_messages=9, timeout_s=60)
    count = CountWorker(s, "count-0").run(max_messages=9, timeout_s=60)
    assert count["duplicates"] == 0
    row = read_table(s)["cam1"]
    assert row["frames_applied"] == 16 and row["complete"] and row["frames_expected"] == 16
    ends = [r for r in read_all(s.kafka, s.topics.frames.name, timeout_s=10) if not r.value]
    assert [decode_frame(r.value, r.headers).frames_published for r in ends] == [8, 16]
    assert all(isinstance(decode_frame(r.value, r.headers), EndOfStream) for r in ends)


def test_realtime_mode_under_3x_overload_keeps_latency_bounded_and_accounts_for_every_frame(
    make_settings, camera: RtspServer
) -> None:
    """A 10 f/s camera into an InterConsumer that takes 300 ms a frame (about 3.3 f/s): lossless, the
    backlog and the latency grow all run long; real-time, frames are dropped at the source (``behind``)
    and a counted frame waited at most about ``max_lag_s`` plus one model latency."""
    max_lag_s, model_s = 1.0, 0.3
    s = _settings(
        make_settings,
        producer__max_frames=80,
        producer__mode="realtime",
        producer__max_lag_s=max_lag_s,
        model__name=f"sleep:{int(model_s * 1000)}ms",
        inter__batch_size=1,
    )
    stats: dict[str, Any] = {}

    def stage(name: str, worker: Any) -> threading.Thread:
        thread = threading.Thread(target=lambda: stats.update({name: worker.run(timeout_s=120, idle_timeout_s=8)}))
        thread.start()
        return thread

    workers = [InterWorker(s, "inter-0"), CountWorker(s, "count-0")]
    threads = [stage("inter", workers[0]), stage("count", workers[1])]
    # Frames published before the InterConsumer owns its partitions would wait seconds for its group join.
    _wait_for(lambda: all(w.stats()["ready"] and w.stats()["assigned"] for w in workers), 60)
    result, _ = _produce_with(s, f"cam1={camera.url}", lambda p: None)
    for thread in threads:
        thread.join(timeout=180)
    behind = result["frames_behind"]
    assert behind > 0 and result["frames_published"] == 80
    row = read_table(s)["cam1"]
    assert row["frames_applied"] + row["frames_skipped"]["behind"] == 80 and row["complete"]
    p99_s = stats["count"]["latency_ms"]["p99"] / 1000
    assert p99_s <= max_lag_s + model_s + 1.0, stats["count"]["latency_ms"]  # lossless: about 15 s
