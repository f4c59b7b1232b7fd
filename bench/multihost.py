"""Strong scaling on the three-host lab against one host, side by side in one command.

The same input, brokers and replica counts run twice: once on the lab's Ray cluster (producers
on host1, crop and count on host2, every InterConsumer on host3's GPU) and once on a local Ray
on host2 alone (every actor on one host, no GPU requested). Both talk to the lab's three
brokers over the bridge, so the difference is where the actors live, not the Kafka setup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bench.experiments import environment, scaling
from pipeline.config import Settings

__all__ = ["multihost", "one_host"]

logger = logging.getLogger(__name__)


def one_host(settings: Settings, cpus: int) -> Settings:
    """``settings`` (already on the lab) with every actor on a local Ray of ``cpus`` CPUs: no node pins, no GPU."""
    update: dict[str, Any] = {
        "ray": settings.ray.model_copy(update={"address": None, "num_cpus": cpus}),
        "producer": settings.producer.model_copy(update={"resources": {}}),
        "inter": settings.inter.model_copy(update={"num_gpus": 0.0, "resources": {}}),
    }
    for stage in ("crop", "count"):
        update[stage] = getattr(settings, stage).model_copy(update={"resources": {}})
    return settings.model_copy(update=update)


def multihost(
    settings: Settings,
    lab: Any,
    replicas: list[int],
    frames: int,
    repeat: int,
    video: str,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Strong scaling with the InterConsumers on host3 and with every actor on host2; fps ratio per replica count.

    Must run on the lab's host2 (``vapipe bench multihost`` sees to it).
    """
    cluster = lab.settings(settings)
    # Every InterConsumer of the largest run must fit on host3's GPUs.
    share = round(lab.spec.gpus / max(replicas), 6)
    cluster = cluster.model_copy(update={"inter": cluster.inter.model_copy(update={"num_gpus": share})})
    layouts = {"three hosts": cluster, "one host": one_host(cluster, sum(lab.spec.cpus))}
    tables: dict[str, list[dict[str, Any]]] = {}
    for layout, s in layouts.items():
        logger.warning("multihost: %s", layout)
        tables[layout] = scaling(s, "strong", replicas, frames, repeat, video, on_progress)["table"]
    rows = [{"layout": layout, **entry} for layout, table in tables.items() for entry in table]
    one = {e["replicas"]: e for e in tables["one host"]}
    table = [
        {
            "replicas": e["replicas"],
            "fps_three_hosts": e["fps_mean"],
            "fps_one_host": one[e["replicas"]]["fps_mean"],
            "fps_ratio": round(e["fps_mean"] / one[e["replicas"]]["fps_mean"], 3) if one[e["replicas"]]["fps_mean"] else None,
            "speedup_three_hosts": e["speedup"],
            "speedup_one_host": one[e["replicas"]]["speedup"],
            "p50_ms_three_hosts": e["latency_p50_ms"],
            "p50_ms_one_host": one[e["replicas"]]["latency_p50_ms"],
        }
        for e in tables["three hosts"]
    ]
    return {
        "benchmark": "multihost",
        "frames": frames,
        "repeat": repeat,
        "video": video,
        "lab": {"brokers": lab.spec.brokers, "gpus": lab.spec.gpus, "cpus": list(lab.spec.cpus), "inter_num_gpus": share},
        "table": table,
        "rows": rows,
        **environment(settings),
    }
