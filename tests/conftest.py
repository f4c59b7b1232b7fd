"""Shared fixtures: the shared data folder, a real Kafka broker, per-test topics and groups, local Ray.

Tests that need Kafka, Ray or the model fail (never skip) when CI=true and the
part is missing. Outside CI, a test session without VAPIPE_TEST_BOOTSTRAP starts
a private broker of its own from the Maven-resolved jars.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings, load_settings, set_path

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = Path(__file__).resolve().parent.parent


def _missing(what: str) -> None:
    """A required part is absent: fail in CI (and everywhere: a skipped test proves nothing)."""
    pytest.fail(f"{what} (CI={os.environ.get('CI', '')})", pytrace=False)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = Path(os.environ.get("VAPIPE_SHARED", ROOT.parent / "shared")).resolve()
    if not (path / "models").is_dir():
        _missing(f"shared test data not found at {path}; set VAPIPE_SHARED")
    return path


@pytest.fixture(scope="session")
def model_path(shared_dir: Path) -> str:
    path = shared_dir / "models" / "yolov8n_int8.onnx"
    if not path.is_file():
        _missing(f"model not found: {path}")
    return str(path)


class ReferenceDetector:
    """The shared model in this process, one detection per distinct JPEG for the whole session.

    End-to-end tests compare what the pipeline put on topic C with this; the same frames of the
    same video encode to the same JPEG bytes in every test, so each is detected once.
    """

    def __init__(self, model: str) -> None:
        from pipeline.config import ModelConfig
        from pipeline.detector import UltralyticsDetector

        self.detector = UltralyticsDetector(ModelConfig(name=model))
        self.cache: dict[bytes, Any] = {}

    def detect(self, jpeg: bytes) -> Any:
        import hashlib

        from pipeline.codecs import decode_jpeg

        key = hashlib.sha256(jpeg).digest()
        if key not in self.cache:
            self.cache[key] = self.detector.detect([decode_jpeg(jpeg)])[0]
        return self.cache[key]


@pytest.fixture(scope="session")
def reference_detector(model_path: str) -> ReferenceDetector:
    return ReferenceDetector(model_path)


@pytest.fixture(scope="session")
def highway(shared_dir: Path) -> str:
    return str(shared_dir / "videos" / "highway-320x240.avi")


@pytest.fixture(scope="session")
def race(shared_dir: Path) -> str:
    return str(shared_dir / "videos" / "race-1280x720.mp4")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all bound at once, so two calls cannot hand out the same one."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real broker: $VAPIPE_TEST_BOOTSTRAP (CI starts one) or a private one."""
    from cluster.clients import check_broker
    from pipeline.config import KafkaConfig
    from pipeline.errors import BrokerError

    given = os.environ.get("VAPIPE_TEST_BOOTSTRAP")
    if given:
        try:
            check_broker(KafkaConfig(bootstrap_servers=given, connect_timeout_s=10))
        except BrokerError as exc:
            _missing(f"VAPIPE_TEST_BOOTSTRAP={given} does not answer: {exc}")
        yield given
        return
    if IN_CI:
        _missing("CI=true but VAPIPE_TEST_BOOTSTRAP is not set: .ci/run must start the broker")
    with private_broker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker.bootstrap


@contextmanager
def private_broker(state_dir: Path) -> Iterator[Any]:
    """A broker of the caller's own on free ports (a test may stop and restart it)."""
    from cluster.broker import KafkaBroker
    from pipeline.config import BrokerConfig
    from pipeline.errors import BrokerError

    port, controller_port = free_ports(2)
    broker = KafkaBroker(BrokerConfig(port=port, controller_port=controller_port, state_dir=str(state_dir), heap="512m"))
    try:
        broker.start()
    except BrokerError as exc:
        _missing(f"could not start a test broker: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


def build_settings(bootstrap: str, out_dir: Path, model: str, **overrides: Any) -> Settings:
    """Settings with unique topics and groups, output under ``out_dir``; overrides as ``section__field=value``."""
    tag = uuid.uuid4().hex[:8]
    tree: dict[str, Any] = {
        # A killed replica's partitions move after 10 s instead of 20 (recovery tests wait for that).
        "kafka": {"bootstrap_servers": bootstrap, "session_timeout_ms": 10000, "heartbeat_interval_ms": 1000},
        "topics": {
            key: {"name": f"t{tag}.{key}"}
            for key in ("frames", "detected_frames", "detections", "counts", "counts_changelog", "dead_letter", "streams")
        },
        "group_prefix": f"g{tag}",
        "output_dir": str(out_dir / f"out-{tag}"),
        "model": {"name": model},
        "producer": {"fps": 0},
    }
    tree["topics"]["counts_changelog"]["config"] = {"cleanup.policy": "compact"}
    tree["topics"]["streams"]["config"] = {"cleanup.policy": "compact"}
    for dotted, value in overrides.items():
        set_path(tree, dotted.split("__"), value)
    return load_settings(None, overrides=tree, environ={})


@pytest.fixture
def make_settings(kafka_bootstrap: str, tmp_path: Path, model_path: str) -> Any:
    """Settings with unique topics and groups for this test, output under tmp_path."""

    def make(**overrides: Any) -> Settings:
        return build_settings(kafka_bootstrap, tmp_path, model_path, **overrides)

    return make


@contextmanager
def _ray_start(**kwargs: Any) -> Iterator[Any]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(namespace="vapipe", include_dashboard=False, logging_level="WARNING", **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """One local Ray for the session: logical CPUs so every replica of every stage fits."""
    try:
        with _ray_start(num_cpus=4) as ray:
            yield ray
    except Exception as exc:  # Ray failing to start is a failure, not a skip
        _missing(f"Ray did not start: {exc}")


CAMERA_PASSWORD = "s3cretPW"
CAMERA_FPS = 10


@pytest.fixture(scope="module")
def camera(highway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real RTSP camera (GStreamer, 10 f/s, user admin with ``CAMERA_PASSWORD``) serving the looped
    highway video, one per test module; a test may stop, start or freeze it."""
    from cluster.rtsp import RtspServer, check_rtsp_server
    from pipeline.errors import PipelineError

    try:
        check_rtsp_server()
    except PipelineError as exc:
        _missing(str(exc))
    log = tmp_path_factory.mktemp("rtsp") / "server.log"
    server = RtspServer(highway, port=free_port(), fps=CAMERA_FPS, user="admin", password=CAMERA_PASSWORD, log=log)
    with server:
        yield server
