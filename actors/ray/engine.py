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
from typing import Any, cast

from actors.delivery import fence, stage_transactional_id
from actors.launcher import Progress, RunPlan, drain, prepare_run, summarise, wait_ready, write_summary
from actors.ray.actors import ProducerActor, StageActor, actor_options, requested
from actors.streams import StreamCommands, apply_stream_commands
from cluster.raycluster import placement_shortfall, ray_session
from pipeline.config import RayConfig, Role, Settings
from pipeline.errors import PipelineError
from pipeline.sources import SourceSpec
from pipeline.stats import STAGES, EarlierLives, RunSummary, WorkerStats

__all__ = ["RunControl", "RayWorkers", "run_pipeline", "launch_stage", "actor_stats", "check_placement", "named_actor_stats"]

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
        """Kill a replica for good (no restart); the group hands its partitions to the others.

        Its transactional id is fenced at once: no successor takes it over, and the transaction it
        left open would otherwise hold back every read_committed consumer of the partitions it wrote
        to until the broker's transaction timeout (60 s; see ``actors.delivery.fence``).
        """
        import ray

        handle = self.actors.pop(name)
        self.stage_refs.pop(name, None)
        self.progress.retire(name)
        ray.kill(handle, no_restart=True)
        if self.settings.processing_guarantee == "exactly_once":
            stage = name.rsplit("-", 1)[0]
            as_stage = self.settings.for_role(cast(Role, stage))  # the credentials the replica used
            try:
                fence(as_stage.kafka, stage_transactional_id(as_stage.group(stage), name))
            except Exception as exc:  # the broker aborts it after its transaction timeout all the same
                logger.warning("%s: its open transaction was not fenced (%s); the broker times it out", name, exc)


