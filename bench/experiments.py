"""Benchmarks that print ratios measured side by side in one run (never timed assertions in tests).

- ``overhead``: the pipeline with one InterConsumer against a bare ultralytics
  predict loop over the same decoded frames with the same model, bare-pipeline-bare.
- ``scaling``: the study's strong (fixed input, r replicas of every stage) and weak
  (r producers and r replicas) scaling, repeated, with speedup and efficiency.
- ``sweep``: the study's future work: inference/poll batch size, input frame rate
  and JPEG quality against throughput, latency and detection agreement.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from actors.launcher import RunPlan
from actors.ray.engine import run_pipeline
from cluster.clients import check_broker
from cluster.raycluster import ray_session
from cluster.reading import read_all
from cluster.topics import delete_topics
from pipeline.codecs import decode_detections
from pipeline.config import Settings
from pipeline.detector import UltralyticsDetector
from pipeline.messages import Detections, FrameDetections
from pipeline.sources import VideoSource, parse_source
from pipeline.stats import STAGES

__all__ = ["overhead", "bare_loop_fps", "scaling", "sweep", "agreement", "environment"]

logger = logging.getLogger(__name__)

TOPIC_KEYS = ("frames", "detected_frames", "detections", "counts", "counts_changelog")


def environment(settings: Settings) -> dict[str, Any]:
    """Machine, model and software versions, for every report."""
    import kafka
    import ray

    versions = {"python": platform.python_version(), "ray": ray.__version__, "kafka-python": kafka.__version__}
    for name in ("ultralytics", "torch", "onnxruntime", "cv2"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "machine": f"{platform.machine()} cpus={os.cpu_count()} {platform.platform()}",
        "model": settings.model.name,
        "versions": versions,
    }


def bare_loop_fps(detector: UltralyticsDetector, frames: list[Any], batch: int = 1) -> float:
    """Frames/s of ``model.predict`` over the frames, ``batch`` frames per call, in this process."""
    detector.load()
    detector.detect(frames[:2])  # warm-up, as the pipeline's actors are warm when timing starts
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        detector.detect(frames[i : i + batch])
    return len(frames) / (time.perf_counter() - t0)


def isolated(settings: Settings, **stage_overrides: Any) -> Settings:
    """Fresh topics and groups so a run measures only its own frames."""
    tag = uuid.uuid4().hex[:8]
    t = settings.topics
    renamed = t.model_copy(update={k: getattr(t, k).model_copy(update={"name": f"bench-{tag}.{k}"}) for k in TOPIC_KEYS})
    update: dict[str, Any] = {"topics": renamed, "group_prefix": f"bench-{tag}"}
    for section, fields in stage_overrides.items():
        update[section] = getattr(settings, section).model_copy(update=fields)
    return settings.model_copy(update=update)


def _run(
    settings: Settings, sources: list[str], replicas: int, on_progress: Callable[[Any], None] | None, keep_topics: bool = False
) -> tuple[dict[str, Any], Settings]:
    plan = RunPlan(
        sources=[parse_source(src, stream_id=f"s{i}") for i, src in enumerate(sources)],
        replicas={"inter": replicas, "crop": replicas, "count": replicas},
        include_dashboard=False,
        allow_calibration=True,
    )
    try:
        return run_pipeline(settings, plan, on_progress=on_progress).to_dict(), settings
    finally:
        if not keep_topics:
            delete_topics(settings.kafka, [getattr(settings.topics, k).name for k in TOPIC_KEYS])


def overhead(
    settings: Settings, video: str, frames: int, repeat: int = 3, on_progress: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """Pipeline frames/s over bare-loop frames/s on the same frames; target >= 0.85.

    A shared 2-core machine drifts by 20% within a minute, so the runs are interleaved
    (bare, pipeline, bare, pipeline, ..., bare): each pipeline run is compared with the
    mean of the bare runs just before and after it, and the headline is the median of
    those ratios. The ratio against a loop that calls predict with the InterConsumer's
    batch size (ultralytics has a per-call cost) is reported too.
    """
    check_broker(settings.kafka)  # fail in seconds, not after the bare loop
    source = VideoSource(parse_source(video), max_frames=frames).open()
    images = [f.image for f in source]
    source.close()
    batch = settings.inter.batch_size
    detector = UltralyticsDetector(settings.model)
    pipe: list[float] = []
    summary: dict[str, Any] = {}
    with ray_session(settings.ray, include_dashboard=False):  # the bare loop too runs next to an idle Ray
        bare = [bare_loop_fps(detector, images, 1)]
        batched = bare_loop_fps(detector, images, batch)
        for rep in range(repeat):
            run_settings = isolated(settings, producer={"fps": 0.0, "max_frames": frames})
            summary, _ = _run(run_settings, [video], 1, on_progress)
            pipe.append(summary["frames_per_s"])
            bare.append(bare_loop_fps(detector, images, 1))
            logger.warning("overhead repeat %d: pipeline %.2f f/s, bare %.2f -> %.2f f/s", rep, pipe[-1], bare[-2], bare[-1])
    ratios = [p / ((bare[i] + bare[i + 1]) / 2) for i, p in enumerate(pipe)]
    rows = [
        {
            "repeat": i,
            "bare_before_fps": round(bare[i], 2),
            "pipeline_fps": round(p, 2),
            "bare_after_fps": round(bare[i + 1], 2),
            "ratio": round(ratios[i], 3),
        }
        for i, p in enumerate(pipe)
    ]
    headline = {
        "frames": len(images),
        "bare_loop_fps": round(statistics.median(bare), 2),
        "pipeline_fps": round(statistics.median(pipe), 2),
        "ratio": round(statistics.median(ratios), 3),
        "target": 0.85,
    }
    return {
        "rows": rows,
        "table": [headline],
        "benchmark": "overhead",
        "video": video,
        "frames": len(images),
        "repeat": repeat,
        "batch_size": batch,
        "bare_loop_fps": round(statistics.median(bare), 2),
        "bare_loop_fps_runs": [round(b, 2) for b in bare],
        "bare_loop_batched_fps": round(batched, 2),
        "pipeline_fps": round(statistics.median(pipe), 2),
        "pipeline_fps_runs": [round(p, 2) for p in pipe],
        "ratio": round(statistics.median(ratios), 3),
        "ratio_runs": [round(r, 3) for r in ratios],
        "ratio_vs_batched_loop": round(statistics.median(pipe) / batched, 3),
        "target": 0.85,
        "peak_rss_mb": {name: a.get("peak_rss_mb") for name, a in summary["actors"].items()},
        "count_latency_ms": summary["count_latency_ms"],
        **environment(settings),
    }


def _row(experiment: str, replicas: int, repeat: int, summary: dict[str, Any], **extra: Any) -> dict[str, Any]:
    lat = summary["count_latency_ms"]
    return {
        "experiment": experiment,
        "replicas": replicas,
        "repeat": repeat,
        "frames": summary["frames_produced"],
        "wall_s": summary["processing_s"],
        "fps": summary["frames_per_s"],
        **{f"peak_fps_{k}": v for k, v in summary["stage_peak_fps"].items()},
        "latency_p50_ms": lat.get("p50"),
        "latency_p95_ms": lat.get("p95"),
        "latency_p99_ms": lat.get("p99"),
        "peak_rss_mb_max": max((a.get("peak_rss_mb") or 0) for a in summary["actors"].values()),
        "peak_rss_mb_inter": max((a.get("peak_rss_mb") or 0) for n, a in summary["actors"].items() if n.startswith("inter")),
        **extra,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def scaling(
    settings: Settings,
    mode: Literal["strong", "weak"],
    replicas: list[int],
    frames: int,
    repeat: int,
    video: str,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Strong: fixed input (one stream of ``frames``), r replicas of every stage.
    Weak: r streams of ``frames`` each (r producers) and r replicas of every stage.

    Repeats are interleaved (1,2,3,1,2,3,...) so drift on a noisy machine spreads evenly.
    """
    check_broker(settings.kafka)
    rows: list[dict[str, Any]] = []
    timelines: dict[int, list[dict[str, Any]]] = {}
    with ray_session(settings.ray, include_dashboard=False):
        for rep in range(repeat):
            for r in replicas:
                s = isolated(settings, producer={"fps": 0.0, "max_frames": frames})
                sources = [video] * (1 if mode == "strong" else r)
                summary, _ = _run(s, sources, r, on_progress)
                rows.append(_row(mode, r, rep, summary))
                timelines[r] = summary["timeline"]
                logger.warning(
                    "%s r=%d repeat %d: %.2fs, %.1f f/s", mode, r, rep, summary["processing_s"], summary["frames_per_s"]
                )
    base_t, _ = _mean_std([row["wall_s"] for row in rows if row["replicas"] == replicas[0]])
    base_median = statistics.median(row["wall_s"] for row in rows if row["replicas"] == replicas[0])
    table = []
    for r in replicas:
        times = [row["wall_s"] for row in rows if row["replicas"] == r]
        mean_t, std_t = _mean_std(times)
        fps_mean, fps_std = _mean_std([row["fps"] for row in rows if row["replicas"] == r])
        median_t = statistics.median(times)
        entry: dict[str, Any] = {
            "replicas": r,
            "wall_s_mean": round(mean_t, 3),
            "wall_s_std": round(std_t, 3),
            "wall_s_median": round(median_t, 3),
            "fps_mean": round(fps_mean, 2),
            "fps_std": round(fps_std, 2),
            "latency_p50_ms": round(statistics.median(x["latency_p50_ms"] for x in rows if x["replicas"] == r), 1),
            "latency_p99_ms": round(statistics.median(x["latency_p99_ms"] for x in rows if x["replicas"] == r), 1),
        }
        if mode == "strong":
            entry["speedup"] = round(base_t / mean_t * replicas[0], 3)
            entry["efficiency"] = round(entry["speedup"] / r, 3)
            # Medians resist the odd run that a shared machine slows down.
            entry["speedup_median"] = round(base_median / median_t * replicas[0], 3)
        else:
            entry["time_ratio_to_base"] = round(mean_t / base_t, 3)
            entry["time_ratio_median"] = round(median_t / base_median, 3)
        table.append(entry)
    return {
        "benchmark": mode,
        "frames": frames,
        "repeat": repeat,
        "video": video,
        "table": table,
        "rows": rows,
        "timelines": {str(k): v for k, v in timelines.items()},
        **environment(settings),
    }


