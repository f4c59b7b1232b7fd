"""The thin Ray shells: a worker class becomes a named actor only at launch.

Resources (CPUs, GPUs) come from the config, not from decorators, following
Ray's own ``util/queue.py`` pattern of ``ray.remote(Cls).options(...)``.
"""

from __future__ import annotations

import logging
import os
import resource
from typing import Any

from actors.producer import FrameProducer
from actors.stages import WORKERS
from pipeline.config import Settings
from pipeline.sources import SourceSpec

__all__ = ["StageActor", "ProducerActor", "actor_options"]

logger = logging.getLogger(__name__)


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

    def run(self, **limits: Any) -> dict[str, Any]:
        return self.worker.run(**limits) | _placement()

    def stop(self) -> None:
        self.worker.stop()

    def rejoin(self) -> None:
        self.worker.rejoin()

    def stats(self) -> dict[str, Any]:
        return self.worker.stats() | _placement()


class ProducerActor:
    """Publishes one source to topic A from inside the cluster."""

    def __init__(self, settings: Settings, spec: SourceSpec, name: str, since_ms: int | None = None) -> None:
        # Ray reruns this with the same arguments when it restarts the actor; ``run`` is then
        # retried and resumes after the frames its predecessor committed.
        self.producer = FrameProducer(settings, spec, name, since_ms=since_ms)

    def run(self) -> dict[str, Any]:
        return self.producer.run() | _placement()

    def stop(self) -> None:
        self.producer.stop()

    def stats(self) -> dict[str, Any]:
        return self.producer.stats() | _placement()


def actor_options(name: str, num_cpus: float, num_gpus: float, cluster_gpus: float) -> dict[str, Any]:
    """Named, restartable, threaded actor options; GPUs are requested only when the cluster has some."""
    from cluster.raycluster import NAMESPACE

    return {
        "name": name,
        "namespace": NAMESPACE,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus if cluster_gpus > 0 else 0,
        "max_concurrency": 4,
        "max_restarts": 3,
        "max_task_retries": 3,
    }
