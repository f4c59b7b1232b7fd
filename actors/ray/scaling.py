"""The Ray shell of the InterConsumer autoscaler: feeds ``pipeline.autoscale`` once a second and acts.

Adding a replica is ``RunControl.add_replica``: a new named actor that asks Ray for the stage's
CPUs/GPUs like any other (on a cluster with Ray's autoscaler, a request no node can serve brings
one up). Removing one is a graceful stop: the replica finishes its batch, commits it in its
transaction and leaves the group, so its partitions move at once and no frame is lost or
handled twice; only one that does not stop within ``RETIRE_TIMEOUT_S`` is killed (exactly-once
still holds then: its open transaction is aborted when its partitions' new owner is fenced).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from actors.ray.engine import RunControl
from pipeline.autoscale import LagController, ScaleInput
from pipeline.config import InterConfig
from pipeline.stats import WorkerStats

__all__ = ["InterAutoscaler"]

logger = logging.getLogger(__name__)

RETIRE_TIMEOUT_S = 60.0
"""A retiring replica that has not returned from ``run`` after this long is killed."""


class InterAutoscaler:
    """Called once a tick with the run's ``RunControl``; keeps a record of what it saw and did."""

    def __init__(self, cfg: InterConfig) -> None:
        self.cfg = cfg
        self.controller = LagController(cfg.autoscale)
        self.retiring: dict[str, tuple[Any, Any, float]] = {}
        self.events: list[dict[str, Any]] = []
        """One row per scale event: time, replicas after it, why."""
        self.samples: list[dict[str, Any]] = []
        """One row per tick: time, replicas, ready, lag_s, busy, input frames/s."""

    def __call__(self, control: RunControl) -> None:
        self._reap(control)
        names = sorted((n for n in control.stage_refs if n.startswith("inter-")), key=_index)
        fresh = [control.progress.fresh.get(n) for n in names]
        ready = [s for s in fresh if s is not None and s.ready]
        now = time.time()
        t = round(now - control.progress.t0, 2)
        look = ScaleInput(
            now=now,
            replicas=len(names),
            ready=len(ready),
            lag_s=max((s.lag_s or 0.0 for s in ready), default=0.0),
            busy=round(sum(s.busy for s in ready), 3),
            room=self.cfg.autoscale.request_nodes or _room(self.cfg),
        )
        self.samples.append(
            {
                "t": t,
                "replicas": look.replicas,
                "ready": look.ready,
                "lag_s": look.lag_s,
                "busy": look.busy,
                "input_fps": round(sum(s.fps for s in control.progress.stage("producer")), 2),
            }
        )
        delta = self.controller.decide(look)
        if delta > 0:
            name = control.add_replica("inter")
        elif delta < 0:
            name = names[-1]
            self._retire(control, name)
        else:
            return
        self.events.append(
            {
                "t": t,
                "change": f"{'+' if delta > 0 else '-'}{name}",
                "replicas": look.replicas + delta,
                "why": self.controller.reason,
            }
        )
        logger.warning(
            "autoscale: %s (%s); %d InterConsumers", self.events[-1]["change"], self.controller.reason, look.replicas + delta
        )

    def _retire(self, control: RunControl, name: str) -> None:
        """Stop a replica gracefully; it stays among the run's actors (answering stats, killed at the
        end of the run) until it has returned."""
        handle = control.actors[name]
        ref = control.stage_refs.pop(name)
        handle.stop.remote()
        self.retiring[name] = (handle, ref, time.monotonic() + RETIRE_TIMEOUT_S)

    def _reap(self, control: RunControl) -> None:
        """Replicas that stopped: keep their final counts in the run's totals, then let them go."""
        import ray

        for name, (handle, ref, deadline) in list(self.retiring.items()):
            done, _ = ray.wait([ref], timeout=0)
            if not done and time.monotonic() < deadline:
                continue
            del self.retiring[name]
            control.actors.pop(name, None)
            last = control.progress.stats.get(name)
            if done:
                try:
                    last = WorkerStats.from_dict(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    logger.warning("autoscale: %s stopped with %s", name, exc)
            else:
                logger.warning("autoscale: %s did not stop within %.0fs; killing it", name, RETIRE_TIMEOUT_S)
            control.progress.retire(name, last)
            ray.kill(handle, no_restart=True)

    def report(self) -> dict[str, Any]:
        """The summary's ``autoscale`` block."""
        cfg = self.cfg.autoscale
        return {"config": cfg.model_dump(), "events": self.events, "samples": self.samples}


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _room(cfg: InterConfig) -> bool:
    """The cluster has free CPUs (and GPUs, where replicas ask for them) for one more replica right now."""
    import ray

    free = ray.available_resources()
    gpus_needed = cfg.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return free.get("CPU", 0.0) >= cfg.num_cpus and free.get("GPU", 0.0) >= gpus_needed
