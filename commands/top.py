"""``vapipe top`` and ``vapipe status --json``: every stage and camera of a running pipeline, live.

``top_view`` is a pure function from one round of worker reports to rich tables, so the view is
tested on a fixed snapshot; the command redraws it once a second from the same reports
``vapipe status --json`` prints. rich draws with plain terminal codes, so it works over SSH.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.stats import STAGES, LatencyHistogram, WorkerStats

__all__ = ["top", "top_view", "status_json", "stage_rows"]

Rows = dict[str, WorkerStats | str]


def _latency(s: WorkerStats) -> LatencyHistogram:
    """The latency a replica's row shows: publish to count for count, per-frame inference for inter."""
    if s.stage == "count":
        return s.histogram
    if s.stage == "inter" and "inference" in s.timings:
        return LatencyHistogram.from_dict(s.timings["inference"])
    return LatencyHistogram()


def _ms(hist: LatencyHistogram) -> str:
    return f"{hist.percentile(0.5):.0f} / {hist.percentile(0.99):.0f}" if hist.count else "-"


def _problem(s: WorkerStats) -> str:
    return s.last_error or s.crashed or s.stuck or ("" if s.running else "stopped")


def stage_rows(rows: Rows) -> list[dict[str, Any]]:
    """One row per stage, summed (frames, f/s, lag) or worst-of (lag seconds) over its replicas."""
    workers = [s for s in rows.values() if isinstance(s, WorkerStats)]
    out = []
    for stage in STAGES:
        members = [s for s in workers if s.stage == stage]
        hist = LatencyHistogram()
        for s in members:
            hist.merge(_latency(s))
        out.append(
            {
                "stage": stage,
                "replicas": len(members),
                "frames": sum(s.frames_out for s in members),
                "fps": round(sum(s.fps for s in members), 1),
                "lag": sum(s.lag or 0 for s in members),
                "lag_s": max((s.lag_s or 0.0 for s in members), default=0.0),
                "latency": _ms(hist),
                "restarts": sum(s.restarts for s in members),
                "errors": sum(s.dead_lettered + s.retries for s in members),
            }
        )
    return out


def top_view(rows: Rows, title: str = "vapipe top") -> Group:
    """Three tables: stages, cameras (producers), and every replica."""
    stages = Table(title=title, title_justify="left", expand=False)
    for col in ("stage", "replicas", "frames", "f/s", "lag", "lag s", "p50 / p99 ms", "restarts", "dead+retried"):
        stages.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for r in stage_rows(rows):
        stages.add_row(
            r["stage"],
            str(r["replicas"]),
            str(r["frames"]),
            f"{r['fps']:.1f}",
            str(r["lag"]),
            f"{r['lag_s']:.1f}",
            r["latency"],
            str(r["restarts"]),
            str(r["errors"]),
        )
    cameras = Table(title="cameras", title_justify="left")
    for col in ("stream", "f/s", "published", "skipped", "restarts", "node", "problem"):
        cameras.add_column(
            col, justify="right" if col in ("f/s", "published", "skipped", "restarts") else "left", no_wrap=col == "stream"
        )
    replicas = Table(title="replicas", title_justify="left")
    for col in ("worker", "f/s", "frames", "busy", "lag", "lag s", "p50 / p99 ms", "restarts", "node", "problem"):
        # On a narrow terminal, node and problem give way first; names and figures never wrap.
        replicas.add_column(
            col,
            justify="left" if col in ("worker", "node", "problem") else "right",
            no_wrap=col not in ("node", "problem"),
            min_width=max((len(n) for n in rows if not n.startswith("producer-")), default=6) if col == "worker" else None,
        )
    for name, s in rows.items():
        if isinstance(s, str):
            replicas.add_row(name, *["-"] * 8, Text(s, style="red"))
            continue
        problem = Text(_problem(s), style="red" if s.last_error or s.crashed or s.stuck else "yellow")
        if s.stage == "producer":
            cameras.add_row(
                s.stream_id or name,
                f"{s.fps:.1f}",
                str(s.frames_out),
                str(s.frames_skipped),
                str(s.restarts),
                s.node or "-",
                problem,
            )
            continue
        replicas.add_row(
            name,
            f"{s.fps:.1f}",
            str(s.frames_out),
            f"{s.busy:.0%}",
            "-" if s.lag is None else str(s.lag),
            "-" if s.lag_s is None else f"{s.lag_s:.1f}",
            _ms(_latency(s)),
            str(s.restarts),
            s.node or "-",
            problem,
        )
    return Group(stages, cameras, replicas)


def status_json(rows: Rows) -> dict[str, Any]:
    """``vapipe status --json``: every worker's full report, or why it did not answer."""
    return {name: s.to_dict() if isinstance(s, WorkerStats) else {"name": name, "unavailable": s} for name, s in rows.items()}


def top(
    address: Annotated[str, typer.Option(help="Ray cluster to watch.")] = "auto",
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    iterations: Annotated[int | None, typer.Option(help="Stop after N refreshes (default: until Ctrl-C).")] = None,
) -> None:
    """Live view of every stage and camera of the running pipeline: f/s, lag, latency, restarts, errors."""
    from actors.ray.engine import named_actor_stats
    from cluster.raycluster import ray_session
    from pipeline.config import RayConfig

    console = Console()
    with ray_session(RayConfig(address=address), include_dashboard=False):
        done = 0
        # Not a terminal (piped, tmux capture, a test): rich prints only the last view, when the loop ends.
        with Live(console=console, auto_refresh=False) as live:
            while iterations is None or done < iterations:
                started = time.monotonic()
                rows = named_actor_stats(timeout_s=max(interval, 1.0))
                view = top_view(rows, title=f"vapipe top  {time.strftime('%H:%M:%S')}  ({len(rows)} workers)")
                live.update(view if rows else Text("no vapipe actors are running"), refresh=True)
                done += 1
                if iterations is not None and done >= iterations:
                    break
                time.sleep(max(interval - (time.monotonic() - started), 0.0))
