"""Streams added and removed while a run goes on (Ray, then Faust), through the control topic (``vapipe streams``)."""

from __future__ import annotations

from typing import Any

import pytest

from actors.engines import parse_engines
from actors.faust.engine import run_engines
from actors.launcher import RunPlan
from actors.ray.engine import run_pipeline
from actors.stages import read_table
from actors.streams import declare, declared, withdraw
from pipeline.sources import parse_source
from tests.conftest import CAMERA_FPS, CAMERA_PASSWORD

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.rtsp]


class Script:
    """Driven once a second by the run: add cam2 once cam1 is going, then remove cam1, then cam2."""

    def __init__(self, settings: Any, url: str) -> None:
        self.settings, self.url, self.step = settings, url, 0

    def published(self, progress: Any, stream_id: str) -> int:
        stats = progress.stats.get(f"producer-{stream_id}")
        return stats.frames_out if stats else 0

    def __call__(self, control: Any) -> None:  # the Ray engine's on_tick
        self.on_progress(control.progress)

    def on_progress(self, progress: Any) -> None:  # any engine
        if self.step == 0 and self.published(progress, "cam1") >= 10:
            declare(self.settings, {"cam2": self.url})
            self.step = 1
        elif self.step == 1 and self.published(progress, "cam2") >= 10:
            assert set(declared(self.settings)) == {"cam2"}
            withdraw(self.settings, ["cam1"])
            self.step = 2
        elif self.step == 2 and progress.streams_complete(["cam1"]):
            withdraw(self.settings, ["cam2"])
            self.step = 3


def _plan(url: str) -> RunPlan:
    return RunPlan(
        sources=[parse_source(f"cam1={url}")],
        replicas={"inter": 1, "crop": 1, "count": 1},
        include_dashboard=False,
        allow_calibration=True,
        stall_timeout_s=120,
    )


@pytest.mark.parametrize("engine", ["ray", "faust"])
def test_a_stream_added_and_removed_mid_run_is_counted_to_its_end(engine: str, ray_local, make_settings, camera) -> None:
    # Faust runs at least once (faust#440); the count table applies each frame once either way.
    guarantee = "exactly_once" if engine == "ray" else "at_least_once"
    s = make_settings(model__name="sleep:1ms", producer__fps=CAMERA_FPS, producer__stall_s=3.0, processing_guarantee=guarantee)
    script = Script(s, camera.url)
    if engine == "ray":
        summary = run_pipeline(s, _plan(camera.url), on_tick=script)
    else:
        summary = run_engines(s, _plan(camera.url), parse_engines("faust"), on_progress=script.on_progress)
    assert script.step == 3
    assert set(summary.per_stream) == {"cam1", "cam2"}
    table = read_table(s)
    for sid in ("cam1", "cam2"):
        row = summary.per_stream[sid]
        assert row["produced"] >= 10 and table[sid]["complete"]
        assert row["counted"] + table[sid]["frames_skipped"].get("disconnected", 0) == row["produced"]
    assert declared(s) == {}
    assert CAMERA_PASSWORD not in str(summary.to_dict())
