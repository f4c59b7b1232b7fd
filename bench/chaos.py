"""Faults injected into real runs, each checked for frames lost and frames counted twice.

Every fault runs the same input through the whole pipeline (real broker, real Ray,
the configured model) and is judged from what Kafka holds afterwards, not from the
actors' own counters:

- lost: frames the producer published that never got a count update on the counts topic;
- counted twice: frames the count table applied more than once (``count_verdict``): a frame whose
  count updates disagree on the table they left, or a table (its last snapshot on the changelog)
  that applied more frames than have a count update;
- duplicates on counts: frames with more than one committed count update. Zero under exactly_once;
  under at_least_once a count replica killed after its batch's count updates were acknowledged but
  before its snapshot was (``actors.stages.CountWorker.process``) leaves updates that no durable
  snapshot covers, and its successor, restoring the table without those frames, applies them once
  and sends the same updates again: repeated output, not a frame counted twice;
- duplicates on C: frames with more than one committed detection record (zero under
  exactly_once; under at_least_once the table absorbs them);
- crops and table: the crop corpus and the vehicle totals of the run against those of an
  undisturbed run of the same input; with ``tracking.enabled`` also the tracked counts
  (unique vehicles, moving vehicles, line crossings: ``traffic_match``). Tracking steps over a
  frame that comes more than ``tracking.reorder_wait_s`` late, so a fault whose recovery takes
  longer than that changes them by design; set the wait above the recovery time to compare.
  A stalled or restarted producer does not: a recording's frames carry its media time
  (``pipeline.sources.CaptureClock``), which a restart continues.

Faults that only exist with several machines (``LAB_FAULTS``) need the three-host lab
(``cluster/lab.py``, ``vapipe chaos --lab``): a broker of three SIGKILLed, the GPU host's Ray
worker killed and started again, the GPU host cut off from the brokers for ``hold_s`` seconds,
and a count replica frozen (SIGSTOP) past its session timeout, then resumed as a zombie. Their
recovery time runs from the end of the fault (the partition healed, the host or the zombie back;
for the broker, from its death, as two of three must carry on), and ``fault_s`` says how long the
fault lasted.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.launcher import RunPlan
from actors.ray.engine import RunControl, run_pipeline
from actors.stages import read_table
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

__all__ = ["FAULTS", "LAB_FAULTS", "Injector", "chaos", "count_verdict", "run_fault", "verify"]

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
    "kill-broker": "lab: SIGKILL of one broker of three mid-run (unclean); it is started again 10 s later",
    "kill-gpu-host": "lab: every Ray process of host3 (the GPU host) SIGKILLed mid-run, host3's worker started again",
    "partition": "lab: host3 (the InterConsumers) cut off from the brokers' host for hold_s (30 s), then healed",
    "zombie": "lab: a count replica frozen (SIGSTOP) past its session timeout, then resumed (SIGCONT)",
}

LAB_FAULTS = frozenset({"kill-broker", "kill-gpu-host", "partition", "zombie"})
"""Faults that only exist with several hosts: they need the lab (``cluster/lab.py``)."""


@dataclass
class Injector:
    """Fires one fault once the run is a third of the way through, then times the recovery.

    Recovery: from the fault until every actor answers again and frames are being counted again.
    """

    fault: str
    trigger_frames: int
    restart_broker: Callable[[], None] | None = None
    lab: Any = None
    """The ``cluster.lab.Lab`` the run is on, for ``LAB_FAULTS``."""
    hold_s: float = 30.0
    """How long a partition lasts."""
    fired_at: float | None = None
    healed_at: float | None = None
    recovered_at: float | None = None
    counted_at_fire: int = 0
    notes: list[str] = field(default_factory=list)
    _heal: Callable[[], None] | None = None
    _heal_due: float = 0.0
    _healing: threading.Thread | None = None

    def __call__(self, control: RunControl) -> None:
        counted = _counted(control)
        if self.fired_at is None:
            # A partition cuts the InterConsumers off: fired while frames are still coming, so that they
            # have work left to lose (counted frames trail the producer by the whole chain).
            by_producer = self.fault in ("kill-producer", "partition")
            watched = control.progress.total("producer", "frames_out") if by_producer else counted
            if watched >= self.trigger_frames:
                self.counted_at_fire = counted
                self.fired_at = time.monotonic()
                self._fire(control)
                if self._heal is None:
                    self.healed_at = self.fired_at
            return
        if self.healed_at is None:
            if self._healing is None and time.monotonic() >= self._heal_due:
                # In a thread: starting a Ray node takes seconds, and the run keeps draining meanwhile.
                self._healing = threading.Thread(target=self._run_heal, name=f"heal-{self.fault}", daemon=True)
                self._healing.start()
            return
        if self.recovered_at is None and counted > self.counted_at_fire and set(control.actors) <= set(control.progress.fresh):
            self.recovered_at = time.monotonic()

    def close(self) -> None:
        """Heal a fault the run outlived (it drained before the heal was due): the next run starts whole."""
        if self._healing is not None:
            self._healing.join(timeout=120)
        elif self._heal is not None and self.healed_at is None:
            logger.warning("chaos: the run finished before %s healed; healing it now", self.fault)
            self._run_heal()

    def _run_heal(self) -> None:
        assert self._heal is not None
        try:
            self._heal()
        finally:
            self.healed_at = time.monotonic()

    def _after(self, delay_s: float, heal: Callable[[], None], counted: int) -> None:
        self._heal, self._heal_due = heal, time.monotonic() + delay_s
        self.counted_at_fire = counted

    @property
    def recovery_s(self) -> float | None:
        if self.healed_at is None or self.recovered_at is None:
            return None
        return round(self.recovered_at - self.healed_at, 2)

    @property
    def fault_s(self) -> float | None:
        """How long the fault lasted: a partition, a frozen replica, a host down (0 for instant faults)."""
        if self.fired_at is None or self.healed_at is None:
            return None
        return round(self.healed_at - self.fired_at, 2)

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
        elif fault in LAB_FAULTS:
            self._fire_lab(control)
        elif fault != "none":
            raise PipelineError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")

    def _fire_lab(self, control: RunControl) -> None:
        lab, fault = self.lab, self.fault
        if lab is None:
            raise PipelineError(f"fault {fault} needs the three-host lab: run `vapipe chaos --lab`")
        if fault == "kill-broker":
            node = lab.kafka().nodes[1]
            self.notes.append(f"broker {node.node_id} (pid {node.kill()}) SIGKILLed")
            # The cluster must carry on with two; the broker comes back later, so the next run has three.
            restart = threading.Timer(10.0, node.start)
            restart.daemon = True
            restart.start()
        elif fault == "kill-gpu-host":
            self.notes.append(f"host3: {len(lab.kill_ray('host3'))} Ray processes SIGKILLed")
            self._after(5.0, lambda: lab.start_ray("host3"), _counted(control))
        elif fault == "partition":
            lab.partition("host3", "host1")
            self.notes.append(f"host3 cut off from host1 for {self.hold_s:g}s")
            self._after(self.hold_s, lambda: lab.heal("host3", "host1"), _counted(control))
        elif fault == "zombie":
            pid = int(control.progress.stats["count-0"].pid)
            frozen_s = control.settings.kafka.session_timeout_ms / 1000 + 5
            os.kill(pid, signal.SIGSTOP)
            self.notes.append(f"count-0 (pid {pid}) stopped for {frozen_s:g}s")
            self._after(frozen_s, lambda: os.kill(pid, signal.SIGCONT), _counted(control))


def _actor_hosts(actors: dict[str, dict[str, Any]], lab: Any) -> dict[str, str]:
    """Actor -> the node it ended on (the lab's host name where there is a lab)."""
    by_ip = {} if lab is None else {lab.spec.address(h): h for h in ("host1", "host2", "host3")}
    return {name: by_ip.get(a.get("node") or "", a.get("node") or "?") for name, a in actors.items()}


def _counted(control: RunControl) -> int:
    """Frames applied to the count table, as the live count replicas report it."""
    best: dict[str, int] = {}  # a replica may report an older copy of a stream it does not own
    for name, s in control.progress.fresh.items():
        if name.startswith("count-"):
            for stream_id, t in s.table.items():
                best[stream_id] = max(best.get(stream_id, 0), int(t.get("frames_applied") or 0))
    return sum(best.values())


def count_verdict(updates: list[dict[str, Any]], produced: int, table: dict[str, Any] | None) -> dict[str, Any]:
    """Judge one stream's committed count updates (``"type": "count"``) and its last table snapshot.

    Every update carries the table it left behind (``frames_applied``, ``totals``). A frame applied
    once gives the same update however often it is sent: a successor that restored the table from
    before the frame applies it onto the same state. A frame applied again onto a table that already
    held it moves ``frames_applied`` on, so its updates disagree. A frame applied twice whose updates
    did not both land shows in the table: it applied more frames than have an update.

    Returns:
        ``frames_counted``, ``lost``, ``counted_twice`` (frames applied more than once: the frames with
        disagreeing updates, or the table's excess, whichever is more), ``duplicates_on_counts`` (frames
        with more than one update: zero under exactly_once, allowed under at_least_once) and
        ``table_frames_applied`` (None without a snapshot).
    """
    sent: Counter[int] = Counter()
    left: dict[int, set[tuple[int, tuple[tuple[str, int], ...]]]] = {}
    for u in updates:
        index = int(u["frame_index"])
        sent[index] += 1
        state = (int(u.get("frames_applied", 0)), tuple(sorted((str(k), int(v)) for k, v in u.get("totals", {}).items())))
        left.setdefault(index, set()).add(state)
    applied = None if table is None else int(table.get("frames_applied", 0))
    reapplied = sum(1 for states in left.values() if len(states) > 1)
    excess = 0 if applied is None else max(0, applied - len(sent))
    return {
        "frames_counted": len(sent),
        "lost": sum(1 for i in range(produced) if i not in sent),
        "counted_twice": max(reapplied, excess),
        "duplicates_on_counts": sum(1 for n in sent.values() if n > 1),
        "table_frames_applied": applied,
    }


def verify(settings: Settings, stream_id: str, produced: int) -> dict[str, Any]:
    """Judge a finished run from the committed records on C, the counts topic and the changelog."""
    updates: list[dict[str, Any]] = []
    for r in read_all(settings.kafka, settings.topics.counts.name):
        try:
            update = decode_json(r.value)
        except DecodeError:
            continue
        if update.get("stream_id") == stream_id and update.get("type") == "count":
            updates.append(update)
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
        **count_verdict(updates, produced, read_table(settings).get(stream_id)),
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
    lab: Any = None,
    hold_s: float = 30.0,
) -> tuple[dict[str, Any], set[tuple[int, int, str]]]:
    """One pipeline run of ``frames`` frames with ``fault`` injected; returns its row and its crop keys."""
    if fault not in FAULTS:
        raise PipelineError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    # Fresh topics, groups and crop folder: each run's corpus is its own, not piled on the last one's.
    s = isolated(settings).model_copy(
        update={"output_dir": str(Path(settings.output_dir) / "chaos" / f"{fault}-{uuid.uuid4().hex[:6]}")}
    )
    if fault in LAB_FAULTS and lab is None:
        raise PipelineError(f"fault {fault} needs the three-host lab: run `vapipe chaos --lab`")
    injector = Injector(fault, trigger_frames=max(1, frames // 3), restart_broker=restart_broker, lab=lab, hold_s=hold_s)
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
            fault_s=injector.fault_s,
            injected=injector.fired_at is not None,
            nodes=_actor_hosts(summary["actors"], lab),
            wall_s=summary["wall_s"],
            notes=" ".join(injector.notes),
            vehicle_totals=summary["vehicle_totals"],
            traffic=comparable(summary["traffic"][stream_id]) if summary.get("traffic") else None,
        )
        return row, crops
    finally:
        injector.close()
        delete_topics(s.kafka, [getattr(s.topics, k).name for k in TOPIC_KEYS])


def chaos(
    settings: Settings,
    video: str,
    frames: int,
    faults: list[str],
    replicas: int = 2,
    restart_broker: Callable[[], None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
    lab: Any = None,
    hold_s: float = 30.0,
) -> dict[str, Any]:
    """Run every fault on the same input; the first run (``none`` unless left out) is the crop reference.

    With ``lab`` (a ``cluster.lab.Lab``), the runs go to the lab's brokers and Ray head and may include
    ``LAB_FAULTS``; this process must then run on the lab's host2 (``vapipe chaos --lab`` sees to it).
    """
    if lab is not None:
        settings = lab.settings(settings)
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
            try:
                row, crops = run_fault(settings, video, frames, fault, replicas, restart_broker, on_progress, lab, hold_s)
            except Exception as exc:  # a PipelineError, or Ray's own (an actor lost for good)
                if reference is None:
                    raise
                # One fault that broke its run is a row of the table (and a failed fault), not the end of the table.
                why = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
                logger.warning("chaos %s: the run failed: %s", fault, why)
                rows.append({"fault": fault, "error": why[:300], "lost": None, "counted_twice": None})
                continue
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
        "lab": None if lab is None else {"brokers": lab.spec.brokers, "head": lab.spec.head, "bootstrap": lab.spec.bootstrap},
        "rows": rows,
        **environment(settings),
    }


TABLE_COLUMNS = (
    "fault",
    "frames_produced",
    "frames_counted",
    "lost",
    "counted_twice",
    "duplicates_on_counts",
    "duplicates_on_c",
    "crops_expected",
    "crops_written",
    "table_match",
    "traffic_match",
    "dead_lettered",
    "recovery_s",
    "fault_s",
)


def table_lines(result: dict[str, Any]) -> list[str]:
    """The chaos table as ``|``-separated lines, header first."""
    return [" | ".join(TABLE_COLUMNS)] + [" | ".join(str(row.get(c)) for c in TABLE_COLUMNS) for row in result["rows"]]


def failed_faults(result: dict[str, Any]) -> list[str]:
    """Faults that lost or double-counted a frame, or changed the crop corpus, the table or the tracked
    counts; under exactly_once also those that sent a frame's count update twice (at least once, a
    replica killed between its count updates and its snapshot repeats them: see ``count_verdict``)."""
    exactly_once = result.get("processing_guarantee", "exactly_once") == "exactly_once"
    return [
        r["fault"]
        for r in result["rows"]
        if r.get("error")
        or r["lost"]
        or r["counted_twice"]
        or (exactly_once and r.get("duplicates_on_counts"))
        or not (r["crops_match"] and r["table_match"])
        or not r.get("traffic_match", True)
    ]
