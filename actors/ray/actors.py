"""The thin Ray shells: a worker class becomes a named actor only at launch.

Resources (CPUs, GPUs) come from the config, not from decorators, following
Ray's own ``util/queue.py`` pattern of ``ray.remote(Cls).options(...)``.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from typing import Any

from actors.producer import FrameProducer
from actors.stages import WORKERS
from pipeline.config import Settings
from pipeline.sources import SourceSpec

__all__ = ["StageActor", "ProducerActor", "actor_options", "requested"]

logger = logging.getLogger(__name__)


def _restarts() -> int:
    """How often Ray restarted this actor (asked once, in ``__init__``, which every restart reruns)."""
    import ray

    try:
        from ray._private.state import actors  # the GCS actor table; the public state API needs the dashboard

        return int(actors(ray.get_runtime_context().get_actor_id())["NumRestarts"])
    except Exception:  # the private API changed: say "restarted" without a count
        return int(ray.get_runtime_context().was_current_actor_reconstructed)


def _placement() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node": ray.util.get_node_ip_address(),
        "node_id": ctx.get_node_id()[:12],
        "pid": os.getpid(),
        "gpus": [str(g) for g in ray.get_gpu_ids()],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


class StageActor:
    """Runs one consumer-stage worker inside a Ray actor (threaded, so stats answer while it runs)."""

    def __init__(self, stage: str, settings: Settings, name: str) -> None:
        threads = getattr(settings, stage).threads or os.cpu_count() or 1
        # Before torch or onnxruntime load: Ray set OMP_NUM_THREADS=1 for this fractional-CPU actor.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        self.worker = WORKERS[stage](settings, name)
        self.restarts = _restarts()
        self._started = threading.Lock()
        self._done = threading.Event()
        self._result: dict[str, Any] | None = None

    def run(self, **limits: Any) -> dict[str, Any] | None:
        """The worker's loop, once per actor instance: a second call (the driver runs a stage again
        when it lost sight of the actor's node, though it may still be running) waits for the first."""
        if not self._started.acquire(blocking=False):
            self._done.wait()
            return self._result
        try:
            self._result = self.worker.run(**limits) | _placement() | {"restarts": self.restarts}
            return self._result
        finally:
            self._done.set()

    def stop(self) -> None:
        self.worker.stop()

    def rejoin(self) -> None:
        self.worker.rejoin()

    def stats(self) -> dict[str, Any]:
        return self.worker.stats() | _placement() | {"restarts": self.restarts}


class ProducerActor:
    """Publishes one source to topic A from inside the cluster."""

    def __init__(self, settings: Settings, spec: SourceSpec, name: str, since_ms: int | None = None) -> None:
        # Ray reruns this with the same arguments when it restarts the actor; ``run`` is then
        # retried and resumes after the frames its predecessor committed.
        self.producer = FrameProducer(settings, spec, name, since_ms=since_ms)
        self.restarts = _restarts()

    def run(self, start_after_s: float = 0.0) -> dict[str, Any]:
        self.producer.pause(start_after_s)
        return self.producer.run() | _placement()

    def stop(self, end: bool = False) -> None:
        self.producer.stop(end)

    def stats(self) -> dict[str, Any]:
        return self.producer.stats() | _placement() | {"restarts": self.restarts}


def actor_options(
    name: str, num_cpus: float, num_gpus: float, cluster_gpus: float, resources: dict[str, float] | None = None
) -> dict[str, Any]:
    """Named, restartable, threaded actor options; GPUs are requested only when the cluster has some,
    custom resources (``resources``) always, so a stage that needs one waits for a node with it."""
    from cluster.raycluster import NAMESPACE

    opts: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus if cluster_gpus > 0 else 0,
        "max_concurrency": 4,
        "max_restarts": 3,
        "max_task_retries": 3,
    }
    if resources:
        opts["resources"] = dict(resources)
    return opts


def requested(num_gpus: float, cluster_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """GPUs and custom resources one actor requests, as ``actor_options`` asks Ray for them."""
    return {"GPU": num_gpus if cluster_gpus > 0 else 0.0, **resources}
