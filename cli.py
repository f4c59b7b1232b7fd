"""vapipe command line: a thin typer layer over ``actors``, ``cluster`` and ``bench``.

Every command loads the settings (``--config``, ``VAPIPE_*``, ``--set``), calls one
function, and turns any ``PipelineError`` into a one-line message and exit 1. The
command groups live in ``commands/``; the pipeline's own commands are here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from commands.annotate import annotate
from commands.bench import bench_app, chaos
from commands.common import SourceOpt, configure, echo_json, progress_printer, settings
from commands.kafka import kafka_app, topics_app
from commands.lab import lab_app
from commands.streams import streams_app
from commands.top import status_json, top
from pipeline.config import Settings
from pipeline.errors import PipelineError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distributed video analytics: video -> Kafka -> YOLO on Ray -> crops and vehicle counts.",
)
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(bench_app, name="bench")
app.add_typer(lab_app, name="lab")
app.add_typer(streams_app, name="streams")
app.command("chaos")(chaos)
app.command("annotate")(annotate)
app.command("top")(top)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (default: built-in defaults, see configs/default.yaml).")
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: section.field=value (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the whole run summary as JSON instead of the short report.")]


@app.callback()
def _root(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    configure(config, set_)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # our own errors say it in one line


@app.command()
def produce(
    source: SourceOpt,
    fps: Annotated[float | None, typer.Option(help="Frames/s per stream; 0 = as fast as possible.")] = None,
    max_frames: Annotated[int | None, typer.Option(help="Stop each stream after N frames.")] = None,
) -> None:
    """Publish sources to topic A from this machine (one thread per stream, with progress bars)."""
    from tqdm import tqdm

    from actors.launcher import validate_sources
    from actors.producer import publish_streams
    from cluster.clients import check_broker
    from pipeline.sources import parse_source

    s = settings(**{"producer.fps": fps, "producer.max_frames": max_frames})
    specs = [parse_source(x) for x in source]
    check_broker(s.kafka)
    validate_sources(specs)
    bars = {spec.stream_id: tqdm(desc=spec.stream_id, unit="frame", position=i, leave=True) for i, spec in enumerate(specs)}
    try:
        results = publish_streams(s, specs, on_frame=lambda sid: lambda n: bars[sid].update(1))
    finally:
        for bar in bars.values():
            bar.close()
    echo_json(results)


def _run(
    s: Settings,
    sources: list[str],
    replicas: dict[str, int | None],
    follow: bool = False,
    calibration: bool = False,
    engine: str = "ray",
) -> Any:
    from actors.engines import parse_engines, run
    from actors.launcher import RunPlan
    from pipeline.sources import parse_source

    engines = parse_engines(engine)  # a typo fails before anything starts
    defaults = {"inter": s.inter.replicas, "crop": s.crop.replicas, "count": s.count.replicas}
    plan = RunPlan(
        sources=[parse_source(x) for x in sources],
        replicas={stage: replicas.get(stage) or n for stage, n in defaults.items()},
        follow=follow,
        allow_calibration=calibration,
    )
    summary = run(s, plan, engines, on_progress=progress_printer())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    return summary


def _print_summary(summary: Any, as_json: bool) -> None:
    if as_json:
        echo_json(summary.to_dict() | {"summary_path": summary.summary_path})
    else:
        typer.echo(summary.report())


@app.command()
def run(
    source: SourceOpt,
    inter: Annotated[int | None, typer.Option(help="InterConsumer (YOLO) replicas.")] = None,
    crop: Annotated[int | None, typer.Option(help="Crop replicas.")] = None,
    count: Annotated[int | None, typer.Option(help="Count replicas.")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join ('auto' or host:port); default starts a local Ray.")
    ] = None,
    fps: Annotated[float | None, typer.Option(help="Producer frames/s per stream; 0 = as fast as possible.")] = None,
    max_frames: Annotated[int | None, typer.Option(help="Stop each stream after N frames.")] = None,
    model: Annotated[str | None, typer.Option(help="Ultralytics model name or path.")] = None,
    follow: Annotated[bool, typer.Option(help="Keep running for endless streams until Ctrl-C, then drain.")] = False,
    calibration: Annotated[bool, typer.Option(help="Allow the sleep:Nms calibration detector.")] = False,
    engine: Annotated[str, typer.Option(help="ray, faust, or per stage: inter=ray,crop=faust,count=faust.")] = "ray",
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline with N replicas per stage (Ray actors or Faust workers); report and JSON summary."""
    s = settings(**{"ray.address": address, "producer.fps": fps, "producer.max_frames": max_frames, "model.name": model})
    summary = _run(s, source, {"inter": inter, "crop": crop, "count": count}, follow, calibration, engine)
    _print_summary(summary, as_json)


