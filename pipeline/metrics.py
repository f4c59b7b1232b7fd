"""Every Prometheus metric vapipe exports, built from the workers' ``WorkerStats``: the one place they are defined.

The workers already count everything (``actors.meter``, the stages, the producers) and the run
loop polls them once a second; this module turns one round of those reports into metric
families, so nothing is counted twice and the metrics always agree with the run summary.
Names follow Prometheus conventions and the field's (Frigate's per-camera ``camera_fps``,
Kafka exporters' lag in records and in seconds): unit suffixes, ``_total`` for counters, and only
bounded labels (stream, stage, actor, partition, class, line; never a frame).

Example:
    >>> families = metric_families([WorkerStats(name="inter-0", stage="inter", frames_out=3)])
    >>> [f.name for f in families][:2]
    ['vapipe_camera_fps', 'vapipe_frames_published']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from pipeline.stats import STAGES, LatencyHistogram, WorkerStats

__all__ = ["METRICS", "BUCKETS_S", "metric_families", "best_tables"]

BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Histogram bucket bounds in seconds, shared by inference and end-to-end latency."""

METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # name: (type, help, labels)
    "vapipe_camera_fps": ("gauge", "Frames/s each producer publishes (per camera or file).", ("stream",)),
    "vapipe_frames_published_total": ("counter", "Frames published to topic A.", ("stream",)),
    "vapipe_frames_skipped_total": (
        "counter",
        "Frames that will never be counted: unreadable at the source, dead-lettered (poison, too_large) or given up (lost_gap).",
        ("stream", "reason"),
    ),
    "vapipe_stage_frames_total": ("counter", "Frames each stage replica fully handled.", ("stage", "actor")),
    "vapipe_stage_fps": ("gauge", "Frames/s of each stage replica.", ("stage", "actor")),
    "vapipe_stage_busy_ratio": (
        "gauge",
        "Fraction of the last 10 s a replica spent processing batches (not committing them).",
        ("stage", "actor"),
    ),
    "vapipe_stage_replicas": ("gauge", "Replicas of each stage reporting.", ("stage",)),
    "vapipe_actor_restarts_total": ("counter", "Times Ray (or the Faust engine) restarted a worker.", ("stage", "actor")),
    "vapipe_inference_seconds": (
        "histogram",
        "Per-frame time in each InterConsumer phase: decode (JPEG to model input), inference, post (NMS, boxes scaled back).",
        ("phase",),
    ),
    "vapipe_consumer_lag": ("gauge", "Records left in each input partition of a stage.", ("stage", "partition")),
    "vapipe_consumer_lag_seconds": (
        "gauge",
        "How long the oldest record of a stage's last polled batches had waited in Kafka (record timestamps).",
        ("stage",),
    ),
    "vapipe_e2e_latency_seconds": ("histogram", "Publish to count-applied latency of every counted frame.", ()),
    "vapipe_dead_lettered_total": ("counter", "Records sent to the dead-letter topic.", ("stage",)),
    "vapipe_retried_batches_total": ("counter", "Batches that failed transiently and were retried.", ("stage",)),
    "vapipe_poison_records_total": ("counter", "Records that failed permanently.", ("stage",)),
    "vapipe_detections_total": ("counter", "Boxes the InterConsumers found.", ()),
    "vapipe_crops_total": ("counter", "Crops written, per label.", ("label",)),
    "vapipe_vehicles_total": ("counter", "Vehicle boxes counted over all frames (box counts).", ("stream", "class")),
    "vapipe_unique_vehicles_total": ("counter", "Tracked vehicles (tracking.enabled).", ("stream", "class")),
    "vapipe_line_crossings_total": (
        "counter",
        "Tracked vehicles crossing each counting line.",
        ("stream", "line", "direction", "class"),
    ),
}
"""Every metric: type, help text and label names."""


def _family(name: str) -> Any:
    """A fresh family of one metric (each family type has its own ``add_metric`` signature)."""
    kind, doc, labels = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))
    if kind == "gauge":
        return GaugeMetricFamily(name, doc, labels=list(labels))
    return HistogramMetricFamily(name, doc, labels=list(labels))


def _add_histogram(family: HistogramMetricFamily, labels: list[str], hist: LatencyHistogram) -> None:
    cum = hist.cumulative([b * 1000 for b in BUCKETS_S])
    buckets = [(f"{b:g}", float(n)) for b, n in zip(BUCKETS_S, cum, strict=True)] + [("+Inf", float(hist.count))]
    family.add_metric(labels, buckets, sum_value=hist.total_ms() / 1000)


