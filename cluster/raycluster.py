"""Join a running Ray cluster or start a local one; the dashboard stays on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.config import RayConfig
from pipeline.errors import PipelineError

__all__ = ["NAMESPACE", "ray_session", "connect"]

logger = logging.getLogger(__name__)

NAMESPACE = "vapipe"
"""Every vapipe actor lives in this Ray namespace, so `vapipe status` can find it by name."""


def connect(cfg: RayConfig, *, include_dashboard: bool = True) -> bool:
    """Connect this process to Ray. Returns True if it started a local instance (and so must stop it).

    Raises:
        PipelineError: the given address does not answer.
    """
    import ray

    if ray.is_initialized():
        return False
    # Actors ship our modules by import, not by pickle of the driver's files.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": True, "logging_level": logging.WARNING}
    if cfg.address:
        try:
            ray.init(address=cfg.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PipelineError(f"cannot join the Ray cluster at {cfg.address}: {exc}") from None
        return False
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host=cfg.dashboard_host,
        **kwargs,
    )
    return True


@contextmanager
def ray_session(cfg: RayConfig, *, include_dashboard: bool = True) -> Iterator[Any]:
    """Context manager around ``connect``: disconnects (and stops a local Ray) only if it connected.

    Inside a process already connected (a test session's Ray, a benchmark's), it leaves Ray up.
    """
    import ray

    connected_before = ray.is_initialized()
    connect(cfg, include_dashboard=include_dashboard)
    try:
        yield ray
    finally:
        if not connected_before and ray.is_initialized():
            ray.shutdown()
