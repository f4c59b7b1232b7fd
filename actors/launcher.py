"""Running a pipeline, whichever engine runs its workers: prepare, wait until ready, drain, summarise.

A finite run is complete when every producer has published its end-of-stream
record, the count table has applied every published frame of every stream, and
the crop group has committed everything on topic B. Then every worker is asked
to stop, and a summary is written. ``actors.ray.engine`` and ``actors.faust.engine``
launch the workers; this module watches them through the ``Workers`` interface.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from actors.metrics import serve_metrics
from actors.stages import read_table
from cluster.clients import check_broker
from cluster.reading import group_lag
from cluster.topics import create_topics
from pipeline.config import Settings, TopicSpec
from pipeline.count_table import traffic_figures
from pipeline.crop import load_index
from pipeline.detector import check_model, is_calibration
from pipeline.errors import ConfigError, PipelineError
from pipeline.sources import SourceSpec, VideoSource
from pipeline.stats import STAGES, LatencyHistogram, RunSummary, WorkerStats

__all__ = [
    "RunPlan",
    "Progress",
    "Workers",
    "prepare_run",
    "wait_ready",
    "drain",
    "summarise",
    "write_summary",
    "validate_sources",
    "new_run_id",
]

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
"""How often the driver asks the workers for their stats while a run drains."""
FINISHING_POLL_S = 0.2
"""How often once every producer has finished: only the run's end is awaited, and it is seen sooner."""
LIVE_OPEN_TIMEOUT_S = 30.0
"""How long a camera may take to send its first frame when a run checks its sources."""
STALL_KICK_MIN_S = 20.0
"""A stage whose group has records waiting is asked to rejoin after taking none for this long (or two sessions)."""
REJOIN_AFTER_S = 5.0
"""A replica still owning no partition this long after start-up is asked to rejoin its group."""


def new_run_id() -> str:
    return datetime.now(UTC).strftime("r%Y%m%d-%H%M%S")


@dataclass
class RunPlan:
    """What to launch: sources and replicas per stage."""

    sources: list[SourceSpec]
    replicas: dict[str, int]
    follow: bool = False
    allow_calibration: bool = False
    run_id: str = field(default_factory=new_run_id)
    stall_timeout_s: float = 300.0
    include_dashboard: bool = True
    start_after_s: dict[str, float] = field(default_factory=dict)
    """Stream id -> seconds its producer waits before publishing (Ray engine; a step load for benchmarks)."""


def validate_sources(sources: list[SourceSpec]) -> None:
    """Open and close every source so a missing or corrupt video fails before anything is published."""
    if not sources:
        raise ConfigError("no --source given")
    seen: set[str] = set()
    for spec in sources:
        if spec.stream_id in seen:
            raise ConfigError(f"two sources share the stream id {spec.stream_id!r}: name them with id=SOURCE")
        seen.add(spec.stream_id)
        # A camera that accepts and sends nothing must not hang the start: bounded like a reconnect.
        VideoSource(spec, max_frames=1, timeout_s=LIVE_OPEN_TIMEOUT_S if spec.live else None).open().close()


def _validate_model(settings: Settings, allow_calibration: bool) -> None:
    name = settings.model.name
    if is_calibration(name) and not allow_calibration:
        raise ConfigError(f"model {name!r} is the calibration detector (finds nothing); pass --calibration to use it on purpose")
    check_model(name, safe_only=settings.model.safe_formats_only)


