"""`vapipe top`'s view as a pure function of one round of worker reports (a fixed snapshot)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from commands.top import stage_rows, status_json, top_view
from pipeline.stats import WorkerStats
from tests.pipeline.test_metrics import _snapshot


def _rows() -> dict[str, WorkerStats | str]:
    rows: dict[str, WorkerStats | str] = {s.name: s for s in _snapshot()}
    rows["count-1"] = "unavailable: GetTimeoutError"
    return rows


def render(rows: dict[str, WorkerStats | str]) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(top_view(rows))
    return out.getvalue()


def test_stage_rows_sum_replicas_and_take_the_worst_lag() -> None:
    inter, crop, count = stage_rows(_rows())
    assert inter == {
        "stage": "inter",
        "replicas": 2,
        "frames": 41,
        "fps": 10.5,
        "lag": 0,  # lag in records is only what the replicas measured (none in this snapshot)
        "lag_s": 1.5,
        "latency": "45 / 50",  # per-frame inference, merged over the replicas
        "restarts": 1,
        "errors": 3,  # 1 dead-lettered + 2 retried batches
    }
    assert crop["frames"] == 41 and count["latency"] == "121 / 121" and count["replicas"] == 1


def test_view_shows_every_stage_camera_and_replica() -> None:
    text = render(_rows())
    cells = [line.replace("│", " ").split() for line in text.splitlines()]
    assert ["inter", "2", "41", "10.5", "0", "1.5", "45", "/", "50", "1", "3"] in cells, text
    assert ["cam1", "9.5", "41", "2", "0", "-"] in cells, text  # the camera row
    assert ["inter-0", "5.0", "20", "40%", "-", "1.5", "45", "/", "45", "0", "-"] in cells, text
    assert ["count-1", *["-"] * 8, "unavailable:", "GetTimeoutError"] in cells, text


def test_status_json_is_every_report_in_full() -> None:
    data = json.loads(json.dumps(status_json(_rows())))
    assert data["inter-0"]["partition_lag"] == {"0": 3, "1": 0} and data["inter-0"]["busy"] == 0.4
    assert data["count-1"] == {"name": "count-1", "unavailable": "unavailable: GetTimeoutError"}
