"""``vapipe kafka`` and ``vapipe topics``: the local broker and the pipeline's topics."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from commands.common import settings

__all__ = ["kafka_app", "topics_app"]

kafka_app = typer.Typer(no_args_is_help=True, help="Run a local Apache Kafka broker (KRaft) from Maven-resolved jars.")
topics_app = typer.Typer(no_args_is_help=True, help="Create, list, describe and delete the pipeline's topics.")
TopicNames = Annotated[list[str] | None, typer.Argument(help="Topics (default: the configured ones).")]


def broker(secure: bool = False) -> Any:
    from cluster.broker import KafkaBroker

    s = settings()
    cfg = s.broker.model_copy(update={"secure": True}) if secure else s.broker
    return KafkaBroker(cfg, s.kafka)


def kafka_cluster(brokers: int | None = None, secure: bool = False) -> Any:
    """The brokers ``vapipe kafka start --brokers N`` runs; None: as many as the state folder holds."""
    from cluster.broker import KafkaCluster

    s = settings()
    cfg = s.broker.model_copy(update={"secure": True}) if secure else s.broker
    if brokers is None:
        return KafkaCluster.existing(cfg, s.kafka)
    return KafkaCluster(cfg, s.kafka, brokers)


@kafka_app.command("install")
def kafka_install() -> None:
    """Resolve the broker jars with Maven (done automatically by start)."""
    typer.echo(str(broker().install()))


@kafka_app.command("start")
def kafka_start(
    brokers: Annotated[
        int, typer.Option("--brokers", min=1, help="KRaft nodes (broker+controller each, one quorum) on port, port+2, ...")
    ] = 1,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="SASL_SSL with SCRAM-SHA-512, a CA and one user per role in the state folder, and ACLs so each "
            "role does only its job (docs/security.md). A state folder once secured stays secured; with --brokers N "
            "every node shares one CA and one set of users.",
        ),
    ] = False,
) -> None:
    """Start the broker(s) in the background unless they already run; wait until each answers."""
    cluster = kafka_cluster(brokers, secure)
    for st in cluster.start():
        if st.already_running:
            typer.echo(f"Kafka already running (pid {st.pid}) at {st.bootstrap}")
        else:
            typer.echo(f"Kafka started (pid {st.pid}) at {st.bootstrap}, ready in {st.ready_s:.1f}s; state in {st.state_dir}")
    if brokers > 1:
        typer.echo(
            f"bootstrap: {cluster.bootstrap} (set kafka.bootstrap_servers, and topics' replication_factor up to {brokers})"
        )
    if cluster.security is not None:  # --secure, or a state folder secured before
        from cluster.security import apply_acls

        n = apply_acls(cluster.admin_kafka, settings())
        typer.echo(f"secured: SASL_SSL, SCRAM-SHA-512, {n} ACL rules; `vapipe kafka users` says how to hand out credentials")


@kafka_app.command("users")
def kafka_users() -> None:
    """How to hand each machine the credentials of the roles it runs (file paths, never passwords)."""
    from cluster.security import SecurityFiles, users_text

    cluster = kafka_cluster()
    typer.echo(users_text(settings(), cluster.security or SecurityFiles.of(cluster.state_dir), cluster.bootstrap))


@kafka_app.command("acls")
def kafka_acls() -> None:
    """Write the ACLs of the configured topics and groups again (after renaming them)."""
    from cluster.security import apply_acls

    cluster = kafka_cluster()
    if cluster.security is None:
        raise typer.BadParameter("this broker is not secured (start it with --secure)")
    typer.echo(f"{apply_acls(cluster.admin_kafka, settings())} ACL rules in place")


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the broker(s) this state folder started (and nothing else)."""
    typer.echo("Kafka stopped" if kafka_cluster().stop() else "Kafka was not running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Are the brokers running, and where; exits 3 unless every one runs."""
    statuses = kafka_cluster().status()
    for st in statuses:
        typer.echo(
            f"Kafka running (pid {st.pid}) at {st.bootstrap}" if st.running else f"Kafka not running (state {st.state_dir})"
        )
    if not all(st.running for st in statuses):
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
