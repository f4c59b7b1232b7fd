"""The run contract: what every worker reports and what a run summary holds, as typed data.

Workers report ``WorkerStats`` (over Ray, or as JSON files from Faust worker processes);
the driver folds them into a ``RunSummary`` that is written to ``output/runs/<run>.json``.
Keys of that JSON are only ever added, never renamed, so scripts that read it keep working;
``schema_version`` says which fields to expect.

Latencies live in a ``LatencyHistogram``: fixed log-spaced buckets, so memory stays bounded
however long a camera runs, and histograms of several replicas merge by adding counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["STAGES", "SUMMARY_SCHEMA_VERSION", "LatencyHistogram", "WorkerStats", "RunSummary", "traffic_line"]

STAGES: tuple[str, ...] = ("inter", "crop", "count")
"""The consumer stages, in data-path order: A -> inter -> B/C -> crop (B) and count (C)."""

SUMMARY_SCHEMA_VERSION = 3
"""1: the untyped summary of the first releases; 2: adds ``schema_version`` and ``latency_histogram``;
3: adds ``box_counts`` (always) and ``traffic`` (runs with ``tracking.enabled``)."""


def traffic_line(row: dict[str, Any]) -> str:
    """``vehicles car=12, truck=2; gate in 9 / out 4; stationary 1`` for one stream."""

    def classes(counts: dict[str, int]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"

    parts = [f"vehicles {classes(row.get('unique_vehicles', {}))}"]
    for line, per_dir in sorted((row.get("line_crossings") or {}).items()):
        parts.append(f"{line} in {sum(per_dir.get('in', {}).values())} / out {sum(per_dir.get('out', {}).values())}")
    parts.append(f"moving {sum(row.get('moving_vehicles', {}).values())}")
    parts.append(f"stationary now {sum(row.get('stationary_vehicles', {}).values())}")
    return "; ".join(parts)


class LatencyHistogram:
    """Latencies in milliseconds, in log-spaced buckets 2% wide from 0.1 ms to about 28 hours.

    Percentiles are exact to the bucket (±1%), memory is one small array whatever the count,
    and two histograms merge by adding counts (HdrHistogram's idea, in numpy).
    """

    LOW_MS = 0.1
    GROWTH = 1.02
    BUCKETS = 1024

    def __init__(self) -> None:
        self.counts = np.zeros(self.BUCKETS, dtype=np.int64)

    @classmethod
    def _bucket(cls, value_ms: float) -> int:
        if not value_ms > cls.LOW_MS:  # also catches NaN and negatives (clock skew between hosts)
            return 0
        if not math.isfinite(value_ms):
            return cls.BUCKETS - 1
        return min(int(math.log(value_ms / cls.LOW_MS, cls.GROWTH)) + 1, cls.BUCKETS - 1)

    @classmethod
    def _value(cls, bucket: int) -> float:
        """The geometric middle of a bucket."""
        if bucket == 0:
            return cls.LOW_MS
        return float(cls.LOW_MS * cls.GROWTH ** (bucket - 0.5))

    def record(self, value_ms: float, n: int = 1) -> None:
        """Add ``n`` samples of ``value_ms`` (a batch's per-frame time, once per frame)."""
        self.counts[self._bucket(value_ms)] += n

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        self.counts += other.counts
        return self

    def percentile(self, q: float) -> float:
        """The value below which a fraction ``q`` (0..1) of the samples lie; 0.0 when empty."""
        total = self.count
        if total == 0:
            return 0.0
        rank = min(max(int(q * total), 0), total - 1)
        bucket = int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))
        return self._value(bucket)

    def cumulative(self, bounds_ms: list[float]) -> list[int]:
        """Samples at or below each bound, as a Prometheus histogram's ``le`` buckets want them.

        A sample counts below a bound when its whole bucket does, so each figure is exact to one
        bucket (2%) of the bound.
        """
        uppers = self.LOW_MS * self.GROWTH ** np.arange(self.BUCKETS)
        cum = np.cumsum(self.counts)
        return [int(cum[i - 1]) if i > 0 else 0 for i in np.searchsorted(uppers, bounds_ms, side="right")]

    def total_ms(self) -> float:
        """Sum of the samples, each taken at its bucket's middle (±1%)."""
        nonzero = np.flatnonzero(self.counts)
        return float(sum(self._value(int(i)) * int(self.counts[i]) for i in nonzero))

    def summary(self) -> dict[str, float]:
        """The summary's ``count_latency_ms`` block: p50, p95, p99 and the sample count ``n``."""
        if self.count == 0:
            return {}
        return {
            "p50": round(self.percentile(0.5), 1),
            "p95": round(self.percentile(0.95), 1),
            "p99": round(self.percentile(0.99), 1),
            "n": float(self.count),
        }

    def to_dict(self) -> dict[str, Any]:
        """Sparse, JSON-safe form: the bucket layout and the non-empty buckets."""
        nonzero = np.flatnonzero(self.counts)
        return {
            "low_ms": self.LOW_MS,
            "growth": self.GROWTH,
            "buckets": {str(int(i)): int(self.counts[i]) for i in nonzero},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LatencyHistogram:
        hist = cls()
        if not data:
            return hist
        if data.get("low_ms") != cls.LOW_MS or data.get("growth") != cls.GROWTH:
            raise ValueError(f"latency histogram layout {data.get('low_ms')}/{data.get('growth')} is not ours")
        for key, n in (data.get("buckets") or {}).items():
            index = int(key)
            if 0 <= index < cls.BUCKETS and int(n) > 0:
                hist.counts[index] += int(n)
        return hist


CARRIED_COUNTERS = (
    "records_in",
    "frames_in",
    "frames_out",
    "poison",
    "dead_lettered",
    "commit_failures",
    "retries",
    "skip_markers",
    "detections",
    "end_of_streams",
    "duplicates",
    "frames_skipped",
)
"""Counters a worker sums over its lives (restore figures and rates describe the live process only)."""


@dataclass
class EarlierLives:
    """What a worker's earlier processes counted. A restarted worker (Ray restarting a killed actor,
    the Faust engine a crashed process) starts its counters at 0; the run's totals, its live line
    and its summary must not fall back when it does."""

    counters: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def end_life(self, last: dict[str, Any]) -> None:
        """Keep what a process that is gone reported last."""
        for key in CARRIED_COUNTERS:
            self.counters[key] = self.counters.get(key, 0) + int(last.get(key) or 0)
        self.latency.merge(LatencyHistogram.from_dict(last.get("latency_histogram")))

    def add_to(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The live process's report plus its earlier lives (a new dict)."""
        out = dict(stats)
        for key, n in self.counters.items():
            out[key] = int(out.get(key) or 0) + n
        if self.latency.count:
            merged = LatencyHistogram.from_dict(out.get("latency_histogram")).merge(self.latency)
            out["latency_histogram"], out["latency_ms"] = merged.to_dict(), merged.summary()
        return out


@dataclass
class WorkerStats:
    """One worker's report (a stage replica or a producer), polled about once a second.

    Stage-specific fields stay at their defaults for other stages.
    """

    name: str
    """Actor or process name: ``inter-0``, ``count-1``, ``producer-<stream>``."""
    stage: str
    """``inter``, ``crop``, ``count`` or ``producer``."""
    running: bool = True
    """The worker's loop is running (False once stopped, finished or crashed)."""
    ready: bool = False
    """Clients exist, the model is loaded and the first poll joined the group."""
    assigned: int = 0
    """Input partitions this worker owns, as of its last poll."""
    records_in: int = 0
    """Input records consumed in committed batches (frames, end markers and poison records)."""
    frames_in: int = 0
    """Frames taken from the input (a redelivered count frame is counted here and in ``duplicates``)."""
    frames_out: int = 0
    """Frames fully handled: detected, cropped, or applied to the table (producers: frames published)."""
    poison: int = 0
    """Records that failed permanently: they did not decode, or an output of theirs is above the size limit."""
    dead_lettered: int = 0
    """Records sent to the dead-letter topic."""
    commit_failures: int = 0
    """At-least-once offset commits refused after a rebalance (the records are redelivered)."""
    retries: int = 0
    """Batches that failed (broker, sink) and were rewound to be retried."""
    fps: float = 0.0
    """Frames/s over the last ~30 polls."""
    lag: int | None = None
    """Records left in the partitions this worker owns."""
    partition_lag: dict[str, int] = field(default_factory=dict)
    """The same per input partition (partition number as a string)."""
    lag_s: float | None = None
    """Consumer lag in seconds, from record timestamps: how long the oldest record of the last polled
    batch had waited in Kafka (0 when a poll finds nothing new)."""
    busy: float = 0.0
    """Fraction of the last 10 s spent processing batches (decode, detect, encode; not the commit):
    1.0 is a replica that never waits for input."""
    uptime_s: float = 0.0
    last_error: str | None = None
    """The last failure, cleared when a retry succeeds."""
    skip_markers: int = 0
    """Frames that will never be counted: markers sent to topic C by inter for frames it dead-lettered,
    or markers applied by count (each closes a gap in the table at once)."""
    # inter
    detections: int = 0
    end_of_streams: int = 0
    model: str | None = None
    inference_s: float = 0.0
    """Seconds spent in the model (inference only)."""
    decode_s: float = 0.0
    """Seconds spent decoding and letterboxing JPEGs for the model (none for the calibration detector)."""
    postprocess_s: float = 0.0
    """Seconds spent in post-processing (NMS, boxes scaled back); 0 where the model does its own."""
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-frame milliseconds of each InterConsumer phase (``decode``, ``inference``, ``post``) as
    ``LatencyHistogram.to_dict()``, from the same clocks as the seconds above, so replicas merge exactly."""
    # crop
    crops: dict[str, int] = field(default_factory=dict)
    """Crops written per label, committed batches only."""
    # count
    duplicates: int = 0
    """Redelivered frames the table had already applied."""
    restores: int = 0
    """Times the table was re-read from its changelog (assignments and rewinds)."""
    restore_records: int = 0
    """Changelog records those restores read (only owned partitions, only after a local checkpoint)."""
    restore_s: list[float] = field(default_factory=list)
    """Seconds each of the last 32 restores took."""
    restored_partitions: list[int] = field(default_factory=list)
    """Changelog partitions the last restore read (those numbered like the owned C partitions)."""
    table: dict[str, dict[str, Any]] = field(default_factory=dict)
    """This replica's view of the count table: stream -> snapshot summary."""
    latency_ms: dict[str, float] = field(default_factory=dict)
    """Capture-to-count latency percentiles (p50, p95, p99, n)."""
    latency_histogram: dict[str, Any] | None = None
    """``LatencyHistogram.to_dict()`` of the same samples, so the driver merges replicas exactly."""
    last_applied_ts: float | None = None
    """Wall-clock time of the last frame applied to the table."""
    moving_window: dict[str, Any] | None = None
    """Faust count workers: the hopping-window table's size, step and current view."""
    # producer
    stream_id: str | None = None
    frames_skipped: int = 0
    camera: dict[str, Any] | None = None
    """A live source's ``CameraStatus.to_dict()``: connected or reconnecting (since, attempts), last frame."""
    # placement
    node: str | None = None
    node_id: str | None = None
    pid: int | None = None
    gpus: list[str] = field(default_factory=list)
    peak_rss_mb: float | None = None
    # Faust engine
    engine: str = "ray"
    crashed: str | None = None
    """Why a Faust worker process exited, if it did."""
    skipped_read: int = 0
    """Records Faust skipped after a rebalance, read back from Kafka and processed."""
    restarts: int = 0
    """Times the engine restarted this worker."""
    waiting: str | None = None
    """Why this worker is not ready yet (Faust: no partition, rebalancing, which changelog offsets recovery awaits)."""
    stuck: str | None = None
    """Why this worker cannot become ready (a table recovery that received nothing for ``faust.stuck_after_s``)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerStats:
        """From a worker's JSON report; unknown keys (a newer worker) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def histogram(self) -> LatencyHistogram:
        return LatencyHistogram.from_dict(self.latency_histogram)


@dataclass
class RunSummary:
    """What a run did, written to ``output/runs/<run_id>.json`` and returned by ``run_pipeline``."""

    run_id: str
    model: str
    sources: dict[str, str]
    """Stream id -> source URI (credentials redacted)."""
    replicas: dict[str, int]
    frames_produced: int
    """Frames of this run's streams in topic A (including those a crashed producer published)."""
    frames_skipped: int
    """Frames the producers skipped (unreadable)."""
    per_stream: dict[str, dict[str, int]]
    """Stream id -> produced, skipped and counted frames."""
    frames_processed: dict[str, int]
    """Stage -> frames handled by its replicas (a restarted replica's frames before the restart are not included)."""
    poison_records: dict[str, int]
    dead_lettered: dict[str, int]
    retried_batches: dict[str, int]
    detections: int
    """Boxes the InterConsumers found."""
    crops_per_label: dict[str, int]
    crops_dir: str
    vehicles: dict[str, dict[str, int]]
    """Stream id -> vehicle class -> boxes counted over all frames (the study's per-frame count)."""
    vehicle_totals: dict[str, int]
    wall_s: float
    """From the producers' start to the last stage drained."""
    processing_s: float
    """From the first frame published to the last count applied, on the workers' clocks."""
    frames_per_s: float
    """``frames_produced / processing_s``."""
    count_latency_ms: dict[str, float]
    """Capture-to-count latency: p50, p95, p99 and ``n`` over every counted frame."""
    stage_peak_fps: dict[str, float]
    timeline: list[dict[str, Any]]
    """One sample a second: produced frames and per stage frames, f/s and lag."""
    actors: dict[str, dict[str, Any]]
    """Worker name -> stage, frames_out, fps, node, gpus, peak_rss_mb."""
    latency_histogram: dict[str, Any] = field(default_factory=dict)
    """``LatencyHistogram.to_dict()`` of every counted frame, for merging runs."""
    schema_version: int = SUMMARY_SCHEMA_VERSION
    summary_path: str | None = None
    """Where the JSON was written (set by ``write_summary``)."""
    # Faust engine and mixed runs
    engines: dict[str, str] | None = None
    """Stage -> engine, when not every stage ran on Ray."""
    processing_guarantee: str | None = None
    restarts: dict[str, int] | None = None
    """Faust worker -> times the engine restarted it."""
    moving_window: dict[str, Any] | None = None
    """Faust's hopping-window counts (stream -> class -> count), merged over its count workers."""
    # schema 3
    box_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Stream id -> class -> boxes counted over all frames: the same figures as ``vehicles``, named for
    what they are (a car in view for 75 frames counts 75 times)."""
    traffic: dict[str, dict[str, Any]] | None = None
    """Runs with ``tracking.enabled``: stream id -> ``unique_vehicles``, ``moving_vehicles`` and
    ``stationary_vehicles`` (class -> vehicles), ``line_crossings`` (line -> "in"/"out" -> class ->
    crossings), ``frames_tracked`` and ``frames_stepped_over`` (never came, or came too late)."""
    autoscale: dict[str, Any] | None = None
    """Runs with ``inter.autoscale.enabled``: its ``config``, scale ``events`` (time, change, replicas
    after, why) and one ``samples`` row a second (replicas, ready, lag_s, busy, input_fps)."""

    def report(self) -> str:
        """The few lines a person reads at the end of a run (the JSON has everything else)."""
        lat = self.count_latency_ms
        latency = f", latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms" if lat else ""
        streams = len(self.per_stream)
        box_header = "boxes counted" if self.traffic is not None else "vehicles"
        lines = [
            f"run {self.run_id}: {self.frames_produced} frames from {streams} stream{'s' * (streams != 1)} "
            f"in {self.processing_s:.1f} s ({self.frames_per_s:.1f} frames/s){latency}",
            f"  {'stream':<32}{'produced':>10}{'skipped':>9}{'counted':>9}  {box_header}",
        ]
        for sid, row in self.per_stream.items():
            vehicles = ", ".join(f"{k}={v}" for k, v in sorted(self.vehicles.get(sid, {}).items())) or "-"
            lines.append(
                f"  {sid:<32}{row.get('produced', 0):>10}{row.get('skipped', 0):>9}{row.get('counted', 0):>9}  {vehicles}"
            )
        for sid, row in (self.traffic or {}).items():
            lines.append(f"  {sid}: {traffic_line(row)}")
        crops = sum(self.crops_per_label.values())
        by_label = ", ".join(f"{k}={v}" for k, v in self.crops_per_label.items())
        lines.append(f"  crops: {crops}" + (f" ({by_label})" if by_label else "") + f" in {self.crops_dir}")
        lines.append(
            f"  dead-lettered: {sum(self.dead_lettered.values())}, retried batches: {sum(self.retried_batches.values())}"
        )
        nodes: dict[str, list[str]] = {}
        for name, actor in self.actors.items():
            nodes.setdefault(str(actor.get("node") or "?"), []).append(name)
        if len(nodes) > 1:  # a cluster: say where each actor ran
            lines.append("  actors by node: " + "; ".join(f"{node}: {', '.join(names)}" for node, names in sorted(nodes.items())))
        if self.summary_path:
            lines.append(f"  summary: {self.summary_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field, leaving out engine-specific ones that are unset."""
        data = asdict(self)
        for key in ("engines", "processing_guarantee", "restarts", "moving_window", "summary_path", "traffic", "autoscale"):
            if data[key] is None:
                del data[key]
        return data
