"""The Faust engine end to end: real broker, real model, Faust worker processes; and mixed with Ray stages.

Mirrors ``test_pipeline.py``: detections on C equal a one-process reference, crops
only above 0.7, every frame counted once; a mixed Ray/Faust run builds the same
table as an all-Ray run; a count worker killed mid-run recovers from the changelog.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from actors.launcher import RunPlan
from actors.stages import read_table
from pipeline.config import Settings
from pipeline.count_table import comparable
from pipeline.sources import parse_source
from pipeline.stats import RunSummary
from tests.conftest import ReferenceDetector, _missing
from tests.integration.test_pipeline import (
    REAL_TIME,
    TRACKING,
    assert_detections_and_crops_match_reference,
    detections_on_c,
    direct_vehicle_count,
    one_process_traffic,
)

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.slow]

AT_LEAST_ONCE = {"processing_guarantee": "at_least_once"}
"""The Faust engine runs at-least-once only (faust-streaming#440); the Ray engine defaults to exactly-once."""


@pytest.fixture(scope="session")
def faust_installed() -> None:
    try:
        import faust  # noqa: F401
    except ImportError as exc:
        _missing(f"faust-streaming is not installed ({exc}); `make setup` installs it")


def run(
    settings: Settings,
    engine: str,
    sources: list[str],
    inter: int = 1,
    crop: int = 1,
    count: int = 1,
    on_progress: Any = None,
    stall_timeout_s: float = 240,
) -> RunSummary:
    from actors.engines import parse_engines
    from actors.engines import run as run_engines

    plan = RunPlan(
        sources=[parse_source(s) for s in sources],
        replicas={"inter": inter, "crop": crop, "count": count},
        include_dashboard=False,
        stall_timeout_s=stall_timeout_s,
    )
    return run_engines(settings, plan, parse_engines(engine), on_progress=on_progress)


@pytest.mark.parametrize("inter", [1, 3])
def test_faust_end_to_end_every_frame_counted_once(
    faust_installed, make_settings, reference_detector: ReferenceDetector, highway: str, inter: int
) -> None:
    frames = 90
    # A window far longer than the clip's capture time: the time-windowed count then holds every frame.
    s = make_settings(producer__max_frames=frames, faust__window_s=600, faust__window_step_s=60, **AT_LEAST_ONCE)
    replicas = 2 if inter == 3 else 1
    summary = run(s, "faust", [f"hw={highway}"], inter=inter, crop=replicas, count=replicas)

    assert summary.engines == {"inter": "faust", "crop": "faust", "count": "faust"}
    assert summary.frames_produced == frames
    assert summary.per_stream["hw"] == {"produced": frames, "skipped": 0, "counted": frames}
    assert summary.frames_processed["inter"] == frames
    assert summary.frames_processed["count"] == frames  # applied once each
    assert summary.restarts == {}
    assert set(summary.actors) >= {f"inter-{i}" for i in range(inter)}
    assert all(a.get("peak_rss_mb") for n, a in summary.actors.items() if not n.startswith("producer"))

    got, _ = assert_detections_and_crops_match_reference(s, "hw", frames, reference_detector)
    direct = direct_vehicle_count(got)
    assert summary.vehicles["hw"] == direct
    # The Faust table's changelog is the Ray engine's: the same snapshot format, readable by `vapipe counts`.
    table = read_table(s)
    assert table["hw"]["totals"] == direct and table["hw"]["frames_applied"] == frames
    # The time-windowed moving count (a Faust hopping-window table) holds the same vehicles.
    assert summary.moving_window["size_s"] == 600
    assert summary.moving_window["current"]["hw"] == direct


@pytest.mark.parametrize("engine", ["inter=ray,crop=faust,count=faust", "inter=faust,crop=ray,count=ray"])
def test_mixed_engines_build_the_same_table_as_all_ray(
    faust_installed, ray_local, make_settings, highway: str, engine: str
) -> None:
    frames = 60
    ray_settings = make_settings(producer__max_frames=frames, **AT_LEAST_ONCE, **TRACKING, **REAL_TIME)
    mixed_settings = make_settings(producer__max_frames=frames, **AT_LEAST_ONCE, **TRACKING, **REAL_TIME)
    all_ray = run(ray_settings, "ray", [f"hw={highway}"], inter=2)
    mixed = run(mixed_settings, engine, [f"hw={highway}"], inter=2, count=2)

    assert all_ray.engines == {"inter": "ray", "crop": "ray", "count": "ray"}
    assert mixed.per_stream["hw"] == all_ray.per_stream["hw"] == {"produced": frames, "skipped": 0, "counted": frames}
    want, got = read_table(ray_settings)["hw"], read_table(mixed_settings)["hw"]
    for key in ("totals", "frames_applied", "frames_expected", "window", "applied_watermark", "applied_runs"):
        assert got[key] == want[key], key
    assert mixed.vehicles == all_ray.vehicles == {"hw": direct_vehicle_count(detections_on_c(mixed_settings, "hw"))}
    assert mixed.crops_per_label == all_ray.crops_per_label
    # Tracking: the count agent (Faust's or Ray's) tracks like one TrafficCounter over C in frame order,
    # in each run.
    assert mixed.traffic is not None and all_ray.traffic is not None
    assert comparable(mixed.traffic["hw"]) == one_process_traffic(mixed_settings, "hw")
    assert comparable(all_ray.traffic["hw"]) == one_process_traffic(ray_settings, "hw")
    # Tracked counts across two runs depend on the producer's pace (see test_pipeline); not compared here.


def test_ray_and_faust_take_turns_on_one_table(faust_installed, ray_local, make_settings, highway: str) -> None:
    """Issue 19: Faust after a Ray exactly-once run, Ray after Faust, then a mixed run, on the same topics and groups.

    Ray's exactly-once transactions end every changelog partition they wrote with a commit
    marker; Faust's table recovery waited for a record at that offset, forever. Each turn
    counts its own stream, and every earlier stream's row must stay as it was.
    """
    frames = 24
    exactly_once = make_settings(producer__max_frames=frames)  # one set of topics and groups for every turn
    at_least_once = exactly_once.model_copy(update=AT_LEAST_ONCE)
    turns = [
        ("ray", exactly_once),
        ("faust", at_least_once),
        ("ray", exactly_once),
        ("inter=ray,crop=faust,count=faust", at_least_once),
    ]
    want: dict[str, dict[str, int]] = {}
    for i, (engine, s) in enumerate(turns):
        stream = f"turn{i}"
        summary = run(s, engine, [f"{stream}={highway}"], stall_timeout_s=150)

        assert summary.per_stream[stream] == {"produced": frames, "skipped": 0, "counted": frames}, engine
        want[stream] = direct_vehicle_count(detections_on_c(s, stream))
        assert summary.vehicles[stream] == want[stream], engine
        table = read_table(s)
        for name, totals in want.items():  # this turn's stream counted once, the earlier ones untouched
            row = table[name]
            assert (row["totals"], row["frames_applied"], row["applied_runs"]) == (totals, frames, []), (engine, name)


def test_faust_count_worker_killed_mid_run_recovers_from_the_changelog(faust_installed, make_settings, highway: str) -> None:
    frames = 90
    s = make_settings(producer__max_frames=frames, producer__fps=15, **AT_LEAST_ONCE, **TRACKING)
    killed: list[str] = []

    def kill_the_owner(progress: Any) -> None:
        if killed:
            return
        for st in progress.stage("count"):
            # The worker that owns the stream's partition, once it has applied (and committed) part of it.
            if 20 <= st.frames_out < frames - 30 and st.pid:
                os.kill(st.pid, signal.SIGKILL)
                killed.append(st.name)
                return

    summary = run(s, "faust", [f"hw={highway}"], inter=1, count=2, on_progress=kill_the_owner)

    assert killed, "the run ended before a count worker could be killed"
    # At least the kill; a worker found stuck afterwards is restarted too (faust.stuck_after_s).
    assert summary.restarts.get(killed[0], 0) >= 1
    assert summary.per_stream["hw"] == {"produced": frames, "skipped": 0, "counted": frames}
    table = read_table(s)["hw"]
    assert table["frames_applied"] == frames and table["applied_watermark"] == frames and table["applied_runs"] == []
    # No frame counted twice: the totals equal a direct count of C's vehicles above 0.5.
    assert table["totals"] == summary.vehicles["hw"] == direct_vehicle_count(detections_on_c(s, "hw"))
    # The tracker came back from the changelog too: the counts of one uninterrupted TrafficCounter.
    assert summary.traffic is not None and comparable(summary.traffic["hw"]) == one_process_traffic(s, "hw")


def test_compare_bench_runs_both_engines_and_writes_report(
    faust_installed, ray_local, make_settings, highway: str, tmp_path: Path
) -> None:
    import csv
    import json

    from bench.experiments import compare_engines
    from bench.report import write_report

    s = make_settings(**AT_LEAST_ONCE)
    result = compare_engines(s, ["ray", "faust"], [1, 2], frames=24, repeat=1, models=["sleep:5ms"], video=highway)
    assert [(t["engine"], t["replicas"]) for t in result["table"]] == [("ray", 1), ("ray", 2), ("faust", 1), ("faust", 2)]
    assert all(row["frames"] == 24 for row in result["rows"])
    assert all(t["fps_mean"] > 0 and t["speedup"] > 0 and t["rss_mb_per_worker"] > 0 for t in result["table"])
    assert [t["fps_vs_ray"] for t in result["table"] if t["engine"] == "ray"] == [1.0, 1.0]
    out = write_report(result, tmp_path / "compare", command=["vapipe", "bench", "compare"])
    assert (out / "compare.png").stat().st_size > 1000
    assert json.loads((out / "compare.json").read_text())["benchmark"] == "compare"
    assert len(list(csv.DictReader((out / "compare.csv").read_text().splitlines()))) == 4
