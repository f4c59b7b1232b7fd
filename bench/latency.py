"""``vapipe bench latency``: a real RTSP camera in real-time mode, capture-to-count latency per hop.

One camera (``cluster/rtsp.py``, the shared video looped) at each input rate, one replica per stage,
``producer.mode: realtime``, exactly-once. Latency is read back from the topics: each frame's
capture and publish times (its headers), the InterConsumer's inference time (its C record) and the
Kafka timestamps of its A, C and count records, so every hop is measured on the same frames:

- ``grab_to_publish``: decode, JPEG encode and send in the producer;
- ``wait_for_inter``: on topic A until the InterConsumer's batch ran (producer transaction, poll, batch fill);
- ``inference``: the model on the frame's batch;
- ``inter_to_count``: the InterConsumer's commit, then the count stage's poll and apply.

The single-frame model latency is measured in this process on the same frames before the runs.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.launcher import RunPlan
from actors.ray.engine import run_pipeline
from bench.experiments import TOPIC_KEYS, environment, isolated
from cluster.reading import read_all
from cluster.rtsp import RtspServer, check_rtsp_server
from cluster.topics import delete_topics
from pipeline.codecs import decode_detections, decode_json
from pipeline.config import Settings
from pipeline.detector import UltralyticsDetector
from pipeline.messages import FrameDetections
from pipeline.sources import VideoSource, parse_source

__all__ = ["latency", "hop_breakdown", "model_latency_ms"]

logger = logging.getLogger(__name__)

HOPS = ("grab_to_publish", "wait_for_inter", "inference", "inter_to_count", "capture_to_count")


def model_latency_ms(settings: Settings, video: str, frames: int = 30) -> float:
    """Median time of one ``detect([frame])`` call on the video's first frames, in this process."""
    images = [f.image for f in VideoSource(parse_source(video), max_frames=frames).open()]
    detector = UltralyticsDetector(settings.model)
    detector.load()
    detector.detect(images[:2])  # warm-up
    times = []
    for image in images:
        t0 = time.perf_counter()
        detector.detect([image])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else 0.0


def hop_breakdown(settings: Settings, stream_id: str) -> dict[str, dict[str, float]]:
    """Per-hop latency (ms) of every counted frame of a stream: p50, p95, p99 per hop."""
    a_ts: dict[int, float] = {}
    for r in read_all(settings.kafka, settings.topics.frames.name, timeout_s=60):
        if r.value:
            headers = dict(r.headers or [])
            if headers.get("stream_id", b"").decode() == stream_id:
                a_ts[int(headers["frame_index"])] = r.timestamp / 1000
    c: dict[int, tuple[FrameDetections, float]] = {}
    for r in read_all(settings.kafka, settings.topics.detections.name, timeout_s=60):
        item = decode_detections(r.value)
        if isinstance(item, FrameDetections) and item.meta.stream_id == stream_id:
            c[item.meta.frame_index] = (item, r.timestamp / 1000)
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    for r in read_all(settings.kafka, settings.topics.counts.name, timeout_s=60):
        body = decode_json(r.value)
        index = body.get("frame_index")
        if body.get("type") != "count" or body.get("stream_id") != stream_id or index not in c:
            continue
        item, c_ts = c[index]
        meta, counted = item.meta, r.timestamp / 1000
        published = meta.publish_ts or a_ts.get(index, meta.capture_ts)
        hops["grab_to_publish"].append((published - meta.capture_ts) * 1000)
        hops["wait_for_inter"].append((c_ts - published) * 1000 - item.inference_ms)
        hops["inference"].append(item.inference_ms)
        hops["inter_to_count"].append((counted - c_ts) * 1000)
        hops["capture_to_count"].append((counted - meta.capture_ts) * 1000)
    return {h: {"p50": _pct(v, 50), "p95": _pct(v, 95), "p99": _pct(v, 99), "n": len(v)} for h, v in hops.items()}


def latency(
    settings: Settings,
    video: str,
    rates: list[int],
    seconds: float,
    max_lag_s: float,
    port: int,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """One real-time run per camera rate; returns the report's rows and per-hop tables."""
    check_rtsp_server()
    model_ms = model_latency_ms(settings, video)
    rows, hops = [], {}
    for rate in rates:
        s = isolated(
            settings,
            producer={"fps": rate, "mode": "realtime", "max_lag_s": max_lag_s, "max_frames": int(rate * seconds)},
        )
        s = s.model_copy(update={"processing_guarantee": "exactly_once"})
        with RtspServer(video, port=port, fps=rate) as camera:
            plan = RunPlan(
                sources=[parse_source(f"cam={camera.url}")],
                replicas={"inter": 1, "crop": 1, "count": 1},
                include_dashboard=False,
            )
            try:
                summary = run_pipeline(s, plan, on_progress=on_progress)
                breakdown = hop_breakdown(s, "cam")
            finally:
                delete_topics(s.kafka, [getattr(s.topics, k).name for k in TOPIC_KEYS])
        total = breakdown["capture_to_count"]
        produced = summary.per_stream["cam"]
        rows.append(
            {
                "input_fps": rate,
                "frames": produced["produced"],
                "counted": produced["counted"],
                "dropped_behind": produced["produced"] - produced["counted"],
                "model_ms": round(model_ms, 1),
                "p50_ms": total["p50"],
                "p95_ms": total["p95"],
                "p99_ms": total["p99"],
                "p99_over_model": round(total["p99"] / model_ms, 2) if model_ms else 0.0,
                # The model inside the run (the InterConsumer's own time, under the run's CPU contention).
                "p99_over_inference_p50": round(total["p99"] / breakdown["inference"]["p50"], 2)
                if breakdown["inference"]["p50"]
                else 0.0,
                **{f"{h}_p50_ms": breakdown[h]["p50"] for h in HOPS[:-1]},
                **{f"{h}_p99_ms": breakdown[h]["p99"] for h in HOPS[:-1]},
            }
        )
        hops[str(rate)] = breakdown
    return {
        "benchmark": "latency",
        "video": video,
        "seconds": seconds,
        "max_lag_s": max_lag_s,
        "model_latency_ms": round(model_ms, 1),
        "table": rows,
        "rows": rows,
        "hops": hops,
        **environment(settings),
    }