@app.command()
def status(
    address: Annotated[str, typer.Option(help="Ray cluster to ask.")] = "auto",
    engine: Annotated[str, typer.Option(help="ray (ask the cluster) or faust (the latest Faust run's workers).")] = "ray",
    as_json: Annotated[
        bool, typer.Option("--json", help="Every worker's full report as JSON (what `vapipe top` shows).")
    ] = False,
) -> None:
    """Load of every running vapipe actor or Faust worker (frames, frames/s, lag, node, GPU)."""
    from pipeline.live import camera_line
    from pipeline.stats import WorkerStats

    if engine == "faust":
        from actors.faust.engine import faust_status

        rows: dict[str, WorkerStats | str] = {st["name"]: WorkerStats.from_dict(st) for st in faust_status(settings())}
    elif engine == "ray":
        from actors.ray.engine import actor_stats

        rows = actor_stats(address)
    else:
        raise PipelineError(f"invalid --engine {engine!r}: expected ray or faust")
    if as_json:
        echo_json(status_json(rows))
        return
    if not rows:
        typer.echo(f"no vapipe {'actors are' if engine == 'ray' else 'workers are'} running")
        return
    typer.echo(f"{'worker':<28}{'frames':>8}{'f/s':>8}{'lag':>8}  node / pid / gpus / peak MB / problem")
    for name, st in rows.items():
        if isinstance(st, str):
            typer.echo(f"{name:<28} {st}")
            continue
        problem = st.last_error or st.crashed or ("ok" if st.running else "stopped")
        if st.camera is not None:  # a live source: connected / reconnecting (since, attempts) / last frame age
            problem = camera_line(st.camera)
        typer.echo(
            f"{name:<28}{st.frames_out:>8}{st.fps:>8}{'-' if st.lag is None else st.lag!s:>8}  "
            f"{st.node or '-'} / {st.pid or '-'} / {','.join(st.gpus) or '-'} / {st.peak_rss_mb or '-'} / {problem}"
        )


@app.command()
def counts(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the table as JSON (each stream's snapshot, less the tracker's resume state).")
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune", help="Drop finished streams of unnamed sources (id 'name@run') from the table and its changelog."
        ),
    ] = False,
) -> None:
    """Print the current vehicle table (read from its changelog topic)."""
    from actors.stages import prune_table, read_table
    from pipeline.count_table import readable, traffic_figures
    from pipeline.stats import traffic_line

    if prune:
        gone = prune_table(settings())
        typer.echo(f"pruned {len(gone)} finished unnamed stream(s){': ' + ', '.join(gone) if gone else ''}", err=True)
    table = read_table(settings())
    if as_json:
        echo_json({sid: readable(state) for sid, state in table.items()})
        return
    if not table:
        typer.echo("the count table is empty")
        return
    for stream_id, state in sorted(table.items()):
        totals = ", ".join(f"{k}={v}" for k, v in sorted(state.get("totals", {}).items())) or "no vehicles"
        done = "complete" if state.get("complete") else "running"  # skipped frames count toward completion
        if "traffic" not in state:
            typer.echo(f"{stream_id}: {totals} ({state.get('frames_applied', 0)} frames, {done})")
            continue
        typer.echo(f"{stream_id}: {traffic_line(traffic_figures(state))} ({state.get('frames_applied', 0)} frames, {done})")
        typer.echo(f"  boxes counted over all frames: {totals}")


@app.command()
def demo(
    source: Annotated[
        list[str] | None, typer.Option("--source", "-s", help="Any video (default: the ultralytics bus photo, panned).")
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per stream.")] = 60,
    model: Annotated[
        str | None, typer.Option(help="Model name or path (default: VAPIPE_MODEL__NAME or the official yolov8n.pt).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start Kafka and Ray if needed, run the pipeline on a short clip, print the report, stop what it started."""
    from cluster.broker import local_broker
    from pipeline.sources import demo_image_path

    s = settings(**{"model.name": model, "producer.max_frames": frames})
    with local_broker(
        s.broker, s.kafka, on_start=lambda b: typer.echo(f"starting a local Kafka broker at {b.bootstrap} ...", err=True)
    ):
        summary = _run(s, source or [f"pan:{demo_image_path()}:{frames}"], {})
    _print_summary(summary, as_json)


def main() -> None:
    """Console entry point: one line and a non-zero exit for every expected failure."""
    try:
        app()
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
