"""`vapipe run`: validate inputs, create topics, launch every stage as named Ray actors, drain, summarise.

A finite run is complete when every producer has published its end-of-stream
record, the count table has applied every published frame of every stream, and
the crop group has committed everything on topic B. Then every actor is asked
to stop, and a JSON summary is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from cluster.clients import check_broker
from cluster.reading import group_lag
from actors.ray.actors import ProducerActor, StageActor, actor_options
from actors.stages import percentiles, read_table
from cluster.raycluster import connect
from cluster.topics import create_topics
from pipeline.config import Settings, TopicSpec
from pipeline.crop import load_index
from pipeline.detector import check_model, is_calibration
from pipeline.errors import ConfigError, PipelineError
from pipeline.sources import SourceSpec, VideoSource

__all__ = [
    "RunPlan", "Progress", "Workers", "RayWorkers", "run_pipeline", "prepare_run", "wait_ready", "drain", "summarise",
    "write_summary", "validate_sources", "new_run_id",
]

logger = logging.getLogger(__name__)

STAGES = ("inter", "crop", "count")
POLL_INTERVAL_S = 1.0
"""How often the driver asks the workers for their stats while a run drains."""
REJOIN_AFTER_S = 5.0
"""A replica still owning no partition this long after start-up is asked to rejoin its group."""


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("r%Y%m%d-%H%M%S")


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


def validate_sources(sources: list[SourceSpec]) -> None:
    """Open and close every source so a missing or corrupt video fails before anything is published."""
    if not sources:
        raise ConfigError("no --source given")
    seen: set[str] = set()
    for spec in sources:
        if spec.stream_id in seen:
            raise ConfigError(f"two sources share the stream id {spec.stream_id!r}: name them with id=SOURCE")
        seen.add(spec.stream_id)
        VideoSource(spec, max_frames=1).open().close()


def _validate_model(settings: Settings, allow_calibration: bool) -> None:
    name = settings.model.name
    if is_calibration(name) and not allow_calibration:
        raise ConfigError(f"model {name!r} is the calibration detector (finds nothing); pass --calibration to use it on purpose")
    check_model(name)


class Progress:
    """Accumulates what the actors report, for the live line and the summary."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, Any]] = {}
        self.fresh: dict[str, dict[str, Any]] = {}
        self.t0 = time.time()
        self.timeline: list[dict[str, Any]] = []
        """One sample per poll: seconds since start, and per stage frames out, f/s and consumer lag."""

    def update(self, stats: list[dict[str, Any]]) -> None:
        self.fresh = {s["name"]: s for s in stats}
        """The actors that answered this round (a restarting one does not)."""
        for s in stats:
            self.stats[s["name"]] = s

    def sample(self) -> None:
        row: dict[str, Any] = {"t": round(time.time() - self.t0, 2), "produced": self.total("producer", "frames_out")}
        for stage in STAGES:
            row[stage] = {
                "frames": self.total(stage, "frames_out"),
                "fps": round(sum(float(s.get("fps") or 0) for s in self.stage(stage)), 2),
                "lag": sum(int(s.get("lag") or 0) for s in self.stage(stage)),
            }
        self.timeline.append(row)

    def stage(self, stage: str) -> list[dict[str, Any]]:
        return [s for s in self.stats.values() if s.get("stage") == stage]

    def total(self, stage: str, key: str) -> int:
        return sum(int(s.get(key) or 0) for s in self.stage(stage))

    def line(self) -> str:
        parts = [f"produced {self.total('producer', 'frames_out')}"]
        for stage in STAGES:
            fps = sum(float(s.get("fps") or 0) for s in self.stage(stage))
            lag = sum(int(s.get("lag") or 0) for s in self.stage(stage))
            parts.append(f"{stage} {self.total(stage, 'frames_out')} ({fps:.1f} f/s, lag {lag})")
        return " | ".join(parts)

    def streams_complete(self, stream_ids: list[str]) -> bool:
        # Any replica may hold an older copy of a stream it restored from the changelog but does
        # not own; only the owner ever sees the stream complete.
        complete = {sid for s in self.stage("count") for sid, t in (s.get("table") or {}).items() if t.get("complete")}
        return all(sid in complete for sid in stream_ids)