class Progress:
    """Accumulates what the workers report, for the live line and the summary."""

    def __init__(self) -> None:
        self.stats: dict[str, WorkerStats] = {}
        self.fresh: dict[str, WorkerStats] = {}
        """The workers that answered the last round (a restarting one does not)."""
        self.t0 = time.time()
        self.timeline: list[dict[str, Any]] = []
        """One sample per poll: seconds since start, and per stage frames out, f/s and consumer lag."""
        self.retired: list[WorkerStats] = []
        """Final reports of replicas removed for good (autoscaling): their work still counts in the totals."""
        self.metrics_url: str | None = None
        """Where this run's Prometheus endpoint answers while it drains (None: off)."""

    def update(self, stats: list[dict[str, Any]]) -> None:
        self.fresh = {s["name"]: WorkerStats.from_dict(s) for s in stats}
        self.stats.update(self.fresh)

    def retire(self, name: str, last: WorkerStats | None = None) -> None:
        """A replica removed for good: its work stays in the totals, its rates leave them."""
        last = self.stats.pop(name, None) if last is None else last
        self.stats.pop(name, None)
        self.fresh.pop(name, None)
        if last is not None:
            last.fps, last.lag, last.lag_s, last.busy, last.running = 0.0, None, None, 0.0, False
            last.partition_lag = {}
            self.retired.append(last)

    def sample(self) -> None:
        row: dict[str, Any] = {"t": round(time.time() - self.t0, 2), "produced": self.total("producer", "frames_out")}
        for stage in STAGES:
            row[stage] = {"frames": self.total(stage, "frames_out"), "fps": round(self.fps(stage), 2), "lag": self.lag(stage)}
        self.timeline.append(row)

    def stage(self, stage: str) -> list[WorkerStats]:
        return [s for s in [*self.stats.values(), *self.retired] if s.stage == stage]

    def total(self, stage: str, key: str) -> int:
        return sum(int(getattr(s, key) or 0) for s in self.stage(stage))

    def fps(self, stage: str) -> float:
        return sum(s.fps for s in self.stage(stage))

    def lag(self, stage: str) -> int:
        return sum(s.lag or 0 for s in self.stage(stage))

    def line(self) -> str:
        parts = [f"produced {self.total('producer', 'frames_out')}"]
        for stage in STAGES:
            parts.append(f"{stage} {self.total(stage, 'frames_out')} ({self.fps(stage):.1f} f/s, lag {self.lag(stage)})")
        return " | ".join(parts)

    def owners(self) -> str:
        """Who owns what, per replica: what a stalled run's error shows (a member left without
        partitions, a replica whose loop stopped answering, its last error)."""
        parts = []
        for s in sorted(self.stats.values(), key=lambda s: s.name):
            if s.stage in STAGES:
                stale = "" if s.name in self.fresh else " silent"
                error = f" ({s.last_error})" if s.last_error else ""
                table = "".join(
                    f" {sid} {t.get('frames_applied')}+{sum(dict(t.get('frames_skipped') or {}).values())}"
                    f"/{t.get('frames_expected')}"
                    for sid, t in s.table.items()
                    if not t.get("complete")
                )
                parts.append(f"{s.name} {s.assigned}p lag {s.lag}{table}{stale}{error}")
        return ", ".join(parts)

    def streams_complete(self, stream_ids: list[str], published: dict[str, int] | None = None) -> bool:
        """Every stream counted to its end; with ``published`` (stream -> frames numbered, this run's
        producers), to that end: a named camera's table says complete from its last run until this
        run's first frame reaches it."""
        # Any replica may hold an older copy of a stream it restored from the changelog but does
        # not own; only the owner ever sees the stream complete.
        complete = {
            sid
            for s in self.stage("count")
            for sid, t in s.table.items()
            if t.get("complete") and (published is None or (t.get("frames_expected") or 0) >= published.get(sid, 0))
        }
        return all(sid in complete for sid in stream_ids)

    def streams_caught_up(self, published: dict[str, int]) -> bool:
        """Every frame this run's producers numbered (stream -> frames numbered) is applied or skipped.

        After Ctrl-C a file's producer stops without publishing its end, so that a later run resumes
        it: the run is over once what was published is counted, although the stream is not complete.
        """
        handled: dict[str, int] = {}
        for s in self.stage("count"):
            for sid, t in s.table.items():
                skipped = t.get("frames_skipped") or {}
                n = int(t.get("frames_applied") or 0) + sum(int(v) for v in dict(skipped).values())
                handled[sid] = max(handled.get(sid, 0), n)
        return all(handled.get(sid, 0) >= n for sid, n in published.items())

    def latency(self) -> LatencyHistogram:
        """Capture-to-count latency of every frame the count replicas applied."""
        merged = LatencyHistogram()
        for s in self.stage("count"):
            merged.merge(s.histogram)
        return merged


