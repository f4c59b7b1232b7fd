"""Faults injected into real runs (real broker, real Ray, the shared model): zero frames lost,
zero counted twice, the same crop corpus as an undisturbed run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import FAULTS, chaos
from cluster.broker import KafkaBroker
from tests.conftest import private_broker

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A broker of this module's own, so one test may stop and restart it."""
    with private_broker(tmp_path_factory.mktemp("chaos-kafka")) as broker:
        yield broker


def _restart(broker: KafkaBroker) -> None:
    broker.stop()
    broker.start()


def test_every_fault_loses_nothing_and_counts_nothing_twice(
    ray_local, make_settings, own_broker: KafkaBroker, highway: str
) -> None:
    s = make_settings(kafka__bootstrap_servers=own_broker.bootstrap, producer__fps=15)
    result = chaos(s, highway, frames=60, faults=list(FAULTS), replicas=2, restart_broker=lambda: _restart(own_broker))
    rows = {r["fault"]: r for r in result["rows"]}
    assert list(rows) == list(FAULTS)
    assert rows["none"]["crops_expected"] > 0
    for fault, row in rows.items():
        assert row["injected"], fault
        assert row["frames_produced"] == 60, row
        assert row["lost"] == 0 and row["counted_twice"] == 0 and row["frames_counted"] == 60, row
        assert row["duplicates_on_c"] == 0, row  # exactly-once from A to C
        assert row["crops_match"] and row["table_match"], row
        if fault != "none":
            assert row["recovery_s"] is not None, row


def test_at_least_once_loses_nothing_when_an_inter_consumer_dies(ray_local, make_settings, highway: str, tmp_path: Path) -> None:
    s = make_settings(processing_guarantee="at_least_once", producer__fps=15)
    result = chaos(s, highway, frames=45, faults=["kill-inter", "kill-count"], replicas=2)
    for row in result["rows"]:
        assert row["lost"] == 0 and row["counted_twice"] == 0 and row["crops_match"] and row["table_match"], row
