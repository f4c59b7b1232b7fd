"""cluster/ray-cluster.yaml is a valid `ray up` config, checked with Ray's own code.

Nothing is started and no host is contacted: the config goes through the same
preparation and JSON-schema validation `ray up` runs before it opens any ssh
connection, and the `ray start` lines are parsed by Ray's own CLI parser.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster" / "ray-cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


def test_validates_against_ray_schema(raw):
    # The local provider needs prepare_config (-> prepare_local + fillout_defaults)
    # first: it adds the single internal node type and the defaults
    # (cluster_synced_files, ...) that validate_config requires.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)

    assert prepared["cluster_name"] == "vapipe"
    assert prepared["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    n_workers = len(raw["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n_workers


def test_passes_ray_up_bootstrap(raw):
    # The exact path `ray up` takes before contacting any node (no config cache
    # written: no_config_cache=True). The local provider's hooks are static.
    from ray.autoscaler._private.commands import _bootstrap_config

    resolved = _bootstrap_config(copy.deepcopy(raw), no_config_cache=True)
    assert resolved["provider"]["head_ip"] == raw["provider"]["head_ip"]


def test_schema_check_is_not_vacuous(raw):
    bad = prepare_config(copy.deepcopy(raw))
    bad["worker_start_ray_command"] = bad.pop("worker_start_ray_commands")  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_local_provider_rejects_node_types(raw):
    # Why the file declares GPUs with `ray start --num-gpus` and not with
    # available_node_types: `ray up` aborts on node types for on-prem clusters.
    bad = copy.deepcopy(raw)
    bad["available_node_types"] = {"gpu": {"node_config": {}, "resources": {"GPU": 1}}}
    with pytest.raises(click.ClickException):
        prepare_config(bad)


def _ray_start_args(commands: list[str]) -> list[list[str]]:
    """Arguments of every `ray start` in a list of shell command lines."""
    found = []
    for line in commands:
        for part in re.split(r";|&&", line):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                found.append(words[2:])
    return found


def _parse_ray_start(args: list[str]) -> dict:
    """Parse with Ray's own `ray start` click command, without running it."""
    from ray.scripts.scripts import start

    with start.make_context("ray start", list(args)) as ctx:
        return dict(ctx.params)


def test_head_and_gpu_workers(raw):
    provider = raw["provider"]
    assert provider["head_ip"]
    assert provider["worker_ips"], "at least one worker"
    assert provider["head_ip"] not in provider["worker_ips"]
    assert raw["auth"]["ssh_user"]
    assert any("pip install" in c for c in raw["setup_commands"])

    [head] = _ray_start_args(raw["head_start_ray_commands"])
    head_params = _parse_ray_start(head)
    assert head_params["head"] is True
    assert head_params["port"] == 6379
    assert head_params["dashboard_host"] == "127.0.0.1"  # the dashboard runs code: loopback, tunnel to it
    assert head_params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert raw["head_start_ray_commands"][0].strip() == "ray stop"

    [worker] = _ray_start_args(raw["worker_start_ray_commands"])
    worker_params = _parse_ray_start(worker)
    assert worker_params["head"] is False
    assert worker_params["address"] == "$RAY_HEAD_IP:6379"  # ray up exports RAY_HEAD_IP
    gpus = worker_params["num_gpus"]
    if gpus is None:  # declared as a custom resource instead
        gpus = yaml.safe_load(worker_params["resources"] or "{}").get("GPU", 0)
    assert gpus >= 1, "workers must offer a GPU to the inter actors"
    assert raw["worker_start_ray_commands"][0].strip() == "ray stop"


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_ray_start_keeps_token_auth_on(raw, key):
    """Without RAY_AUTH_MODE=token anyone who reaches the Ray ports runs code on every node."""
    [line] = [c for c in raw[key] if "ray start" in c]
    steps = [shlex.split(part) for part in re.split(r"&&", line)]
    assert ["export", "RAY_AUTH_MODE=token"] in steps, line
    assert steps.index(["export", "RAY_AUTH_MODE=token"]) < next(i for i, s in enumerate(steps) if s[:2] == ["ray", "start"])
    assert not any("RAY_AUTH_MODE=disabled" in c for c in raw[key])


def test_every_node_gets_the_token_and_nothing_else_is_exposed(raw):
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = CLUSTER_YAML.read_text()
    assert "--dashboard-host=0.0.0.0" not in "\n".join(raw["head_start_ray_commands"])
    assert "dashboard" in text and "RAY_AUTH_MODE=token" in text
