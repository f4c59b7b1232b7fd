"""``vapipe bench`` and ``vapipe chaos``: experiments that drive real runs and write reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from commands.common import OutOpt, default_model, default_video, echo_json, ints, progress_printer, settings
from pipeline.errors import PipelineError

__all__ = ["bench_app", "chaos"]

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured side by side.")
Source = Annotated[str, typer.Option("--source", "-s")]
Model = Annotated[str | None, typer.Option()]
Replicas = Annotated[str, typer.Option(help="Replica counts, comma-separated.")]
Repeat = Annotated[int, typer.Option(help="Runs per replica count.")]
ScalingModel = Annotated[str, typer.Option(help="Model; the calibration detector measures the pipeline's own cost.")]


@bench_app.command("overhead")
def bench_overhead(
    source: Source = "",
    frames: Annotated[int, typer.Option(help="Frames of the video to use.")] = 300,
    repeat: Annotated[int, typer.Option(help="Pipeline runs, each between two bare-loop runs.")] = 3,
    model: Model = None,
    out: OutOpt = Path("output/bench/overhead"),
) -> None:
    """Pipeline (1 InterConsumer) frames/s against a bare ultralytics loop over the same frames."""
    from bench.experiments import overhead
    from bench.report import write_report

    result = overhead(
        settings(**{"model.name": model}), source or default_video(), frames, repeat, on_progress=progress_printer()
    )
    write_report(result, out)
    echo_json(result)


@bench_app.command("strong")
def bench_strong(
    replicas: Replicas = "1,2,3",
    frames: Annotated[int, typer.Option(help="Frames of the fixed input.")] = 600,
    repeat: Repeat = 5,
    model: ScalingModel = "sleep:40ms",
    source: Source = "",
    out: OutOpt = Path("output/bench/strong"),
) -> None:
    """Strong scaling: fixed input, r replicas of every stage; speedup and efficiency."""
    _scaling("strong", replicas, frames, repeat, model, source, out)


@bench_app.command("weak")
def bench_weak(
    replicas: Replicas = "1,2,3",
    frames_per_producer: Annotated[int, typer.Option(help="Frames each of the r producers publishes.")] = 300,
    repeat: Repeat = 5,
    model: ScalingModel = "sleep:40ms",
    source: Source = "",
    out: OutOpt = Path("output/bench/weak"),
) -> None:
    """Weak scaling: r producers and r replicas of every stage; time should stay flat."""
    _scaling("weak", replicas, frames_per_producer, repeat, model, source, out)


def _scaling(mode: str, replicas: str, frames: int, repeat: int, model: str, source: str, out: Path) -> None:
    from bench.experiments import scaling
    from bench.report import write_report

    s = settings(**{"model.name": model})
    result = scaling(s, mode, ints(replicas), frames, repeat, source or default_video(), on_progress=progress_printer())  # type: ignore[arg-type]
    folder = write_report(result, out)
    echo_json(result["table"])
    typer.echo(f"report: {folder / 'README.md'}", err=True)


@bench_app.command("sweep")
def bench_sweep(
    batch: Annotated[str, typer.Option(help="Inference/poll batch sizes.")] = "1,4,8,16",
    fps: Annotated[str, typer.Option(help="Input frame rates; 'max' = as fast as possible.")] = "5,10,20,max",
    jpeg_quality: Annotated[str, typer.Option(help="JPEG qualities.")] = "70,90",
    frames: Annotated[int, typer.Option(help="Frames per run.")] = 60,
    model: Model = None,
    source: Source = "",
    out: OutOpt = Path("output/bench/sweep"),
) -> None:
    """The study's future work: batch size, input frame rate and JPEG quality vs throughput and agreement."""
    from bench.experiments import sweep
    from bench.report import write_report

    fps_values = [0.0 if x.strip() == "max" else float(x) for x in fps.split(",") if x.strip()]
    result = sweep(
        settings(**{"model.name": model}),
        ints(batch),
        fps_values,
        ints(jpeg_quality),
        frames,
        source or default_video(),
        on_progress=progress_printer(),
    )
    folder = write_report(result, out)
    echo_json(
        [
            {k: r[k] for k in ("factor", "batch", "input_fps", "jpeg_quality", "fps", "latency_p50_ms", "agreement")}
            for r in result["rows"]
        ]
    )
    typer.echo(f"report: {folder / 'README.md'}", err=True)


@bench_app.command("compare")
def bench_compare(
    engines: Annotated[str, typer.Option(help="Engines to compare, comma-separated.")] = "ray,faust",
    replicas: Replicas = "1,2,3",
    frames: Annotated[int, typer.Option(help="Frames of the fixed input.")] = 300,
    repeat: Annotated[int, typer.Option(help="Runs per engine, model and replica count.")] = 1,
    models: Annotated[str, typer.Option(help="Models, comma-separated: the calibration detector and the real model.")] = "",
    source: Source = "",
    out: OutOpt = Path("output/bench/compare"),
) -> None:
    """Strong scaling of each engine side by side: throughput, speedup, latency p50/p99, memory per worker."""
    from bench.experiments import compare_engines
    from bench.report import write_report

    model_list = [m.strip() for m in models.split(",") if m.strip()] or ["sleep:40ms", default_model()]
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    result = compare_engines(
        settings(),
        engine_list,
        ints(replicas),
        frames,
        repeat,
        model_list,
        source or default_video(),
        on_progress=progress_printer(),
    )
    folder = write_report(result, out)
    echo_json(result["table"])
    typer.echo(f"report: {folder / 'README.md'}", err=True)


def chaos(
    source: Source = "",
    frames: Annotated[int, typer.Option(help="Frames of the video per run.")] = 90,
    faults: Annotated[str, typer.Option(help="Comma-separated faults (default: all); see --list.")] = "",
    replicas: Annotated[int, typer.Option(help="Replicas of every stage.")] = 2,
    model: Model = None,
    list_faults: Annotated[bool, typer.Option("--list", help="List the faults and exit.")] = False,
    out: OutOpt = Path("output/bench/chaos"),
) -> None:
    """Inject faults into real runs; one table: lost, counted twice, crops, dead-lettered, recovery.

    Exits 1 if any fault lost a frame, counted one twice or changed the crop corpus.
    """
    from bench.chaos import FAULTS, failed_faults, table_lines
    from bench.chaos import chaos as run_chaos
    from bench.report import write_report
    from commands.kafka import broker

    if list_faults:
        for name, what in FAULTS.items():
            typer.echo(f"{name:16} {what}")
        return
    s = settings(**{"model.name": model})
    chosen = [f.strip() for f in faults.split(",") if f.strip()] or list(FAULTS)
    restart = None
    if "broker-restart" in chosen:
        local = broker()
        if not local.status().running:
            raise PipelineError(
                f"fault broker-restart needs the broker started by `vapipe kafka start` (state "
                f"{s.broker.state_dir}); leave it out with --faults"
            )

        def restart() -> None:
            local.stop()
            local.start()

    result = run_chaos(s, source or default_video(), frames, chosen, replicas, restart, on_progress=progress_printer())
    folder = write_report(result, out)
    for line in table_lines(result):
        typer.echo(line)
    typer.echo(f"report: {folder / 'README.md'}", err=True)
    bad = failed_faults(result)
    if bad:
        raise PipelineError(f"faults that lost or double-counted frames, or changed the crops or the table: {', '.join(bad)}")