@dataclass
class RunControl:
    """Handed to ``on_tick`` about once a second while a run drains, to change the running
    pipeline: add or remove replicas (``vapipe chaos`` injects its faults through it)."""

    settings: Settings
    progress: Progress
    actors: dict[str, Any]
    stage_refs: dict[str, Any]
    cluster_gpus: float = 0.0

    def add_replica(self, stage: str) -> str:
        """Start one more replica of a stage; it joins the stage's consumer group (a rebalance)."""
        taken = {int(n.rsplit("-", 1)[1]) for n in self.actors if n.startswith(f"{stage}-")}
        name = f"{stage}-{next(i for i in range(len(taken) + 1) if i not in taken)}"
        self.actors[name], self.stage_refs[name] = _launch_stage(self.settings, stage, name, self.cluster_gpus)
        return name

    def remove_replica(self, name: str) -> None:
        """Kill a replica for good (no restart); the group hands its partitions to the others."""
        import ray

        handle = self.actors.pop(name)
        self.stage_refs.pop(name, None)
        self.progress.stats.pop(name, None)
        ray.kill(handle, no_restart=True)


class Workers(Protocol):
    """The running workers of one run, whichever engine runs them: what the run loop watches.

    ``RayWorkers`` are Ray actors; ``actors.faust.engine.FaustWorkers`` are Faust
    processes, possibly next to Ray stage actors.
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

    def producers_left(self) -> int:
        ...

    def stop_producers(self) -> None:
        """End every stream early (Ctrl-C); what was published is still drained."""
        ...

    def rejoin(self, names: list[str]) -> None:
        """Ask stage workers that own no partition to rejoin their group."""
        ...


@dataclass
class RayWorkers:
    """The run's Ray actors: stage actors and producers, with the refs of their ``run`` calls."""

    actors: dict[str, Any]
    stage_refs: dict[str, Any]
    producer_refs: dict[str, Any] = field(default_factory=dict)

    def stage_names(self) -> list[str]:
        return list(self.stage_refs)

    def poll(self) -> list[dict[str, Any]]:
        import ray

        done, _ = ray.wait(list(self.stage_refs.values()), num_returns=len(self.stage_refs), timeout=0)
        for name, ref in self.stage_refs.items():
            if ref in done:
                _get(ref, name)  # raises the stage's error; a clean return here is unexpected
                raise PipelineError(f"stage actor {name} stopped before the run was complete")
        return _gather_stats(self.actors)

    def finished_producers(self) -> dict[str, dict[str, Any]]:
        import ray

        ready, _ = ray.wait(list(self.producer_refs.values()), num_returns=len(self.producer_refs), timeout=0)
        finished = {}
        for name, ref in list(self.producer_refs.items()):
            if ref in ready:
                finished[name] = _get(ref, name)
                del self.producer_refs[name]
        return finished

    def producers_left(self) -> int:
        return len(self.producer_refs)

    def stop_producers(self) -> None:
        for name in self.producer_refs:
            self.actors[name].stop.remote()

    def rejoin(self, names: list[str]) -> None:
        for name in names:
            if name in self.actors:
                self.actors[name].rejoin.remote()

    def launch(self, settings: Settings, stage: str, name: str, cluster_gpus: float) -> None:
        """Start one stage actor and its ``run`` loop."""
        self.actors[name], self.stage_refs[name] = _launch_stage(settings, stage, name, cluster_gpus)

    def stop(self, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Ask every actor to stop; returns the stage actors' final stats."""
        import ray

        for handle in self.actors.values():
            handle.stop.remote()
        return list(ray.get(list(self.stage_refs.values()), timeout=timeout_s))

    def kill(self) -> None:
        """Whatever is left, on the way out (an error, Ctrl-C, or after ``stop``)."""
        import ray

        for handle in self.actors.values():
            try:
                ray.kill(handle)
            except Exception:  # already gone
                pass


def _launch_stage(settings: Settings, stage: str, name: str, cluster_gpus: float) -> tuple[Any, Any]:
    import ray

    cfg = getattr(settings, stage)
    handle = ray.remote(StageActor).options(**actor_options(name, cfg.num_cpus, cfg.num_gpus, cluster_gpus)).remote(stage, settings, name)
    return handle, handle.run.remote()


def prepare_run(settings: Settings, plan: RunPlan, extra_topics: list[TopicSpec] | None = None) -> None:
    """Before any worker starts, whatever the engine: name this run's streams, check the sources,
    the model and the broker, and create the topics.

    Raises:
        PipelineError: a bad source or model, or a broker that cannot be reached.
    """
    plan.sources = [s.for_run(plan.run_id) for s in plan.sources]
    validate_sources(plan.sources)
    _validate_model(settings, plan.allow_calibration)
    check_broker(settings.kafka)
    create_topics(settings.kafka, settings.topics.all() + list(extra_topics or []))


def run_pipeline(
    settings: Settings,
    plan: RunPlan,
    on_progress: Callable[[Progress], None] | None = None,
    on_tick: Callable[[RunControl], None] | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline on a Ray cluster and return the run summary.

    Raises:
        PipelineError: bad source, model, broker, or a stage that failed.
    """
    prepare_run(settings, plan)
    started_ray = connect(settings.ray, include_dashboard=plan.include_dashboard)
    import ray

    workers = RayWorkers({}, {})
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        for stage in STAGES:
            for i in range(plan.replicas[stage]):
                workers.launch(settings, stage, f"{stage}-{i}", gpus)
        wait_ready(settings, workers, timeout_s=plan.stall_timeout_s)
        producers: dict[str, Any] = {}
        # This run's streams have no frames older than this (a minute of slack for clocks across
        # nodes): a restarted producer scans only that much of topic A to find where to resume.
        since_ms = int((time.time() - 60) * 1000)
        for spec in plan.sources:
            name = f"producer-{spec.stream_id}"
            opts = actor_options(name, settings.producer.num_cpus, 0, 0)
            producers[name] = ray.remote(ProducerActor).options(**opts).remote(settings, spec, name, since_ms)
        workers.actors.update(producers)
        # Start every stream together: a producer whose worker process is slow to start must not
        # begin seconds after the others (and stretch the measured run).
        ray.get([h.stats.remote() for h in producers.values()], timeout=plan.stall_timeout_s)
        t0 = time.time()
        workers.producer_refs = {name: h.run.remote() for name, h in producers.items()}
        progress = Progress()
        control = RunControl(settings, progress, workers.actors, workers.stage_refs, gpus)
        produced = drain(settings, plan, workers, progress, on_progress, on_tick and (lambda: on_tick(control)))
        wall = time.time() - t0
        progress.update(workers.stop())
        summary = summarise(settings, plan, produced, progress, wall)
        write_summary(settings, plan, summary)
        return summary
    finally:
        workers.kill()
        if started_ray:
            ray.shutdown()


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
    produced: dict[str, dict[str, Any]] = {}
    stream_ids = [s.stream_id for s in plan.sources]
    last_change, last_line = time.monotonic(), ""
    interrupted = False
    while True:
        try:
            time.sleep(POLL_INTERVAL_S)  # never spin on the workers
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
        line = progress.line()
        if line != last_line:
            last_change, last_line = time.monotonic(), line
        elif time.monotonic() - last_change > plan.stall_timeout_s:
            raise PipelineError(f"no progress for {plan.stall_timeout_s:.0f}s: {line}")
        if workers.producers_left() or not progress.streams_complete(stream_ids):
            continue
        lag = group_lag(settings.kafka, settings.group("crop"), [settings.topics.detected_frames.name])
        if sum(lag.values()) == 0:
            return produced


def wait_ready(settings: Settings, workers: Workers, timeout_s: float) -> None:
    """Block until every stage worker has loaded its model and its group owns every input partition.

    Timings then start at the first frame, and no frame waits for a late rebalance.
    """
    inputs = {"inter": settings.topics.frames, "crop": settings.topics.detected_frames, "count": settings.topics.detections}
    names = workers.stage_names()
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    waiting = "start-up"
    while True:
        if time.monotonic() > deadline:
            raise PipelineError(f"stage workers not ready after {timeout_s:.0f}s: {waiting}")
        stats = {s["name"]: s for s in workers.poll() if s.get("name") in names}
        not_ready = sorted(n for n in names if not stats.get(n, {}).get("ready"))
        stuck = [f"{n}: {stats[n]['stuck']}" for n in not_ready if stats.get(n, {}).get("stuck")]
        if stuck:  # a worker that knows it cannot become ready (Faust: a table recovery that stalled)
            raise PipelineError(f"stage workers cannot become ready: {'; '.join(stuck)}")
        unowned = []
        for stage, spec in inputs.items():
            members = [s for s in stats.values() if s.get("stage") == stage]
            owned = [int(s.get("assigned") or 0) for s in members]
            # Every partition owned, and no replica left without one when there are enough to go round.
            idle = [s["name"] for s in members if not s.get("assigned")] if len(members) <= spec.partitions else []
            if sum(owned) != spec.partitions or idle:
                unowned.append(stage)
                if idle and time.monotonic() - started > REJOIN_AFTER_S:
                    # Seen here: a member left out of a finished rebalance stays idle for the whole run.
                    workers.rejoin(idle)
                    started = time.monotonic()
        if not not_ready and not unowned:
            return
        why = [f"{n} ({stats[n]['waiting']})" if stats.get(n, {}).get("waiting") else n for n in not_ready]
        waiting = f"not ready: {', '.join(why) or '-'}; partitions not yet assigned: {', '.join(unowned) or '-'}"
        time.sleep(0.5)


def _gather_stats(actors: dict[str, Any], timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Ask every actor for its stats; one that is restarting or slow is left out this round."""
    import ray

    refs = [h.stats.remote() for h in actors.values()]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out = []
    for ref in ready:
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayError:
            continue
    return out


def _get(ref: Any, name: str) -> Any:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
        if isinstance(cause, PipelineError):
            raise type(cause)(f"{name}: {cause}") from None
        raise PipelineError(f"{name} failed: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayActorError as exc:
        raise PipelineError(f"{name} died: {exc}") from None


def summarise(settings: Settings, plan: RunPlan, produced: dict[str, dict[str, Any]], progress: Progress, wall: float) -> dict[str, Any]:
    stream_ids = [s.stream_id for s in plan.sources]
    table = read_table(settings)
    crops = [e for e in load_index(Path(settings.output_dir) / "crops").values() if e["stream_id"] in stream_ids]
    frames = sum(p["frames_published"] for p in produced.values())
    # Processing time: first frame published to last count applied, from the actors' own clocks.
    firsts = [p["first_ts"] for p in produced.values() if p.get("first_ts")]
    lasts = [s["last_applied_ts"] for s in progress.stage("count") if s.get("last_applied_ts")]
    processing_s = max(lasts) - min(firsts) if firsts and lasts else wall
    vehicles: dict[str, dict[str, int]] = {sid: table.get(sid, {}).get("totals", {}) for sid in stream_ids}
    latencies = percentiles([v for s in progress.stage("count") for v in s.get("latencies_ms") or []])
    return {
        "run_id": plan.run_id,
        "model": settings.model.name,
        "sources": {s.stream_id: s.uri for s in plan.sources},
        "replicas": plan.replicas,
        "frames_produced": frames,
        "frames_skipped": sum(p["frames_skipped"] for p in produced.values()),
        "per_stream": {
            sid: {
                "produced": next((p["frames_published"] for p in produced.values() if p["stream_id"] == sid), 0),
                "skipped": next((p["frames_skipped"] for p in produced.values() if p["stream_id"] == sid), 0),
                "counted": table.get(sid, {}).get("frames_applied", 0),
            }
            for sid in stream_ids
        },
        "frames_processed": {stage: progress.total(stage, "frames_out") for stage in STAGES},
        "poison_records": {stage: progress.total(stage, "poison") for stage in STAGES},
        "dead_lettered": {stage: progress.total(stage, "dead_lettered") for stage in STAGES},
        "retried_batches": {stage: progress.total(stage, "retries") for stage in STAGES},
        "detections": progress.total("inter", "detections"),
        "crops_per_label": dict(sorted(Counter(e["label"] for e in crops).items())),
        "crops_dir": str((Path(settings.output_dir) / "crops").resolve()),
        "vehicles": vehicles,
        "vehicle_totals": dict(sorted(sum((Counter(v) for v in vehicles.values()), Counter()).items())),
        "wall_s": round(wall, 2),
        "processing_s": round(processing_s, 3),
        "frames_per_s": round(frames / processing_s, 2) if processing_s > 0 else 0.0,
        "count_latency_ms": latencies,
        "stage_peak_fps": {stage: max((row[stage]["fps"] for row in progress.timeline), default=0.0) for stage in STAGES},
        "timeline": progress.timeline,
        "actors": {
            name: {k: s.get(k) for k in ("stage", "frames_out", "fps", "node", "gpus", "peak_rss_mb") if k in s}
            for name, s in sorted(progress.stats.items())
        },
    }


def write_summary(settings: Settings, plan: RunPlan, summary: dict[str, Any]) -> Path:
    folder = Path(settings.output_dir) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{plan.run_id}.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["summary_path"] = str(path.resolve())
    return path
