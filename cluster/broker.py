"""Run a single-node Apache Kafka 4.x broker in KRaft mode from Maven-resolved jars.

``install`` resolves ``org.apache.kafka:kafka_2.13`` and its runtime dependencies
with Maven from ``cluster/kafka/pom.xml`` into a cache folder, once. If
``KAFKA_HOME`` points at an official distribution, its ``libs/`` is used instead.
``start`` writes ``server.properties`` from the config, formats storage on first
use, launches the broker in the background and waits until it answers.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import BrokerConfig, KafkaConfig
from pipeline.errors import BrokerError

__all__ = ["BrokerStatus", "KafkaBroker", "local_broker", "server_properties", "POM_PATH"]

logger = logging.getLogger(__name__)

POM_PATH = Path(__file__).parent / "kafka" / "pom.xml"
LOG4J_PATH = Path(__file__).parent / "kafka" / "log4j2.properties"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    state_dir: str
    already_running: bool = False
    ready_s: float | None = None


def server_properties(cfg: BrokerConfig, data_dir: Path, max_message_bytes: int) -> str:
    """The broker's ``server.properties``: combined broker+controller, one node, frame-sized messages."""
    advertised = cfg.advertised_host or cfg.listen_host
    if advertised in ("0.0.0.0", "::"):
        raise BrokerError(
            f"broker.advertised_host must be set to an address other machines can reach when listen_host is {cfg.listen_host}"
        )
    controller_host = "127.0.0.1" if cfg.listen_host in ("0.0.0.0", "::") else cfg.listen_host
    # Room for headers and batch overhead on top of the largest frame.
    limit = max_message_bytes + 1024 * 1024
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{controller_host}:{cfg.controller_port}",
        "listeners": f"PLAINTEXT://{cfg.listen_host}:{cfg.port},CONTROLLER://{controller_host}:{cfg.controller_port}",
        # What clients are told to connect to: must be reachable from every Ray node.
        "advertised.listeners": f"PLAINTEXT://{advertised}:{cfg.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "6",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "message.max.bytes": str(limit),
        "replica.fetch.max.bytes": str(limit),
        "socket.request.max.bytes": str(max(limit * 2, 104857600)),
        "log.retention.hours": "24",
        "log.segment.bytes": str(256 * 1024 * 1024),
        "auto.create.topics.enable": "false",
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class KafkaBroker:
    """Installs, starts, stops and reports the broker whose files live in ``state_dir``."""

    def __init__(self, broker: BrokerConfig, kafka: KafkaConfig | None = None) -> None:
        self.cfg = broker
        self.kafka = kafka or KafkaConfig(bootstrap_servers=f"{broker.advertised_host or broker.listen_host}:{broker.port}")
        self.state_dir = Path(broker.state_dir).expanduser().resolve()
        self.data_dir = self.state_dir / "data"
        self.log_dir = self.state_dir / "logs"
        self.pid_file = self.state_dir / "broker.pid"
        self.props_file = self.state_dir / "server.properties"

    @property
    def bootstrap(self) -> str:
        return f"{self.cfg.advertised_host or self.cfg.listen_host}:{self.cfg.port}"

    # -- jars ----------------------------------------------------------------
    @staticmethod
    def jar_cache() -> Path:
        digest = hashlib.sha256(POM_PATH.read_bytes()).hexdigest()[:12]
        base = Path(os.environ.get("VAPIPE_CACHE", Path.home() / ".cache" / "vapipe")).expanduser()
        return base / f"kafka-jars-{digest}"

    def classpath(self) -> str:
        home = os.environ.get("KAFKA_HOME")
        if home:
            libs = Path(home) / "libs"
            if not any(libs.glob("kafka_2.13-*.jar")):
                raise BrokerError(f"KAFKA_HOME={home} is not a Kafka distribution (no libs/kafka_2.13-*.jar)")
            return f"{libs}/*"
        return f"{self.install()}/*"

    def install(self) -> Path:
        """Resolve the broker jars with Maven once; later calls reuse the cache."""
        jars = self.jar_cache()
        if (jars / ".complete").exists():
            return jars
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("Maven (mvn) not found: install it or set KAFKA_HOME to a Kafka distribution")
        tmp = jars.with_name(jars.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        logger.info("resolving Kafka jars from Maven Central into %s", jars)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM_PATH),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise BrokerError(f"Maven could not resolve the Kafka jars: {' | '.join(tail) or proc.returncode}")
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(jars, ignore_errors=True)
        tmp.rename(jars)
        return jars

    # -- lifecycle -----------------------------------------------------------
    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and "kafka.Kafka" in _cmdline(pid):
            return pid
        return None

    def status(self) -> BrokerStatus:
        pid = self._running_pid()
        return BrokerStatus(running=pid is not None, pid=pid, bootstrap=self.bootstrap, state_dir=str(self.state_dir))

    def _format(self, java: str, classpath: str) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        proc = subprocess.run(
            [
                java,
                "-cp",
                classpath,
                f"-Dlog4j2.configurationFile={LOG4J_PATH}",
                f"-Dkafka.logs.dir={self.log_dir}",
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                "-c",
                str(self.props_file),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed: {(proc.stderr or proc.stdout).strip()[-300:]}")

    def start(self) -> BrokerStatus:
        """Start the broker unless this state folder's broker already runs; wait until it answers."""
        pid = self._running_pid()
        if pid is not None:
            return BrokerStatus(True, pid, self.bootstrap, str(self.state_dir), already_running=True)
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java not found: Kafka 4 needs Java 17 or newer on PATH")
        classpath = self.classpath()
        for folder in (self.data_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.props_file.write_text(server_properties(self.cfg, self.data_dir, self.kafka.max_message_bytes))
        self._format(java, classpath)
        out = open(self.log_dir / "broker.out", "ab")  # noqa: SIM115 - handed to the broker process, closed below
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [
                java,
                f"-Xmx{self.cfg.heap}",
                f"-Xms{self.cfg.heap}",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={LOG4J_PATH}",
                f"-Dkafka.logs.dir={self.log_dir}",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(self.props_file),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        self.pid_file.write_text(f"{proc.pid}\n")
        self._wait_ready(proc, t0)
        ready = time.monotonic() - t0
        logger.info("broker ready at %s after %.1fs", self.bootstrap, ready)
        return BrokerStatus(True, proc.pid, self.bootstrap, str(self.state_dir), ready_s=ready)

    def _wait_ready(self, proc: subprocess.Popen[bytes], t0: float) -> None:
        import socket

        host, port = self.cfg.advertised_host or self.cfg.listen_host, self.cfg.port
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        while time.monotonic() - t0 < self.cfg.start_timeout_s:
            if proc.poll() is not None:
                raise BrokerError(f"Kafka broker exited with code {proc.returncode} during start-up: {self.last_error()}")
            try:
                with socket.create_connection((host, port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.3)
                continue
            from cluster.clients import check_broker

            try:
                check_broker(self.kafka.model_copy(update={"bootstrap_servers": f"{host}:{port}", "connect_timeout_s": 5}))
                return
            except BrokerError:
                time.sleep(0.5)
        self.stop()
        raise BrokerError(
            f"Kafka broker did not answer on {host}:{port} within {self.cfg.start_timeout_s:g}s: {self.last_error()}"
        )

    def last_error(self) -> str:
        for name in ("server.log", "broker.out"):
            path = self.log_dir / name
            if path.exists():
                lines = [line for line in path.read_text(errors="replace").splitlines() if "ERROR" in line or "Exception" in line]
                if lines:
                    return lines[-1].strip()[:300]
        return "no error in the broker log"

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker this state folder started (and only that one). Returns whether one was running."""
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid_alive(pid):
            try:  # reap it if it is our child (tests start and stop in one process)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        if _pid_alive(pid):
            logger.warning("broker %d ignored SIGTERM for %.0fs; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def logs(self, lines: int = 50) -> str:
        path = self.log_dir / "server.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def local_broker(
    broker: BrokerConfig, kafka: KafkaConfig, on_start: Callable[[KafkaBroker], None] | None = None
) -> Iterator[KafkaBroker]:
    """A broker for the block: the one at ``kafka.bootstrap_servers`` if it answers, else a local one
    started here and stopped on the way out (``vapipe demo``)."""
    from cluster.clients import check_broker
    from pipeline.errors import PipelineError

    local = KafkaBroker(broker, kafka)
    try:
        check_broker(kafka.model_copy(update={"connect_timeout_s": 3}))
    except PipelineError:
        if on_start is not None:
            on_start(local)
        local.start()
    else:
        yield local
        return
    try:
        yield local
    finally:
        local.stop()
