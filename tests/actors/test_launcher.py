"""The run loop's end conditions, driven by scripted workers (the ``Workers`` protocol) against the
real test broker (the loop reads the crop group's lag from it before it returns)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from actors.launcher import Progress, RunPlan, drain
from cluster.reading import group_lag
from pipeline.errors import PipelineError
from pipeline.sources import parse_source
from tests.conftest import build_settings

pytestmark = [pytest.mark.kafka]


class CtrlCWorkers:
    """One file stream: the first poll is interrupted (Ctrl-C); the producer then stops after 5 frames
    without an end-of-stream, and the count replica catches up on those 5 over the next polls."""

    def __init__(self, stream_id: str, applied: list[int]) -> None:
        self.stream_id, self.applied = stream_id, applied
        self.stopped = False
        self.polls = 0

    def stage_names(self) -> list[str]:
        return ["count-0"]

    def poll(self) -> list[dict[str, Any]]:
        self.polls += 1
        if self.polls == 1:
            raise KeyboardInterrupt
        done = self.applied[min(self.polls - 2, len(self.applied) - 1)]
        table = {self.stream_id: {"frames_applied": done, "frames_skipped": {"dead_letter": 1}, "frames_expected": None}}
        return [{"name": "count-0", "stage": "count", "frames_out": done, "table": table}]

    def finished_producers(self) -> dict[str, dict[str, Any]]:
        if self.stopped and self.polls == 1:
            return {f"producer-{self.stream_id}": {"stream_id": self.stream_id, "frames_published": 5}}
        return {}

    def producers_left(self) -> int:
        return 0 if self.stopped else 1

    def stop_producers(self) -> None:
        self.stopped = True

    def rejoin(self, names: list[str]) -> None:
        pass


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path) -> Any:
    s = build_settings(kafka_bootstrap, tmp_path, "synthetic:1ms")
    # A fresh broker creates its offsets topic on the first group lookup: wait for its coordinator.
    for attempt in range(30):
        try:
            group_lag(s.kafka, s.group("crop"), [])
            break
        except Exception:
            if attempt == 29:
                raise
            time.sleep(1)
    return s


def _plan(stream_id: str, stall_s: int) -> RunPlan:
    return RunPlan(sources=[parse_source("bus.jpg", stream_id=stream_id)], replicas={}, stall_timeout_s=stall_s)


def test_ctrl_c_on_a_file_stream_drains_what_was_published_and_returns(settings: Any) -> None:
    # 3 applied, then 4: with the one dead-lettered frame, the 5 published frames are all handled.
    workers = CtrlCWorkers("clip", applied=[3, 4])
    produced = drain(settings, _plan("clip", stall_s=60), workers, Progress(), None)
    assert workers.stopped and workers.polls == 3
    assert produced == {"producer-clip": {"stream_id": "clip", "frames_published": 5}}


def test_ctrl_c_waits_for_every_published_frame(settings: Any) -> None:
    # Stuck one frame short of what was published: the run does not end as if it were done.
    workers = CtrlCWorkers("clip", applied=[3])
    with pytest.raises(PipelineError, match="no progress for 2s"):
        drain(settings, _plan("clip", stall_s=2), workers, Progress(), None)


class RejoinRecorder:
    """Stage replicas as the run loop sees them: only their names, and the rejoins asked of them."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.rejoined = names, []

    def stage_names(self) -> list[str]:
        return self.names

    def rejoin(self, names: list[str]) -> None:
        self.rejoined.append(names)


def test_a_stage_taking_nothing_while_its_group_has_records_waiting_is_asked_to_rejoin(settings: Any) -> None:
    from actors.launcher import StallWatch
    from cluster.clients import make_producer
    from cluster.topics import create_topics

    create_topics(settings.kafka, settings.topics.all())
    producer = make_producer(settings.kafka)
    for i in range(3):  # records on B that no crop replica takes; A stays empty
        producer.send(settings.topics.detected_frames.name, key=b"hw/%d" % i, value=b"x", partition=i)
    producer.flush()
    producer.close()
    progress, workers = Progress(), RejoinRecorder(["inter-0", "crop-0", "crop-1", "count-0"])
    idle = [{"name": n, "stage": n.split("-")[0], "records_in": 0} for n in workers.names]
    progress.update(idle)
    now = [0.0]  # the watch's clock, moved by hand: slow admin calls on a loaded machine take no time
    watch = StallWatch(after_s=0.3, clock=lambda: now[0])
    assert watch.check(settings, workers, progress) == []  # just seen: not stalled yet
    now[0] += 0.4
    assert watch.check(settings, workers, progress) == ["crop"]  # inter and count have nothing waiting
    assert workers.rejoined == [["crop-0", "crop-1"]]
    assert watch.check(settings, workers, progress) == []  # once per after_s
    now[0] += 0.4
    progress.update([{**idle[1], "last_error": "SinkError: disk full"}, idle[2]])
    assert watch.check(settings, workers, progress) == []  # a replica retrying a known failure says why itself
    progress.update([{**idle[1], "records_in": 1}, idle[2]])
    now[0] += 0.4
    assert watch.check(settings, workers, progress) == []  # it took a record: the clock starts again


def test_totals_keep_the_work_of_replicas_restarted_or_removed() -> None:
    """A Ray actor restarted after its process was killed reports from 0, and a removed replica stops
    reporting: neither may take its committed work out of the live line or the run summary."""
    from actors.ray.engine import RayWorkers

    workers, progress = RayWorkers(actors={"count-0": None, "count-1": None}, stage_refs={}), Progress()

    def report(name: str, pid: int, frames: int) -> dict[str, Any]:
        return workers._over_lives(name, {"name": name, "stage": "count", "pid": pid, "frames_out": frames, "fps": 3.0})

    progress.update([report("count-0", 100, 40), report("count-1", 200, 10)])
    progress.update([report("count-0", 101, 2), report("count-1", 200, 12)])  # count-0's process was killed
    assert progress.total("count", "frames_out") == 54
    progress.update([report("count-0", 101, 5)])
    progress.retire("count-1")  # removed for good (a chaos fault, the soak, the autoscaler)
    assert progress.total("count", "frames_out") == 57 and progress.fps("count") == 3.0
