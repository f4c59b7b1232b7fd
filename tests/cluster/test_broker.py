"""The launcher starts a broker from the Maven-resolved jars, reports a running one, and stops it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.broker import KafkaBroker, server_properties
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
