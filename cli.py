"""vapipe command line: a thin typer layer over ``actors`` and ``cluster``.

Every command loads the settings (``--config``, ``VAPIPE_*``, ``--set``), calls
one function, and turns any ``PipelineError`` into a one-line message and exit 1.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.config import Settings, dotted_overrides, load_settings, set_path
from pipeline.errors import PipelineError

__all__ = ["app", "main"]

logger = logging.getLogger("vapipe")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed video analytics: video -> Kafka -> YOLO on Ray -> crops and vehicle counts.")
kafka_app = typer.Typer(no_args_is_help=True, help="Run a local Apache Kafka broker (KRaft) from Maven-resolved jars.")
topics_app = typer.Typer(no_args_is_help=True, help="Create, list, describe and delete the pipeline's topics.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured side by side.")
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(bench_app, name="bench")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML settings file (default: built-in defaults, see configs/default.yaml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: section.field=value (repeatable).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder for JSON, CSV, plots and the markdown report.")]


class _State:
    config: Path | None = None
    sets: list[str] = []


_state = _State()


def settings(**overrides: Any) -> Settings:
    """Settings from file, environment, --set, then command flags (highest)."""
    tree = dotted_overrides(_state.sets)
    for dotted, value in overrides.items():
        if value is not None:
            set_path(tree, dotted.split("."), value)
    return load_settings(_state.config, overrides=tree)


@app.callback()
def _root(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    _state.config = config
    _state.sets = list(set_ or [])
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # our own errors say it in one line


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- kafka ----------------------------------------------------------------------
def _broker() -> Any:
    from cluster.broker import KafkaBroker

    s = settings()
    return KafkaBroker(s.broker, s.kafka)


@kafka_app.command("install")
def kafka_install() -> None:
    """Resolve the broker jars with Maven (done automatically by start)."""
    typer.echo(str(_broker().install()))


@kafka_app.command("start")
def kafka_start() -> None:
    """Start the broker in the background unless it already runs; wait until it answers."""
    st = _broker().start()
    if st.already_running:
        typer.echo(f"Kafka already running (pid {st.pid}) at {st.bootstrap}")
    else:
        typer.echo(f"Kafka started (pid {st.pid}) at {st.bootstrap}, ready in {st.ready_s:.1f}s; state in {st.state_dir}")


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the broker this state folder started (and nothing else)."""
    typer.echo("Kafka stopped" if _broker().stop() else "Kafka was not running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Is the broker running, and where."""
    st = _broker().status()
    typer.echo(f"Kafka running (pid {st.pid}) at {st.bootstrap}" if st.running else f"Kafka not running (state {st.state_dir})")
    if not st.running:
        raise typer.Exit(3)


@kafka_app.command("logs")
def kafka_logs(lines: Annotated[int, typer.Option("--lines", "-n")] = 50) -> None:
    """Last lines of the broker log."""
    typer.echo(_broker().logs(lines))


# -- topics ---------------------------------------------------------------------
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
def topics_describe(names: Annotated[Optional[list[str]], typer.Argument(help="Topics (default: the configured ones).")] = None) -> None:
    from cluster.topics import describe_topics

    s = settings()
    for t in describe_topics(s.kafka, names or [t.name for t in s.topics.all()]):
        typer.echo(f"{t.name}\tpartitions={t.partitions}\treplication={t.replication_factor}")


@topics_app.command("delete")
def topics_delete(
    names: Annotated[Optional[list[str]], typer.Argument(help="Topics (default: the configured ones).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    from cluster.topics import delete_topics

    s = settings()
    targets = names or [t.name for t in s.topics.all()]
    if not yes:
        typer.confirm(f"delete {', '.join(targets)}?", abort=True)
    for name in delete_topics(s.kafka, targets):
        typer.echo(f"deleted {name}")


# -- pipeline -------------------------------------------------------------------
SourceOpt = Annotated[list[str], typer.Option("--source", "-s", help="Video file, rtsp/http URL, webcam index, image folder, pan:IMAGE or demo; prefix id= to name the stream.")]


@app.command()
def produce(
    source: SourceOpt,
    fps: Annotated[Optional[float], typer.Option(help="Frames/s per stream; 0 = as fast as possible.")] = None,
    max_frames: Annotated[Optional[int], typer.Option(help="Stop each stream after N frames.")] = None,
) -> None:
    """Publish sources to topic A from this machine (one thread per stream, with progress bars)."""
    from tqdm import tqdm

    from cluster.clients import check_broker
    from actors.launcher import validate_sources
    from actors.producer import FrameProducer
    from pipeline.sources import parse_source

    s = settings(**{"producer.fps": fps, "producer.max_frames": max_frames})
    specs = [parse_source(x) for x in source]
    check_broker(s.kafka)
    validate_sources(specs)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def one(pos: int, spec: Any) -> None:
        bar = tqdm(desc=spec.stream_id, unit="frame", position=pos, leave=True)
        try:
            results[spec.stream_id] = FrameProducer(s, spec).run(on_frame=lambda n: bar.update(1))
        except BaseException as exc:  # surfaced below as one line
            errors.append(exc)
        finally:
            bar.close()

    threads = [threading.Thread(target=one, args=(i, spec), daemon=True) for i, spec in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    _echo_json(results)


def _progress_printer() -> Any:
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(progress: Any) -> None:
        now = time.monotonic()
        if tty:
            sys.stderr.write("\r\033[K" + progress.line())
            sys.stderr.flush()
        elif now - last[0] >= 5:
            sys.stderr.write(progress.line() + "\n")
            last[0] = now

    return show


def _run(s: Settings, sources: list[str], inter: int | None, crop: int | None, count: int | None,
         follow: bool, calibration: bool, include_dashboard: bool = True, engine: str = "ray") -> dict[str, Any]:
    from actors.launcher import RunPlan, run_pipeline
    from pipeline.sources import parse_source

    engines = None
    if engine != "ray":
        from actors.faust.engine import parse_engines

        engines = parse_engines(engine)  # a typo fails before anything starts

    plan = RunPlan(
        sources=[parse_source(x) for x in sources],
        replicas={"inter": inter or s.inter.replicas, "crop": crop or s.crop.replicas, "count": count or s.count.replicas},
        follow=follow,
        allow_calibration=calibration,
        include_dashboard=include_dashboard,
    )
    if engines is None:
        summary = run_pipeline(s, plan, on_progress=_progress_printer())
    else:
        from actors.faust.engine import run_engines

        summary = run_engines(s, plan, engines, on_progress=_progress_printer())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    return summary


@app.command()
def run(
    source: SourceOpt,
    inter: Annotated[Optional[int], typer.Option(help="InterConsumer (YOLO) replicas.")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Crop replicas.")] = None,
    count: Annotated[Optional[int], typer.Option(help="Count replicas.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join ('auto' or host:port); default starts a local Ray.")] = None,
    fps: Annotated[Optional[float], typer.Option(help="Producer frames/s per stream; 0 = as fast as possible.")] = None,
    max_frames: Annotated[Optional[int], typer.Option(help="Stop each stream after N frames.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Ultralytics model name or path.")] = None,
    follow: Annotated[bool, typer.Option(help="Keep running for endless streams until Ctrl-C, then drain.")] = False,
    calibration: Annotated[bool, typer.Option(help="Allow the sleep:Nms calibration detector.")] = False,
    engine: Annotated[str, typer.Option(help="ray, faust, or per stage: inter=ray,crop=faust,count=faust.")] = "ray",
) -> None:
    """Run the whole pipeline with N replicas per stage (Ray actors or Faust workers); prints and writes a JSON summary."""
    s = settings(**{"ray.address": address, "producer.fps": fps, "producer.max_frames": max_frames, "model.name": model})
    _echo_json(_run(s, source, inter, crop, count, follow, calibration, engine=engine))


@app.command()
def status(
    address: Annotated[str, typer.Option(help="Ray cluster to ask.")] = "auto",
    engine: Annotated[str, typer.Option(help="ray (ask the cluster) or faust (the latest Faust run's workers).")] = "ray",
) -> None:
    """Load of every running vapipe actor or Faust worker (frames, frames/s, lag, node, GPU)."""
    if engine == "faust":
        _faust_status()
        return
    if engine != "ray":
        raise PipelineError(f"invalid --engine {engine!r}: expected ray or faust")
    import ray

    from cluster.raycluster import NAMESPACE, connect
    from pipeline.config import RayConfig

    connect(RayConfig(address=address))
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE)
    if not names:
        typer.echo("no vapipe actors are running")
        return
    handles = {n: ray.get_actor(n, namespace=NAMESPACE) for n in names}
    refs = {n: h.stats.remote() for n, h in handles.items()}
    typer.echo(f"{'actor':<28}{'frames':>8}{'f/s':>8}{'lag':>8}  node / gpus / peak MB / problem")
    for name, ref in refs.items():
        try:
            st = ray.get(ref, timeout=10)
        except Exception as exc:  # one sick actor must not hide the others
            typer.echo(f"{name:<28} unavailable: {type(exc).__name__}")
            continue
        typer.echo(f"{name:<28}{st.get('frames_out', 0):>8}{st.get('fps', 0):>8}{str(st.get('lag', '-')):>8}  "
                   f"{st.get('node')} / {','.join(st.get('gpus') or []) or '-'} / {st.get('peak_rss_mb')} / {st.get('last_error') or 'ok'}")


def _faust_status() -> None:
    from actors.faust.engine import faust_status

    rows = faust_status(settings())
    if not rows:
        typer.echo("the latest Faust run has no workers")
        return
    typer.echo(f"{'worker':<28}{'frames':>8}{'f/s':>8}{'lag':>8}  pid / peak MB / problem")
    for st in rows:
        state = st.get("last_error") or st.get("crashed") or ("ok" if st.get("running", True) else "stopped")
        typer.echo(f"{st.get('name', '?'):<28}{st.get('frames_out', 0):>8}{st.get('fps', 0):>8}{str(st.get('lag', '-')):>8}  "
                   f"{st.get('pid', '-')} / {st.get('peak_rss_mb', '-')} / {state}")


@app.command()
def counts(as_json: Annotated[bool, typer.Option("--json", help="Print the raw table as JSON.")] = False) -> None:
    """Print the current vehicle table (read from its changelog topic)."""
    from actors.stages import read_table

    table = read_table(settings())
    if as_json:
        _echo_json(table)
        return
    if not table:
        typer.echo("the count table is empty")
        return
    for stream_id, state in sorted(table.items()):
        totals = ", ".join(f"{k}={v}" for k, v in sorted(state.get("totals", {}).items())) or "no vehicles"
        done = "complete" if state.get("frames_expected") is not None and state.get("frames_applied", 0) >= state["frames_expected"] else "running"
        typer.echo(f"{stream_id}: {totals} ({state.get('frames_applied', 0)} frames, {done})")


@app.command()
def demo(
    source: Annotated[Optional[list[str]], typer.Option("--source", "-s", help="Any video (default: the ultralytics bus photo, panned).")] = None,
    frames: Annotated[int, typer.Option(help="Frames per stream.")] = 60,
    model: Annotated[Optional[str], typer.Option(help="Model name or path (default: VAPIPE_MODEL__NAME or the official yolov8n.pt).")] = None,
) -> None:
    """Start Kafka and Ray if needed, run the pipeline on a short clip, print the summary, stop what it started."""
    from cluster.clients import check_broker
    from cluster.broker import KafkaBroker

    s = settings(**{"model.name": model, "producer.max_frames": frames})
    sources = source or [f"pan:{_demo_image()}:{frames}"]
    broker = KafkaBroker(s.broker, s.kafka)
    started = False
    try:
        check_broker(s.kafka.model_copy(update={"connect_timeout_s": 3}))
    except PipelineError:
        typer.echo(f"starting a local Kafka broker at {broker.bootstrap} ...", err=True)
        broker.start()
        started = True
    try:
        summary = _run(s, sources, None, None, None, False, False)
    finally:
        if started:
            broker.stop()
    _echo_json(summary)
    typer.echo(f"\ncrops: {summary['crops_dir']}\nsummary: {summary.get('summary_path')}", err=True)


def _demo_image() -> str:
    from pipeline.sources import demo_image_path

    return str(demo_image_path())


# -- bench ----------------------------------------------------------------------
@bench_app.command("overhead")
def bench_overhead(
    source: Annotated[str, typer.Option("--source", "-s")] = "",
    frames: Annotated[int, typer.Option(help="Frames of the video to use.")] = 300,
    repeat: Annotated[int, typer.Option(help="Pipeline runs, each between two bare-loop runs.")] = 3,
    model: Annotated[Optional[str], typer.Option()] = None,
    out: OutOpt = Path("output/bench/overhead"),
) -> None:
    """Pipeline (1 InterConsumer) frames/s against a bare ultralytics loop over the same frames."""
    from bench.experiments import overhead

    from bench.report import write_report

    s = settings(**{"model.name": model})
    result = overhead(s, source or _default_video(), frames, repeat, on_progress=_progress_printer())
    write_report(result, out)
    _echo_json(result)


@app.command("chaos")
def chaos_cmd(
    source: Annotated[str, typer.Option("--source", "-s")] = "",
    frames: Annotated[int, typer.Option(help="Frames of the video per run.")] = 90,
    faults: Annotated[str, typer.Option(help="Comma-separated faults (default: all); see --list.")] = "",
    replicas: Annotated[int, typer.Option(help="Replicas of every stage.")] = 2,
    model: Annotated[Optional[str], typer.Option()] = None,
    list_faults: Annotated[bool, typer.Option("--list", help="List the faults and exit.")] = False,
    out: OutOpt = Path("output/bench/chaos"),
) -> None:
    """Inject faults into real runs; one table: lost, counted twice, crops, dead-lettered, recovery.

    Exits 1 if any fault lost a frame, counted one twice or changed the crop corpus.
    """
    from bench.chaos import FAULTS, chaos
    from bench.report import write_report

    if list_faults:
        for name, what in FAULTS.items():
            typer.echo(f"{name:16} {what}")
        return
    s = settings(**{"model.name": model})
    chosen = [f.strip() for f in faults.split(",") if f.strip()] or list(FAULTS)
    restart = None
    if "broker-restart" in chosen:
        broker = _broker()
        if not broker.status().running:
            raise PipelineError("fault broker-restart needs the broker started by `vapipe kafka start` (state "
                                f"{s.broker.state_dir}); leave it out with --faults")

        def restart() -> None:
            broker.stop()
            broker.start()

    result = chaos(s, source or _default_video(), frames, chosen, replicas, restart, on_progress=_progress_printer())
    folder = write_report(result, out)
    cols = ("fault", "frames_produced", "frames_counted", "lost", "counted_twice", "duplicates_on_c",
            "crops_expected", "crops_written", "table_match", "dead_lettered", "recovery_s")
    typer.echo(" | ".join(cols))
    for row in result["rows"]:
        typer.echo(" | ".join(str(row.get(c)) for c in cols))
    typer.echo(f"report: {folder / 'README.md'}", err=True)
    bad = [r["fault"] for r in result["rows"] if r["lost"] or r["counted_twice"] or not (r["crops_match"] and r["table_match"])]
    if bad:
        raise PipelineError(f"faults that lost or double-counted frames, or changed the crops or the table: {', '.join(bad)}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@bench_app.command("strong")
def bench_strong(
    replicas: Annotated[str, typer.Option(help="Replica counts, comma-separated.")] = "1,2,3",
    frames: Annotated[int, typer.Option(help="Frames of the fixed input.")] = 600,
    repeat: Annotated[int, typer.Option(help="Runs per replica count.")] = 5,
    model: Annotated[str, typer.Option(help="Model; the calibration detector measures the pipeline's own cost.")] = "sleep:40ms",
    source: Annotated[str, typer.Option("--source", "-s")] = "",
    out: OutOpt = Path("output/bench/strong"),
) -> None:
    """Strong scaling: fixed input, r replicas of every stage; speedup and efficiency."""
    _scaling("strong", replicas, frames, repeat, model, source, out)


@bench_app.command("weak")
def bench_weak(
    replicas: Annotated[str, typer.Option(help="Replica counts, comma-separated.")] = "1,2,3",
    frames_per_producer: Annotated[int, typer.Option(help="Frames each of the r producers publishes.")] = 300,
    repeat: Annotated[int, typer.Option(help="Runs per replica count.")] = 5,
    model: Annotated[str, typer.Option(help="Model; the calibration detector measures the pipeline's own cost.")] = "sleep:40ms",
    source: Annotated[str, typer.Option("--source", "-s")] = "",
    out: OutOpt = Path("output/bench/weak"),
) -> None:
    """Weak scaling: r producers and r replicas of every stage; time should stay flat."""
    _scaling("weak", replicas, frames_per_producer, repeat, model, source, out)


def _scaling(mode: str, replicas: str, frames: int, repeat: int, model: str, source: str, out: Path) -> None:
    from bench.experiments import scaling
    from bench.report import write_report

    s = settings(**{"model.name": model})
    result = scaling(s, mode, _ints(replicas), frames, repeat, source or _default_video(), on_progress=_progress_printer())  # type: ignore[arg-type]
    folder = write_report(result, out)
    _echo_json(result["table"])
    typer.echo(f"report: {folder / 'README.md'}", err=True)


@bench_app.command("sweep")
def bench_sweep(
    batch: Annotated[str, typer.Option(help="Inference/poll batch sizes.")] = "1,4,8,16",
    fps: Annotated[str, typer.Option(help="Input frame rates; 'max' = as fast as possible.")] = "5,10,20,max",
    jpeg_quality: Annotated[str, typer.Option(help="JPEG qualities.")] = "70,90",
    frames: Annotated[int, typer.Option(help="Frames per run.")] = 60,
    model: Annotated[Optional[str], typer.Option()] = None,
    source: Annotated[str, typer.Option("--source", "-s")] = "",
    out: OutOpt = Path("output/bench/sweep"),
) -> None:
    """The study's future work: batch size, input frame rate and JPEG quality vs throughput and agreement."""
    from bench.experiments import sweep
    from bench.report import write_report

    s = settings(**{"model.name": model})
    fps_values = [0.0 if x.strip() == "max" else float(x) for x in fps.split(",") if x.strip()]
    result = sweep(s, _ints(batch), fps_values, _ints(jpeg_quality), frames, source or _default_video(), on_progress=_progress_printer())
    folder = write_report(result, out)
    _echo_json([{k: r[k] for k in ("factor", "batch", "input_fps", "jpeg_quality", "fps", "latency_p50_ms", "agreement")} for r in result["rows"]])
    typer.echo(f"report: {folder / 'README.md'}", err=True)


@bench_app.command("compare")
def bench_compare(
    engines: Annotated[str, typer.Option(help="Engines to compare, comma-separated.")] = "ray,faust",
    replicas: Annotated[str, typer.Option(help="Replica counts, comma-separated.")] = "1,2,3",
    frames: Annotated[int, typer.Option(help="Frames of the fixed input.")] = 300,
    repeat: Annotated[int, typer.Option(help="Runs per engine, model and replica count.")] = 1,
    models: Annotated[str, typer.Option(help="Models, comma-separated: the calibration detector and the real model.")] = "",
    source: Annotated[str, typer.Option("--source", "-s")] = "",
    out: OutOpt = Path("output/bench/compare"),
) -> None:
    """Strong scaling of each engine side by side: throughput, speedup, latency p50/p99, memory per worker."""
    from bench.experiments import compare_engines
    from bench.report import write_report

    model_list = [m.strip() for m in models.split(",") if m.strip()] or ["sleep:40ms", _default_model()]
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    result = compare_engines(settings(), engine_list, _ints(replicas), frames, repeat, model_list,
                             source or _default_video(), on_progress=_progress_printer())
    folder = write_report(result, out)
    _echo_json(result["table"])
    typer.echo(f"report: {folder / 'README.md'}", err=True)


def _default_model() -> str:
    import os

    shared = Path(os.environ.get("VAPIPE_SHARED", Path(__file__).resolve().parent.parent / "shared"))
    onnx = shared / "models" / "yolov8n_int8.onnx"
    return str(onnx) if onnx.is_file() else "yolov8n.pt"


def _default_video() -> str:
    import os

    shared = Path(os.environ.get("VAPIPE_SHARED", Path(__file__).resolve().parent.parent / "shared"))
    return str(shared / "videos" / "highway-320x240.avi")


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
