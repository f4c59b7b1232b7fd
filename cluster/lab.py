"""Three machines on one Linux box: network namespaces on a bridge, as Jepsen and Kafka's system tests do.

Each host is a network namespace with its own address, ports and routes, joined to the others
by a veth pair on one bridge; this machine keeps an address on the bridge (``.254``) to reach
them, the way a laptop on the same LAN would:

- ``host1`` (``.1``): the Kafka brokers (``brokers`` KRaft nodes on ports 9092, 9094, ...) and
  a Ray worker for the producers;
- ``host2`` (``.2``): the Ray head (and its dashboard), the crop and count actors, the driver
  (``vapipe run --address <head>``, run there with ``exec_argv``);
- ``host3`` (``.3``): a Ray worker that declares ``gpus`` GPUs, where every InterConsumer lands.

The brokers advertise host1's address, so every client reaches them over the bridge, never
over loopback. Addresses come from 198.18.0.0/15 (RFC 2544, reserved for benchmarking). Needs
root (``ip netns``); processes are told apart by namespace, so ``down`` ends exactly what ``up``
started, nothing else on the machine. ``kill_ray``, ``partition`` and the broker handles are
the faults ``vapipe chaos --lab`` injects.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.broker import KafkaCluster
from pipeline.config import BrokerConfig, Settings, TopicsConfig
from pipeline.errors import PipelineError

__all__ = ["LabSpec", "Lab", "LabError", "HOSTS", "lab_overrides"]

logger = logging.getLogger(__name__)

HOSTS = ("host1", "host2", "host3")
BENCHMARK_NET = ipaddress.ip_network("198.18.0.0/15")


class LabError(PipelineError):
    """The lab could not be set up, or a command inside it failed."""


@dataclass(frozen=True)
class LabSpec:
    """Names, addresses and sizes of one lab; two labs with different ``tag`` and ``subnet`` coexist."""

    tag: str = "vpl"
    """Prefix of namespaces (``<tag>-host1``), the bridge (``<tag>-br``) and veths; at most 6 characters."""
    subnet: str = "198.18.0"
    """First three octets of the lab's /24, inside 198.18.0.0/15; hosts are .1 .2 .3, this machine .254."""
    brokers: int = 3
    kafka_port: int = 9092
    controller_port: int = 9093
    ray_port: int = 6379
    dashboard_port: int = 8265
    gpus: int = 1
    """GPUs host3's Ray worker declares (``ray start --num-gpus``); nothing checks they exist."""
    inter_per_gpu: int = 2
    """InterConsumers sharing one GPU: each requests ``1 / inter_per_gpu`` of one."""
    cpus: tuple[int, int, int] = (2, 4, 2)
    """Logical Ray CPUs of host1, host2 (the head) and host3."""
    heap: str = "384m"
    """JVM heap of each broker."""
    object_store_mb: int = 200
    """Ray object store of each node (frames travel through Kafka, not Ray)."""
    state_dir: str = ".cache/lab"
    """Broker data and logs, the Ray token, the lab's settings file."""

    def __post_init__(self) -> None:
        if not (1 <= len(self.tag) <= 6 and self.tag.replace("-", "").isalnum()):
            raise LabError(f"lab tag {self.tag!r} must be 1 to 6 letters or digits (interface names are short)")
        try:
            net = ipaddress.ip_network(f"{self.subnet}.0/24")
        except ValueError:
            raise LabError(f"lab subnet {self.subnet!r} must be three octets, e.g. 198.18.0") from None
        if not net.subnet_of(BENCHMARK_NET):
            raise LabError(f"lab subnet {net} must lie in {BENCHMARK_NET} (reserved for benchmarking)")

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS.index(host) + 1}"

    @property
    def gateway(self) -> str:
        """This machine's address on the lab's bridge."""
        return f"{self.subnet}.254"

    @property
    def bridge(self) -> str:
        return f"{self.tag}-br"

    @property
    def head(self) -> str:
        return f"{self.address('host2')}:{self.ray_port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.address('host2')}:{self.dashboard_port}"

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{self.address('host1')}:{self.kafka_port + 2 * i}" for i in range(self.brokers))


