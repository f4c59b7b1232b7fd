"""The benchmark commands run end to end (tiny sizes) and write their reports; no timing is asserted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bench.experiments import agreement, scaling, sweep
from bench.report import write_report
from pipeline.messages import Detections

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.slow]


def _det(*boxes: tuple[str, float, float, float, float]) -> Detections:
    return Detections.from_records([{"label": b[0], "class_id": 0, "confidence": 0.9, "box": list(b[1:])} for b in boxes])


def test_agreement_is_one_for_identical_and_drops_for_moved_boxes() -> None:
    a = {0: _det(("car", 0, 0, 10, 10), ("bus", 20, 20, 40, 40)), 1: _det()}
    assert agreement(a, a) == 1.0
    moved = {0: _det(("car", 0, 0, 10, 10), ("bus", 60, 60, 80, 80)), 1: _det()}
    assert agreement(moved, a) == 0.5
    relabelled = {0: _det(("truck", 0, 0, 10, 10), ("bus", 20, 20, 40, 40)), 1: _det()}
    assert agreement(relabelled, a) == 0.5


@pytest.mark.parametrize("mode", ["strong", "weak"])
def test_scaling_bench_writes_report(ray_local, make_settings, highway: str, tmp_path: Path, mode: str) -> None:
    s = make_settings(model__name="sleep:5ms")
    result = scaling(s, mode, [1, 2], frames=24, repeat=1, video=highway)
    assert [t["replicas"] for t in result["table"]] == [1, 2]
    key = "speedup" if mode == "strong" else "time_ratio_to_base"
    assert all(t[key] > 0 for t in result["table"])
    produced = [row["frames"] for row in result["rows"]]
    assert produced == ([24, 24] if mode == "strong" else [24, 48])
    out = write_report(result, tmp_path / mode, command=["vapipe", "bench", mode])
    assert (out / f"{mode}.png").stat().st_size > 1000
    assert json.loads((out / f"{mode}.json").read_text())["benchmark"] == mode
    rows = list(csv.DictReader((out / f"{mode}.csv").read_text().splitlines()))
    assert len(rows) == 2 and float(rows[0]["latency_p50_ms"]) >= 0
    assert "vapipe bench " + mode in (out / "README.md").read_text()


@pytest.mark.model
def test_sweep_reports_throughput_and_agreement(ray_local, make_settings, highway: str, tmp_path: Path) -> None:
    s = make_settings()
    result = sweep(s, batches=[8, 1], fps_values=[0.0], qualities=[90, 40], frames=10, video=highway)
    rows = {r["factor"]: r for r in result["rows"]}
    assert set(rows) == {"base", "batch", "jpeg_quality"}
    assert rows["base"]["agreement"] == 1.0
    assert rows["batch"]["agreement"] == 1.0  # batching changes speed, never detections
    assert 0 < rows["jpeg_quality"]["agreement"] <= 1.0
    out = write_report(result, tmp_path / "sweep", command=["vapipe", "bench", "sweep"])
    assert (out / "sweep.png").is_file() and np.isfinite(rows["base"]["fps"])
