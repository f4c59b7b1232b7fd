"""The Faust engine's broker-free pieces: engine parsing, the record adapter, the collecting producer, settings transport."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from actors.engines import parse_engines
from actors.faust.app import CollectingProducer, faust_guarantee, settings_from_json, settings_to_json
from actors.faust.gaps import EventRecord
from actors.stages import CountWorker
from pipeline.codecs import decode_json, encode_detections
from pipeline.config import KafkaConfig, Settings
from pipeline.errors import ConfigError
from pipeline.messages import Detections, FrameDetections, FrameMeta


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ray", {"inter": "ray", "crop": "ray", "count": "ray"}),
        ("faust", {"inter": "faust", "crop": "faust", "count": "faust"}),
        ("inter=ray,crop=faust,count=faust", {"inter": "ray", "crop": "faust", "count": "faust"}),
        ("count=faust", {"inter": "ray", "crop": "ray", "count": "faust"}),
    ],
)
def test_parse_engines(text: str, expected: dict[str, str]) -> None:
    assert parse_engines(text) == expected


@pytest.mark.parametrize("text", ["flink", "inter=spark", "detect=faust", "inter"])
def test_parse_engines_names_the_valid_choices(text: str) -> None:
    with pytest.raises(ConfigError, match="expected one of") as err:
        parse_engines(text)
    assert "\n" not in str(err.value)


def test_faust_guarantee_maps_the_configured_one() -> None:
    assert faust_guarantee(Settings(processing_guarantee="at_least_once")) == "at_least_once"
    odd = Settings().model_copy(update={"processing_guarantee": "at_most_once"})
    with pytest.raises(ConfigError, match="no Faust equivalent"):
        faust_guarantee(odd)
    # Faust's exactly_once crashes on assignment (faust-streaming#440): refused in one line, naming why.
    eos = Settings().model_copy(update={"processing_guarantee": "exactly_once"})
    with pytest.raises(ConfigError, match="faust-streaming/faust#440") as err:
        faust_guarantee(eos)
    assert "\n" not in str(err.value) and "--engine ray" in str(err.value)


def test_settings_travel_to_a_worker_process_with_their_secret() -> None:
    s = Settings(kafka=KafkaConfig(sasl_password=SecretStr("hunter2"), bootstrap_servers="h:1"))
    back = settings_from_json(settings_to_json(s))
    assert back == s and back.kafka.sasl_password is not None
    assert back.kafka.sasl_password.get_secret_value() == "hunter2"


def _frame(i: int) -> bytes:
    det = Detections.from_records([{"box": [0, 0, 10, 10], "confidence": 0.9, "class_id": 2, "label": "car"}])
    rec = encode_detections(FrameDetections(FrameMeta("cam", i, 1.0 + i, 320, 240), det, model="m"))
    assert rec.value is not None
    return rec.value


def test_count_worker_runs_unchanged_behind_the_collecting_producer() -> None:
    """The Faust agent reuses CountWorker.process: what it would send is collected, nothing is lost or doubled."""
    worker = CountWorker(Settings(), "count-0")
    producer = CollectingProducer()
    worker.producer = producer  # type: ignore[assignment]
    event = SimpleNamespace(message=SimpleNamespace(topic="C", partition=1, offset=7, key=b"cam", value=_frame(0), headers=None))
    record = EventRecord.of(event)
    assert (record.topic, record.partition, record.offset, record.key, record.headers) == ("C", 1, 7, b"cam", [])
    worker.process([record])
    worker.process([record])  # redelivered: applied once
    sent = producer.take()
    topics = [t for t, _, _ in sent]
    s = Settings()
    assert topics.count(s.topics.counts.name) == 1
    assert topics.count(s.topics.counts_changelog.name) == 1  # the second batch touched nothing
    snapshot = decode_json(next(r.value for t, r, _ in sent if t == s.topics.counts_changelog.name))
    assert snapshot["totals"] == {"car": 1} and snapshot["frames_applied"] == 1
    assert producer.take() == []


def test_faust_status_reads_the_latest_run(tmp_path) -> None:
    import json

    from actors.faust.engine import faust_status
    from pipeline.errors import PipelineError

    s = Settings(output_dir=str(tmp_path))
    with pytest.raises(PipelineError, match="no Faust run found"):
        faust_status(s)
    run = tmp_path / "faust" / "r1"
    run.mkdir(parents=True)
    (tmp_path / "faust" / "latest").symlink_to("r1")
    (run / "settings.json").write_text("{}")
    (run / "count-0.json").write_text(json.dumps({"name": "count-0", "frames_out": 3}))
    (run / "producer-a.result.json").write_text("{}")
    assert faust_status(s) == [{"name": "count-0", "frames_out": 3}]


def test_cli_rejects_an_unknown_engine_in_one_line() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "run", "--source", "demo", "--engine", "flink"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: invalid --engine 'flink'")
    assert "Traceback" not in proc.stderr


def test_the_moving_window_changelog_is_made_by_the_engine_with_source_partitions() -> None:
    from actors.faust.tables import moving_changelog

    s = Settings.model_validate({"group_prefix": "g1", "topics": {"detections": {"name": "c", "partitions": 4}}})
    spec = moving_changelog(s)
    assert spec.name == "g1-count-moving-changelog"  # Faust's name: <app id>-<table>-changelog
    assert spec.partitions == 4 and spec.config["cleanup.policy"] == "compact,delete"


def test_faust_workers_report_each_finished_producer_once(tmp_path) -> None:
    import json

    from actors.faust.engine import FaustProcess, FaustWorkers

    producers = {n: FaustProcess(n, "producer", [], tmp_path, max_restarts=0) for n in ("producer-a", "producer-b")}
    group = FaustWorkers({}, producers, ray=None, run_dir=tmp_path)
    (tmp_path / "producer-a.result.json").write_text(json.dumps({"stream_id": "a", "frames_published": 3}))
    (tmp_path / "producer-b.result.json").write_text(json.dumps({"error": "SourceError: cannot open b.mp4"}))
    with pytest.raises(Exception, match="cannot open b.mp4"):
        group.finished_producers()
    producers.pop("producer-b")
    assert group.finished_producers() == {"producer-a": {"stream_id": "a", "frames_published": 3}}
    assert group.finished_producers() == {} and group.producers_left() == 0


def test_held_gaps_stop_faust_committing_past_skipped_offsets_until_released() -> None:
    """Faust's own offset bookkeeping (``Consumer._new_offset``) with vapipe's hold on gap marking."""
    import asyncio
    from collections import defaultdict

    from faust.transport.consumer import Consumer
    from faust.types import TP
    from intervaltree import IntervalTree

    from actors.faust.gaps import hold_faust_gaps

    hold_faust_gaps()  # a class-level patch: undone after the test by held_gaps
    tp = TP("c", 0)
    consumer = SimpleNamespace(
        _acked=defaultdict(list),
        _acked_index=defaultdict(set),
        _gap=defaultdict(IntervalTree),
        _committed_offset=defaultdict(lambda: None),
    )
    consumer._committed_offset[tp] = 0
    consumer._acked[tp] = [0, 1, 2, 9]  # offsets 3..8 were skipped: Faust went from 2 straight to 9
    asyncio.run(Consumer._add_gap(consumer, tp, 3, 9))  # what Faust calls on the skip: held, marks nothing
    assert Consumer._new_offset(consumer, tp) == 3  # no commit past the hole
    consumer._committed_offset[tp], consumer._acked[tp] = 3, [9]  # after Faust committed 3
    asyncio.run(Consumer.release_gap(consumer, tp, 3, 8))  # the agent read and processed 3..8 itself
    assert Consumer._new_offset(consumer, tp) == 10


def test_a_worker_with_records_waiting_and_no_progress_exits_to_be_restarted(tmp_path, monkeypatch) -> None:
    import asyncio
    import time

    from actors.faust import app as faust_app
    from actors.faust.app import FaustStage

    s = Settings.model_validate(
        {"output_dir": str(tmp_path), "processing_guarantee": "at_least_once", "faust": {"stuck_after_s": 30}}
    )
    stage = FaustStage(s, "crop", "crop-0")
    exits: list[int] = []
    monkeypatch.setattr(faust_app.os, "_exit", exits.append)
    waiting = {"ready": True, "lag": 5}
    monkeypatch.setattr(stage, "stats", lambda: waiting)

    stage._progress_at = time.monotonic() - 10  # idle, but not for long
    asyncio.run(stage._restart_if_stuck())
    assert exits == []
    waiting["lag"] = 0  # idle for long, but nothing waiting
    stage._progress_at = time.monotonic() - 60
    asyncio.run(stage._restart_if_stuck())
    assert exits == []
    waiting["lag"] = 5
    asyncio.run(stage._restart_if_stuck())
    assert exits == [3] and "no record processed for 60s with 5 waiting" in stage.crashed
