"""Worker reports to Prometheus metric families: names, labels and values as a scraper sees them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import BUCKETS_S, METRICS, metric_families
from pipeline.stats import LatencyHistogram, WorkerStats


def _hist(values_ms: list[float]) -> dict[str, Any]:
    h = LatencyHistogram()
    for v in values_ms:
        h.record(v)
    return h.to_dict()


def _snapshot() -> list[WorkerStats]:
    table = {
        "cam1": {
            "totals": {"car": 7, "truck": 1},
            "frames_applied": 40,
            "frames_skipped": {"poison": 1},
            "unique_vehicles": {"car": 2},
            "line_crossings": {"north": {"in": {"car": 2}, "out": {}}},
        }
    }
    stale = {"cam1": {"totals": {"car": 1}, "frames_applied": 3, "frames_skipped": {}}}
    return [
        WorkerStats(name="producer-cam1", stage="producer", stream_id="cam1", frames_out=41, frames_skipped=2, fps=9.5),
        WorkerStats(
            name="inter-0",
            stage="inter",
            frames_out=20,
            fps=5.0,
            busy=0.4,
            detections=30,
            partition_lag={"0": 3, "1": 0},
            lag_s=1.5,
            dead_lettered=1,
            poison=1,
            timings={"decode": _hist([2, 3]), "inference": _hist([40, 45]), "post": _hist([1, 1])},
        ),
        WorkerStats(
            name="inter-1",
            stage="inter",
            frames_out=21,
            fps=5.5,
            partition_lag={"2": 4},
            lag_s=0.5,
            retries=2,
            restarts=1,
            timings={"inference": _hist([50])},
        ),
        WorkerStats(name="crop-0", stage="crop", frames_out=41, crops={"car": 5}),
        WorkerStats(name="count-0", stage="count", frames_out=40, table=table, latency_histogram=_hist([120.0] * 40)),
        WorkerStats(name="count-1", stage="count", frames_out=0, table=stale),
    ]


def _scrape(stats: list[WorkerStats]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Render as the endpoint would and parse it back: (sample name, sorted labels) -> value."""

    class Collector:
        def collect(self) -> Any:
            return metric_families(stats)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_metric_is_named_by_convention() -> None:
    for name, (kind, _, labels) in METRICS.items():
        assert name.startswith("vapipe_")
        assert name.endswith("_total") == (kind == "counter"), name
        assert "frame" not in labels and "frame_index" not in labels  # no unbounded labels


@pytest.mark.parametrize(
    ("sample", "labels", "expected"),
    [
        ("vapipe_camera_fps", {"stream": "cam1"}, 9.5),
        ("vapipe_frames_published_total", {"stream": "cam1"}, 41),
        ("vapipe_frames_skipped_total", {"stream": "cam1", "reason": "unreadable"}, 2),
        ("vapipe_frames_skipped_total", {"stream": "cam1", "reason": "poison"}, 1),
        ("vapipe_stage_frames_total", {"stage": "inter", "actor": "inter-1"}, 21),
        ("vapipe_stage_busy_ratio", {"stage": "inter", "actor": "inter-0"}, 0.4),
        ("vapipe_stage_replicas", {"stage": "count"}, 2),
        ("vapipe_actor_restarts_total", {"stage": "inter", "actor": "inter-1"}, 1),
        ("vapipe_consumer_lag", {"stage": "inter", "partition": "2"}, 4),
        ("vapipe_consumer_lag_seconds", {"stage": "inter"}, 1.5),
        ("vapipe_dead_lettered_total", {"stage": "inter"}, 1),
        ("vapipe_retried_batches_total", {"stage": "inter"}, 2),
        ("vapipe_detections_total", {}, 30),
        ("vapipe_crops_total", {"label": "car"}, 5),
        ("vapipe_vehicles_total", {"stream": "cam1", "class": "car"}, 7),  # the owner's row, not the stale copy
        ("vapipe_unique_vehicles_total", {"stream": "cam1", "class": "car"}, 2),
        ("vapipe_line_crossings_total", {"stream": "cam1", "line": "north", "direction": "in", "class": "car"}, 2),
        ("vapipe_e2e_latency_seconds_count", {}, 40),
        ("vapipe_e2e_latency_seconds_bucket", {"le": "0.1"}, 0),
        ("vapipe_e2e_latency_seconds_bucket", {"le": "0.25"}, 40),
        ("vapipe_inference_seconds_count", {"phase": "inference"}, 3),  # merged over replicas
        ("vapipe_inference_seconds_bucket", {"phase": "inference", "le": "0.05"}, 2),
        ("vapipe_inference_seconds_count", {"phase": "decode"}, 2),
    ],
)
def test_scraped_values(sample: str, labels: dict[str, str], expected: float) -> None:
    scraped = _scrape(_snapshot())
    assert scraped[(sample, tuple(sorted(labels.items())))] == pytest.approx(expected)


def test_histogram_sum_is_the_samples_sum_within_a_bucket() -> None:
    scraped = _scrape(_snapshot())
    assert scraped[("vapipe_e2e_latency_seconds_sum", ())] == pytest.approx(40 * 0.120, rel=0.01)


def test_no_reports_give_empty_but_valid_families() -> None:
    scraped = _scrape([])
    assert scraped[("vapipe_e2e_latency_seconds_count", ())] == 0
    assert scraped[("vapipe_stage_replicas", (("stage", "inter"),))] == 0


def test_cumulative_buckets_are_exact_to_one_bucket() -> None:
    values = np.random.default_rng(3).lognormal(np.log(50), 1.0, 3000)
    hist = LatencyHistogram()
    for v in values:
        hist.record(float(v))
    bounds = [b * 1000 for b in BUCKETS_S]
    for bound, n in zip(bounds, hist.cumulative(bounds), strict=True):
        assert int((values <= bound / 1.02).sum()) <= n <= int((values <= bound).sum())
