"""``vapipe bench`` and ``vapipe chaos``: experiments that drive real runs and write reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from commands.common import OutOpt, default_model, default_video, echo_json, ints, progress_printer, settings, shared_videos
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


@bench_app.command("autoscale")
def bench_autoscale(
    source: Source = "",
    model: Annotated[
        str, typer.Option(help="Calibration detector sized so one InterConsumer keeps up with one camera.")
    ] = "sleep:60ms",
    fps: Annotated[float, typer.Option(help="Frames/s of each camera.")] = 10.0,
    step_at: Annotated[float, typer.Option(help="Seconds before cameras b and c join.")] = 15.0,
    step_frames: Annotated[int, typer.Option(help="Frames cameras b and c publish.")] = 300,
    max_replicas: Annotated[int, typer.Option(help="inter.autoscale.max.")] = 3,
    target_lag: Annotated[float, typer.Option(help="inter.autoscale.target_lag_s.")] = 2.0,
    cooldown: Annotated[float, typer.Option(help="inter.autoscale.cooldown_s.")] = 5.0,
    out: OutOpt = Path("output/bench/autoscale"),
) -> None:
    """Step load (1 camera, 3, then 1) against autoscaled InterConsumers: replicas, lag, lost, counted twice."""
    import dataclasses
    import io
    import time

    from rich.console import Console

    from bench.autoscale import autoscale_bench, scrape, write_autoscale_report, write_board
    from commands.top import top_view

    printer = progress_printer()
    scrapes: list[tuple[float, dict[str, float]]] = []
    peak = {"replicas": 0, "view": ""}
    out.mkdir(parents=True, exist_ok=True)

    def watch(progress: Any) -> None:
        """The live line, a scrape of the run's /metrics, and `vapipe top`'s view at the most replicas."""
        printer(progress)
        if progress.metrics_url:
            scrapes.append((round(time.time() - progress.t0, 2), scrape(progress.metrics_url)))
        replicas = len([s for s in progress.stats.values() if s.stage == "inter"])
        if replicas > peak["replicas"] or (replicas == peak["replicas"] and progress.lag("inter") == 0):
            text = io.StringIO()
            anonymous = {n: dataclasses.replace(st, node=None) for n, st in progress.stats.items()}  # a report names no host
            Console(file=text, width=120, color_system=None).print(top_view(anonymous))
            peak.update(replicas=replicas, view=text.getvalue())

    result = autoscale_bench(
        settings(),
        source or default_video(),
        model,
        fps,
        step_at,
        step_frames,
        max_replicas,
        target_lag,
        cooldown,
        on_progress=watch,
    )
    if scrapes:
        write_board(scrapes, out / "board.png")
    (out / "top.txt").write_text(peak["view"])
    write_autoscale_report(result, out)
    echo_json({k: v for k, v in result.items() if k != "samples"})
    if result["lost"] or result["counted_twice"]:
        raise typer.Exit(1)


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


@bench_app.command("latency")
def bench_latency(
    rates: Annotated[str, typer.Option(help="Camera frame rates to run at, comma-separated.")] = "5,10",
    seconds: Annotated[float, typer.Option(help="Seconds of camera per run.")] = 60.0,
    max_lag_s: Annotated[float, typer.Option(help="producer.max_lag_s of the real-time mode.")] = 1.0,
    port: Annotated[int, typer.Option(help="Port of the RTSP camera this starts.")] = 18554,
    model: Model = None,
    source: Source = "",
    out: OutOpt = Path("output/bench/latency"),
) -> None:
    """A real RTSP camera in real-time mode: capture-to-count p50/p95/p99 per hop, against the model's own latency."""
    from bench.latency import latency
    from bench.report import write_report

    s = settings(**{"model.name": model or default_model()})
    result = latency(s, source or default_video(), ints(rates), seconds, max_lag_s, port, on_progress=progress_printer())
    write_report(result, out)
    echo_json(result["table"])


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


@bench_app.command("restore")
def bench_restore(
    snapshots: Annotated[int, typer.Option(help="Changelog records to preload.")] = 300_000,
    streams: Annotated[int, typer.Option(help="Streams they are spread over.")] = 10,
    tail: Annotated[int, typer.Option(help="Snapshots written after the checkpoint.")] = 1000,
) -> None:
    """Count-table restore against a long changelog: whole topic vs owned partition vs checkpoint + tail.

    Uses fresh topics (named ``<changelog>-bench-<random>``) on the configured broker and deletes them after.
    """
    import uuid

    from bench.restore import measure_restore
    from cluster.topics import delete_topics

    s = settings()
    tag = uuid.uuid4().hex[:8]
    topics = s.topics.model_copy(
        update={
            key: getattr(s.topics, key).model_copy(update={"name": f"{getattr(s.topics, key).name}-bench-{tag}"})
            for key in ("detections", "counts_changelog")
        }
    )
    s = s.model_copy(update={"topics": topics, "output_dir": str(Path(s.output_dir) / "bench" / "restore" / tag)})
    try:
        result = measure_restore(s, snapshots, streams, tail)
    finally:
        delete_topics(s.kafka, [topics.detections.name, topics.counts_changelog.name])
    for line in result.lines():
        typer.echo(line)