def lab_overrides(spec: LabSpec) -> dict[str, Any]:
    """Settings for a run on the lab: its brokers and head, replicated topics, actors on their hosts.

    InterConsumers request a share of a GPU (only host3 has one); producers and end stages
    request the ``node:<address>`` resource Ray gives every node, so they land on host1 and
    host2. ``min.insync.replicas`` is 2 with three brokers, so one broker may be down.
    """

    def topic() -> dict[str, Any]:
        cfg: dict[str, Any] = {"replication_factor": min(spec.brokers, 3)}
        if spec.brokers > 1:
            cfg["config"] = {"min.insync.replicas": str(min(spec.brokers, 2))}
        return cfg

    return {
        "kafka": {"bootstrap_servers": spec.bootstrap},
        # Every topic, the streams control topic included: one on a single broker stops every run while it is down.
        "topics": {key: topic() for key in TopicsConfig.model_fields},
        "ray": {"address": spec.head},
        "inter": {"num_gpus": round(1 / spec.inter_per_gpu, 6)},
        "crop": {"resources": {f"node:{spec.address('host2')}": 0.01}},
        "count": {"resources": {f"node:{spec.address('host2')}": 0.01}},
        "producer": {"resources": {f"node:{spec.address('host1')}": 0.01}},
    }


