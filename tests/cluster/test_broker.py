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
