"""``vapipe kafka`` and ``vapipe topics``: the local broker and the pipeline's topics."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from commands.common import settings

__all__ = ["kafka_app", "topics_app"]

kafka_app = typer.Typer(no_args_is_help=True, help="Run a local Apache Kafka broker (KRaft) from Maven-resolved jars.")
topics_app = typer.Typer(no_args_is_help=True, help="Create, list, describe and delete the pipeline's topics.")
TopicNames = Annotated[list[str] | None, typer.Argument(help="Topics (default: the configured ones).")]


def broker() -> Any:
    from cluster.broker import KafkaBroker

    s = settings()
    return KafkaBroker(s.broker, s.kafka)


@kafka_app.command("install")
def kafka_install() -> None:
    """Resolve the broker jars with Maven (done automatically by start)."""
    typer.echo(str(broker().install()))


@kafka_app.command("start")
def kafka_start() -> None:
    """Start the broker in the background unless it already runs; wait until it answers."""
    st = broker().start()
    if st.already_running:
        typer.echo(f"Kafka already running (pid {st.pid}) at {st.bootstrap}")
    else:
        typer.echo(f"Kafka started (pid {st.pid}) at {st.bootstrap}, ready in {st.ready_s:.1f}s; state in {st.state_dir}")


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the broker this state folder started (and nothing else)."""
    typer.echo("Kafka stopped" if broker().stop() else "Kafka was not running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Is the broker running, and where."""
    st = broker().status()
    typer.echo(f"Kafka running (pid {st.pid}) at {st.bootstrap}" if st.running else f"Kafka not running (state {st.state_dir})")
    if not st.running:
        raise typer.Exit(3)


@kafka_app.command("logs")
def kafka_logs(lines: Annotated[int, typer.Option("--lines", "-n")] = 50) -> None:
    """Last lines of the broker log."""
    typer.echo(broker().logs(lines))


@topics_app.command("create")
def topics_create() -> None:
    """Create the configured topics that are missing (idempotent)."""
    from cluster.topics import create_topics

    s = settings()
    for name, state in create_topics(s.kafka, s.topics.all()).items():
        typer.echo(f"{name}: {state}")


@topics_app.command("list")
def topics_list() -> None:
    from cluster.topics import list_topics

    for name in list_topics(settings().kafka):
        typer.echo(name)


@topics_app.command("describe")
def topics_describe(names: TopicNames = None) -> None:
    from cluster.topics import describe_topics

    s = settings()
    for t in describe_topics(s.kafka, names or [t.name for t in s.topics.all()]):
        typer.echo(f"{t.name}\tpartitions={t.partitions}\treplication={t.replication_factor}")


@topics_app.command("delete")
def topics_delete(
    names: TopicNames = None, yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False
) -> None:
    from cluster.topics import delete_topics

    s = settings()
    targets = names or [t.name for t in s.topics.all()]
    if not yes:
        typer.confirm(f"delete {', '.join(targets)}?", abort=True)
    for name in delete_topics(s.kafka, targets):
        typer.echo(f"deleted {name}")
