"""The Ray engine: every stage replica and producer as a named Ray actor on one cluster.

``run_pipeline`` launches the actors, lets ``actors.launcher`` watch them drain, and
returns the run's summary; ``RunControl`` lets ``vapipe chaos`` add and remove replicas
while a run drains.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.launcher import Progress, RunPlan, drain, prepare_run, summarise, wait_ready, write_summary
from actors.ray.actors import ProducerActor, StageActor, actor_options
from cluster.raycluster import ray_session
from pipeline.config import RayConfig, Settings
from pipeline.errors import PipelineError
from pipeline.stats import STAGES, RunSummary, WorkerStats

__all__ = ["RunControl", "RayWorkers", "run_pipeline", "launch_stage", "actor_stats"]

logger = logging.getLogger(__name__)


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
        self.actors[name], self.stage_refs[name] = launch_stage(self.settings, stage, name, self.cluster_gpus)
        return name

    def remove_replica(self, name: str) -> None:
        """Kill a replica for good (no restart); the group hands its partitions to the others."""
        import ray

        handle = self.actors.pop(name)
        self.stage_refs.pop(name, None)
        self.progress.stats.pop(name, None)
        ray.kill(handle, no_restart=True)


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
        self.actors[name], self.stage_refs[name] = launch_stage(settings, stage, name, cluster_gpus)

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


def launch_stage(settings: Settings, stage: str, name: str, cluster_gpus: float) -> tuple[Any, Any]:
    import ray

    cfg = getattr(settings, stage)
    handle = (
        ray.remote(StageActor)
        .options(**actor_options(name, cfg.num_cpus, cfg.num_gpus, cluster_gpus))
        .remote(stage, settings, name)
    )
    return handle, handle.run.remote()


def run_pipeline(
    settings: Settings,
    plan: RunPlan,
    on_progress: Callable[[Progress], None] | None = None,
    on_tick: Callable[[RunControl], None] | None = None,
) -> RunSummary:
    """Run the whole pipeline on a Ray cluster and return the run summary.

    Raises:
        PipelineError: bad source, model, broker, or a stage that failed.
    """
    prepare_run(settings, plan)
    with ray_session(settings.ray, include_dashboard=plan.include_dashboard) as ray:
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


def actor_stats(address: str, timeout_s: float = 10.0) -> dict[str, WorkerStats | str]:
    """Every running vapipe actor of the cluster at ``address``: its stats, or why it did not answer.

    Raises:
        PipelineError: the cluster cannot be reached.
    """
    import ray

    from cluster.raycluster import NAMESPACE, ray_session

    with ray_session(RayConfig(address=address), include_dashboard=False):
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE)
        refs = {n: ray.get_actor(n, namespace=NAMESPACE).stats.remote() for n in names}
        out: dict[str, WorkerStats | str] = {}
        for name, ref in refs.items():
            try:
                out[name] = WorkerStats.from_dict(ray.get(ref, timeout=timeout_s))
            except Exception as exc:  # one sick actor must not hide the others
                out[name] = f"unavailable: {type(exc).__name__}"
        return out