@dataclass
class RayWorkers:
    """The run's Ray actors: stage actors and producers, with the refs of their ``run`` calls."""

    actors: dict[str, Any]
    stage_refs: dict[str, Any]
    producer_refs: dict[str, Any] = field(default_factory=dict)
    asked: dict[str, Any] = field(default_factory=dict)
    """Each actor's stats request in flight: one at a time, carried over ticks until it answers."""
    answered: set[str] = field(default_factory=set)
    """Actors that answered once: a replica still starting (loading its model) is never waited for."""
    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each actor's last report as its process gave it (before earlier lives are added)."""
    lives: dict[str, EarlierLives] = field(default_factory=dict)
    """What the earlier processes of an actor Ray restarted counted."""

    def stage_names(self) -> list[str]:
        return list(self.stage_refs)

    def gather_stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Every actor's stats; one that is restarting or slow is left out this round.

        Waits up to ``timeout_s`` only for actors that answered before: a tick must not stall for
        seconds while a new replica starts (the autoscaler, the live view and the stall watch run on it).
        """
        import ray

        for name in (set(self.asked) | self.answered | set(self.last)) - set(
            self.actors
        ):  # removed or retired: a name reused is new
            self.asked.pop(name, None)
            self.answered.discard(name)
            self.last.pop(name, None)
            self.lives.pop(name, None)
        for name, handle in self.actors.items():
            if name not in self.asked:
                self.asked[name] = handle.stats.remote()
        known = [ref for name, ref in self.asked.items() if name in self.answered]
        if known:
            ray.wait(known, num_returns=len(known), timeout=timeout_s)
        if not self.asked:
            return []
        ready, _ = ray.wait(list(self.asked.values()), num_returns=len(self.asked), timeout=0)
        out = []
        for name, ref in list(self.asked.items()):
            if ref in ready:
                del self.asked[name]
                try:
                    out.append(self._over_lives(name, ray.get(ref)))
                    self.answered.add(name)
                except ray.exceptions.RayError:
                    continue
        return out

    def _over_lives(self, name: str, stats: dict[str, Any]) -> dict[str, Any]:
        """An actor Ray restarted (its process killed) reports from 0: add what its earlier processes counted."""
        before = self.last.get(name)
        if before is not None and (before.get("node_id"), before.get("pid")) != (stats.get("node_id"), stats.get("pid")):
            self.lives.setdefault(name, EarlierLives()).end_life(before)
        self.last[name] = stats
        lives = self.lives.get(name)
        return lives.add_to(stats) if lives is not None else stats

    def poll(self) -> list[dict[str, Any]]:
        import ray

        done, _ = ray.wait(list(self.stage_refs.values()), num_returns=len(self.stage_refs), timeout=0)
        for name, ref in list(self.stage_refs.items()):
            if ref in done:
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.ActorUnavailableError:
                    # Its node is gone or cut off (a crashed GPU host): Ray does not retry a call that
                    # may have run. Run it again; the restarted actor resumes from its committed offsets,
                    # and an actor that is dead for good fails the next call with ActorDiedError.
                    logger.warning("%s is unavailable (its node died or is unreachable); running it again", name)
                    self.stage_refs[name] = self.actors[name].run.remote()
                    continue
                except Exception:
                    pass
                _get(ref, name)  # raises the stage's error; a clean return here is unexpected
                raise PipelineError(f"stage actor {name} stopped before the run was complete")
        return self.gather_stats()

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

    def add_producer(self, settings: Settings, spec: SourceSpec, since_ms: int | None) -> None:
        """Start publishing one more stream (``vapipe streams add``)."""
        import ray

        name = f"producer-{spec.stream_id}"
        opts = actor_options(name, settings.producer.num_cpus, 0, 0, settings.producer.resources)
        self.actors[name] = ray.remote(ProducerActor).options(**opts).remote(settings, spec, name, since_ms)
        self.producer_refs[name] = self.actors[name].run.remote()

    def remove_producer(self, stream_id: str) -> bool:
        """End one stream (``vapipe streams remove``): its producer publishes its end and finishes."""
        name = f"producer-{stream_id}"
        if name not in self.producer_refs:
            return False
        self.actors[name].stop.remote(end=True)
        return True

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
        deadline = time.monotonic() + timeout_s
        pending = list(self.stage_refs.values())
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            for name, ref in self.stage_refs.items():
                if ref in pending:  # a replica that was restarting may have missed the first stop
                    self.actors[name].stop.remote()
        final = []
        for name, ref in self.stage_refs.items():
            try:
                final.append(ray.get(ref, timeout=0))
            except ray.exceptions.RayActorError as exc:
                # The run has drained: a replica lost now (its node died, or it was restarting) costs
                # only its final figures; the last ones it reported stand in for them.
                logger.warning("%s did not report its final stats (%s); using the last it reported", name, type(exc).__name__)
        return final

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
        .options(**actor_options(name, cfg.num_cpus, cfg.num_gpus, cluster_gpus, cfg.resources))
        .remote(stage, settings, name)
    )
    return handle, handle.run.remote()


def check_placement(settings: Settings, plan: RunPlan, capacity: dict[str, float]) -> None:
    """Every replica's GPUs and custom resources against the cluster's (``ray.unplaceable``).

    Raises:
        PipelineError: ``fail``, and some replica can never be placed on the cluster as it is.
    """
    gpus = float(capacity.get("GPU", 0))
    requests = {
        stage: (plan.replicas[stage], requested(getattr(settings, stage).num_gpus, gpus, getattr(settings, stage).resources))
        for stage in STAGES
    }
    requests["producer"] = (len(plan.sources), requested(0, 0, settings.producer.resources))
    short = placement_shortfall(requests, capacity)
    if not short:
        return
    if settings.ray.unplaceable == "fail":
        raise PipelineError(
            f"the Ray cluster has no room for every replica: {'; '.join(short)} (ray.unplaceable=fail; "
            "add nodes, lower the replicas or what each requests, or set ray.unplaceable=wait)"
        )
    logger.warning("waiting for room in the Ray cluster: %s (ray.unplaceable=wait)", "; ".join(short))


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
    commands_from = StreamCommands.end(settings)  # streams added from now on join this run
    with ray_session(settings.ray, include_dashboard=plan.include_dashboard) as ray:
        workers = RayWorkers({}, {})
        producers: dict[str, Any] = {}
        try:
            capacity = ray.cluster_resources()
            gpus = float(capacity.get("GPU", 0))
            check_placement(settings, plan, capacity)
            for stage in STAGES:
                for i in range(plan.replicas[stage]):
                    workers.launch(settings, stage, f"{stage}-{i}", gpus)
            # This run's streams have no frames older than this (a minute of slack for clocks across
            # nodes): a restarted producer scans only that much of topic A to find where to resume.
            since_ms = int((time.time() - 60) * 1000)
            # Producer actors start with the stages (a worker process takes seconds to start) and
            # publish once the stages are ready.
            for spec in plan.sources:
                name = f"producer-{spec.stream_id}"
                opts = actor_options(name, settings.producer.num_cpus, 0, 0, settings.producer.resources)
                producers[name] = ray.remote(ProducerActor).options(**opts).remote(settings, spec, name, since_ms)
            wait_ready(settings, workers, timeout_s=plan.stall_timeout_s)
            workers.actors.update(producers)
            # Start every stream together: a producer whose worker process is slow to start must not
            # begin seconds after the others (and stretch the measured run).
            ray.get([h.stats.remote() for h in producers.values()], timeout=plan.stall_timeout_s)
            t0 = time.time()
            delays = {f"producer-{sid}": after for sid, after in plan.start_after_s.items()}
            workers.producer_refs = {name: h.run.remote(delays.get(name, 0.0)) for name, h in producers.items()}
            progress = Progress()
            control = RunControl(settings, progress, workers.actors, workers.stage_refs, gpus)
            commands = StreamCommands(settings, before=commands_from)
            ticks = [on_tick] if on_tick is not None else []
            autoscaler = None
            if settings.inter.autoscale.enabled:
                from actors.ray.scaling import InterAutoscaler

                autoscaler = InterAutoscaler(settings.inter)
                ticks.insert(0, autoscaler)

            def tick() -> None:
                apply_stream_commands(settings, plan, workers, commands, since_ms)
                for each in ticks:
                    each(control)

            try:
                produced = drain(settings, plan, workers, progress, on_progress, tick)
            finally:
                commands.close()
            wall = time.time() - t0
            progress.update(workers.stop())
            summary = summarise(settings, plan, produced, progress, wall)
            if autoscaler is not None:
                summary.autoscale = autoscaler.report()
            write_summary(settings, plan, summary)
            return summary
        finally:
            workers.actors.update(producers)  # a run that failed while the stages got ready kills them too
            workers.kill()


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
    with ray_session(RayConfig(address=address), include_dashboard=False):
        return named_actor_stats(timeout_s)


def named_actor_stats(timeout_s: float = 10.0) -> dict[str, WorkerStats | str]:
    """``actor_stats`` from a process already connected to the cluster (``vapipe top`` asks every second)."""
    import ray

    from cluster.raycluster import NAMESPACE

    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE)
    refs = {}
    out: dict[str, WorkerStats | str] = {}
    for name in names:
        try:
            refs[name] = ray.get_actor(name, namespace=NAMESPACE).stats.remote()
        except Exception as exc:  # gone between the listing and the lookup (a retired replica)
            out[name] = f"unavailable: {type(exc).__name__}"
    for name, ref in refs.items():
        try:
            out[name] = WorkerStats.from_dict(ray.get(ref, timeout=timeout_s))
        except Exception as exc:  # one sick actor must not hide the others
            out[name] = f"unavailable: {type(exc).__name__}"
    return dict(sorted(out.items()))
