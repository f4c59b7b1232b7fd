"""Join a running Ray cluster or start a local one; the dashboard stays on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipeline.config import RayConfig
from pipeline.errors import PipelineError

__all__ = ["NAMESPACE", "ray_session", "connect", "placement_shortfall"]

logger = logging.getLogger(__name__)

NAMESPACE = "vapipe"
"""Every vapipe actor lives in this Ray namespace, so `vapipe status` can find it by name."""


def connect(cfg: RayConfig, *, include_dashboard: bool = True) -> bool:
    """Connect this process to Ray. Returns True if it started a local instance (and so must stop it).

    Raises:
        PipelineError: the given address does not answer.
    """
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return False
    # Actors ship our modules by import, not by pickle of the driver's files.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Token authentication on (a local Ray creates its token in ~/.ray/auth_token; joining a cluster
    # needs that cluster's token there or in RAY_AUTH_TOKEN_PATH) unless the config opts out.
    mode = "token" if cfg.token_auth else "disabled"
    if os.environ.get("RAY_AUTH_MODE") != mode:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = mode
        Config.initialize("")  # Ray caches the mode per process; its own _enable_token_auth does the same
    if not cfg.token_auth:
        logger.warning("ray.token_auth is off: anyone who reaches this Ray cluster's ports can run code on it")
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": True, "logging_level": logging.WARNING}
    if cfg.address:
        try:
            ray.init(address=cfg.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as exc:
            hint = ""
            if cfg.token_auth and isinstance(exc, AuthenticationError | RuntimeError) and "token" in str(exc).lower():
                hint = " (token authentication: copy the cluster's ~/.ray/auth_token here or set RAY_AUTH_TOKEN_PATH)"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"cannot join the Ray cluster at {cfg.address}: {first}{hint}") from None
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


def placement_shortfall(requests: Mapping[str, tuple[int, Mapping[str, float]]], capacity: Mapping[str, float]) -> list[str]:
    """What the cluster lacks for every replica to be placed at once, one line per stage and resource.

    Only GPUs and custom resources count: CPUs are logical and fractional, and a stage short of
    them still runs, slower. Totals over the cluster, so a fraction that only fits split across
    nodes (0.6 GPU on two nodes of one) is not caught here; Ray then waits as for any shortfall.

    Args:
        requests: stage -> (replicas, resources each replica requests, e.g. ``{"GPU": 0.5}``).
        capacity: ``ray.cluster_resources()``.

    Returns:
        ``[]`` when everything fits, else lines like ``inter: 3 replicas need GPU 1 each, the cluster has 1 (room for 1)``.

    Example:
        >>> placement_shortfall({"inter": (3, {"GPU": 1})}, {"CPU": 8, "GPU": 2})
        ['inter: 3 replicas need GPU 1 each, the cluster has 2 (room for 2)']
    """
    needed: dict[str, float] = {}
    for _, (replicas, each) in requests.items():
        for name, amount in each.items():
            if name != "CPU" and amount > 0:
                needed[name] = needed.get(name, 0.0) + replicas * amount
    out = []
    for stage, (replicas, each) in requests.items():
        for name, amount in sorted(each.items()):
            if name == "CPU" or amount <= 0 or needed[name] <= capacity.get(name, 0.0) + 1e-9:
                continue
            have = capacity.get(name, 0.0)
            out.append(
                f"{stage}: {replicas} replica{'s' * (replicas != 1)} need{'s' * (replicas == 1)} {name} {amount:g} each, "
                f"the cluster has {have:g} (room for {int(have / amount + 1e-9)})"
                + (
                    f" and other stages need {needed[name] - replicas * amount:g} of it"
                    if needed[name] > replicas * amount
                    else ""
                )
            )
    return out
