"""``vapipe annotate``: one stream, rendered with its tracks, counting lines and running counts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands.common import echo_json, settings

__all__ = ["annotate"]


def annotate(
    stream: Annotated[str, typer.Argument(help="Stream id, as in `vapipe counts`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Video file to write (mp4v).")] = Path("annotated.mp4"),
    max_frames: Annotated[int | None, typer.Option(help="Render only the first N frames.")] = None,
    fps: Annotated[float | None, typer.Option(help="Frames/s of the video (default: the stream's capture rate).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Render STREAM from topic B with its tracked boxes and ids, the counting lines and running in/out counts."""
    from dataclasses import asdict

    from actors.annotate import annotate_stream
    from cluster.clients import check_broker

    s = settings()
    check_broker(s.kafka)
    result = annotate_stream(s, stream, out, max_frames=max_frames, fps=fps)
    if as_json:
        echo_json(asdict(result))
        return
    counts = ", ".join(f"{line} in {c['in']} out {c['out']}" for line, c in result.counts.items()) or "no counting lines"
    typer.echo(
        f"wrote {result.frames} frames ({result.tracked_frames} tracked) at {result.fps:g} frames/s to {result.path}; {counts}"
    )