def _boxes_match(a: Detections, b: Detections, iou: float = 0.5) -> tuple[int, int]:
    """Greedy same-label IoU matching; returns (matched, total boxes in both)."""
    matched, used = 0, set()
    for i in range(len(a)):
        for j in range(len(b)):
            if j in used or a.labels[i] != b.labels[j]:
                continue
            x1, y1 = np.maximum(a.xyxy[i, :2], b.xyxy[j, :2])
            x2, y2 = np.minimum(a.xyxy[i, 2:], b.xyxy[j, 2:])
            inter = max(x2 - x1, 0) * max(y2 - y1, 0)
            union = np.prod(a.xyxy[i, 2:] - a.xyxy[i, :2]) + np.prod(b.xyxy[j, 2:] - b.xyxy[j, :2]) - inter
            if union > 0 and inter / union >= iou:
                matched += 1
                used.add(j)
                break
    return matched, len(a) + len(b)


def agreement(run: dict[int, Detections], reference: dict[int, Detections]) -> float:
    """F1-style agreement of two runs' detections over the frames they share (1.0 = identical boxes)."""
    matched = total = 0
    for index in set(run) & set(reference):
        m, t = _boxes_match(run[index], reference[index])
        matched, total = matched + m, total + t
    return round(2 * matched / total, 4) if total else 1.0