def best_tables(stats: Iterable[WorkerStats]) -> dict[str, dict[str, Any]]:
    """Each stream's row of the count table from the replica that applied most of it (a replica
    may hold an older copy of a stream it restored but does not own)."""
    best: dict[str, dict[str, Any]] = {}
    for s in stats:
        if s.stage != "count":
            continue
        for sid, row in s.table.items():
            if int(row.get("frames_applied") or 0) >= int(best.get(sid, {}).get("frames_applied", -1)):
                best[sid] = row
    return best


def metric_families(stats: Iterable[WorkerStats]) -> list[Metric]:
    """The metric families of one round of worker reports (the workers that answered last)."""
    workers = list(stats)
    fam = {name: _family(name) for name in METRICS}

    def add(name: str, labels: list[str], value: float) -> None:
        fam[name].add_metric(labels, float(value))

    phases: dict[str, LatencyHistogram] = {p: LatencyHistogram() for p in ("decode", "inference", "post")}
    e2e = LatencyHistogram()
    lag_s: dict[str, float] = {}
    partition_lag: dict[tuple[str, str], int] = {}
    crops: dict[str, int] = {}
    for s in workers:
        if s.stage == "producer":
            stream = s.stream_id or s.name.removeprefix("producer-")
            add("vapipe_camera_fps", [stream], s.fps)
            add("vapipe_frames_published_total", [stream], s.frames_out)
            add("vapipe_frames_skipped_total", [stream, "unreadable"], s.frames_skipped)
            add("vapipe_actor_restarts_total", [s.stage, s.name], s.restarts)
            continue
        if s.stage not in STAGES:
            continue
        add("vapipe_stage_frames_total", [s.stage, s.name], s.frames_out)
        add("vapipe_stage_fps", [s.stage, s.name], s.fps)
        add("vapipe_stage_busy_ratio", [s.stage, s.name], s.busy)
        add("vapipe_actor_restarts_total", [s.stage, s.name], s.restarts)
        for partition, n in s.partition_lag.items():
            partition_lag[(s.stage, partition)] = max(partition_lag.get((s.stage, partition), 0), n)
        if s.lag_s is not None:
            lag_s[s.stage] = max(lag_s.get(s.stage, 0.0), s.lag_s)
        for phase, data in s.timings.items():
            if phase in phases:
                phases[phase].merge(LatencyHistogram.from_dict(data))
        if s.stage == "count":
            e2e.merge(s.histogram)
        for label, n in s.crops.items():
            crops[label] = crops.get(label, 0) + n
    for stage in STAGES:
        members = [s for s in workers if s.stage == stage]
        add("vapipe_stage_replicas", [stage], len(members))
        add("vapipe_dead_lettered_total", [stage], sum(s.dead_lettered for s in members))
        add("vapipe_retried_batches_total", [stage], sum(s.retries for s in members))
        add("vapipe_poison_records_total", [stage], sum(s.poison for s in members))
        if stage in lag_s:
            add("vapipe_consumer_lag_seconds", [stage], lag_s[stage])
    for (stage, partition), n in sorted(partition_lag.items()):
        add("vapipe_consumer_lag", [stage, partition], n)
    add("vapipe_detections_total", [], sum(s.detections for s in workers if s.stage == "inter"))
    for label, n in sorted(crops.items()):
        add("vapipe_crops_total", [label], n)
    for phase, hist in phases.items():
        _add_histogram(fam["vapipe_inference_seconds"], [phase], hist)
    _add_histogram(fam["vapipe_e2e_latency_seconds"], [], e2e)
    for stream, row in sorted(best_tables(workers).items()):
        for reason, n in sorted((row.get("frames_skipped") or {}).items()):
            add("vapipe_frames_skipped_total", [stream, reason], n)
        for cls, n in sorted((row.get("totals") or {}).items()):
            add("vapipe_vehicles_total", [stream, cls], n)
        for cls, n in sorted((row.get("unique_vehicles") or {}).items()):
            add("vapipe_unique_vehicles_total", [stream, cls], n)
        for line, per_dir in sorted((row.get("line_crossings") or {}).items()):
            for direction, per_class in sorted(per_dir.items()):
                for cls, n in sorted(per_class.items()):
                    add("vapipe_line_crossings_total", [stream, line, direction, cls], n)
    return list(fam.values())
