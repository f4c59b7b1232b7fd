"""Operating a real run (real broker, real Ray): the Prometheus endpoint against the run summary,
`vapipe top` and `status --json` against the live actors, and InterConsumers that scale with lag
without losing or double-counting a frame.

The detector is the calibration model: what is measured here is the pipeline, not the model."""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from actors.launcher import Progress, RunPlan
from actors.ray.engine import run_pipeline
from bench.chaos import verify
from cli import app
from pipeline.sources import parse_source

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.slow]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


def test_metrics_top_and_status_during_a_run_agree_with_the_summary(ray_local: Any, make_settings: Any, highway: str) -> None:
    s = make_settings(model__name="synthetic:20ms", producer__fps=15, producer__max_frames=45, metrics__port=0)
    scrapes: list[dict[Any, float]] = []
    cli: dict[str, Any] = {}

    def watch(progress: Progress) -> None:
        assert progress.metrics_url, "the run serves no metrics"
        scrapes.append(scrape(progress.metrics_url))
        if "top" not in cli and progress.total("count", "frames_out") > 0:
            runner = CliRunner(env={"COLUMNS": "160"})
            cli["top"] = runner.invoke(app, ["top", "--iterations", "1"])
            cli["status"] = runner.invoke(app, ["status", "--json"])

    plan = RunPlan(
        sources=[parse_source(f"hw={highway}")],
        replicas={"inter": 1, "crop": 1, "count": 1},
        allow_calibration=True,
        include_dashboard=False,
    )
    summary = run_pipeline(s, plan, on_progress=watch)
    last = scrapes[-1]  # the drain's last round: every stream complete
    stream = next(iter(summary.per_stream))
    assert summary.frames_produced == 45
    assert total(last, "vapipe_frames_published_total", stream=stream) == summary.frames_produced
    for stage in ("inter", "count"):
        assert total(last, "vapipe_stage_frames_total", stage=stage) == summary.frames_processed[stage], stage
    assert total(last, "vapipe_stage_frames_total", stage="crop") <= summary.frames_processed["crop"]
    assert total(last, "vapipe_e2e_latency_seconds_count") == summary.count_latency_ms["n"] == 45
    assert total(last, "vapipe_inference_seconds_count", phase="inference") == 45
    assert total(last, "vapipe_detections_total") == summary.detections > 0
    vehicles = {lab[0][1]: v for (n, lab), v in last.items() if n == "vapipe_vehicles_total"}
    assert vehicles == summary.vehicles[stream] and vehicles
    assert total(last, "vapipe_dead_lettered_total") == sum(summary.dead_lettered.values())
    # lag was measured while frames flowed, and is back to nothing at the end
    assert any(("vapipe_consumer_lag_seconds", (("stage", "inter"),)) in x for x in scrapes)
    assert total(last, "vapipe_consumer_lag", stage="inter") == 0
    # the same actors, through the commands an operator runs
    assert cli["top"].exit_code == 0, cli["top"].output
    for word in ("inter", "crop", "count", "inter-0", "count-0", stream, "p50 / p99 ms"):
        assert word in cli["top"].output, cli["top"].output
    status = json.loads(cli["status"].output)
    assert {"inter-0", "crop-0", "count-0", f"producer-{stream}"} <= set(status)
    assert status["inter-0"]["ready"] and "lag_s" in status["inter-0"] and "timings" in status["inter-0"]


def _frames_folder(video: str, folder: Path, n: int) -> str:
    """The first ``n`` frames of a video as a folder of JPEGs: a source of exactly ``n`` frames."""
    folder.mkdir()
    cap = cv2.VideoCapture(video)
    for i in range(n):
        ok, image = cap.read()
        assert ok, f"{video} has fewer than {n} frames"
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), image)
    cap.release()
    return str(folder)


def test_inter_consumers_scale_up_with_lag_and_down_when_idle_exactly_once(
    ray_local: Any, make_settings: Any, highway: str, tmp_path: Path
) -> None:
    """Four cameras at 5 frames/s outrun one InterConsumer (70 ms a frame, 1.4 replicas of work);
    after three of them end, one is enough again (0.35). Every frame of every camera is counted once
    across both scale events.

    The margins are wide on purpose: a slow machine doubles the work per frame and still scales down,
    and the long camera runs 24 s past the others while the added replica starts and the backlog drains."""
    frames = {"long": 180, "b1": 60, "b2": 60, "b3": 60}
    s = make_settings(
        model__name="sleep:70ms",
        producer__fps=5,
        metrics__port=None,
        inter__autoscale__enabled=True,
        inter__autoscale__min=1,
        inter__autoscale__max=2,
        inter__autoscale__target_lag_s=1.0,
        inter__autoscale__cooldown_s=2.0,
    )
    sources = [parse_source(f"{sid}={_frames_folder(highway, tmp_path / sid, n)}") for sid, n in frames.items()]
    plan = RunPlan(
        sources=sources,
        replicas={"inter": 1, "crop": 1, "count": 1},
        allow_calibration=True,
        include_dashboard=False,
    )
    summary = run_pipeline(s, plan)
    assert summary.autoscale is not None
    changes = [e["change"] for e in summary.autoscale["events"]]
    looks = [(r["t"], r["replicas"], r["ready"], r["lag_s"], r["busy"]) for r in summary.autoscale["samples"]]
    assert changes[:2] == ["+inter-1", "-inter-1"], (summary.autoscale["events"], "t replicas ready lag_s busy", looks)
    for sid, n in frames.items():
        row = verify(s, sid, n)
        assert row["frames_counted"] == n and row["lost"] == 0 and row["counted_twice"] == 0, (sid, row)
        assert row["duplicates_on_c"] == 0, (sid, row)
    assert summary.frames_processed["inter"] == sum(frames.values())  # the retired replica's frames included


class _Replica:
    """Stands in for a stage actor: its run ends when asked to stop, or its process dies then (a lost node)."""

    def __init__(self, name: str, dies: bool) -> None:
        self.name, self.dies, self.stopped = name, dies, threading.Event()

    def run(self) -> dict[str, Any]:
        self.stopped.wait()
        if self.dies:
            os._exit(1)
        return {"name": self.name}

    def stop(self) -> None:
        self.stopped.set()


def test_stopping_a_drained_run_survives_a_replica_lost_at_the_end(ray_local: Any) -> None:
    """The run has drained; a replica whose node dies as it stops costs only its final figures."""
    from actors.ray.engine import RayWorkers

    actors = {n: ray_local.remote(_Replica).options(max_concurrency=2).remote(n, n == "inter-1") for n in ("inter-0", "inter-1")}
    workers = RayWorkers(actors, {n: h.run.remote() for n, h in actors.items()})
    assert workers.stop(timeout_s=60) == [{"name": "inter-0"}]
