"""Replicas against the GPUs and custom resources a Ray cluster has (no Ray needed)."""

from __future__ import annotations

import pytest

from actors.launcher import RunPlan
from actors.ray.engine import check_placement
from cluster.raycluster import placement_shortfall
from pipeline.config import Settings, load_settings
from pipeline.errors import PipelineError
from pipeline.sources import parse_source


@pytest.mark.parametrize(
    ("requests", "capacity", "expected"),
    [
        ({"inter": (2, {"GPU": 0.5})}, {"GPU": 1.0}, []),
        ({"inter": (3, {"GPU": 0.5})}, {"GPU": 1.0}, ["inter: 3 replicas need GPU 0.5 each, the cluster has 1 (room for 2)"]),
        ({"inter": (1, {"detector": 1})}, {}, ["inter: 1 replica needs detector 1 each, the cluster has 0 (room for 0)"]),
        ({"inter": (4, {"GPU": 0.0, "CPU": 99})}, {"CPU": 2}, []),  # no GPU asked; CPUs never block
        (
            {"inter": (1, {"detector": 1}), "crop": (1, {"detector": 1})},
            {"detector": 1},
            [
                "inter: 1 replica needs detector 1 each, the cluster has 1 (room for 1) and other stages need 1 of it",
                "crop: 1 replica needs detector 1 each, the cluster has 1 (room for 1) and other stages need 1 of it",
            ],
        ),
    ],
)
def test_placement_shortfall(requests: dict, capacity: dict, expected: list[str]) -> None:
    assert placement_shortfall(requests, capacity) == expected


def _plan(inter: int) -> RunPlan:
    return RunPlan(sources=[parse_source("demo")], replicas={"inter": inter, "crop": 1, "count": 1})


def test_unplaceable_fail_names_the_stage_and_wait_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings(overrides={"inter": {"num_gpus": 0.5}, "ray": {"unplaceable": "fail"}}, environ={})
    check_placement(s, _plan(2), {"CPU": 4, "GPU": 1})
    with pytest.raises(PipelineError, match=r"inter: 3 replicas need GPU 0.5 each.*ray.unplaceable=fail"):
        check_placement(s, _plan(3), {"CPU": 4, "GPU": 1})
    waiting = s.model_copy(update={"ray": s.ray.model_copy(update={"unplaceable": "wait"})})
    check_placement(waiting, _plan(3), {"CPU": 4, "GPU": 1})
    assert "waiting for room in the Ray cluster: inter: 3 replicas" in caplog.text
    # No GPU in the cluster: GPUs are not requested at all (a CPU-only machine runs as before).
    check_placement(s, _plan(3), {"CPU": 4})
    pinned = Settings().model_copy(
        update={"producer": Settings().producer.model_copy(update={"resources": {"node:198.18.0.1": 0.01}})}
    )
    check_placement(pinned, _plan(1), {"CPU": 4, "node:198.18.0.1": 1.0})
