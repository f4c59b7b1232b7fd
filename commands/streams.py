"""``vapipe streams add|remove|list``: change a running pipeline's streams without a restart."""

from __future__ import annotations

from typing import Annotated

import typer

from commands.common import echo_json, settings
from pipeline.errors import ConfigError

__all__ = ["streams_app"]

streams_app = typer.Typer(
    no_args_is_help=True,
    help="Add or remove streams of a running `vapipe run` (through the compacted control topic), or list them.",
)


@streams_app.command("add")
def add(
    streams: Annotated[list[str], typer.Argument(help="ID=SOURCE: a camera URL, video file or webcam index, named.")],
) -> None:
    """Start publishing each stream in the running pipeline (it keeps its numbering across runs)."""
    from actors.streams import declare
    from pipeline.sources import parse_source

    declared: dict[str, str] = {}
    for text in streams:
        spec = parse_source(text)  # a bad URL scheme fails here, in one line
        if not spec.explicit_id:
            raise ConfigError(f"name the stream: ID={spec.display} (a stream added to a running pipeline needs an id)")
        declared[spec.stream_id] = spec.uri
    declare(settings(), declared)
    typer.echo(f"added {', '.join(declared)}")


@streams_app.command("remove")
def remove(stream_ids: Annotated[list[str], typer.Argument(help="Stream ids to end.")]) -> None:
    """End each stream: its producer stops and publishes its end, so its counts complete."""
    from actors.streams import withdraw

    withdraw(settings(), stream_ids)
    typer.echo(f"removed {', '.join(stream_ids)}")


@streams_app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print id -> source as JSON.")] = False) -> None:
    """The streams declared with `vapipe streams add` and not removed (passwords redacted)."""
    from actors.streams import declared

    rows = declared(settings())
    if as_json:
        echo_json(rows)
    elif not rows:
        typer.echo("no streams declared")
    else:
        for sid, source in rows.items():
            typer.echo(f"{sid:<24} {source}")
