"""A 24-second soak (real broker, real Ray): its report's figures come from the run, not from defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.soak import rss_slopes, soak, write_soak_report

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.slow]


def test_rss_slope_is_fitted_per_process_after_its_warm_up() -> None:
    samples = {
        "count-0": [(0, 1, 100.0), (10, 1, 500.0)]  # warm-up, left out
        + [(t, 1, 200.0 + t / 360) for t in range(20, 200, 10)]  # +10 MB/hour
        + [(t, 2, 50.0) for t in range(200, 230, 10)],  # a replacement, too short to fit
    }
    (row,) = rss_slopes(samples, warmup_s=15).values()
    assert row["pid"] == 1 and row["slope_mb_per_h"] == pytest.approx(10.0, rel=1e-3)


def test_a_short_soak_reports_real_figures(ray_local: Any, make_settings, tmp_path: Path) -> None:
    s = make_settings()
    result = soak(s, minutes=0.4, streams=2, fps=4.0, poison_every_s=8, kill_every_s=9, sample_every_s=1, warmup_s=5)
    assert result["frames_produced"] == 2 * 96
    assert result["lost"] == 0 and result["counted_twice"] == 0
    assert result["frames_counted"] == result["frames_produced"]
    # Poison at 0 s, 8 s, 16 s (A, C, A): every one dead-lettered, none stopped the run.
    assert result["poisons_injected"] >= 2 and result["dead_lettered"] == result["poisons_injected"]
    # A kill at 9 s, the next once that replacement restored (18 s on a quick machine): the first
    # replacement restored, and the time is a measured one.
    first = result["kills"][0]
    assert first["restore_s"] is not None and 0 < first["restore_s"] < 60, first
    assert first["restored_after_s"] > 0, first  # the replacement's own restore, not the killed one's
    assert 0 < result["largest_snapshot_bytes"] <= 4096
    assert {"inter-0", "crop-0"} <= set(result["rss"])
    assert all(r["rss_mb_first"] > 10 and r["samples"] >= 3 for r in result["rss"].values())
    assert result["latency_p99_ms_by_minute"] and all(r["p99_ms"] > 0 for r in result["latency_p99_ms_by_minute"])
    folder = write_soak_report(result, tmp_path / "report", "vapipe bench soak --minutes 1")
    text = (folder / "README.md").read_text()
    assert f"| frames lost (of {result['frames_produced']}) | 0 |" in text
    assert (folder / "soak.png").stat().st_size > 1000
