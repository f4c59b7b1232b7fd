"""The Faust engine end to end: real broker, real model, Faust worker processes; and mixed with Ray stages.

Mirrors ``test_pipeline.py``: detections on C equal a one-process reference, crops
only above 0.7, every frame counted once; a mixed Ray/Faust run builds the same
table as an all-Ray run; a count worker killed mid-run recovers from the changelog.
The one-worker Faust run, the mixed runs and their all-Ray reference are turns of
one sequence on one table (``turns``), each run once for the tests that check it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.launcher import RunPlan
from actors.stages import read_table
from pipeline.config import Settings
from pipeline.count_table import comparable
from pipeline.sources import parse_source
from pipeline.stats import RunSummary
from tests.conftest import ReferenceDetector, _missing, build_settings
from tests.integration.test_pipeline import (
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


def assert_faust_end_to_end(
    summary: RunSummary, s: Settings, stream: str, frames: int, inter: int, ref: ReferenceDetector
) -> None:
    """An all-Faust run: detections on C equal the reference, crops above 0.7, every frame counted once,
    the Ray engine's table format, and the time-windowed moving count holding the same vehicles."""
    assert summary.engines == {"inter": "faust", "crop": "faust", "count": "faust"}
    assert summary.frames_produced == frames
    assert summary.per_stream[stream] == {"produced": frames, "skipped": 0, "counted": frames}
    assert summary.frames_processed["inter"] == frames
    assert summary.frames_processed["count"] == frames  # applied once each
    assert summary.restarts == {}
    assert set(summary.actors) >= {f"inter-{i}" for i in range(inter)}
    assert all(a.get("peak_rss_mb") for n, a in summary.actors.items() if not n.startswith("producer"))

    got, _ = assert_detections_and_crops_match_reference(s, stream, frames, ref)
    direct = direct_vehicle_count(got)
    assert summary.vehicles[stream] == direct
    # The Faust table's changelog is the Ray engine's: the same snapshot format, readable by `vapipe counts`.
    table = read_table(s)
    assert table[stream]["totals"] == direct and table[stream]["frames_applied"] == frames
    # The time-windowed moving count (a Faust hopping-window table) holds the same vehicles.
    assert summary.moving_window["size_s"] == 600
    assert summary.moving_window["current"][stream] == direct


WHOLE_CLIP_WINDOW = {"faust__window_s": 600, "faust__window_step_s": 60}
"""A window far longer than the clip's capture time: the time-windowed count then holds every frame."""


@dataclass
class Turn:
    engine: str
    settings: Settings
    stream: str
    summary: RunSummary
    table: dict[str, Any]
    """The whole table right after this turn."""


TURN_FRAMES = 40
"""Frames each turn counts: the highway clip's first line crossing (a car, applied at frame 38) is among them."""
MIXED = ["inter=ray,crop=faust,count=faust", "inter=faust,crop=ray,count=ray"]
FAUST_WORKERS = (3, 2, 2)
"""The all-Faust turn's InterConsumers, crop and count workers: several of each share the work."""


@pytest.fixture(scope="module")
def turns(
    faust_installed, ray_local, kafka_bootstrap: str, model_path: str, highway: str, tmp_path_factory: pytest.TempPathFactory
) -> list[Turn]:
    """Issue 19's runs, on one set of topics and groups: Ray exactly-once, all-Faust (several workers
    per stage), Ray again, then each mixed run (two InterConsumers, two count workers), tracking on.

    Each turn counts a stream of its own (the same frames of the clip), so the all-Ray turn's row is
    what every other turn's row must equal. Each turn writes its crops under an output folder of its
    own, so one turn's crops can be checked alone; the table is on Kafka, shared.
    """
    base = tmp_path_factory.mktemp("turns")
    exactly_once = build_settings(
        kafka_bootstrap, base, model_path, producer__max_frames=TURN_FRAMES, **WHOLE_CLIP_WINDOW, **TRACKING
    )
    at_least_once = exactly_once.model_copy(update=AT_LEAST_ONCE)
    # (engine, settings, replicas of inter, crop and count)
    plan: list[tuple[str, Settings, tuple[int, int, int]]] = [("ray", exactly_once, (1, 1, 1))]
    plan += [("faust", at_least_once, FAUST_WORKERS), ("ray", exactly_once, (1, 1, 1))]
    plan += [(engine, at_least_once, (2, 1, 2)) for engine in MIXED]
    out: list[Turn] = []
    for i, (engine, s, (inter, crop, count)) in enumerate(plan):
        s = s.model_copy(update={"output_dir": str(base / f"turn{i}")})
        stream = f"turn{i}"
        summary = run(s, engine, [f"{stream}={highway}"], inter=inter, crop=crop, count=count, stall_timeout_s=150)
        out.append(Turn(engine, s, stream, summary, read_table(s)))
    return out


