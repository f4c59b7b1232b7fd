"""Faust table recovery on changelogs written with Kafka transactions, and the one line a stuck start-up gives.

Issue 19: after a Ray exactly-once run every changelog partition the Ray count actors
wrote ends with a transaction marker; Faust's recovery waited for a record at the
marker's offset and the count worker never became ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition

from actors.faust.recovery import last_record_offsets, recover_to_last_record, recovery_waiting
from actors.launcher import wait_ready
from cluster.clients import make_consumer, make_producer, send_record
from cluster.topics import create_topics
from pipeline.codecs import Record
from pipeline.config import Settings
from pipeline.errors import PipelineError

CHANGELOG = "vapipe.counts-changelog"


def _publish(settings: Settings, topic: str, partition: int, n: int, how: str) -> None:
    """``n`` records to one partition: ``plain``, each in a committed transaction, or all in one aborted one."""
    if how == "plain":
        producer = make_producer(settings.kafka)
    else:
        producer = make_producer(settings.kafka, transactional_id=f"{topic}.{partition}.{how}")
        producer.init_transactions()
    if how == "aborted":
        producer.begin_transaction()
    for i in range(n):
        if how == "committed":
            producer.begin_transaction()
        send_record(producer, topic, Record(key=b"s", value=str(i).encode()), partition=partition)
        if how == "committed":
            producer.commit_transaction()
    if how == "aborted":
        producer.flush()
        producer.abort_transaction()
    producer.flush()
    producer.close()


@pytest.mark.kafka
def test_recovery_waits_for_the_last_record_not_the_marker_after_it(make_settings) -> None:
    from faust.tables.recovery import Recovery
    from faust.types import TP

    s = make_settings()
    create_topics(s.kafka, s.topics.all())
    topic = s.topics.counts_changelog.name  # partitioned as topic C
    _publish(s, topic, 0, 3, "committed")  # records at 0, 2, 4; commit markers at 1, 3, 5 (a Ray exactly-once run)
    _publish(s, topic, 0, 2, "aborted")  # 6, 7 aborted, abort marker at 8: never received
    _publish(s, topic, 1, 3, "plain")  # 0, 1, 2 (a Faust or at-least-once run)
    _publish(s, topic, 2, 1, "aborted")  # nothing to receive at all
    probe = make_consumer(s.kafka, group_id=None)
    ends = {tp.partition: end for tp, end in probe.end_offsets([TopicPartition(topic, p) for p in range(3)]).items()}
    probe.close()
    assert ends == {0: 9, 1: 3, 2: 2}  # Faust's highwater would be 8, 2 and 1: 8 and 1 never arrive

    assert last_record_offsets(s.kafka, [(topic, 0), (topic, 1), (topic, 2)]) == {(topic, 0): 4, (topic, 1): 2, (topic, 2): -1}

    # Faust's Recovery, as the count worker patches it, computes those highwaters.
    app = SimpleNamespace()
    recover_to_last_record(app, s.kafka)
    recovery = SimpleNamespace(app=app, log=logging.getLogger("test"), _highwater_logtable=lambda h, title: "")
    highwaters: Counter[Any] = Counter()
    asyncio.run(Recovery._build_highwaters(recovery, None, {TP(topic, 0), TP(topic, 1), TP(topic, 2)}, highwaters, "active"))
    assert dict(highwaters) == {TP(topic, 0): 4, TP(topic, 1): 2, TP(topic, 2): -1}


def test_faust_worker_consumers_read_committed_records_only(tmp_path) -> None:
    from actors.faust.app import FaustStage

    async def isolation() -> str:
        s = Settings.model_validate({"output_dir": str(tmp_path), "processing_guarantee": "at_least_once"})
        thread = FaustStage(s, "count", "count-0").app.consumer._thread
        consumer = thread._create_worker_consumer(thread.transport)  # not started: no connection
        return str(consumer._isolation_level)

    assert asyncio.run(isolation()) == "read_committed"  # faust-streaming's default is read_uncommitted


def _recovery(now: float, received: dict[Any, float]) -> Any:
    from faust.types import TP

    tp0, tp2 = TP(CHANGELOG, 0), TP(CHANGELOG, 2)
    return SimpleNamespace(
        active_remaining=lambda: Counter({tp0: 0, tp2: 1}),
        active_offsets={tp0: 40, tp2: 91},
        active_highwaters={tp0: 40, tp2: 92},
        _recovery_started_at=now - 100,
        _active_events_received_at={k: now - v for k, v in received.items()},
    )


@pytest.mark.parametrize(("received", "idle_s"), [({}, 100), ({2: 35}, 35), ({0: 1, 2: 35}, 35)])
def test_recovery_waiting_names_the_partitions_and_how_long_nothing_came(received: dict[int, float], idle_s: float) -> None:
    from faust.types import TP

    now = 1000.0
    reason, idle = recovery_waiting(_recovery(now, {TP(CHANGELOG, p): ago for p, ago in received.items()}), now)  # type: ignore[misc]
    assert reason == f"recovering the table: {CHANGELOG}[2] at offset 91, waiting for 92 (nothing received for {idle_s}s)"
    assert idle == idle_s


def test_recovery_waiting_is_none_once_nothing_remains() -> None:
    done = SimpleNamespace(active_remaining=lambda: Counter({("c", 0): 0, ("c", 1): -1}))
    assert recovery_waiting(done) is None


def test_a_count_worker_whose_recovery_receives_nothing_says_it_cannot_become_ready(tmp_path) -> None:
    from actors.faust.app import FaustStage

    async def states() -> list[tuple[str | None, str | None]]:
        s = Settings.model_validate(
            {"output_dir": str(tmp_path), "processing_guarantee": "at_least_once", "faust": {"stuck_after_s": 30}}
        )
        stage = FaustStage(s, "count", "count-0")
        now = time.monotonic()
        stage.app.tables._recovery = _recovery(now, {})  # nothing received for 100 s
        out = [stage._waiting([], recovered=False)]
        out.append(stage._waiting(["tp"], recovered=True))
        stage._assigned_at = now - 100
        out.append(stage._waiting(["tp"], recovered=False))  # settled, and nothing for 100 s
        stage._revoked_at = now - 1
        out.append(stage._waiting(["tp"], recovered=False))  # a rebalance under way: not stuck
        stage._assigned_at = now - 10
        out.append(stage._waiting(["tp"], recovered=False))  # just assigned: not yet
        return out

    waiting = f"recovering the table: {CHANGELOG}[2] at offset 91, waiting for 92 (nothing received for 100s)"
    assert asyncio.run(states()) == [
        (f"no partition of {Settings().topics.detections.name} assigned yet", None),
        ("rebalancing", None),
        (waiting, f"{waiting}; gave up after faust.stuck_after_s=30s"),
        (waiting, None),
        (waiting, None),
    ]


def test_a_count_worker_writes_its_stats_from_its_first_assignment_not_after_recovery(tmp_path) -> None:
    """Faust starts app timers only after the first table recovery: stats must not wait for them."""
    import json

    from actors.faust.app import FaustStage

    async def first_stats() -> dict[str, Any]:
        s = Settings.model_validate({"output_dir": str(tmp_path), "processing_guarantee": "at_least_once"})
        stage = FaustStage(s, "count", "count-0", stats_path=tmp_path / "count-0.json")
        await stage._on_assigned(stage.app, set())
        await asyncio.sleep(0.1)
        stage.stopped = True
        return dict(json.loads((tmp_path / "count-0.json").read_text()))

    stats = asyncio.run(first_stats())
    assert stats["ready"] is False and stats["waiting"] == f"no partition of {Settings().topics.detections.name} assigned yet"


class _Workers:
    def __init__(self, stats: list[dict[str, Any]]) -> None:
        self.stats = stats

    def stage_names(self) -> list[str]:
        return [s["name"] for s in self.stats]

    def poll(self) -> list[dict[str, Any]]:
        return self.stats

    def rejoin(self, names: list[str]) -> None:
        pass


def _stats(**count: Any) -> list[dict[str, Any]]:
    ready = [{"name": f"{st}-0", "stage": st, "ready": True, "assigned": 6} for st in ("inter", "crop")]
    return ready + [{"name": "count-0", "stage": "count", "ready": False, "assigned": 6} | count]


def test_wait_ready_stops_at_once_with_the_line_of_a_worker_that_cannot_become_ready() -> None:
    stuck = f"recovering the table: {CHANGELOG}[2] at offset 91, waiting for 92 (nothing received for 60s); gave up after faust.stuck_after_s=60s"
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        wait_ready(Settings(), _Workers(_stats(waiting=stuck, stuck=stuck)), timeout_s=300)
    assert time.monotonic() - t0 < 5
    assert str(info.value) == f"stage workers cannot become ready: count-0: {stuck}"


def test_wait_ready_timeout_says_what_each_worker_waits_for() -> None:
    waiting = f"recovering the table: {CHANGELOG}[2] at offset 91, waiting for 92 (nothing received for 3s)"
    with pytest.raises(PipelineError) as info:
        wait_ready(Settings(), _Workers(_stats(waiting=waiting)), timeout_s=1)
    assert str(info.value) == f"stage workers not ready after 1s: not ready: count-0 ({waiting}); partitions not yet assigned: -"
