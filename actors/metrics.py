"""The Prometheus endpoint of a run: the driver serves what the workers last reported.

The run loop already gathers every worker's ``WorkerStats`` once a second from every node of the
cluster (``actors.launcher.drain``), so one endpoint on the driver covers the whole cluster, for
either engine; ``pipeline.metrics`` turns those reports into metric families at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.registry import Collector

from pipeline.config import MetricsConfig
from pipeline.metrics import metric_families
from pipeline.stats import WorkerStats

__all__ = ["StatsCollector", "serve_metrics"]

logger = logging.getLogger(__name__)


class StatsCollector(Collector):
    """A prometheus_client collector over a callable that returns the latest worker reports."""

    def __init__(self, source: Callable[[], Iterable[WorkerStats]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self.source())


@contextmanager
def serve_metrics(cfg: MetricsConfig, source: Callable[[], Iterable[WorkerStats]]) -> Iterator[str | None]:
    """Serve ``/metrics`` on ``cfg.host:cfg.port`` while the block runs; yields its URL (None when off).

    A port already taken is a warning, not a failed run: the metrics are an extra, the frames are not.
    """
    if cfg.port is None:
        yield None
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(source))
    server: Any = None
    try:
        server, thread = start_http_server(cfg.port, addr=cfg.host, registry=registry)
    except OSError as exc:
        logger.warning("metrics: cannot serve on %s:%s (%s); this run exports none", cfg.host, cfg.port, exc)
        yield None
        return
    url = f"http://{cfg.host}:{server.server_port}/metrics"
    logger.info("metrics at %s", url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
