"""Run Apache Kafka 4.x in KRaft mode from Maven-resolved jars: one broker, or a cluster of several.

``install`` resolves ``org.apache.kafka:kafka_2.13`` and its runtime dependencies
with Maven from ``cluster/kafka/pom.xml`` into a cache folder, once. If
``KAFKA_HOME`` points at an official distribution, its ``libs/`` is used instead.
``start`` writes ``server.properties`` from the config, formats storage on first
use, launches the broker in the background and waits until it answers.

``KafkaCluster`` runs ``n`` such processes from the same jars, every one both broker and
controller (one controller quorum of ``n`` voters), node ``i`` on ports ``port + 2(i-1)`` and
``controller_port + 2(i-1)`` with its files in ``state_dir/node-<i>``; internal topics are
replicated to all of them (at most 3) with ``min.insync.replicas=2``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.security import admin_config, ensure_material, scram_format_args, secure_properties, security_files, write_private
from pipeline.config import BrokerConfig, KafkaConfig
from pipeline.errors import BrokerError

__all__ = ["BrokerStatus", "KafkaBroker", "KafkaCluster", "decisive_error", "local_broker", "server_properties", "POM_PATH"]

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


def _controller_host(cfg: BrokerConfig) -> str:
    return "127.0.0.1" if cfg.listen_host in ("0.0.0.0", "::") else cfg.listen_host


_DEDUPE_BUFFER_DEFAULT = 128 * 1024 * 1024
"""Kafka's ``log.cleaner.dedupe.buffer.size``: one buffer allocated whole when the log cleaner starts."""


