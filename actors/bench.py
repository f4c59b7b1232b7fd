"""Benchmarks that print ratios measured side by side in one run (never timed assertions in tests).

``overhead``: the pipeline with one InterConsumer against a bare ultralytics
predict loop over the same decoded frames with the same model, on the same
machine, bare-pipeline-bare so drift on a noisy machine shows up.
"""

from __future__ import annotations

import logging
import platform
import time
import uuid
from collections.abc import Callable
from typing import Any

from actors.kafka_io import check_broker
from actors.launcher import RunPlan, run_pipeline
from pipeline.config import Settings
from pipeline.detector import UltralyticsDetector
from pipeline.sources import VideoSource, parse_source

__all__ = ["overhead", "bare_loop_fps"]

logger = logging.getLogger(__name__)


def bare_loop_fps(settings: Settings, frames: list[Any], batch: int = 1) -> float:
    """Frames/s of ``model.predict`` over the frames, ``batch`` frames per call, in this process."""
    detector = UltralyticsDetector(settings.model)
    detector.load()
    detector.detect(frames[:2])  # warm-up, as the pipeline's actors are warm when timing starts
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        detector.detect(frames[i : i + batch])
    return len(frames) / (time.perf_counter() - t0)


def _isolated(settings: Settings) -> Settings:
    """Fresh topics and groups so the run measures only its own frames."""
    tag = uuid.uuid4().hex[:8]
    t = settings.topics
    renamed = t.model_copy(update={
        name: getattr(t, name).model_copy(update={"name": f"bench-{tag}.{getattr(t, name).name}"})
        for name in ("frames", "detected_frames", "detections", "counts", "counts_changelog")
    })
    return settings.model_copy(update={"topics": renamed, "group_prefix": f"bench-{tag}"})


def overhead(settings: Settings, video: str, frames: int, on_progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Pipeline frames/s over bare-loop frames/s on the same frames; target >= 0.85.

    The headline ratio compares with a bare loop that calls predict on the same batch
    size as the InterConsumer (the stronger baseline: ultralytics has a per-call cost);
    the ratio against a frame-by-frame loop is reported too.
    """
    check_broker(settings.kafka)  # fail in seconds, not after the bare loop
    spec = parse_source(video, stream_id="bench")
    source = VideoSource(spec, max_frames=frames).open()
    images = [f.image for f in source]
    source.close()
    batch = settings.inter.batch_size
    per_frame = bare_loop_fps(settings, images, 1)
    bare_before = bare_loop_fps(settings, images, batch)
    run_settings = _isolated(settings.model_copy(update={
        "producer": settings.producer.model_copy(update={"fps": 0.0, "max_frames": frames}),
    }))
    plan = RunPlan(sources=[spec], replicas={"inter": 1, "crop": 1, "count": 1}, include_dashboard=False)
    summary = run_pipeline(run_settings, plan, on_progress=on_progress)
    bare_after = bare_loop_fps(settings, images, batch)
    bare = (bare_before + bare_after) / 2
    pipe = summary["frames_per_s"]
    return {
        "benchmark": "overhead",
        "model": settings.model.name,
        "video": video,
        "frames": len(images),
        "batch_size": batch,
        "bare_loop_fps": round(bare, 2),
        "bare_loop_fps_before_after": [round(bare_before, 2), round(bare_after, 2)],
        "bare_loop_per_frame_fps": round(per_frame, 2),
        "pipeline_fps": pipe,
        "ratio": round(pipe / bare, 3) if bare else None,
        "ratio_vs_per_frame_loop": round(pipe / per_frame, 3) if per_frame else None,
        "target": 0.85,
        "peak_rss_mb": {name: a.get("peak_rss_mb") for name, a in summary["actors"].items()},
        "count_latency_ms": summary["count_latency_ms"],
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
    }
