"""Faults injected into real runs (real broker, real Ray): zero frames lost, zero counted twice,
the same crop corpus and table as an undisturbed run. One test per fault, all judged against one
undisturbed run of the module.

The detector is the synthetic calibration model (40 ms a frame, boxes that depend only on the
pixels): delivery under faults does not depend on what is detected, only on every box being
cropped and counted once, and the real model would make each run 12 s longer. The shared model
runs end to end in tests/integration; `vapipe chaos` uses the configured model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bench.chaos import FAULTS, LAB_FAULTS, count_verdict, failed_faults, run_fault
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
        # A request lost while the broker restarts holds a transaction's commit this long (60 s by default).
        kafka__ack_timeout_s=10,
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


@pytest.mark.parametrize(
    "fault", [f for f in FAULTS if f != "none" and f not in LAB_FAULTS]
)  # lab faults: tests/cluster/test_lab.py
def test_fault_loses_nothing_and_counts_nothing_twice(
    fault: str, chaos_settings: Settings, undisturbed: tuple[dict[str, Any], set[Any]], own_broker: KafkaBroker, highway: str
) -> None:
    reference_row, reference_crops = undisturbed
    row, crops = run_fault(chaos_settings, highway, FRAMES, fault, REPLICAS, restart_broker=lambda: _restart(own_broker))
    assert row["injected"], row
    assert row["frames_produced"] == FRAMES, row
    assert row["lost"] == 0 and row["counted_twice"] == 0 and row["frames_counted"] == FRAMES, row
    assert row["table_frames_applied"] == FRAMES, row
    assert row["duplicates_on_c"] == 0, row  # exactly-once from A to C
    assert row["duplicates_on_counts"] == 0, row  # and from C to the counts topic
    assert crops == reference_crops, f"crops differ: {len(crops)} vs {len(reference_crops)}"
    assert row["vehicle_totals"] == reference_row["vehicle_totals"], row
    assert row["traffic"]["frames_tracked"] == FRAMES and row["traffic"]["frames_stepped_over"] == 0, row
    assert row["traffic"] == reference_row["traffic"], row  # the same tracks, whatever died (the producer too)
    assert row["recovery_s"] is not None, row


@pytest.mark.parametrize("fault", ["kill-inter", "kill-count"])
def test_at_least_once_loses_nothing_when_a_replica_dies(
    fault: str, chaos_settings: Settings, undisturbed: tuple[dict[str, Any], set[Any]], highway: str
) -> None:
    """Redelivered batches are absorbed: every frame applied to the table once, the same crops and table
    as the exactly-once reference (box counts; tracking off, as this test always ran). A count replica
    killed between its count updates and its snapshot makes its successor send those updates again
    (``duplicates_on_counts``): allowed at least once, a frame applied twice (``counted_twice``) is not.
    The whole `vapipe chaos` path, reference run, table and verdict, runs in tests/cluster/test_lab.py."""
    reference_row, reference_crops = undisturbed
    untracked = chaos_settings.tracking.model_copy(update={"enabled": False})
    s = chaos_settings.model_copy(update={"processing_guarantee": "at_least_once", "tracking": untracked})
    row, crops = run_fault(s, highway, FRAMES, fault, REPLICAS)
    assert row["injected"] and row["frames_produced"] == FRAMES, row
    assert row["lost"] == 0 and row["counted_twice"] == 0 and row["frames_counted"] == FRAMES, row
    assert row["table_frames_applied"] == FRAMES, row
    assert crops == reference_crops, f"crops differ: {len(crops)} vs {len(reference_crops)}"
    assert row["vehicle_totals"] == reference_row["vehicle_totals"], row


def test_verdict_names_every_fault_that_lost_double_counted_or_changed_the_corpus() -> None:
    ok = {"fault": "none", "lost": 0, "counted_twice": 0, "crops_match": True, "table_match": True}
    rows = [
        ok,
        ok | {"fault": "a", "lost": 1},
        ok | {"fault": "b", "counted_twice": 2},
        ok | {"fault": "c", "crops_match": False},
        ok | {"fault": "d", "traffic_match": False},
        ok | {"fault": "e", "traffic_match": True},
        ok | {"fault": "kill-producer", "traffic_match": False},  # a restarted producer continues the clip's clock
        ok | {"fault": "f", "duplicates_on_counts": 6},
    ]
    assert failed_faults({"rows": rows}) == ["a", "b", "c", "d", "kill-producer", "f"]
    # At least once, a count update sent again is expected; a frame applied twice is not.
    assert failed_faults({"rows": rows, "processing_guarantee": "at_least_once"}) == ["a", "b", "c", "d", "kill-producer"]


def _update(index: int, applied: int, cars: int) -> dict[str, Any]:
    return {"type": "count", "stream_id": "s", "frame_index": index, "frames_applied": applied, "totals": {"car": cars}}


def test_count_updates_sent_again_from_the_same_table_are_duplicates_not_double_counts() -> None:
    """The kill-count flake: at least once, a replica killed after its batch's updates (frames 3-8)
    were acknowledged and before its snapshot was; the successor restored the table as of frame 2
    and applied 3-8 once more onto it, sending the very same updates again."""
    first = [_update(i, i + 1, 2 * (i + 1)) for i in range(9)]
    updates = first + first[3:] + [_update(i, i + 1, 2 * (i + 1)) for i in range(9, 12)]
    row = count_verdict(updates, 12, {"frames_applied": 12, "totals": {"car": 24}})
    assert row == {
        "frames_counted": 12,
        "lost": 0,
        "counted_twice": 0,
        "duplicates_on_counts": 6,
        "table_frames_applied": 12,
    }


def test_a_frame_applied_onto_a_table_that_already_held_it_is_counted_twice() -> None:
    once = [_update(i, i + 1, 2 * (i + 1)) for i in range(6)]
    # Frames 3-5 applied again after 5: the table moved on (frames_applied 7-9), and its totals are wrong.
    again = [_update(i, 4 + i, 2 * (4 + i)) for i in range(3, 6)]
    row = count_verdict(once + again, 6, {"frames_applied": 9, "totals": {"car": 18}})
    assert row["counted_twice"] == 3 and row["duplicates_on_counts"] == 3 and row["lost"] == 0
    # The second updates never landed (say, a batch rewound after them): the table still tells.
    assert count_verdict(once, 6, {"frames_applied": 9})["counted_twice"] == 3
    assert count_verdict(once, 6, None)["counted_twice"] == 0  # no snapshot: the updates alone judge
    assert count_verdict(once[:4], 6, {"frames_applied": 4})["lost"] == 2
