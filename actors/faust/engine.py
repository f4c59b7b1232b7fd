"""`vapipe run --engine faust` (or a per-stage mix): the stages as Faust worker processes.

Each Faust stage runs N worker processes (``actors.faust.worker``), one Faust app
per stage whose id is the Ray engine's consumer group (``<prefix>-<stage>``), on
the same topics and message format. A stage runs on one engine at a time (Faust
and kafka-python use different group assignors), but the stages of one run may
use different engines: ``inter=ray,crop=faust,count=faust``. An all-Ray run is
handed to ``actors.ray.engine.run_pipeline`` by ``actors.engines.run``.

The run ends as a Ray run does: every producer has published its end-of-stream
record, the count table (read from its changelog, which both engines share) has
applied every frame of every stream, and the crop group has committed topic B.
A Faust worker process that dies is restarted (``faust.max_restarts``), like a Ray
actor; its table partitions recover from the changelog. Streams declared or removed while
it runs (``vapipe streams add/remove``) start or end a producer process, as on Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.engines import check_engines
from actors.faust.app import settings_to_json
from actors.faust.tables import moving_changelog
from actors.launcher import Progress, RunPlan, drain, prepare_run, summarise, wait_ready, write_summary
from actors.ray.engine import RayWorkers
from actors.streams import StreamCommands, apply_stream_commands
from cluster.raycluster import ray_session
from pipeline.config import Settings
from pipeline.errors import ConfigError, PipelineError
from pipeline.sources import SourceSpec
from pipeline.stats import STAGES, EarlierLives, RunSummary

__all__ = ["run_engines", "FaustProcess", "FaustWorkers", "faust_status"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def _python_env() -> dict[str, str]:
    """The worker processes import this checkout, whatever the venv's editable install points at."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class FaustProcess:
    """One worker process (a Faust stage worker or a producer), restarted when it dies unasked."""

    def __init__(self, name: str, stage: str, argv: list[str], run_dir: Path, max_restarts: int) -> None:
        self.name = name
        self.stage = stage
        self.argv = argv
        self.run_dir = run_dir
        self.max_restarts = max_restarts
        self.restarts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.lives = EarlierLives()
        """What this worker's earlier processes counted, added to its live stats."""

    @property
    def stats_path(self) -> Path:
        return self.run_dir / f"{self.name}.json"

    def start(self, new_session: bool = True) -> None:
        log = open(self.run_dir / f"{self.name}.out", "ab")  # noqa: SIM115 - handed to the child process, closed below
        # A new session: a Ctrl-C in the terminal stops the producers, never a stage in mid-drain.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.faust.worker", *self.argv],
            cwd=str(ROOT),
            env=_python_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Restart a stage worker that died without being asked to stop.

        Raises:
            PipelineError: it died more than ``max_restarts`` times.
        """
        if self.proc is None or self.alive() or self.stopping:
            return
        if self.restarts >= self.max_restarts:
            raise PipelineError(
                f"{self.name} died {self.restarts + 1} times (exit {self.proc.returncode}); last log lines: {self.log_tail()}"
            )
        self.restarts += 1
        logger.warning("%s exited with %s; restarting (%d/%d)", self.name, self.proc.returncode, self.restarts, self.max_restarts)
        self.lives.end_life(self.read_stats() or {})
        self.stats_path.unlink(missing_ok=True)
        self.start()

    def read_stats(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return None

    def stats(self) -> dict[str, Any] | None:
        """The live stats plus what earlier lives of this worker counted."""
        s = self.read_stats()
        if s is None:
            return None
        s = self.lives.add_to(s)
        s["restarts"] = self.restarts
        return s

    def stop(self) -> None:
        self.stopping = True
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs; killing it", self.name, timeout_s)
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 3) -> str:
        text = ""
        for suffix in (".log", ".out"):
            try:
                text += (self.run_dir / f"{self.name}{suffix}").read_text(errors="replace")
            except OSError:
                pass
        printable = (
            "".join(ch for ch in ln if ch.isprintable()).replace("[?25l", "").replace("[?25h", "") for ln in text.splitlines()
        )
        tail = [ln.strip() for ln in printable if ln.strip()][-lines:]
        return " | ".join(tail) or "(no log)"


def _run_dir(settings: Settings, run_id: str) -> Path:
    folder = Path(settings.output_dir).resolve() / "faust" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    latest = folder.parent / "latest"
    try:
        latest.unlink(missing_ok=True)
        latest.symlink_to(folder.name)
    except OSError:  # a filesystem without symlinks only loses `vapipe status --engine faust`
        pass
    return folder


def run_engines(
    settings: Settings,
    plan: RunPlan,
    engines: dict[str, str],
    on_progress: Callable[[Progress], None] | None = None,
) -> RunSummary:
    """Run the pipeline with each stage on its engine; returns the same summary as ``run_pipeline``, plus ``engines``.

    Raises:
        PipelineError: bad source, model, broker, a stage that failed for good, or no progress.
    """
    check_engines(engines)
    if all(e == "ray" for e in engines.values()):
        raise ConfigError("no stage runs on Faust: use actors.engines.run, which hands an all-Ray run to the Ray engine")
    from actors.faust.app import faust_guarantee

    faust_guarantee(settings)
    prepare_run(settings, plan, extra_topics=[moving_changelog(settings)] if engines["count"] == "faust" else [])
    commands_from = StreamCommands.end(settings)  # streams added from now on (`vapipe streams add`) join this run
    run_dir = _run_dir(settings, plan.run_id)
    settings_file = run_dir / "settings.json"
    settings_file.touch(mode=0o600)
    settings_file.write_text(settings_to_json(settings))

    ray_stages = [s for s in STAGES if engines[s] == "ray"]
    ray_workers: RayWorkers | None = None
    workers: dict[str, FaustProcess] = {}
    producers: dict[str, FaustProcess] = {}
    with contextlib.ExitStack() as on_exit:
        if ray_stages:
            on_exit.enter_context(ray_session(settings.ray, include_dashboard=plan.include_dashboard))
            ray_workers = _start_ray_stages(settings, plan, ray_stages)
            on_exit.callback(ray_workers.kill)
        on_exit.callback(_stop_all, producers, workers)
        for stage in STAGES:
            if engines[stage] != "faust":
                continue
            for i in range(plan.replicas[stage]):
                name = f"{stage}-{i}"
                workers[name] = FaustProcess(
                    name, stage, ["stage", stage, name, str(run_dir)], run_dir, settings.faust.max_restarts
                )
                workers[name].start()
        group = FaustWorkers(workers, producers, ray_workers, run_dir)
        wait_ready(settings, group, timeout_s=plan.stall_timeout_s)
        since_ms = int((time.time() - 60) * 1000)  # as the Ray engine: bounds a resumed stream's scan of A
        for spec in plan.sources:
            group.add_producer(settings, spec, since_ms)
        t0 = time.time()
        progress = Progress()
        commands = on_exit.enter_context(contextlib.closing(StreamCommands(settings, before=commands_from)))
        produced = drain(
            settings, plan, group, progress, on_progress, lambda: apply_stream_commands(settings, plan, group, commands, since_ms)
        )
        wall = time.time() - t0
        for w in workers.values():
            w.stop()
        if ray_workers is not None:
            progress.update(ray_workers.stop())
        for w in workers.values():
            w.wait(60)
        progress.update([s for s in (w.stats() for w in workers.values()) if s])
        summary = summarise(settings, plan, produced, progress, wall)
        summary.engines = dict(engines)
        summary.restarts = {n: w.restarts for n, w in workers.items() if w.restarts}
        summary.moving_window = _moving_window(progress)
        summary.processing_guarantee = settings.processing_guarantee
        write_summary(settings, plan, summary)
        return summary


def _stop_all(producers: dict[str, FaustProcess], workers: dict[str, FaustProcess]) -> None:
    """On the way out (an error, Ctrl-C, or after the summary): no process outlives its run."""
    for p in list(producers.values()) + list(workers.values()):
        if p.alive():
            p.stop()
            p.wait(10)


def _start_ray_stages(settings: Settings, plan: RunPlan, stages: list[str]) -> RayWorkers:
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    ray_workers = RayWorkers({}, {})
    for stage in stages:
        for i in range(plan.replicas[stage]):
            ray_workers.launch(settings, stage, f"{stage}-{i}", gpus)
    return ray_workers


class FaustWorkers:
    """The run's Faust processes (stage workers and producers), plus its Ray stage actors in a mixed run.

    Polling restarts a Faust worker that died unasked, as Ray restarts an actor.
    """

    def __init__(
        self, workers: dict[str, FaustProcess], producers: dict[str, FaustProcess], ray: RayWorkers | None, run_dir: Path
    ) -> None:
        self.workers = workers
        self.producers = producers
        self.ray = ray
        self.run_dir = run_dir
        self._reported: set[str] = set()

    def add_producer(self, settings: Settings, spec: SourceSpec, since_ms: int | None) -> None:
        """Start a producer process for one stream (at the start, or ``vapipe streams add``)."""
        name = f"producer-{spec.stream_id}"
        argv = ["produce", name, str(self.run_dir), json.dumps(dataclasses.asdict(spec))]
        if since_ms is not None:
            argv.append(str(since_ms))
        self.producers[name] = FaustProcess(name, "producer", argv, self.run_dir, max_restarts=0)
        self.producers[name].start(new_session=False)

    def remove_producer(self, stream_id: str) -> bool:
        """End one stream (``vapipe streams remove``): SIGUSR1 has its producer publish the end and finish."""
        p = self.producers.get(f"producer-{stream_id}")
        if p is None or not p.alive():
            return False
        assert p.proc is not None
        p.proc.send_signal(signal.SIGUSR1)
        return True

    def stage_names(self) -> list[str]:
        return list(self.workers) + (self.ray.stage_names() if self.ray is not None else [])

    def poll(self) -> list[dict[str, Any]]:
        for w in self.workers.values():
            w.check()
        out = [s for s in (w.stats() for w in list(self.workers.values()) + list(self.producers.values())) if s]
        if self.ray is not None:
            out += self.ray.poll()
        return out

    def finished_producers(self) -> dict[str, dict[str, Any]]:
        finished = {
            name: _producer_result(p) for name, p in self.producers.items() if name not in self._reported and not p.alive()
        }
        self._reported.update(finished)
        return finished

    def producers_left(self) -> int:
        return len(self.producers) - len(self._reported)

    def stop_producers(self) -> None:
        for p in self.producers.values():
            p.stop()

    def rejoin(self, names: list[str]) -> None:
        """Ray actors only: a Faust worker's group membership is Faust's own."""
        if self.ray is not None:
            self.ray.rejoin(names)


def _producer_result(p: FaustProcess) -> dict[str, Any]:
    try:
        result = dict(json.loads((p.run_dir / f"{p.name}.result.json").read_text()))
    except (OSError, ValueError):
        raise PipelineError(
            f"{p.name} exited with {p.proc.returncode if p.proc else '?'} and no result: {p.log_tail()}"
        ) from None
    if "error" in result:
        raise PipelineError(f"{p.name}: {result['error']}")
    return result


def _moving_window(progress: Progress) -> dict[str, Any]:
    current: dict[str, Any] = {}
    size = step = None
    for s in progress.stage("count"):
        mw = s.moving_window or {}
        size, step = mw.get("size_s", size), mw.get("step_s", step)
        current.update(mw.get("current") or {})
    return {"size_s": size, "step_s": step, "current": current} if size is not None else {}


def faust_status(settings: Settings) -> list[dict[str, Any]]:
    """Stats of the latest Faust run's workers (what `vapipe status --engine faust` prints).

    Raises:
        PipelineError: no Faust run has written stats under ``output_dir``.
    """
    latest = Path(settings.output_dir) / "faust" / "latest"
    if not latest.is_dir():
        raise PipelineError(f"no Faust run found under {latest.parent}: start one with `vapipe run --engine faust`")
    out = []
    for path in sorted(latest.glob("*.json")):
        if path.name == "settings.json" or path.name.endswith(".result.json"):
            continue
        try:
            out.append(dict(json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out
