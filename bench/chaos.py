"""Faults injected into real runs, each checked for frames lost and frames counted twice.

Every fault runs the same input through the whole pipeline (real broker, real Ray,
the configured model) and is judged from what Kafka holds afterwards, not from the
actors' own counters:

- lost: frames the producer published that never got a count update on the counts topic;
- counted twice: frames with more than one committed count update;
- duplicates on C: frames with more than one committed detection record (zero under
  exactly_once; under at_least_once the table absorbs them);
- crops and table: the crop corpus and the vehicle totals of the run against those of an
  undisturbed run of the same input; with ``tracking.enabled`` also the tracked counts
  (unique vehicles, moving vehicles, line crossings: ``traffic_match``). Tracking steps over a
  frame that comes more than ``tracking.reorder_wait_s`` late, so a fault whose recovery takes
  longer than that changes them by design; set the wait above the recovery time to compare.
  Faults that stall the producer (``CAPTURE_GAP_FAULTS``) change them by design too.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.launcher import RunPlan
from actors.ray.engine import RunControl, run_pipeline
from bench.experiments import TOPIC_KEYS, environment, isolated
from cluster.clients import check_broker
from cluster.raycluster import ray_session
from cluster.reading import read_all
from cluster.topics import delete_topics
from pipeline.codecs import decode_detections, decode_json
from pipeline.config import Settings
from pipeline.count_table import comparable
from pipeline.crop import load_index
from pipeline.errors import DecodeError, PipelineError
from pipeline.messages import FrameDetections
from pipeline.sources import parse_source
from pipeline.stats import STAGES

__all__ = ["CAPTURE_GAP_FAULTS", "FAULTS", "Injector", "chaos", "run_fault", "verify"]

logger = logging.getLogger(__name__)

FAULTS: dict[str, str] = {
    "none": "an undisturbed run (the reference for the crop corpus)",
    "kill-inter": "ray.kill of an InterConsumer mid-run (Ray restarts it)",
    "sigkill-inter": "SIGKILL of an InterConsumer's worker process mid-run",
    "kill-crop": "ray.kill of a crop actor mid-run",
    "kill-count": "ray.kill of a count actor mid-run (the table comes back from its changelog)",
    "kill-producer": "ray.kill of the producer mid-stream (it resumes after its committed frames)",
    "broker-restart": "the Kafka broker stopped and started again mid-run",
    "rebalance": "a replica added to every stage and one removed, mid-run",
}

CAPTURE_GAP_FAULTS = frozenset({"kill-producer", "broker-restart"})
"""Faults that stall the producer: the frames after the stall are stamped seconds later, a gap longer than
``tracking.track_buffer_s``, so the tracker rightly starts new tracks there. Their tracked counts are
reported (``traffic_match``) but are not part of the verdict; frames, crops and box totals still are."""


@dataclass
class Injector:
    """Fires one fault once the run is a third of the way through, then times the recovery.

    Recovery: from the fault until every actor answers again and frames are being counted again.
    """

    fault: str
    trigger_frames: int
    restart_broker: Callable[[], None] | None = None
    fired_at: float | None = None
    recovered_at: float | None = None
    counted_at_fire: int = 0
    notes: list[str] = field(default_factory=list)

    def __call__(self, control: RunControl) -> None:
        counted = _counted(control)
        if self.fired_at is None:
            watched = control.progress.total("producer", "frames_out") if self.fault == "kill-producer" else counted
            if watched >= self.trigger_frames:
                self.counted_at_fire = counted
                self.fired_at = time.monotonic()
                self._fire(control)
            return
        if self.recovered_at is None and counted > self.counted_at_fire and set(control.actors) <= set(control.progress.fresh):
            self.recovered_at = time.monotonic()

    @property
    def recovery_s(self) -> float | None:
        if self.fired_at is None or self.recovered_at is None:
            return None
        return round(self.recovered_at - self.fired_at, 2)

    def _fire(self, control: RunControl) -> None:
        import ray

        fault = self.fault
        logger.warning("chaos: injecting %s", fault)
        if fault in ("kill-inter", "kill-crop", "kill-count"):
            ray.kill(control.actors[f"{fault.split('-')[1]}-0"], no_restart=False)
        elif fault == "sigkill-inter":
            pid = control.progress.stats["inter-0"].pid
            os.kill(int(pid), signal.SIGKILL)  # the actor's worker process on this machine
        elif fault == "kill-producer":
            name = next(n for n in control.actors if n.startswith("producer-"))
            ray.kill(control.actors[name], no_restart=False)
        elif fault == "broker-restart":
            if self.restart_broker is None:
                raise PipelineError("broker-restart needs a broker this process controls")
            self.restart_broker()
        elif fault == "rebalance":
            for stage in STAGES:
                self.notes.append(f"+{control.add_replica(stage)}")
            for stage in STAGES:
                control.remove_replica(f"{stage}-0")
                self.notes.append(f"-{stage}-0")
        elif fault != "none":
            raise PipelineError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")


def _counted(control: RunControl) -> int:
    """Frames applied to the count table, as the live count replicas report it."""
    best: dict[str, int] = {}  # a replica may report an older copy of a stream it does not own
    for name, s in control.progress.fresh.items():
        if name.startswith("count-"):
            for stream_id, t in s.table.items():
                best[stream_id] = max(best.get(stream_id, 0), int(t.get("frames_applied") or 0))
    return sum(best.values())


def verify(settings: Settings, stream_id: str, produced: int) -> dict[str, Any]:
    """Judge a finished run from the committed records on C and the counts topic."""
    updates: Counter[int] = Counter()
    for r in read_all(settings.kafka, settings.topics.counts.name):
        try:
            update = decode_json(r.value)
        except DecodeError:
            continue
        if update.get("stream_id") == stream_id and update.get("type") == "count":
            updates[int(update["frame_index"])] += 1
    on_c: Counter[int] = Counter()
    for r in read_all(settings.kafka, settings.topics.detections.name):
        try:
            item = decode_detections(r.value)
        except DecodeError:
            continue
        if isinstance(item, FrameDetections) and item.meta.stream_id == stream_id:
            on_c[item.meta.frame_index] += 1
    return {
        "frames_produced": produced,
        "frames_counted": len(updates),
        "lost": sum(1 for i in range(produced) if i not in updates),
        "counted_twice": sum(1 for n in updates.values() if n > 1),
        "duplicates_on_c": sum(1 for n in on_c.values() if n > 1),
    }


def _crop_keys(settings: Settings, stream_id: str) -> set[tuple[int, int, str]]:
    index = load_index(Path(settings.output_dir) / "crops")
    return {(int(e["frame_index"]), int(e["box_index"]), e["label"]) for e in index.values() if e["stream_id"] == stream_id}


def run_fault(
    settings: Settings,
    video: str,
    frames: int,
    fault: str,
    replicas: int = 2,
    restart_broker: Callable[[], None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> tuple[dict[str, Any], set[tuple[int, int, str]]]:
    """One pipeline run of ``frames`` frames with ``fault`` injected; returns its row and its crop keys."""
    if fault not in FAULTS:
        raise PipelineError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    # Fresh topics, groups and crop folder: each run's corpus is its own, not piled on the last one's.
    s = isolated(settings).model_copy(
        update={"output_dir": str(Path(settings.output_dir) / "chaos" / f"{fault}-{uuid.uuid4().hex[:6]}")}
    )
    injector = Injector(fault, trigger_frames=max(1, frames // 3), restart_broker=restart_broker)
    plan = RunPlan(
        sources=[parse_source(video, stream_id="chaos")],
        replicas={stage: replicas for stage in STAGES},
        include_dashboard=False,
        allow_calibration=True,
        stall_timeout_s=180,
    )
    try:
        summary = run_pipeline(s, plan, on_progress=on_progress, on_tick=injector).to_dict()
        stream_id = next(iter(summary["sources"]))
        row = {"fault": fault, **verify(s, stream_id, summary["frames_produced"])}
        crops = _crop_keys(s, stream_id)
        row.update(
            crops_written=len(crops),
            dead_lettered=sum(summary["dead_lettered"].values()),
            retried_batches=sum(summary["retried_batches"].values()),
            recovery_s=injector.recovery_s,
            injected=injector.fired_at is not None,
            wall_s=summary["wall_s"],
            notes=" ".join(injector.notes),
            vehicle_totals=summary["vehicle_totals"],
            traffic=comparable(summary["traffic"][stream_id]) if summary.get("traffic") else None,
        )
        return row, crops
    finally:
        delete_topics(s.kafka, [getattr(s.topics, k).name for k in TOPIC_KEYS])


def chaos(
    settings: Settings,
    video: str,
    frames: int,
    faults: list[str],
    replicas: int = 2,
    restart_broker: Callable[[], None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Run every fault on the same input; the first run (``none`` unless left out) is the crop reference."""
    check_broker(settings.kafka)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise PipelineError(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    settings = settings.model_copy(update={"producer": settings.producer.model_copy(update={"max_frames": frames})})
    rows: list[dict[str, Any]] = []
    reference: set[tuple[int, int, str]] | None = None
    reference_table: dict[str, int] = {}
    reference_traffic: dict[str, Any] | None = None
    with ray_session(settings.ray, include_dashboard=False):
        for fault in ["none"] + [f for f in faults if f != "none"]:
            row, crops = run_fault(settings, video, frames, fault, replicas, restart_broker, on_progress)
            if reference is None:
                reference, reference_table, reference_traffic = crops, row["vehicle_totals"], row["traffic"]
            row["crops_expected"] = len(reference)
            row["crops_match"] = crops == reference
            row["table_match"] = row["vehicle_totals"] == reference_table
            row["traffic_match"] = row["traffic"] == reference_traffic
            rows.append(row)
            logger.warning("chaos %s: %s", fault, {k: row[k] for k in ("lost", "counted_twice", "crops_written", "recovery_s")})
    return {
        "benchmark": "chaos",
        "video": video,
        "frames": frames,
        "replicas": replicas,
        "processing_guarantee": settings.processing_guarantee,
        "rows": rows,
        **environment(settings),
    }


TABLE_COLUMNS = (
    "fault",
    "frames_produced",
    "frames_counted",
    "lost",
    "counted_twice",
    "duplicates_on_c",
    "crops_expected",
    "crops_written",
    "table_match",
    "traffic_match",
    "dead_lettered",
    "recovery_s",
)


def table_lines(result: dict[str, Any]) -> list[str]:
    """The chaos table as ``|``-separated lines, header first."""
    return [" | ".join(TABLE_COLUMNS)] + [" | ".join(str(row.get(c)) for c in TABLE_COLUMNS) for row in result["rows"]]


def failed_faults(result: dict[str, Any]) -> list[str]:
    """Faults that lost or double-counted a frame, or changed the crop corpus, the table or the tracked counts."""
    return [
        r["fault"]
        for r in result["rows"]
        if r["lost"]
        or r["counted_twice"]
        or not (r["crops_match"] and r["table_match"])
        or (not r.get("traffic_match", True) and r["fault"] not in CAPTURE_GAP_FAULTS)
    ]