def _run(argv: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise LabError(f"`{' '.join(argv[:6])}` failed: {tail[0][:300]}")
    return proc


@dataclass
class Lab:
    """Sets up, drives and removes one lab. ``up`` is idempotent only through ``down`` first."""

    spec: LabSpec = field(default_factory=LabSpec)

    @classmethod
    def load(cls, state_dir: str | Path = ".cache/lab") -> Lab:
        """The lab whose state is in ``state_dir`` (as ``up`` wrote it), else a default one there."""
        path = Path(state_dir) / "lab.json"
        if path.exists():
            data = json.loads(path.read_text())
            data["cpus"] = tuple(data["cpus"])
            return cls(LabSpec(**data))
        return cls(LabSpec(state_dir=str(state_dir)))

    def inside(self) -> str | None:
        """The lab host this process runs in, if any (``exec_argv`` sets ``VAPIPE_LAB_HOST``)."""
        return os.environ.get("VAPIPE_LAB_HOST")

    @property
    def state(self) -> Path:
        return Path(self.spec.state_dir).expanduser().resolve()

    @property
    def token_file(self) -> Path:
        return self.state / "ray-token"

    @property
    def settings_file(self) -> Path:
        """The lab's settings (``vapipe --config <this> run ...`` from host2)."""
        return self.state / "lab.yaml"

    def ray_temp(self, host: str) -> Path:
        # Ray's socket paths must stay short: under /tmp, not the state folder.
        return Path("/tmp") / f"{self.spec.tag}-{self.spec.subnet.replace('.', '-')}-ray" / host

    # -- processes in a host ---------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """What every lab process needs: the lab's own Ray token (not ``~/.ray``), no usage stats."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_file),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host`` with the lab's environment (``ip netns exec`` keeps the pid)."""
        env = [f"{k}={v}" for k, v in (self.env() | {"VAPIPE_LAB_HOST": host}).items()]
        return ["ip", "netns", "exec", self.spec.ns(host), "env", *env, *argv]

    def pids(self, host: str) -> list[int]:
        """Every process in ``host``'s namespace: what ``up`` started there."""
        proc = _run(["ip", "netns", "pids", self.spec.ns(host)], check=False)
        return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]

    def _ray(self) -> str:
        ray = Path(sys.executable).with_name("ray")
        return str(ray) if ray.exists() else shutil.which("ray") or "ray"

    # -- up and down -----------------------------------------------------------------------
    def is_up(self) -> bool:
        return self.spec.ns("host1") in _run(["ip", "netns", "list"], check=False).stdout

    def up(self) -> Lab:
        """Namespaces and bridge, the brokers on host1, the Ray head on host2, workers on host3 and host1.

        Raises:
            LabError: not root, no ``ip`` command, or a part that did not start (the lab is removed again).
        """
        if os.geteuid() != 0:
            raise LabError("the lab needs root: network namespaces are created with `ip netns`")
        if shutil.which("ip") is None:
            raise LabError("the lab needs the `ip` command (iproute2)")
        self.down()
        t0 = time.monotonic()
        try:
            self.net_up()
            self.state.mkdir(parents=True, exist_ok=True)
            if not self.token_file.exists():
                self.token_file.write_text(secrets.token_hex(32))
                self.token_file.chmod(0o600)
            shutil.rmtree(self.state / "kafka", ignore_errors=True)  # every lab starts with empty brokers
            self.kafka().start()
            logger.info("lab: %d brokers ready at %s after %.1fs", self.spec.brokers, self.spec.bootstrap, time.monotonic() - t0)
            self.start_ray("host2")
            self.start_ray("host3")
            self.start_ray("host1")
            self.wait_nodes(3)
            self.write_settings()
        except BaseException:
            self.down()
            raise
        logger.info("lab up after %.1fs: head %s, brokers %s", time.monotonic() - t0, self.spec.head, self.spec.bootstrap)
        return self

    def net_up(self) -> None:
        s = self.spec
        _run(["ip", "link", "add", s.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{s.gateway}/24", "dev", s.bridge])
        _run(["ip", "link", "set", s.bridge, "up"])
        for i, host in enumerate(HOSTS, start=1):
            ns, veth = s.ns(host), f"{s.tag}-h{i}"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "set", veth, "master", s.bridge])
            _run(["ip", "link", "set", veth, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{s.address(host)}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def down(self) -> None:
        """End every process in the lab's namespaces, then remove them and the bridge. Safe to repeat."""
        s = self.spec
        for host in HOSTS:
            self.kill_host(host, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(self.pids(h) for h in HOSTS):
            time.sleep(0.3)
        for host in HOSTS:
            self.kill_host(host, signal.SIGKILL)
        for host in HOSTS:
            _run(["ip", "netns", "del", s.ns(host)], check=False)
        _run(["ip", "link", "del", s.bridge], check=False)
        for node in self.kafka().nodes:
            node.pid_file.unlink(missing_ok=True)
        shutil.rmtree(self.ray_temp("host1").parent, ignore_errors=True)

    def kill_host(self, host: str, sig: int = signal.SIGKILL, keep: str | None = None) -> list[int]:
        """Signal every process in ``host`` (but those whose command line contains ``keep``)."""
        killed = []
        for pid in self.pids(host):
            if keep and keep in _cmdline(pid):
                continue
            try:
                os.kill(pid, sig)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed

    # -- Kafka -----------------------------------------------------------------------------
    def kafka(self) -> KafkaCluster:
        """The brokers on host1 (started under ``ip netns exec``, so they bind host1's address)."""
        s = self.spec
        cfg = BrokerConfig(
            listen_host=s.address("host1"),
            advertised_host=s.address("host1"),
            port=s.kafka_port,
            controller_port=s.controller_port,
            state_dir=str(self.state / "kafka"),
            heap=s.heap,
            start_timeout_s=120,
        )
        return KafkaCluster(cfg, None, s.brokers, wrap=("ip", "netns", "exec", s.ns("host1")))

    # -- Ray -------------------------------------------------------------------------------
    def start_ray(self, host: str) -> None:
        """``ray start`` in ``host``: the head on host2, a worker elsewhere (host3 with the GPUs)."""
        s = self.spec
        cpus = s.cpus[HOSTS.index(host)]
        argv = [
            self._ray(),
            "start",
            f"--node-ip-address={s.address(host)}",
            f"--num-cpus={cpus}",
            f"--num-gpus={s.gpus if host == 'host3' else 0}",
            f"--object-store-memory={s.object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
        ]
        if host == "host2":
            temp = self.ray_temp(host)
            temp.mkdir(parents=True, exist_ok=True)
            argv += [
                "--head",
                f"--port={s.ray_port}",
                f"--temp-dir={temp}",
                "--include-dashboard=true",
                f"--dashboard-host={s.address(host)}",
                f"--dashboard-port={s.dashboard_port}",
            ]
        else:
            argv += [f"--address={s.head}"]
        _run(self.exec_argv(host, argv), cwd=Path.cwd(), timeout=180)

    def kill_ray(self, host: str) -> list[int]:
        """SIGKILL every Ray process of ``host`` (a machine that crashed); its brokers, if any, stay."""
        return self.kill_host(host, signal.SIGKILL, keep="kafka.Kafka")

    def ray_nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes as the head's state API lists them (address, state, resources)."""
        return self.state_api("nodes")

    def wait_nodes(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        alive: list[str] = []
        while time.monotonic() < deadline:
            try:
                alive = [node["node_ip"] for node in self.ray_nodes() if node.get("state") == "ALIVE"]
            except LabError:
                alive = []
            if len(alive) >= n:
                return
            time.sleep(1.0)
        raise LabError(f"the lab's Ray cluster has {len(alive)} of {n} nodes after {timeout_s:.0f}s: {alive}")

    def state_api(self, what: str, *, detail: bool = True) -> list[dict[str, Any]]:
        """``ray list <what>`` against the head's dashboard, from host2 with the lab's token.

        Runs as a subprocess, so a process already connected to another Ray (a test session) can ask.
        """
        argv = [self._ray(), "list", what, f"--address={self.spec.dashboard}", "--format=json", "--limit=10000"]
        if detail:
            argv.append("--detail")
        proc = _run(self.exec_argv("host2", argv), check=False, timeout=60)
        if proc.returncode != 0:
            raise LabError(f"ray list {what} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        # Ray may print warnings first; the table is the JSON array that starts a line.
        lines = proc.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("[")), None)
        return [] if start is None else list(json.loads("\n".join(lines[start:])))

    def node_hosts(self) -> dict[str, str]:
        """Ray node id -> lab host name."""
        by_ip = {self.spec.address(h): h for h in HOSTS}
        return {n["node_id"]: by_ip.get(n["node_ip"], n["node_ip"]) for n in self.ray_nodes()}

    # -- faults ----------------------------------------------------------------------------
    def partition(self, host: str, peer: str = "host1") -> None:
        """Drop every packet between ``host`` and ``peer`` (blackhole routes on both sides): a silent
        partition, as a pulled cable; connections time out rather than being refused."""
        s = self.spec
        _run(["ip", "-n", s.ns(host), "route", "add", "blackhole", f"{s.address(peer)}/32"])
        _run(["ip", "-n", s.ns(peer), "route", "add", "blackhole", f"{s.address(host)}/32"])

    def heal(self, host: str, peer: str = "host1") -> None:
        s = self.spec
        _run(["ip", "-n", s.ns(host), "route", "del", "blackhole", f"{s.address(peer)}/32"], check=False)
        _run(["ip", "-n", s.ns(peer), "route", "del", "blackhole", f"{s.address(host)}/32"], check=False)

    # -- settings --------------------------------------------------------------------------
    def write_settings(self) -> Path:
        text = "# Written by `vapipe lab up`: the lab's brokers, head and placement.\n"
        text += yaml.safe_dump(lab_overrides(self.spec), sort_keys=False)
        self.settings_file.write_text(text)
        (self.state / "lab.json").write_text(json.dumps(asdict(self.spec), indent=2) + "\n")
        return self.settings_file

    def settings(self, base: Settings) -> Settings:
        """``base`` moved onto the lab (brokers, head, replication, placement)."""
        return Settings.model_validate(_deep_merge(base.model_dump(), lab_overrides(self.spec)))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
