"""ReorderBuffer: index order out of any arrival order, bounded waits, skipped and late frames, plain-data state."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pipeline.reorder import ReorderBuffer

Step = tuple[str, int, float]
"""("push", index, now) | ("skip", index, 0) | ("tick", 0, now) | ("end", 0, now)."""


def play(steps: list[Step], wait_s: float = 1.0, max_frames: int = 8) -> tuple[list[int], list[int], list[str]]:
    """Feed a script; return the released order, the stepped-over indices and each push's outcome."""
    buffer: ReorderBuffer[str] = ReorderBuffer(wait_s=wait_s, max_frames=max_frames)
    released: list[int] = []
    stepped: list[int] = []
    outcomes: list[str] = []
    for op, index, now in steps:
        if op == "push":
            outcomes.append(buffer.push(index, f"f{index}", now))
        elif op == "skip":
            buffer.skip(index)
            continue
        out = buffer.release(now, flush=op == "end")
        assert [item for _, item in out.items] == [f"f{i}" for i, _ in out.items]
        released += [i for i, _ in out.items]
        stepped += out.stepped_over
    return released, stepped, outcomes


@pytest.mark.parametrize(
    ("steps", "released", "stepped", "outcomes"),
    [
        ([], [], [], []),
        ([("push", 0, 0.0), ("push", 1, 0.1), ("push", 2, 0.2)], [0, 1, 2], [], ["buffered"] * 3),
        ([("push", 2, 0.0), ("push", 1, 0.1), ("push", 0, 0.2)], [0, 1, 2], [], ["buffered"] * 3),
        # a gap waits, then is stepped over once wait_s (1 s) has passed on the caller's clock
        ([("push", 0, 0.0), ("push", 2, 0.1), ("tick", 0, 1.0)], [0], [], ["buffered"] * 2),
        ([("push", 0, 0.0), ("push", 2, 0.1), ("tick", 0, 1.1)], [0, 2], [1], ["buffered"] * 2),
        ([("push", 0, 0.0), ("push", 2, 0.1), ("push", 3, 1.2)], [0, 2, 3], [1], ["buffered"] * 3),
        # the missing frame comes in time
        ([("push", 0, 0.0), ("push", 2, 0.1), ("push", 1, 0.9)], [0, 1, 2], [], ["buffered"] * 3),
        # ... or too late: it was stepped over and is refused
        ([("push", 0, 0.0), ("push", 2, 0.1), ("tick", 0, 2.0), ("push", 1, 2.1)], [0, 2], [1], ["buffered"] * 2 + ["late"]),
        # redelivered frames change nothing
        (
            [("push", 0, 0.0), ("push", 0, 0.1), ("push", 2, 0.2), ("push", 2, 0.3)],
            [0],
            [],
            ["buffered", "late", "buffered", "duplicate"],
        ),
        # the producer said frame 1 will never come: no waiting for it
        ([("skip", 1, 0), ("push", 0, 0.0), ("push", 2, 0.1)], [0, 2], [1], ["buffered"] * 2),
        ([("skip", 1, 0), ("push", 1, 0.0)], [], [], ["late"]),
        # the stream starts late (a counter restarted mid-stream without state): one wait, then on
        ([("push", 500, 0.0), ("push", 501, 0.5), ("push", 502, 1.0)], [500, 501, 502], list(range(500)), ["buffered"] * 3),
        # the end of the stream releases everything
        ([("push", 3, 0.0), ("push", 1, 0.0), ("end", 0, 0.0)], [1, 3], [0, 2], ["buffered"] * 2),
    ],
)
def test_release_order(steps: list[Step], released: list[int], stepped: list[int], outcomes: list[str]) -> None:
    assert play(steps) == (released, stepped, outcomes)


def test_a_full_buffer_steps_over_the_gap_at_once() -> None:
    steps: list[Step] = [("push", i, 0.0) for i in range(1, 10)]  # frame 0 never comes; no time passes
    released, stepped, _ = play(steps, wait_s=60.0, max_frames=8)
    assert released == list(range(1, 10)) and stepped == [0]


def test_never_holds_more_than_max_frames() -> None:
    buffer: ReorderBuffer[int] = ReorderBuffer(wait_s=60.0, max_frames=4)
    for i in range(1, 40, 2):  # every other frame missing, no time passing
        buffer.push(i, i, 0.0)
        buffer.release(0.0)
        assert len(buffer) <= 4


def test_the_clock_never_runs_backwards() -> None:
    released, stepped, _ = play([("push", 0, 5.0), ("push", 2, 5.1), ("tick", 0, 1.0), ("tick", 0, 5.5)])
    assert (released, stepped) == ([0], [])


@pytest.mark.parametrize("seed", range(5))
def test_any_arrival_order_within_the_wait_gives_index_order(seed: int) -> None:
    rng = random.Random(seed)
    indices = list(range(200))
    arrival = sorted(indices, key=lambda i: i + rng.uniform(0, 6))  # each frame at most ~6 frames early or late
    steps: list[Step] = [("push", i, n * 0.04) for n, i in enumerate(arrival)]
    released, stepped, _ = play(steps, wait_s=1.0, max_frames=32)
    assert released == indices and stepped == []


def test_state_round_trips_mid_gap() -> None:
    buffer: ReorderBuffer[dict[str, Any]] = ReorderBuffer(wait_s=1.0, max_frames=8)
    buffer.push(0, {"n": 0}, 0.0)
    buffer.release(0.0)
    buffer.push(3, {"n": 3}, 0.2)
    buffer.push(2, {"n": 2}, 0.3)
    buffer.skip(5)
    state = json.loads(json.dumps(buffer.to_state(lambda item: item)))
    assert state["version"] == 1
    restored: ReorderBuffer[dict[str, Any]] = ReorderBuffer.from_state(state, lambda item: item, wait_s=1.0, max_frames=8)
    assert restored.to_state(lambda item: item) == state
    for b in (buffer, restored):
        b.push(4, {"n": 4}, 0.4)
    assert [i for i, _ in restored.release(1.25).items] == [i for i, _ in buffer.release(1.25).items] == [2, 3, 4]


def test_state_version_is_checked() -> None:
    with pytest.raises(ValueError, match="version 9"):
        ReorderBuffer.from_state({"version": 9, "next_index": 0}, lambda item: item, wait_s=1.0, max_frames=8)


@pytest.mark.parametrize(("wait_s", "max_frames"), [(-1.0, 8), (1.0, 0)])
def test_limits_are_checked(wait_s: float, max_frames: int) -> None:
    with pytest.raises(ValueError):
        ReorderBuffer(wait_s=wait_s, max_frames=max_frames)
