"""The launcher starts a broker from the Maven-resolved jars, reports a running one, and stops it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.broker import KafkaBroker, decisive_error, server_properties
from cluster.clients import check_broker
from pipeline.config import BrokerConfig, KafkaConfig
from pipeline.errors import BrokerError
from tests.conftest import free_ports

pytestmark = pytest.mark.kafka


def test_server_properties_advertise_the_configured_host(tmp_path: Path) -> None:
    cfg = BrokerConfig(listen_host="0.0.0.0", advertised_host="198.18.1.3", port=9092)
    props = server_properties(cfg, tmp_path, 8 * 1024 * 1024)
    assert "advertised.listeners=PLAINTEXT://198.18.1.3:9092" in props
    assert "listeners=PLAINTEXT://0.0.0.0:9092" in props
    assert "process.roles=broker,controller" in props
    assert "message.max.bytes=9437184" in props
    with pytest.raises(BrokerError, match="advertised_host"):
        server_properties(BrokerConfig(listen_host="0.0.0.0"), tmp_path, 1024)


def test_the_log_cleaner_buffer_fits_the_heap(tmp_path: Path) -> None:
    # Kafka's 128 MiB default, one array taken whole at start-up, killed a 256m node of a busy cluster
    def buffer(heap: str) -> int:
        props = server_properties(BrokerConfig(heap=heap), tmp_path, 1024).splitlines()
        return int(next(p for p in props if p.startswith("log.cleaner.dedupe.buffer.size=")).split("=")[1])

    assert buffer("256m") == 32 * 1024**2 and buffer("768m") == 96 * 1024**2
    assert buffer("4g") == 128 * 1024**2  # never more than Kafka's own default


def test_a_start_up_failure_names_its_root_cause_in_one_line(tmp_path: Path) -> None:
    log = """[2026-12-07 06:18:33,662] INFO Starting the log cleaner (org.apache.kafka.storage.internals.log.LogCleaner)
[2026-12-07 06:18:33,700] INFO registerBroker: event failed with NotControllerException in 413 microseconds. (x.Y)
[2026-12-07 06:18:33,846] ERROR Encountered fatal fault: Error starting LogManager (org.apache.kafka.server.fault.ProcessTerminatingFaultHandler)
java.lang.OutOfMemoryError: Java heap space
	at java.base/java.nio.HeapByteBuffer.<init>(HeapByteBuffer.java:64) ~[?:?]
	at org.apache.kafka.storage.internals.log.SkimpyOffsetMap.<init>(SkimpyOffsetMap.java:78) ~[kafka-storage-4.4.0.jar:?]
[2026-12-07 06:18:33,981] INFO [BrokerLifecycleManager id=2] Successfully registered broker 2 (org.apache.kafka.server.BrokerLifecycleManager)
[2026-12-07 06:18:34,000] ERROR [BrokerServer id=2] shutting down (kafka.server.BrokerServer)
"""
    assert (
        decisive_error(log.splitlines())
        == "Encountered fatal fault: Error starting LogManager: java.lang.OutOfMemoryError: Java heap space"
    )
    locked = """[t] ERROR Disk error while locking directory /d (kafka.server.LogDirFailureChannel)
org.apache.kafka.common.KafkaException: Failed to load /d
	at x.Y(Y.java:1)
Caused by: java.io.IOException: Failed to acquire lock on file .lock in /d
	at x.Z(Z.java:2)
	... 12 more
"""
    assert decisive_error(locked.splitlines()) == (
        "Disk error while locking directory /d: java.io.IOException: Failed to acquire lock on file .lock in /d"
    )
    assert decisive_error(log.splitlines()[:2]) is None  # an INFO line quoting an exception is no error
    assert (
        decisive_error(["Error: Could not find or load main class kafka.Kafka"])
        == "Error: Could not find or load main class kafka.Kafka"
    )
    broker = KafkaBroker(BrokerConfig(state_dir=str(tmp_path), heap="256m"))
    broker.log_dir.mkdir(parents=True)
    (broker.log_dir / "server.log").write_text(log)
    assert broker.last_error().endswith("Java heap space (broker.heap=256m is too small for this broker)")


def test_broker_starts_answers_reports_running_and_stops(tmp_path: Path) -> None:
    port, controller_port = free_ports(2)
    cfg = BrokerConfig(port=port, controller_port=controller_port, state_dir=str(tmp_path / "kafka"), heap="384m")
    broker = KafkaBroker(cfg)
    assert "kafka-jars-" in str(broker.install())  # resolved by Maven (once, then cached)
    status = broker.start()
    try:
        assert status.running and not status.already_running and status.ready_s is not None
        info = check_broker(KafkaConfig(bootstrap_servers=broker.bootstrap))
        assert len(info["brokers"]) == 1
        again = broker.start()
        assert again.already_running and again.pid == status.pid
    finally:
        assert broker.stop() is True
    assert broker.status().running is False
    assert broker.stop() is False  # nothing of ours left to stop


def test_cluster_nodes_share_one_quorum_and_replicate_internal_topics(tmp_path: Path) -> None:
    from cluster.broker import KafkaCluster

    cfg = BrokerConfig(listen_host="198.18.1.1", port=9092, controller_port=9093, state_dir=str(tmp_path))
    cluster = KafkaCluster(cfg, None, 3)
    assert cluster.bootstrap == "198.18.1.1:9092,198.18.1.1:9094,198.18.1.1:9096"
    props = [server_properties(n.cfg, n.data_dir, 1024, n.node_id, n.voters).splitlines() for n in cluster.nodes]
    voters = "controller.quorum.voters=1@198.18.1.1:9093,2@198.18.1.1:9095,3@198.18.1.1:9097"
    for i, lines in enumerate(props, start=1):
        assert f"node.id={i}" in lines and voters in lines
        assert {"offsets.topic.replication.factor=3", "transaction.state.log.min.isr=2", "min.insync.replicas=2"} <= set(lines)
    assert len({n.cluster_id for n in cluster.nodes}) == 1 and len({n.state_dir for n in cluster.nodes}) == 3
    assert KafkaCluster.existing(cfg).n == 1  # nothing written yet
    single = server_properties(BrokerConfig(), tmp_path, 1024).splitlines()
    assert "offsets.topic.replication.factor=1" in single and "min.insync.replicas=1" in single