@bench_app.command("soak")
def bench_soak(
    minutes: Annotated[float, typer.Option(help="How long the synthetic streams run.")] = 30.0,
    streams: Annotated[int, typer.Option(help="Synthetic streams (a panned still each).")] = 3,
    fps: Annotated[float, typer.Option(help="Frames per second per stream.")] = 3.0,
    poison_every: Annotated[float, typer.Option(help="Seconds between poison records.")] = 60.0,
    kill_every: Annotated[float, typer.Option(help="Seconds between count-replica kills.")] = 180.0,
    sample_every: Annotated[float, typer.Option(help="Seconds between RSS samples.")] = 10.0,
    warmup: Annotated[float | None, typer.Option(help="Seconds of each process left out of the RSS slope.")] = None,
    model: Annotated[str, typer.Option(help="Calibration detector, so the model is not the limit.")] = "synthetic:0ms",
    out: OutOpt = Path("docs/results/soak"),
) -> None:
    """Run for N minutes with poison and kills; report RSS slope, largest snapshot, restores, lost, twice, p99.

    Exits 1 if a frame was lost or counted twice.
    """
    import shlex
    import sys

    from bench.soak import soak, write_soak_report

    result = soak(
        settings(**{"model.name": model}),
        minutes,
        streams,
        fps,
        poison_every,
        kill_every,
        sample_every,
        warmup,
        on_progress=progress_printer(),
    )
    folder = write_soak_report(result, out, "vapipe " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    typer.echo((folder / "README.md").read_text())
    if result["lost"] or result["counted_twice"]:
        raise PipelineError(f"soak lost {result['lost']} frame(s) and counted {result['counted_twice']} twice")


@bench_app.command("multihost")
def bench_multihost(
    replicas: Replicas = "1,2",
    frames: Annotated[int, typer.Option(help="Frames of the fixed input.")] = 300,
    repeat: Repeat = 2,
    model: ScalingModel = "sleep:40ms",
    source: Source = "",
    lab_state: Annotated[Path, typer.Option(help="The lab's state folder (set up here unless it is up).")] = Path(".cache/lab"),
    out: OutOpt = Path("output/bench/multihost"),
) -> None:
    """Strong scaling with InterConsumers on the lab's GPU host (host3) against every actor on one host."""
    from bench.multihost import multihost
    from bench.report import write_report
    from cluster.lab import Lab

    lab = Lab.load(lab_state)
    if lab.inside() != "host2":
        raise typer.Exit(_in_lab(lab))
    s = settings(**{"model.name": model})
    result = multihost(s, lab, ints(replicas), frames, repeat, source or default_video(), on_progress=progress_printer())
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
    lab: Annotated[
        bool, typer.Option("--lab", help="Run on the three-host lab (set up here unless it is up) and its faults.")
    ] = False,
    lab_state: Annotated[Path, typer.Option(help="The lab's state folder (vapipe lab up --state).")] = Path(".cache/lab"),
    hold: Annotated[float, typer.Option(help="Seconds a lab partition lasts.")] = 30.0,
    out: OutOpt = Path("output/bench/chaos"),
) -> None:
    """Inject faults into real runs; one table: lost, counted twice, crops, dead-lettered, recovery.

    Exits 1 if any fault lost a frame, counted one twice or changed the crop corpus.
    With --lab the runs go to the three-host lab (cluster/lab.py): 3 brokers on host1, the Ray
    head on host2 (where this command then runs), the InterConsumers on host3's GPU.
    """
    from bench.chaos import FAULTS, LAB_FAULTS, failed_faults, table_lines
    from bench.chaos import chaos as run_chaos
    from bench.report import write_report
    from commands.kafka import broker

    if list_faults:
        for name, what in FAULTS.items():
            typer.echo(f"{name:16} {what}")
        return
    the_lab = None
    if lab:
        from cluster.lab import Lab

        the_lab = Lab.load(lab_state)
        if the_lab.inside() != "host2":
            raise typer.Exit(_in_lab(the_lab))
    s = settings(**{"model.name": model})
    chosen = [f.strip() for f in faults.split(",") if f.strip()] or [f for f in FAULTS if (f in LAB_FAULTS or f == "none") == lab]
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

    result = run_chaos(
        s, source or default_video(), frames, chosen, replicas, restart, on_progress=progress_printer(), lab=the_lab, hold_s=hold
    )
    folder = write_report(result, out)
    for line in table_lines(result):
        typer.echo(line)
    typer.echo(f"report: {folder / 'README.md'}", err=True)
    bad = failed_faults(result)
    if bad:
        raise PipelineError(f"faults that lost or double-counted frames, or changed the crops or the table: {', '.join(bad)}")


@bench_app.command("ceiling")
def bench_ceiling(
    source: Annotated[list[str] | None, typer.Option("--source", "-s", help="Videos (default: the shared ones).")] = None,
    frames: Annotated[int, typer.Option(help="Frames of each video.")] = 450,
    replicas: Replicas = "1,2,3",
    repeat: Annotated[int, typer.Option(help="Pipeline runs per replica count, each between two bare-loop runs.")] = 2,
    end_to_end: Annotated[bool, typer.Option(help="Also run the whole pipeline (Ray) at each replica count.")] = True,
    out: OutOpt = Path("output/bench/ceiling"),
) -> None:
    """InterConsumer (sleep:0ms) frames/s against a bare kafka-python consume->produce loop, plus a profile."""
    from bench.ceiling import ceiling
    from bench.report import write_report

    videos = source or shared_videos()
    result = ceiling(settings(), videos, frames, ints(replicas), repeat, end_to_end, on_progress=progress_printer())
    folder = write_report(result, out)
    echo_json(result["table"])
    typer.echo(f"report: {folder / 'README.md'}", err=True)


def _in_lab(lab: Any) -> int:
    """This very command again, on the lab's host2 (the Ray head, as `ray attach` would); the lab is
    set up first unless it is up, and then removed again."""
    import subprocess
    import sys

    started = not lab.is_up()
    if started:
        typer.echo(f"setting up the lab in {lab.state} ...", err=True)
        lab.up()
    try:
        return subprocess.call(lab.exec_argv("host2", [sys.executable, *sys.argv]))
    finally:
        if started:
            lab.down()
