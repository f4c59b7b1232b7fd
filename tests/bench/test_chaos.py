"""Faults injected into real runs (real broker, real Ray): zero frames lost, zero counted twice,
the same crop corpus and table as an undisturbed run. One test per fault, all judged against one
undisturbed run of the module.

The detector is the synthetic calibration model (40 ms a frame, boxes that depend only on the
pixels): delivery under faults does not depend on what is detected, only on every box being
cropped and counted once, and the real model would make each run 12 s longer. The shared model
runs end to end in tests/integration; `vapipe chaos` uses the configured model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import FAULTS, chaos, failed_faults, run_fault, table_lines
from cluster.broker import KafkaBroker
from pipeline.config import Settings
from tests.conftest import build_settings, private_broker
from tests.integration.test_pipeline import TRACKING

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.slow]

FRAMES = 60
REPLICAS = 2
MODEL = "synthetic:40ms"


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A broker of this module's own, so one test may stop and restart it."""
    with private_broker(tmp_path_factory.mktemp("chaos-kafka")) as broker:
        yield broker


@pytest.fixture(scope="module")
def chaos_settings(own_broker: KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Tracking on: the synthetic boxes stand still, so every fault must give the same tracks as the
    # undisturbed run; a count replica that lost its tracker would start new tracks and count them again.
    return build_settings(
        own_broker.bootstrap,
        tmp_path_factory.mktemp("chaos"),
        MODEL,
        producer__fps=15,
        producer__max_frames=FRAMES,
        **TRACKING,
    )


@pytest.fixture(scope="module")
def undisturbed(ray_local: Any, chaos_settings: Settings, highway: str) -> tuple[dict[str, Any], set[Any]]:
    """The reference run: its crop corpus and vehicle table are what every fault must reproduce."""
    row, crops = run_fault(chaos_settings, highway, FRAMES, "none", REPLICAS)
    assert row["lost"] == 0 and row["counted_twice"] == 0 and row["frames_counted"] == FRAMES, row
    assert crops, "the undisturbed run wrote no crops"
    assert row["traffic"] and row["traffic"]["unique_vehicles"] and row["traffic"]["frames_stepped_over"] == 0, row
    return row, crops


def _restart(broker: KafkaBroker) -> None:
    broker.stop()
    broker.start()


@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "none"])
def test_fault_loses_nothing_and_counts_nothing_twice(
    fault: str, chaos_settings: Settings, undisturbed: tuple[dict[str, Any], set[Any]], own_broker: KafkaBroker, highway: str
) -> None:
    reference_row, reference_crops = undisturbed
    row, crops = run_fault(chaos_settings, highway, FRAMES, fault, REPLICAS, restart_broker=lambda: _restart(own_broker))
    assert row["injected"], row
    assert row["frames_produced"] == FRAMES, row
    assert row["lost"] == 0 and row["counted_twice"] == 0 and row["frames_counted"] == FRAMES, row
    assert row["duplicates_on_c"] == 0, row  # exactly-once from A to C
    assert crops == reference_crops, f"crops differ: {len(crops)} vs {len(reference_crops)}"
    assert row["vehicle_totals"] == reference_row["vehicle_totals"], row
    assert row["traffic"]["frames_tracked"] == FRAMES and row["traffic"]["frames_stepped_over"] == 0, row
    # The tracked counts are compared with the undisturbed run's in the report (traffic_match), not
    # here: they depend on the producer's pace (the tracker's clock is the capture stamp), which a
    # loaded test machine does not keep; a kill stalls it beyond track_buffer_s often enough.
    assert row["recovery_s"] is not None, row


def test_at_least_once_loses_nothing_when_an_inter_consumer_dies(ray_local, make_settings, highway: str, tmp_path: Path) -> None:
    """Also the whole `vapipe chaos` path: reference run, faults, table and verdict."""
    s = make_settings(processing_guarantee="at_least_once", producer__fps=15, model__name=MODEL)
    result = chaos(s, highway, frames=45, faults=["kill-inter", "kill-count"], replicas=2)
    assert [r["fault"] for r in result["rows"]] == ["none", "kill-inter", "kill-count"]
    for row in result["rows"]:
        assert row["lost"] == 0 and row["counted_twice"] == 0 and row["crops_match"] and row["table_match"], row
    assert failed_faults(result) == [] and len(table_lines(result)) == 4


def test_verdict_names_every_fault_that_lost_double_counted_or_changed_the_corpus() -> None:
    ok = {"fault": "none", "lost": 0, "counted_twice": 0, "crops_match": True, "table_match": True}
    rows = [
        ok,
        ok | {"fault": "a", "lost": 1},
        ok | {"fault": "b", "counted_twice": 2},
        ok | {"fault": "c", "crops_match": False},
        ok | {"fault": "d", "traffic_match": False},
        ok | {"fault": "e", "traffic_match": True},
        ok | {"fault": "kill-producer", "traffic_match": False},  # new tracks after the capture gap: by design
    ]
    assert failed_faults({"rows": rows}) == ["a", "b", "c", "d"]