def heap_bytes(heap: str) -> int | None:
    """``-Xmx``-style size (``768m``, ``1g``, ``524288k``, bytes) in bytes; None if it is not one."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)\s*", heap)
    if m is None:
        return None
    return int(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " ")


def dedupe_buffer_bytes(heap: str) -> int:
    """The log cleaner's dedupe buffer for a broker of this heap: an eighth of it, at most Kafka's 128 MiB.

    The cleaner allocates the whole buffer as one array when the broker starts its log manager. Kafka's
    128 MiB default is half of a 256 MiB heap, and G1 must find it contiguous: on a busy start the
    allocation fails, ``OutOfMemoryError`` stops the broker with "Error starting LogManager". An eighth
    still indexes over a million keys of the compacted topics (offsets, transactions, stage state) per pass.
    """
    size = heap_bytes(heap)
    if size is None:
        return _DEDUPE_BUFFER_DEFAULT
    return max(4 * 1024 * 1024, min(_DEDUPE_BUFFER_DEFAULT, size // 8))


def server_properties(
    cfg: BrokerConfig, data_dir: Path, max_message_bytes: int, node_id: int = 1, voters: str | None = None
) -> str:
    """The broker's ``server.properties``: combined broker+controller, frame-sized messages.

    Args:
        node_id: this node's id in the quorum.
        voters: ``controller.quorum.voters`` of a cluster (``1@host:port,2@...``); None: this node alone.
    """
    advertised = cfg.advertised_host or cfg.listen_host
    if advertised in ("0.0.0.0", "::"):
        raise BrokerError(
            f"broker.advertised_host must be set to an address other machines can reach when listen_host is {cfg.listen_host}"
        )
    controller_host = _controller_host(cfg)
    nodes = len(voters.split(",")) if voters else 1
    # Internal topics on every node (at most 3); with several, a write needs 2 in sync, so one may die.
    replication, min_isr = str(min(nodes, 3)), str(min(nodes, 2))
    # Room for headers and batch overhead on top of the largest frame.
    limit = max_message_bytes + 1024 * 1024
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters or f"{node_id}@{controller_host}:{cfg.controller_port}",
        "listeners": f"PLAINTEXT://{cfg.listen_host}:{cfg.port},CONTROLLER://{controller_host}:{cfg.controller_port}",
        # What clients are told to connect to: must be reachable from every Ray node.
        "advertised.listeners": f"PLAINTEXT://{advertised}:{cfg.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "6",
        "offsets.topic.replication.factor": replication,
        "transaction.state.log.replication.factor": replication,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replication,
        "share.coordinator.state.topic.min.isr": min_isr,
        "default.replication.factor": replication,
        "min.insync.replicas": min_isr,
        "group.initial.rebalance.delay.ms": "0",
        "message.max.bytes": str(limit),
        "replica.fetch.max.bytes": str(limit),
        "socket.request.max.bytes": str(max(limit * 2, 104857600)),
        "log.retention.hours": "24",
        "log.segment.bytes": str(256 * 1024 * 1024),
        "log.cleaner.dedupe.buffer.size": str(dedupe_buffer_bytes(cfg.heap)),
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


def _reap(pid: int) -> None:
    """Collect a broker that is our child (tests start and stop it in one process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` has exited (reaping it when it is our child); returns whether it has.

    A JVM holds its log folder's ``.lock`` until it is gone, so a broker started on the same
    folder before then fails ("Failed to acquire lock").
    """
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(pid)
        if not _pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (what ``kafka-storage random-uuid`` prints)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_RECORD = re.compile(r"^\[[^\]]*\] ([A-Z]+) (.*?)(?: \([\w.$]+\))?$")
"""One record of ``log4j2.properties``'s layout: ``[time] LEVEL message (logger)``."""


def decisive_error(lines: list[str], limit: int = 400) -> str | None:
    """The error that stopped a broker, in one line, from its log: None when the log has none.

    That is the last fatal fault, else the last ERROR record, followed by the root cause of the
    stack trace logged under it (the exception, or its last ``Caused by:``): a fatal fault's
    record alone ("Error starting LogManager") does not say why, its trace does
    ("java.lang.OutOfMemoryError: Java heap space"). A log without records (the JVM's own
    ``broker.out``) gives its last line that names an error or exception; records of lower levels
    never count (the INFO line quoting a NotControllerException is no error).
    """
    fatal: tuple[str, str | None] | None = None
    last: tuple[str, str | None] | None = None
    current: list[str | None] | None = None  # [message, cause] of the ERROR record being read
    for line in lines:
        record = _RECORD.match(line)
        if record is not None:
            if current is not None:
                last = (current[0] or "", current[1])
                fatal = last if "fatal" in last[0].lower() else fatal
            current = [record[2].strip(), None] if record[1] in ("ERROR", "FATAL") else None
        elif current is not None and line.strip() and not line[0].isspace():
            current[1] = line.strip().removeprefix("Caused by: ")
    if current is not None:
        last = (current[0] or "", current[1])
        fatal = last if "fatal" in last[0].lower() else fatal
    chosen = fatal or last
    if chosen is None:
        named = [line.strip() for line in lines if not _RECORD.match(line) and any(w in line for w in ("Error", "Exception"))]
        return named[-1][:limit] if named else None
    message, cause = chosen
    return (f"{message}: {cause}" if cause and cause not in message else message)[:limit]


class KafkaBroker:
    """Installs, starts, stops and reports the broker whose files live in ``state_dir``.

    Args:
        node_id, voters, cluster_id: its place in a ``KafkaCluster`` (defaults: a cluster of one).
        wrap: command prefix the JVM is started under, e.g. ``ip netns exec <host>`` (the lab).
        security_dir: the folder whose ``security/`` a secured node uses: a cluster's nodes share
            one CA, one broker certificate and one set of users (default: its own ``state_dir``).
        cert_hosts: more names the broker certificate must cover (every node's, in a cluster).
    """

    def __init__(
        self,
        broker: BrokerConfig,
        kafka: KafkaConfig | None = None,
        *,
        node_id: int = 1,
        voters: str | None = None,
        cluster_id: str | None = None,
        wrap: tuple[str, ...] = (),
        security_dir: Path | None = None,
        cert_hosts: tuple[str, ...] = (),
    ) -> None:
        self.cfg = broker
        self.node_id, self.voters, self.cluster_id, self.wrap = node_id, voters, cluster_id, wrap
        self.kafka = kafka or KafkaConfig(bootstrap_servers=f"{broker.advertised_host or broker.listen_host}:{broker.port}")
        self.state_dir = Path(broker.state_dir).expanduser().resolve()
        self.data_dir = self.state_dir / "data"
        self.log_dir = self.state_dir / "logs"
        self.pid_file = self.state_dir / "broker.pid"
        self.props_file = self.state_dir / "server.properties"
        self.security_dir = security_dir or self.state_dir
        self.cert_hosts = cert_hosts
        self.security = security_files(broker, self.security_dir)
        """Set when this broker is secured (``broker.secure`` or a state folder secured before)."""
        if self.security is not None:
            self.kafka = admin_config(self.kafka, self.security)

    @property
    def bootstrap(self) -> str:
        return f"{self.cfg.advertised_host or self.cfg.listen_host}:{self.cfg.port}"

    @property
    def label(self) -> str:
        """How errors name it: which node of a cluster failed to start, with its log."""
        return "Kafka broker" if self.voters is None else f"Kafka node {self.node_id} (log: {self.log_dir / 'server.log'})"

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
            if self.security is not None and not self._formatted_marker.exists():
                raise BrokerError(
                    f"{self.data_dir} was formatted without --secure, so it has no users: stop the broker and "
                    "delete that folder to start a secured one"
                )
            return
        extra = scram_format_args(self.security) if self.security is not None else []
        cluster_id = self.cluster_id or new_cluster_id()
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
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        if self.security is not None:
            self._formatted_marker.write_text("SCRAM users created\n")

    @property
    def _formatted_marker(self) -> Path:
        """Written once this node's storage holds the SCRAM users (one per node of a secured cluster)."""
        assert self.security is not None
        return self.security.root / ("formatted" if self.voters is None else f"formatted-node-{self.node_id}")

    def start(self) -> BrokerStatus:
        """Start the broker unless this state folder's broker already runs; wait until it answers."""
        pid = self._running_pid()
        if pid is not None:
            return BrokerStatus(True, pid, self.bootstrap, str(self.state_dir), already_running=True)
        t0 = time.monotonic()
        proc = self.launch()
        self._wait_ready(proc, t0)
        ready = time.monotonic() - t0
        logger.info("broker ready at %s after %.1fs", self.bootstrap, ready)
        return BrokerStatus(True, proc.pid, self.bootstrap, str(self.state_dir), ready_s=ready)

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the JVM without waiting for it: a quorum of several answers only once a majority runs."""
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java not found: Kafka 4 needs Java 17 or newer on PATH")
        classpath = self.classpath()
        for folder in (self.data_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        props = server_properties(self.cfg, self.data_dir, self.kafka.max_message_bytes, self.node_id, self.voters)
        if self.security is not None:
            hosts = [self.cfg.listen_host, self.cfg.advertised_host or "", *self.cert_hosts]
            props = secure_properties(props, ensure_material(self.security_dir, hosts), self.cfg.ssl_client_auth)
        write_private(self.props_file, props.encode())  # holds the brokers' own password when secured
        self._format(java, classpath)
        out = open(self.log_dir / "broker.out", "ab")  # noqa: SIM115 - handed to the broker process, closed below
        proc = subprocess.Popen(
            [
                *self.wrap,
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
        # ``ip netns exec`` execs the JVM in its own process, so the pid is the broker's.
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc

    def kill(self) -> int | None:
        """SIGKILL the broker (an unclean crash, for chaos); returns its pid, None if none ran."""
        pid = self._running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10.0)  # until then it still reads as running, and holds its log folder
        return pid

    def _wait_ready(self, proc: subprocess.Popen[bytes], t0: float) -> None:
        import socket

        host, port = self.cfg.advertised_host or self.cfg.listen_host, self.cfg.port
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        while time.monotonic() - t0 < self.cfg.start_timeout_s:
            if proc.poll() is not None:
                raise BrokerError(f"{self.label} exited with code {proc.returncode} during start-up: {self.last_error()}")
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
            f"{self.label} did not answer on {host}:{port} within {self.cfg.start_timeout_s:g}s: {self.last_error()}"
        )

    def last_error(self) -> str:
        """The broker log's decisive error in one line (``logs/server.log``, else the JVM's ``broker.out``)."""
        for name in ("server.log", "broker.out"):
            path = self.log_dir / name
            if path.exists():
                found = decisive_error(path.read_text(errors="replace").splitlines())
                if found:
                    if "OutOfMemoryError" in found:
                        found += f" (broker.heap={self.cfg.heap} is too small for this broker)"
                    return found
        return "no error in the broker log"

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker this state folder started (and only that one). Returns whether one was running."""
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout_s):
            logger.warning("broker %d ignored SIGTERM for %.0fs; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            if not _wait_gone(pid, 10.0):
                logger.warning("broker %d still runs 10s after SIGKILL; its log folder may stay locked", pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def logs(self, lines: int = 50) -> str:
        path = self.log_dir / "server.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class KafkaCluster:
    """``n`` KRaft nodes from the same jars, each broker and controller, one controller quorum.

    With ``n == 1`` it is the single broker of ``KafkaBroker`` in ``state_dir`` itself, so
    ``vapipe kafka start`` and ``vapipe kafka start --brokers 1`` are the same broker.
    """

    def __init__(self, broker: BrokerConfig, kafka: KafkaConfig | None = None, n: int = 1, wrap: tuple[str, ...] = ()) -> None:
        if n < 1:
            raise BrokerError(f"a Kafka cluster needs at least one broker, got {n}")
        self.cfg, self.n = broker, n
        self.state_dir = Path(broker.state_dir).expanduser().resolve()
        if n == 1:
            self.nodes = [KafkaBroker(broker, kafka, wrap=wrap)]
            self.security = self.nodes[0].security
            return
        id_file = self.state_dir / "cluster.id"
        if not id_file.exists():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(new_cluster_id() + "\n")
        cluster_id = id_file.read_text().strip()
        configs = [
            broker.model_copy(
                update={
                    "port": broker.port + 2 * i,
                    "controller_port": broker.controller_port + 2 * i,
                    "state_dir": str(self.state_dir / f"node-{i + 1}"),
                }
            )
            for i in range(n)
        ]
        voters = ",".join(f"{i + 1}@{_controller_host(c)}:{c.controller_port}" for i, c in enumerate(configs))
        kafka = kafka or KafkaConfig(bootstrap_servers=",".join(KafkaBroker(c).bootstrap for c in configs))
        # Secured: one CA, certificate and user set for all nodes, in the cluster's own folder.
        hosts = tuple(sorted({h for c in configs for h in (c.listen_host, c.advertised_host or "") if h}))
        self.nodes = [
            KafkaBroker(
                c,
                kafka,
                node_id=i + 1,
                voters=voters,
                cluster_id=cluster_id,
                wrap=wrap,
                security_dir=self.state_dir,
                cert_hosts=hosts,
            )
            for i, c in enumerate(configs)
        ]
        self.security = self.nodes[0].security
        """The shared security folder when the cluster is secured."""

    @classmethod
    def existing(cls, broker: BrokerConfig, kafka: KafkaConfig | None = None) -> KafkaCluster:
        """The cluster whose files are in ``state_dir``: as many nodes as it has ``node-*`` folders."""
        state = Path(broker.state_dir).expanduser().resolve()
        return cls(broker, kafka, max(1, len(list(state.glob("node-*/server.properties")))))

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def admin_kafka(self) -> KafkaConfig:
        """Client settings that reach every node, as the admin user when the cluster is secured."""
        return self.nodes[0].kafka.model_copy(update={"bootstrap_servers": self.bootstrap})

    def start(self) -> list[BrokerStatus]:
        """Start every node that is not running, then wait until each answers."""
        t0 = time.monotonic()
        launched = {}
        for node in self.nodes:
            if node._running_pid() is None:
                launched[node.node_id] = node.launch()
        out = []
        for node in self.nodes:
            proc = launched.get(node.node_id)
            if proc is None:
                out.append(replace(node.status(), already_running=True))
                continue
            try:
                node._wait_ready(proc, t0)
            except BrokerError:
                self.stop()
                raise
            out.append(BrokerStatus(True, proc.pid, node.bootstrap, str(node.state_dir), ready_s=time.monotonic() - t0))
        return out

    def stop(self) -> bool:
        """Stop every node; returns whether any was running."""
        stopped = [node.stop() for node in self.nodes]
        return any(stopped)

    def status(self) -> list[BrokerStatus]:
        return [node.status() for node in self.nodes]


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
