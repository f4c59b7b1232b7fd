"""The Ray helper starts a local instance (dashboard off here) and shuts down only what it started."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_ray_helper_starts_and_stops_a_local_instance() -> None:
    import ray

    from cluster.raycluster import ray_session
    from pipeline.config import RayConfig

    if ray.is_initialized():  # the session fixture's Ray is up: the helper must join it, not start another
        from cluster.raycluster import connect

        assert connect(RayConfig()) is False
        with ray_session(RayConfig(), include_dashboard=False):
            pass
        assert ray.is_initialized(), "ray_session stopped a Ray it did not start"
        return
    with ray_session(RayConfig(num_cpus=1), include_dashboard=False):
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 1
    assert not ray.is_initialized()