class Workers(Protocol):
    """The running workers of one run, whichever engine runs them: what the run loop watches.

    ``actors.ray.engine.RayWorkers`` are Ray actors; ``actors.faust.engine.FaustWorkers``
    are Faust processes, possibly next to Ray stage actors.
    """

    def stage_names(self) -> list[str]:
        """The stage workers (not producers)."""
        ...

    def poll(self) -> list[dict[str, Any]]:
        """Stats of every worker that answers; raises PipelineError when a stage worker stopped for good."""
        ...

    def finished_producers(self) -> dict[str, dict[str, Any]]:
        """Results of the producers that finished since the last call; raises PipelineError for a failed one."""
        ...

    def producers_left(self) -> int: ...

    def stop_producers(self) -> None:
        """End every stream early (Ctrl-C); what was published is still drained."""
        ...

    def rejoin(self, names: list[str]) -> None:
        """Ask stage workers that own no partition to rejoin their group."""
        ...


def prepare_run(settings: Settings, plan: RunPlan, extra_topics: list[TopicSpec] | None = None) -> None:
    """Before any worker starts, whatever the engine: name this run's streams, check the sources,
    the model and the broker, and create the topics.

    Raises:
        PipelineError: a bad source or model, or a broker that cannot be reached.
    """
    plan.sources = [s.for_run(plan.run_id) for s in plan.sources]
    validate_sources(plan.sources)
    _validate_model(settings, plan.allow_calibration)
    recorded = [s.stream_id for s in plan.sources if s.kind not in ("url", "webcam")]
    if settings.tracking.enabled and settings.producer.fps == 0 and recorded:
        logger.warning(
            "tracking with producer.fps 0: frames of %s are stamped as fast as they are read, so recorded "
            "motion is compressed and tracks break; replay at the video's own rate (--fps)",
            ", ".join(recorded),
        )
    check_broker(settings.kafka)
    create_topics(settings.kafka, settings.topics.all() + list(extra_topics or []))