def _detections_by_frame(settings: Settings) -> dict[int, Detections]:
    out: dict[int, Detections] = {}
    for record in read_all(settings.kafka, settings.topics.detections.name):
        item = decode_detections(record.value)
        if isinstance(item, FrameDetections):
            out[item.meta.frame_index] = item.detections
    return out


def sweep(
    settings: Settings,
    batches: list[int],
    fps_values: list[float],
    qualities: list[int],
    frames: int,
    video: str,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """One factor at a time around a base point (largest quality, batch 8 or the first, fps max).

    Agreement compares each run's detections with the base run's, frame by frame.
    """
    check_broker(settings.kafka)
    base = {"batch": 8 if 8 in batches else batches[0], "fps": 0.0, "jpeg_quality": max(qualities)}
    points = [base] + [dict(base, batch=b) for b in batches if b != base["batch"]]
    points += [dict(base, fps=f) for f in fps_values if f != base["fps"]]
    points += [dict(base, jpeg_quality=q) for q in qualities if q != base["jpeg_quality"]]
    rows: list[dict[str, Any]] = []
    reference: dict[int, Detections] | None = None
    with ray_session(settings.ray, include_dashboard=False):
        for point in points:
            s = isolated(
                settings,
                producer={"fps": point["fps"], "max_frames": frames, "jpeg_quality": point["jpeg_quality"]},
                inter={"batch_size": point["batch"]},
            )
            summary, used = _run(s, [video], 1, on_progress, keep_topics=True)
            detections = _detections_by_frame(used)
            delete_topics(used.kafka, [getattr(used.topics, k).name for k in TOPIC_KEYS])
            if reference is None:
                reference = detections
            factor = "base" if point == base else next(k for k in base if point[k] != base[k])
            factor = {"fps": "input_fps"}.get(factor, factor)
            rows.append(
                _row(
                    "sweep",
                    1,
                    0,
                    summary,
                    factor=factor,
                    batch=point["batch"],
                    input_fps=point["fps"] or "max",
                    jpeg_quality=point["jpeg_quality"],
                    agreement=agreement(detections, reference),
                )
            )
            logger.warning("sweep %s: %.1f f/s", point, summary["frames_per_s"])
    return {"benchmark": "sweep", "frames": frames, "video": video, "base": base, "rows": rows, **environment(settings)}


# -- Ray versus Faust ---------------------------------------------------------
def _worker_rss(summary: dict[str, Any]) -> dict[str, float]:
    """Mean peak RSS (MB) of the stage workers (Ray actors or Faust processes), per stage and overall."""
    by_stage: dict[str, list[float]] = {}
    for a in summary["actors"].values():
        if a.get("stage") in STAGES and a.get("peak_rss_mb"):
            by_stage.setdefault(a["stage"], []).append(float(a["peak_rss_mb"]))
    out = {f"rss_mb_{stage}": round(statistics.fmean(v), 1) for stage, v in by_stage.items()}
    every = [x for v in by_stage.values() for x in v]
    out["rss_mb_per_worker"] = round(statistics.fmean(every), 1) if every else 0.0
    return out


def compare_engines(
    settings: Settings,
    engines: list[str],
    replicas: list[int],
    frames: int,
    repeat: int,
    models: list[str],
    video: str,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Strong scaling (one stream of ``frames``, r replicas of every stage) for each engine and model, in one run.

    Runs are interleaved engine by engine inside each (repeat, model, replicas) point, so
    drift on a shared machine hits both engines alike. Every Ray run starts and stops its
    own local Ray (as ``vapipe run`` does), so Faust runs do not share the CPUs with an idle Ray.

    Returns:
        ``{"benchmark": "compare", "table": [...], "rows": [...], ...}``; the table has, per model,
        engine and replica count: mean frames/s, speedup over 1 replica, latency p50/p99 and
        mean peak RSS per stage worker, plus ``fps_vs_ray`` (this engine's frames/s over Ray's).
    """
    from actors.engines import ENGINES
    from actors.engines import run as run_engines
    from pipeline.errors import ConfigError

    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise ConfigError(f"unknown engine(s) {unknown}: expected a comma-separated subset of {list(ENGINES)}")
    check_broker(settings.kafka)
    if "faust" in engines:
        # Both engines at the one guarantee Faust can run (faust-streaming#440), so they compare like for like.
        settings = settings.model_copy(update={"processing_guarantee": "at_least_once"})
    rows: list[dict[str, Any]] = []
    for rep in range(repeat):
        for model in models:
            for r in replicas:
                for engine in engines:
                    s = isolated(
                        settings.model_copy(update={"model": settings.model.model_copy(update={"name": model})}),
                        producer={"fps": 0.0, "max_frames": frames},
                    )
                    plan = RunPlan(
                        sources=[parse_source(video, stream_id="s0")],
                        replicas={"inter": r, "crop": r, "count": r},
                        include_dashboard=False,
                        allow_calibration=True,
                    )
                    try:
                        summary = run_engines(s, plan, dict.fromkeys(STAGES, engine), on_progress=on_progress).to_dict()
                    finally:
                        delete_topics(s.kafka, [getattr(s.topics, k).name for k in TOPIC_KEYS])
                    rows.append(_row("compare", r, rep, summary, engine=engine, model=model, **_worker_rss(summary)))
                    logger.warning("compare %s %s r=%d repeat %d: %.1f f/s", engine, model, r, rep, summary["frames_per_s"])
    table: list[dict[str, Any]] = []
    for model in models:
        for engine in engines:
            base: float | None = None
            for r in replicas:
                pts = [x for x in rows if x["model"] == model and x["engine"] == engine and x["replicas"] == r]
                fps = statistics.fmean(x["fps"] for x in pts)
                base = fps if base is None else base
                table.append(
                    {
                        "model": model,
                        "engine": engine,
                        "replicas": r,
                        "runs": len(pts),
                        "fps_mean": round(fps, 2),
                        "speedup": round(fps / base * replicas[0], 3) if base else None,
                        "latency_p50_ms": round(statistics.median(x["latency_p50_ms"] or 0 for x in pts), 1),
                        "latency_p99_ms": round(statistics.median(x["latency_p99_ms"] or 0 for x in pts), 1),
                        "rss_mb_per_worker": round(statistics.fmean(x["rss_mb_per_worker"] for x in pts), 1),
                        "rss_mb_inter": round(statistics.fmean(x.get("rss_mb_inter", 0.0) for x in pts), 1),
                    }
                )
    ray_fps = {(t["model"], t["replicas"]): t["fps_mean"] for t in table if t["engine"] == "ray"}
    for t in table:
        ref = ray_fps.get((t["model"], t["replicas"]))
        t["fps_vs_ray"] = round(t["fps_mean"] / ref, 3) if ref else None
    env = environment(settings)
    try:
        import faust

        env["versions"]["faust-streaming"] = faust.__version__
        env["versions"]["aiokafka"] = __import__("aiokafka").__version__
    except ImportError:
        pass
    env["model"] = ", ".join(models)
    return {
        "benchmark": "compare",
        "engines": engines,
        "frames": frames,
        "repeat": repeat,
        "video": video,
        "models": models,
        "table": table,
        "rows": rows,
        **env,
    }
