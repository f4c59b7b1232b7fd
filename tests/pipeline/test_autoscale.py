"""The InterConsumer autoscaler's decisions over scripted load: lag up, idle down, cooldown, bounds."""

from __future__ import annotations

import itertools

import pytest

from pipeline.autoscale import LagController, ScaleInput
from pipeline.config import AutoscaleConfig

CFG = AutoscaleConfig(enabled=True, min=1, max=3, target_lag_s=2.0, cooldown_s=4.0, idle_busy=0.8)


def run(script: list[tuple[float, int, int, float, float]], cfg: AutoscaleConfig = CFG, room: bool = True) -> list[int]:
    """(now, replicas, ready, lag_s, busy) per tick -> decisions."""
    ctl = LagController(cfg)
    return [ctl.decide(ScaleInput(now, n, ready, lag, busy, room)) for now, n, ready, lag, busy in script]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # lag above target must hold for cooldown_s
        ([(0, 1, 1, 5, 1), (2, 1, 1, 5, 1), (4, 1, 1, 5, 1)], [0, 0, 1]),
        # a dip under target restarts the clock
        ([(0, 1, 1, 5, 1), (2, 1, 1, 1, 1), (4, 1, 1, 5, 1), (7, 1, 1, 5, 1), (8, 1, 1, 5, 1)], [0, 0, 0, 0, 1]),
        # nothing while the new replica is not ready; lag must then hold for cooldown_s again
        (
            [(0, 1, 1, 5, 1), (4, 1, 1, 5, 1), (5, 2, 1, 5, 1), (6, 2, 2, 5, 2), (9, 2, 2, 5, 2), (10, 2, 2, 5, 2)],
            [0, 1, 0, 0, 0, 1],
        ),
        # never above max
        ([(0, 3, 3, 50, 3), (10, 3, 3, 50, 3)], [0, 0]),
        # idle: the work fits one replica fewer at <= 0.8 each
        ([(0, 3, 3, 0.1, 1.2), (4, 3, 3, 0.1, 1.2)], [0, -1]),
        # not idle: 0.9 does not fit one replica at 0.8
        ([(0, 2, 2, 0.1, 0.9), (10, 2, 2, 0.1, 0.9)], [0, 0]),
        # never below min
        ([(0, 1, 1, 0, 0), (10, 1, 1, 0, 0)], [0, 0]),
        # lagging replicas are never idle, however little busy they report
        ([(0, 2, 2, 5, 0.1), (3, 2, 2, 5, 0.1)], [0, 0]),
    ],
)
def test_decisions(script: list[tuple[float, int, int, float, float]], expected: list[int]) -> None:
    assert run(script) == expected


def test_bounds_are_restored_first() -> None:
    cfg = CFG.model_copy(update={"min": 2})
    assert run([(0, 1, 1, 0, 0)], cfg) == [1]
    assert run([(0, 4, 4, 0, 4)]) == [-1]


def test_no_room_in_the_cluster_means_no_new_replica() -> None:
    assert run([(0, 1, 1, 5, 1), (4, 1, 1, 5, 1)], room=False) == [0, 0]


def test_step_load_goes_up_then_back_down() -> None:
    """1 camera, then 3, then 1; a replica handles 1.3 cameras' worth: replicas 1 -> 3 -> 1."""
    ctl = LagController(CFG)
    replicas, history = 1, []
    for t in range(0, 90):
        cameras = 3 if 10 <= t < 40 else 1
        load = cameras / 1.3  # in replicas' worth of work
        lag = 10.0 if load > replicas else 0.2
        delta = ctl.decide(ScaleInput(float(t), replicas, replicas, lag, min(load, replicas)))
        replicas += delta
        history.append(replicas)
    assert history[9] == 1 and max(history[10:45]) == 3 and history[-1] == 1
    assert all(abs(a - b) <= 1 for a, b in itertools.pairwise(history))


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ValueError, match="min"):
        AutoscaleConfig(min=3, max=2)