def test_ray_and_faust_take_turns_on_one_table(turns: list[Turn]) -> None:
    """Issue 19: Faust after a Ray exactly-once run, Ray after Faust, then mixed runs, on the same topics and groups.

    Ray's exactly-once transactions end every changelog partition they wrote with a commit
    marker; Faust's table recovery waited for a record at that offset, forever. Each turn
    counts its own stream, and every earlier stream's row must stay as it was.
    """
    want: dict[str, dict[str, int]] = {}
    for turn in turns:
        assert turn.summary.per_stream[turn.stream] == {"produced": TURN_FRAMES, "skipped": 0, "counted": TURN_FRAMES}, (
            turn.engine
        )
        want[turn.stream] = direct_vehicle_count(detections_on_c(turn.settings, turn.stream))
        assert turn.summary.vehicles[turn.stream] == want[turn.stream], turn.engine
        for name, totals in want.items():  # this turn's stream counted once, the earlier ones untouched
            row = turn.table[name]
            assert (row["totals"], row["frames_applied"], row["applied_runs"]) == (totals, TURN_FRAMES, []), (turn.engine, name)


def test_faust_end_to_end_several_workers_every_frame_counted_once(
    turns: list[Turn], reference_detector: ReferenceDetector
) -> None:
    """The all-Faust turn: three InterConsumers, two crop and two count workers, on a table the Ray
    engine wrote before."""
    turn = turns[1]
    assert turn.engine == "faust"
    assert_faust_end_to_end(turn.summary, turn.settings, turn.stream, TURN_FRAMES, FAUST_WORKERS[0], reference_detector)


@pytest.mark.parametrize("engine", MIXED)
def test_mixed_engines_build_the_same_table_as_all_ray(turns: list[Turn], engine: str) -> None:
    all_ray, mixed = turns[0], next(t for t in turns if t.engine == engine)
    assert all_ray.summary.engines == {"inter": "ray", "crop": "ray", "count": "ray"}
    assert mixed.summary.engines == dict(part.split("=") for part in engine.split(","))
    want, got = mixed.table[all_ray.stream], mixed.table[mixed.stream]
    for key in ("totals", "frames_applied", "frames_expected", "window", "applied_watermark", "applied_runs"):
        assert got[key] == want[key], key
    direct = direct_vehicle_count(detections_on_c(mixed.settings, mixed.stream))
    assert mixed.summary.vehicles[mixed.stream] == all_ray.summary.vehicles[all_ray.stream] == direct
    assert mixed.summary.crops_per_label == all_ray.summary.crops_per_label
    # Tracking: the count agent (Faust's or Ray's) tracks like one TrafficCounter over C in frame order,
    # and the two runs count the same vehicles and crossings.
    traffic, all_ray_traffic = mixed.summary.traffic, all_ray.summary.traffic
    assert traffic is not None and all_ray_traffic is not None
    assert comparable(traffic[mixed.stream]) == one_process_traffic(mixed.settings, mixed.stream)
    assert comparable(all_ray_traffic[all_ray.stream]) == one_process_traffic(all_ray.settings, all_ray.stream)
    assert comparable(traffic[mixed.stream]) == comparable(all_ray_traffic[all_ray.stream])


def test_faust_count_worker_killed_mid_run_recovers_from_the_changelog(faust_installed, make_settings, highway: str) -> None:
    frames = 60
    # Paced, so the kill lands mid-stream even where detection outruns the producer. The dead member
    # leaves the group after Kafka's shortest session (6 s) instead of 10 s; a live one heartbeats every second.
    s = make_settings(producer__max_frames=frames, producer__fps=10, kafka__session_timeout_ms=6000, **AT_LEAST_ONCE, **TRACKING)
    killed: list[str] = []

    def kill_the_owner(progress: Any) -> None:
        if killed:
            return
        for st in progress.stage("count"):
            # The worker that owns the stream's partition, once it has applied (and committed) part of it.
            if 12 <= st.frames_out < frames - 20 and st.pid:
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