def drain(
    settings: Settings,
    plan: RunPlan,
    workers: Workers,
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
    on_tick: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Watch the workers until every stream is fully processed; returns the producers' results.

    Raises:
        PipelineError: a stage or producer failed, or nothing changed for ``plan.stall_timeout_s``.
    """
    with serve_metrics(settings.metrics, lambda: list(progress.stats.values())) as url:
        progress.metrics_url = url
        try:
            return _drain(settings, plan, workers, progress, on_progress, on_tick)
        finally:
            progress.metrics_url = None


def _drain(
    settings: Settings,
    plan: RunPlan,
    workers: Workers,
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
    on_tick: Callable[[], None] | None,
) -> dict[str, dict[str, Any]]:
    produced: dict[str, dict[str, Any]] = {}
    last_change, last_line = time.monotonic(), ""
    interrupted = False
    watch = StallWatch(after_s=max(STALL_KICK_MIN_S, 2 * settings.kafka.session_timeout_ms / 1000))
    while True:
        try:
            finishing = not workers.producers_left() and not (plan.follow and not interrupted)
            time.sleep(FINISHING_POLL_S if finishing else POLL_INTERVAL_S)  # never spin on the workers
            produced.update(workers.finished_producers())
            stats = workers.poll()
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted = True
            logger.warning("interrupted: stopping producers and draining what they published (Ctrl-C again to abort)")
            workers.stop_producers()
            continue
        progress.update(stats)
        progress.sample()
        if on_progress is not None:
            on_progress(progress)
        if on_tick is not None:
            on_tick()
        watch.check(settings, workers, progress)
        line = progress.line()
        following = plan.follow and not interrupted  # streams may still be added: run until Ctrl-C
        if line != last_line:
            last_change, last_line = time.monotonic(), line
        elif time.monotonic() - last_change > plan.stall_timeout_s and not following:
            raise PipelineError(f"no progress for {plan.stall_timeout_s:.0f}s: {line}; replicas: {progress.owners()}")
        if following:
            continue
        stream_ids = [s.stream_id for s in plan.sources]  # streams added while running included
        published = {p["stream_id"]: p["frames_published"] for p in produced.values()}
        if workers.producers_left():
            continue
        # Interrupted: a file stream stopped short of its end (a later run resumes it); drain what it published.
        counted = progress.streams_caught_up(published) if interrupted else progress.streams_complete(stream_ids, published)
        if not counted:
            continue
        lag = group_lag(settings.kafka, settings.group("crop"), [settings.topics.detected_frames.name])
        if sum(lag.values()) == 0:
            return produced


def stage_inputs(settings: Settings) -> dict[str, str]:
    """Each stage's input topic: what its consumer group owes."""
    t = settings.topics
    return {"inter": t.frames.name, "crop": t.detected_frames.name, "count": t.detections.name}


@dataclass
class StallWatch:
    """Asks a stage's replicas to rejoin their group when records wait for it and none is taken.

    Seen after a replica was removed mid-run: a stage whose records all sat in partitions no live
    replica polled, every replica idle with lag 0, until the run stalled out. Whatever leaves a
    partition unowned (a member left out of a rebalance, one whose generation went stale), a fresh
    join gives every partition an owner; under exactly-once a rebalance loses and repeats nothing.
    """

    after_s: float
    """How long a stage may take no record while its group has some waiting (past a session timeout)."""
    seen: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Stage -> (records it had taken, when that last changed)."""
    clock: Callable[[], float] = time.monotonic

    def check(self, settings: Settings, workers: Workers, progress: Progress) -> list[str]:
        """Kick the stalled stages (at most once per ``after_s`` each); returns their names."""
        now, kicked = self.clock(), []
        for stage, topic in stage_inputs(settings).items():
            taken = progress.total(stage, "records_in")
            before, since = self.seen.get(stage, (-1, now))
            if taken != before or now - since < self.after_s:
                if taken != before:
                    self.seen[stage] = (taken, now)
                continue
            try:
                waiting = sum(group_lag(settings.kafka, settings.group(stage), [topic]).values())
            except Exception as exc:  # broker unreachable: nothing to learn now, the next check asks again
                logger.debug("stall check of %s failed: %s", stage, exc)
                waiting = 0
            self.seen[stage] = (taken, self.clock())
            replicas = [n for n in workers.stage_names() if n.rsplit("-", 1)[0] == stage]
            failing = [st.last_error for st in progress.stage(stage) if st.name in progress.fresh and st.last_error]
            if waiting and replicas and not failing:  # a replica retrying a known failure says why itself
                logger.warning(
                    "%s: %d records wait in its group but no replica took one for %.0fs (%s); asking %s to rejoin",
                    stage, waiting, now - since, progress.owners(), ", ".join(replicas),
                )  # fmt: skip
                workers.rejoin(replicas)
                kicked.append(stage)
        return kicked


def wait_ready(settings: Settings, workers: Workers, timeout_s: float) -> None:
    """Block until every stage worker has loaded its model and its group owns every input partition.

    Timings then start at the first frame, and no frame waits for a late rebalance.
    """
    inputs = stage_inputs(settings)
    partitions = {t.name: t.partitions for t in settings.topics.all()}
    names = workers.stage_names()
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    waiting = "start-up"
    while True:
        if time.monotonic() > deadline:
            raise PipelineError(f"stage workers not ready after {timeout_s:.0f}s: {waiting}")
        stats = {s.name: s for s in map(WorkerStats.from_dict, workers.poll()) if s.name in names}
        not_ready = sorted(n for n in names if n not in stats or not stats[n].ready)
        stuck = [f"{n}: {stats[n].stuck}" for n in not_ready if n in stats and stats[n].stuck]
        if stuck:  # a worker that knows it cannot become ready (Faust: a table recovery that stalled)
            raise PipelineError(f"stage workers cannot become ready: {'; '.join(stuck)}")
        unowned = []
        for stage, topic in inputs.items():
            members = [s for s in stats.values() if s.stage == stage]
            owned = [s.assigned for s in members]
            # Every partition owned, and no replica left without one when there are enough to go round.
            idle = [s.name for s in members if not s.assigned] if len(members) <= partitions[topic] else []
            if sum(owned) != partitions[topic] or idle:
                unowned.append(stage)
                if idle and time.monotonic() - started > REJOIN_AFTER_S:
                    # Seen here: a member left out of a finished rebalance stays idle for the whole run.
                    workers.rejoin(idle)
                    started = time.monotonic()
        if not not_ready and not unowned:
            return
        why = [f"{n} ({stats[n].waiting})" if n in stats and stats[n].waiting else n for n in not_ready]
        waiting = f"not ready: {', '.join(why) or '-'}; partitions not yet assigned: {', '.join(unowned) or '-'}"
        time.sleep(0.2)


def summarise(
    settings: Settings, plan: RunPlan, produced: dict[str, dict[str, Any]], progress: Progress, wall: float
) -> RunSummary:
    """The run's summary, from the producers' results, the workers' last stats and the table on Kafka."""
    stream_ids = [s.stream_id for s in plan.sources]
    table = read_table(settings)
    crops = [e for e in load_index(Path(settings.output_dir) / "crops").values() if e["stream_id"] in stream_ids]
    frames = sum(p["frames_published"] for p in produced.values())
    # Processing time: first frame published to last count applied, from the workers' own clocks.
    firsts = [p["first_ts"] for p in produced.values() if p.get("first_ts")]
    lasts = [s.last_applied_ts for s in progress.stage("count") if s.last_applied_ts]
    processing_s = max(lasts) - min(firsts) if firsts and lasts else wall
    vehicles: dict[str, dict[str, int]] = {sid: table.get(sid, {}).get("totals", {}) for sid in stream_ids}
    by_stream = {p["stream_id"]: p for p in produced.values()}
    latency = progress.latency()
    return RunSummary(
        run_id=plan.run_id,
        model=settings.model.name,
        sources={s.stream_id: s.display for s in plan.sources},
        replicas=dict(plan.replicas),
        frames_produced=frames,
        frames_skipped=sum(p["frames_skipped"] for p in produced.values()),
        per_stream={
            sid: {
                "produced": by_stream.get(sid, {}).get("frames_published", 0),
                "skipped": by_stream.get(sid, {}).get("frames_skipped", 0),
                "counted": table.get(sid, {}).get("frames_applied", 0),
            }
            for sid in stream_ids
        },
        frames_processed={stage: progress.total(stage, "frames_out") for stage in STAGES},
        poison_records={stage: progress.total(stage, "poison") for stage in STAGES},
        dead_lettered={stage: progress.total(stage, "dead_lettered") for stage in STAGES},
        retried_batches={stage: progress.total(stage, "retries") for stage in STAGES},
        detections=progress.total("inter", "detections"),
        crops_per_label=dict(sorted(Counter(e["label"] for e in crops).items())),
        crops_dir=str((Path(settings.output_dir) / "crops").resolve()),
        vehicles=vehicles,
        box_counts=vehicles,
        traffic={sid: traffic_figures(table.get(sid, {})) for sid in stream_ids} if settings.tracking.enabled else None,
        vehicle_totals=dict(sorted(sum((Counter(v) for v in vehicles.values()), Counter()).items())),
        wall_s=round(wall, 2),
        processing_s=round(processing_s, 3),
        frames_per_s=round(frames / processing_s, 2) if processing_s > 0 else 0.0,
        count_latency_ms=latency.summary(),
        latency_histogram=latency.to_dict(),
        stage_peak_fps={stage: max((row[stage]["fps"] for row in progress.timeline), default=0.0) for stage in STAGES},
        timeline=progress.timeline,
        actors={
            name: {
                "stage": s.stage,
                "frames_out": s.frames_out,
                "fps": s.fps,
                "node": s.node,
                "gpus": s.gpus,
                "peak_rss_mb": s.peak_rss_mb,
            }
            for name, s in sorted(progress.stats.items())
        },
    )


def write_summary(settings: Settings, plan: RunPlan, summary: RunSummary) -> Path:
    """Write ``output/runs/<run_id>.json`` and remember where in ``summary.summary_path``."""
    folder = Path(settings.output_dir) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{plan.run_id}.json"
    path.write_text(json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n")
    summary.summary_path = str(path.resolve())
    return path
