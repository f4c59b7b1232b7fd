"""The run contract: bounded latency histograms, worker stats and the run summary's JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.stats import STAGES, SUMMARY_SCHEMA_VERSION, EarlierLives, LatencyHistogram, RunSummary, WorkerStats


def exact_percentile(values: np.ndarray, q: float) -> float:
    ordered = np.sort(values)
    return float(ordered[min(int(q * len(ordered)), len(ordered) - 1)])


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
@pytest.mark.parametrize("scale_ms", [1.0, 180.0, 20000.0])
def test_histogram_percentiles_are_within_two_percent_of_exact(q: float, scale_ms: float) -> None:
    values = np.random.default_rng(7).lognormal(mean=np.log(scale_ms), sigma=0.6, size=5000)
    hist = LatencyHistogram()
    for v in values:
        hist.record(float(v))
    assert hist.percentile(q) == pytest.approx(exact_percentile(values, q), rel=0.02)


def test_histogram_memory_does_not_grow_with_samples() -> None:
    hist = LatencyHistogram()
    before = hist.counts.nbytes
    for v in np.linspace(0.05, 1e9, 100_000):
        hist.record(float(v))
    assert hist.counts.nbytes == before and hist.count == 100_000


@pytest.mark.parametrize("value", [-5.0, 0.0, float("nan"), float("inf"), 1e12])
def test_histogram_takes_any_value_without_raising(value: float) -> None:
    hist = LatencyHistogram()
    hist.record(value)
    assert hist.count == 1


def test_histograms_merge_like_one_over_all_samples() -> None:
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for i, v in enumerate(np.linspace(1, 500, 1000)):
        (a if i % 3 else b).record(float(v))
        both.record(float(v))
    assert np.array_equal(a.merge(b).counts, both.counts)


def test_histogram_round_trips_through_json() -> None:
    hist = LatencyHistogram()
    for v in (3.0, 3.0, 250.0, 9000.0):
        hist.record(v)
    again = LatencyHistogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert np.array_equal(again.counts, hist.counts)
    assert again.summary() == hist.summary() and hist.summary()["n"] == 4.0


def test_histogram_refuses_a_foreign_bucket_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        LatencyHistogram.from_dict({"low_ms": 1.0, "growth": 1.5, "buckets": {"3": 1}})


def test_empty_histogram_has_an_empty_summary() -> None:
    assert LatencyHistogram().summary() == {} and LatencyHistogram().percentile(0.5) == 0.0


def test_worker_stats_ignore_unknown_keys_and_round_trip() -> None:
    raw = {"name": "count-0", "stage": "count", "frames_out": 7, "lag": 3, "from_a_newer_worker": True}
    stats = WorkerStats.from_dict(raw)
    assert (stats.name, stats.frames_out, stats.lag, stats.histogram.count) == ("count-0", 7, 3, 0)
    assert WorkerStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def make_summary(**overrides: object) -> RunSummary:
    fields: dict[str, object] = dict(
        run_id="r1",
        model="m.onnx",
        sources={"hw": "highway.avi"},
        replicas=dict.fromkeys(STAGES, 1),
        frames_produced=60,
        frames_skipped=0,
        per_stream={"hw": {"produced": 60, "skipped": 0, "counted": 60}},
        frames_processed=dict.fromkeys(STAGES, 60),
        poison_records=dict.fromkeys(STAGES, 0),
        dead_lettered=dict.fromkeys(STAGES, 0),
        retried_batches=dict.fromkeys(STAGES, 0),
        detections=90,
        crops_per_label={"car": 40},
        crops_dir="/out/crops",
        vehicles={"hw": {"car": 80}},
        vehicle_totals={"car": 80},
        wall_s=9.0,
        processing_s=8.0,
        frames_per_s=7.5,
        count_latency_ms={"p50": 180.0, "p95": 400.0, "p99": 650.0, "n": 60.0},
        stage_peak_fps=dict.fromkeys(STAGES, 8.0),
        timeline=[],
        actors={},
    )
    fields.update(overrides)
    return RunSummary(**fields)  # type: ignore[arg-type]


# Keys scripts read from output/runs/*.json since the first release: they may only be added to.
FIRST_RELEASE_KEYS = {
    "run_id",
    "model",
    "sources",
    "replicas",
    "frames_produced",
    "frames_skipped",
    "per_stream",
    "frames_processed",
    "poison_records",
    "dead_lettered",
    "retried_batches",
    "detections",
    "crops_per_label",
    "crops_dir",
    "vehicles",
    "vehicle_totals",
    "wall_s",
    "processing_s",
    "frames_per_s",
    "count_latency_ms",
    "stage_peak_fps",
    "timeline",
    "actors",
}


def test_summary_json_keeps_every_key_of_the_first_release_and_says_its_schema() -> None:
    data = make_summary().to_dict()
    assert set(data) >= FIRST_RELEASE_KEYS
    assert data["schema_version"] == SUMMARY_SCHEMA_VERSION
    assert "engines" not in data and "summary_path" not in data  # unset engine fields stay out
    assert make_summary(engines={"inter": "ray"}).to_dict()["engines"] == {"inter": "ray"}


def test_report_names_frames_rate_latency_counts_and_where_things_are() -> None:
    text = make_summary(summary_path="/out/runs/r1.json").report()
    for expected in (
        "60 frames",
        "7.5 frames/s",
        "p50 180 ms",
        "p99 650 ms",
        "car=80",
        "crops: 40 (car=40) in /out/crops",
        "dead-lettered: 0",
        "/out/runs/r1.json",
    ):
        assert expected in text
    assert len(text.splitlines()) <= 8


def test_tracked_counts_are_in_the_json_and_one_report_line_per_stream() -> None:
    assert "traffic" not in make_summary().to_dict()  # tracking off: no key
    traffic = {
        "hw": {
            "unique_vehicles": {"car": 5, "truck": 1},
            "moving_vehicles": {"car": 5},
            "stationary_vehicles": {"truck": 1},
            "line_crossings": {"highway": {"in": {"car": 3}, "out": {"car": 1}}},
            "frames_tracked": 60,
            "frames_stepped_over": 0,
        }
    }
    summary = make_summary(traffic=traffic, box_counts={"hw": {"car": 80}})
    data = summary.to_dict()
    assert data["traffic"] == traffic and data["box_counts"] == data["vehicles"]
    text = summary.report()
    assert "boxes counted" in text
    assert "hw: vehicles car=5, truck=1; highway in 3 / out 1; moving 5; stationary now 1" in text


def test_a_worker_restarted_twice_keeps_what_every_earlier_life_counted() -> None:
    lives = EarlierLives()
    first, second = LatencyHistogram(), LatencyHistogram()
    first.record(10.0)
    second.record(20.0)
    lives.end_life({"frames_out": 7, "skip_markers": 1, "latency_histogram": first.to_dict(), "restores": 3})
    lives.end_life({"frames_out": 5, "commit_failures": 2, "latency_histogram": second.to_dict()})
    live = {"name": "count-0", "frames_out": 4, "restores": 1, "restore_s": [0.2]}
    total = lives.add_to(live)
    assert total["frames_out"] == 16 and total["skip_markers"] == 1 and total["commit_failures"] == 2
    assert total["restores"] == 1 and total["restore_s"] == [0.2]  # the live process's own restores
    assert total["latency_ms"]["n"] == 2 and live["frames_out"] == 4  # the report itself is left as it was
