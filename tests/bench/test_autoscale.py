"""`vapipe bench autoscale`'s figures from its samples (the run itself is tests/actors/test_operate.py)."""

from __future__ import annotations

import pytest

from bench.autoscale import _quantile, recovery_after


def lags(*values: float) -> list[dict[str, float]]:
    return [{"t": float(t), "lag_s": v} for t, v in enumerate(values)]


@pytest.mark.parametrize(
    ("samples", "step", "expected"),
    [
        (lags(0, 0, 3, 5, 4, 1, 0, 0), 1, 4.0),  # above target from t=2 to t=4, under again at t=5
        (lags(0, 0, 0, 0), 1, 0.0),  # never rose
        (lags(0, 3, 3, 3), 1, None),  # never came back
        (lags(3, 0, 1, 3, 1), 1, 3.0),  # only what rose after the step counts
    ],
)
def test_lag_back_under_target(samples: list[dict[str, float]], step: float, expected: float | None) -> None:
    assert recovery_after(samples, step, 2.0) == expected


def test_board_quantile_is_prometheus_histogram_quantile_over_the_window() -> None:
    def row(n01: float, n1: float, total: float) -> dict[str, float]:
        return {'h_bucket{le="0.1"}': n01, 'h_bucket{le="1"}': n1, 'h_bucket{le="+Inf"}': total}

    before, after = row(10, 10, 10), row(10, 110, 110)  # 100 new samples, all in (0.1, 1]
    assert _quantile(after, before, "h", 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert _quantile(before, before, "h", 0.5) is None  # nothing new in the window
