"""``vapipe lab``: three hosts on this machine (network namespaces) running Kafka and Ray, for people.

The same lab the tests and ``vapipe chaos --lab`` use; see ``cluster/lab.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["lab_app", "StateOpt"]

lab_app = typer.Typer(no_args_is_help=True, help="Three hosts (network namespaces) running Kafka and Ray on this machine.")
StateOpt = Annotated[Path, typer.Option("--state", help="The lab's state folder (brokers, token, settings).")]
DEFAULT_STATE = Path(".cache/lab")


@lab_app.command("up")
def lab_up(
    state: StateOpt = DEFAULT_STATE,
    brokers: Annotated[int, typer.Option(help="Kafka brokers on host1 (one KRaft quorum).")] = 3,
    gpus: Annotated[int, typer.Option(help="GPUs host3's Ray worker declares.")] = 1,
    inter_per_gpu: Annotated[int, typer.Option(help="InterConsumers sharing one GPU.")] = 2,
    subnet: Annotated[str, typer.Option(help="The lab's /24 in 198.18.0.0/15, three octets.")] = "198.18.0",
    tag: Annotated[str, typer.Option(help="Prefix of its namespaces and links.")] = "vpl",
) -> None:
    """Create the hosts, start the brokers and the Ray cluster; print how to drive it."""
    from cluster.lab import Lab, LabSpec

    spec = LabSpec(tag=tag, subnet=subnet, brokers=brokers, gpus=gpus, inter_per_gpu=inter_per_gpu, state_dir=str(state))
    lab = Lab(spec).up()
    typer.echo(f"lab up: brokers {spec.bootstrap} (host1), Ray head {spec.head} (host2), {gpus} GPU on host3")
    typer.echo(f"drive it:  vapipe lab exec host2 -- vapipe --config {lab.settings_file} run -s VIDEO --inter 2")
    typer.echo(f"dashboard: {spec.dashboard}   stop:  vapipe lab down --state {state}")


@lab_app.command("down")
def lab_down(state: StateOpt = DEFAULT_STATE) -> None:
    """Stop everything the lab runs and remove its hosts."""
    from cluster.lab import Lab

    Lab.load(state).down()
    typer.echo("lab down")


@lab_app.command("status")
def lab_status(state: StateOpt = DEFAULT_STATE) -> None:
    """The lab's hosts, processes and Ray nodes; exits 3 when it is not up."""
    from cluster.lab import HOSTS, Lab

    lab = Lab.load(state)
    if not lab.is_up():
        typer.echo("lab not up")
        raise typer.Exit(3)
    nodes = {n["node_ip"]: n for n in lab.ray_nodes() if n.get("state") == "ALIVE"}
    for host in HOSTS:
        addr = lab.spec.address(host)
        res = nodes.get(addr, {}).get("resources_total", {})
        ray = ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if not k.startswith(("node:", "memory", "object_store")))
        typer.echo(f"{host} {addr}: {len(lab.pids(host))} processes; Ray: {ray or 'no node'}")


@lab_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lab_exec(
    ctx: typer.Context,
    host: Annotated[str, typer.Argument(help="host1, host2 or host3.")],
    state: StateOpt = DEFAULT_STATE,
) -> None:
    """Run a command inside a lab host with the lab's Ray token, e.g. `vapipe lab exec host2 -- vapipe run ...`."""
    from cluster.lab import HOSTS, Lab

    if host not in HOSTS:
        raise typer.BadParameter(f"host must be one of {', '.join(HOSTS)}, got {host!r}")
    argv = [a for a in ctx.args if a != "--"]
    if argv and argv[0] == "vapipe":
        argv[0] = str(Path(sys.executable).with_name("vapipe"))
    raise typer.Exit(subprocess.call(Lab.load(state).exec_argv(host, argv)))
