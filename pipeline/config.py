"""Settings for a whole pipeline: one frozen pydantic model per concern.

Values come, lowest priority first, from the model defaults (which
``configs/default.yaml`` mirrors), a YAML file, ``VAPIPE_*`` environment
variables and CLI flags. Nested fields are addressed with ``__`` in environment
variables and ``.`` in flags: ``VAPIPE_INTER__REPLICAS=3`` and
``--set inter.replicas=3`` mean the same thing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

__all__ = [
    "KafkaConfig",
    "BrokerConfig",
    "TopicSpec",
    "TopicsConfig",
    "ProducerConfig",
    "StageConfig",
    "ModelConfig",
    "CropConfig",
    "CountConfig",
    "DecodeConfig",
    "CountingLine",
    "TrackingConfig",
    "RayConfig",
    "FaustConfig",
    "Settings",
    "load_settings",
    "set_path",
    "COCO_VEHICLES",
]

logger = logging.getLogger(__name__)

COCO_VEHICLES: tuple[str, ...] = ("bicycle", "car", "motorcycle", "bus", "train", "truck")
"""COCO labels the study counts as vehicles."""

ENV_PREFIX = "VAPIPE_"

Compression = Literal["snappy", "gzip", "lz4", "zstd", "none"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
ProcessingGuarantee = Literal["exactly_once", "at_least_once"]
InDirection = Literal["up", "down", "left", "right"]
Anchor = Literal["bottom_center", "center"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class KafkaConfig(_Frozen):
    """How every client reaches the cluster."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    connect_timeout_s: float = Field(10.0, gt=0)
    """How long a command waits for the broker before it fails with a clear error."""
    session_timeout_ms: int = Field(20000, ge=6000)
    """A consumer that stops heartbeating this long is dropped from its group and its partitions move
    to the others; lower recovers a killed replica sooner, higher rides out longer pauses (6 s minimum:
    the broker's group.min.session.timeout.ms)."""
    heartbeat_interval_ms: int = Field(2000, gt=0)
    """How often consumers heartbeat; keep it under a third of ``session_timeout_ms``."""
    linger_ms: int = Field(5, ge=0)
    """Producer batching delay; 5 ms as in the study."""
    compression_type: Compression = "snappy"
    """Producer compression; snappy as in the study."""
    max_message_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Largest record (a JPEG frame plus headers) producers send and brokers accept."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Passed unchanged to every kafka-python client (escape hatch)."""

    def hosts(self) -> list[str]:
        return [h.strip() for h in self.bootstrap_servers.split(",") if h.strip()]


class BrokerConfig(_Frozen):
    """The single-node KRaft broker that ``vapipe kafka start`` runs on this machine."""

    listen_host: str = "127.0.0.1"
    """Interface the broker binds; 0.0.0.0 to accept other machines."""
    advertised_host: str | None = None
    """Address other machines use to reach this broker; defaults to listen_host.
    Must be reachable from every Ray node when the cluster spans machines."""
    port: int = Field(9092, gt=0, lt=65536)
    controller_port: int = Field(9093, gt=0, lt=65536)
    state_dir: str = ".cache/kafka"
    """Jars, data, logs and pid file, relative to the working directory unless absolute."""
    heap: str = "768m"
    start_timeout_s: float = Field(60.0, gt=0)


class TopicSpec(_Frozen):
    name: str = Field(min_length=1)
    partitions: int = Field(6, gt=0)
    replication_factor: int = Field(1, gt=0)
    config: dict[str, str] = Field(default_factory=dict)


class TopicsConfig(_Frozen):
    """The study's topics A, B and C, plus the count table's output and changelog."""

    frames: TopicSpec = TopicSpec(name="vapipe.A.frames")
    """A: JPEG frames from producers."""
    detected_frames: TopicSpec = TopicSpec(name="vapipe.B.detected-frames")
    """B: JPEG frames with their detections, for the crop stage."""
    detections: TopicSpec = TopicSpec(name="vapipe.C.detections")
    """C: detections only (JSON), keyed by stream, for the count stage."""
    counts: TopicSpec = TopicSpec(name="vapipe.counts", partitions=3)
    """Per-frame count updates (JSON)."""
    counts_changelog: TopicSpec = TopicSpec(
        name="vapipe.counts-changelog",
        partitions=6,
        config={"cleanup.policy": "compact"},
    )
    """Compacted table state keyed by stream, so a restarted count replica recovers."""
    dead_letter: TopicSpec = TopicSpec(name="vapipe.dead-letter", partitions=1)
    """Records no stage could decode, with the reason and origin in headers."""

    def all(self) -> list[TopicSpec]:
        return [self.frames, self.detected_frames, self.detections, self.counts, self.counts_changelog, self.dead_letter]


class ProducerConfig(_Frozen):
    fps: float = Field(10.0, ge=0)
    """Target frames per second per stream (the study used 10); 0 means as fast as possible."""
    jpeg_quality: int = Field(90, ge=1, le=100)
    max_frames: int | None = Field(None, gt=0)
    """Stop a stream after this many frames (None: until the source ends)."""
    oversize: Literal["fail", "downscale"] = "fail"
    """A frame whose JPEG exceeds kafka.max_message_bytes: fail the stream with a clear error,
    or downscale it (lower quality, then smaller size) until it fits."""
    transaction_ms: int = Field(200, gt=0)
    """exactly_once: commit the producer's transaction at least this often (and at every 64 frames)."""
    num_cpus: float = Field(0.1, gt=0)


class StageConfig(_Frozen):
    """Replicas and Ray resources of one consumer stage."""

    replicas: int = Field(1, gt=0)
    num_cpus: float = Field(0.5, gt=0)
    """Logical Ray CPUs per actor; fractions let several replicas share a small machine."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor when the cluster has GPUs (fractions allowed); ignored otherwise."""
    batch_size: int = Field(8, gt=0)
    """Records handled per poll (inference batch for the InterConsumer)."""
    poll_timeout_ms: int = Field(200, gt=0)
    threads: int | None = Field(None, gt=0)
    """Math threads (OpenMP, torch) in each actor; None = every core of its node. Ray would
    otherwise force 1 thread on actors with fractional num_cpus, halving YOLO's speed."""


class ModelConfig(_Frozen):
    name: str = "yolov8n.pt"
    """Ultralytics model name or path; official weights are downloaded on first use."""
    device: str = "auto"
    """'auto' (GPU when the actor has one), 'cpu', 'cuda', 'cuda:1', ..."""
    imgsz: int = Field(640, gt=0)
    min_confidence: float = Field(0.25, ge=0, le=1)
    """Detections below this are dropped by the model itself."""


class CropConfig(_Frozen):
    min_confidence: float = Field(0.7, ge=0, le=1)
    """Crop only boxes strictly above this confidence."""
    jpeg_quality: int = Field(95, ge=1, le=100)


class CountConfig(_Frozen):
    min_confidence: float = Field(0.5, ge=0, le=1)
    """Count only boxes strictly above this confidence."""
    labels: tuple[str, ...] = COCO_VEHICLES
    window_frames: int = Field(50, gt=0)
    """Moving count covers the last N frames of each stream."""
    reorder_horizon_frames: int = Field(4096, gt=0)
    """A missing frame index is given up (counted as skipped, reason ``lost_gap``) once this many
    later frames of its stream are applied, so one frame that never comes cannot grow the table
    forever; a frame that arrives later than that is not counted. Frames dead-lettered upstream
    close their gap at once (reason ``poison`` or ``too_large``)."""
    max_gaps: int = Field(256, gt=0)
    """Most missing-frame gaps a stream's table holds open before giving up the oldest (``lost_gap``);
    bounds the snapshot on the changelog (a few bytes per gap)."""

    @field_validator("labels")
    @classmethod
    def _labels_not_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one label to count")
        return v


class DecodeConfig(_Frozen):
    """Bounds every decoder checks before parsing a record, so no poison record can crash a stage or
    exhaust its memory; a record beyond them is dead-lettered (``pipeline.codecs.DecodeLimits``)."""

    max_json_bytes: int = Field(1024 * 1024, gt=0)
    """Largest JSON document read: a topic C value, topic B's detections header, a changelog snapshot."""
    max_json_depth: int = Field(32, gt=0)
    """Deepest nesting of JSON arrays and objects (vapipe's own nest 3 deep); deeper is rejected unparsed."""
    max_header_bytes: int = Field(2 * 1024 * 1024, gt=0)
    """Largest total size of one record's headers, the detections header included."""
    max_image_pixels: int = Field(40_000_000, gt=0)
    """Largest width x height a frame may declare (headers and JPEG frame header) before it is decoded;
    40 M pixels is above 8K. Frames must be JPEG: other formats are refused before decoding."""


class CountingLine(_Frozen):
    """A counting line in normalised frame coordinates (x to the right, y down, both in [0, 1]).

    A track crossing it in ``in_direction`` counts as "in", the opposite way as "out".
    """

    name: str = Field(min_length=1)
    start: tuple[float, float]
    end: tuple[float, float]
    in_direction: InDirection = "up"
    """Moving this way across the line is "in": up/down for lines that are not vertical,
    left/right for lines that are not horizontal."""
    streams: tuple[str, ...] = ("*",)
    """Stream ids the line applies to; "*" means every stream."""

    @field_validator("start", "end")
    @classmethod
    def _normalised(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= c <= 1.0 for c in v):
            raise ValueError(f"line points are normalised frame coordinates in [0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _direction_crosses_line(self) -> CountingLine:
        dx, dy = self.end[0] - self.start[0], self.end[1] - self.start[1]
        if dx == 0 and dy == 0:
            raise ValueError(f"line {self.name!r} has the same start and end")
        if self.in_direction in ("up", "down") and dx == 0:
            raise ValueError(f"line {self.name!r} is vertical: in_direction must be left or right")
        if self.in_direction in ("left", "right") and dy == 0:
            raise ValueError(f"line {self.name!r} is horizontal: in_direction must be up or down")
        return self

    def applies_to(self, stream_id: str) -> bool:
        return "*" in self.streams or stream_id in self.streams


class TrackingConfig(_Frozen):
    """Tracking and line counting in the count stage (issue 14: count vehicles, not boxes). Off by default."""

    enabled: bool = False
    """Track vehicles and count unique vehicles and line crossings; false keeps per-frame box counts only."""
    high_threshold: float = Field(0.25, ge=0, le=1)
    """Detections at or above this take part in the first association (ByteTrack's track_thresh). 0.25 as in
    ultralytics' bytetrack.yaml: YOLOv8 scores run lower than the YOLOX ones ByteTrack's 0.5 was tuned for."""
    low_threshold: float = Field(0.1, ge=0, le=1)
    """Detections from here up to high_threshold only extend existing tracks (ByteTrack's second stage).
    The model drops boxes below model.min_confidence, so lower that too for this to matter."""
    new_track_threshold: float = Field(0.25, ge=0, le=1)
    """An unmatched detection starts a track only at or above this."""
    match_iou: float = Field(0.2, gt=0, le=1)
    """First association: least IoU (times detection confidence) between a predicted track box and a detection."""
    track_buffer_s: float = Field(1.0, gt=0)
    """A lost track is kept this long (capture time) to be found again, then forgotten."""
    min_hits: int = Field(3, ge=1)
    """A track counts as a vehicle once it was matched this many times (filters one-frame false boxes)."""
    reorder_wait_s: float = Field(2.0, ge=0)
    """A missing frame index is waited for this long (capture or arrival time) before it is stepped over."""
    reorder_max_frames: int = Field(32, gt=0)
    """At most this many frames wait for a missing one; beyond it the gap is stepped over at once."""
    anchor: Anchor = "bottom_center"
    """The point of a box that must cross a line: bottom_center (where a vehicle meets the road) or center."""
    hysteresis: float = Field(0.01, ge=0, lt=0.5)
    """A track's side of a line changes only once its anchor is this far past the line (fraction of the
    frame diagonal), so a box jittering on the line is not counted again."""
    moving_threshold: float = Field(0.03, gt=0, le=1)
    """A track is moving traffic once its anchor moved this far (fraction of the frame diagonal) ..."""
    moving_window_s: float = Field(4.0, gt=0)
    """... within this long; parked vehicles never become moving, and only moving ones are counted on lines."""
    lines: tuple[CountingLine, ...] = ()
    """Counting lines; each applies to the streams it names ("*" for all)."""

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> TrackingConfig:
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold {self.low_threshold} must not be above high_threshold {self.high_threshold}")
        names = [line.name for line in self.lines]
        if len(names) != len(set(names)):
            raise ValueError(f"line names must be unique, got {names}")
        return self

    def lines_for(self, stream_id: str) -> tuple[CountingLine, ...]:
        return tuple(line for line in self.lines if line.applies_to(stream_id))


class RayConfig(_Frozen):
    address: str | None = None
    """None starts a local Ray; 'auto' or host:port joins a running cluster."""
    dashboard_host: str = "127.0.0.1"
    num_cpus: int | None = None
    """CPUs of a local Ray (None: all of this machine)."""


class FaustConfig(_Frozen):
    """Knobs of the Faust engine (``vapipe run --engine faust``) that the Ray engine has no use for."""

    window_s: float = Field(10.0, gt=0)
    """Size of the hopping window of the time-windowed moving count, in seconds of capture time."""
    window_step_s: float = Field(2.0, ge=1)
    """Step of that hopping window, whole seconds (equal to window_s makes it tumbling)."""
    window_expires_s: float = Field(60.0, gt=0)
    """How long a closed window stays readable in the windowed table."""
    commit_interval_s: float = Field(1.0, gt=0)
    """How often each Faust worker commits the offsets of acknowledged events."""
    standby_replicas: int = Field(0, ge=0)
    """Faust standby copies of each table partition on other count workers (0: recover from the changelog)."""
    max_restarts: int = Field(3, ge=0)
    """A Faust worker process that dies is restarted this often (as Ray restarts an actor)."""
    stuck_after_s: float = Field(60.0, gt=0)
    """A Faust worker that owns records waiting and processes none for this long logs its tasks
    and exits, to be restarted (Faust's own stream_processing_timeout only logs); one that makes
    no progress towards ready for this long (a table recovery receiving nothing) reports it cannot
    become ready, and `vapipe run` stops waiting with its reason."""


class Settings(_Frozen):
    kafka: KafkaConfig = KafkaConfig()
    broker: BrokerConfig = BrokerConfig()
    topics: TopicsConfig = TopicsConfig()
    producer: ProducerConfig = ProducerConfig()
    inter: StageConfig = StageConfig(num_cpus=0.25, batch_size=8)
    crop: StageConfig = StageConfig(num_cpus=0.1, batch_size=32)
    count: StageConfig = StageConfig(num_cpus=0.1, batch_size=64)
    model: ModelConfig = ModelConfig()
    crops: CropConfig = CropConfig()
    counting: CountConfig = CountConfig()
    decoding: DecodeConfig = DecodeConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    faust: FaustConfig = FaustConfig()
    output_dir: str = "output"
    """Crops, index and run summaries go here."""
    group_prefix: str = "vapipe"
    """Consumer groups are '<prefix>-inter', '<prefix>-crop', '<prefix>-count'."""
    processing_guarantee: ProcessingGuarantee = "exactly_once"
    """exactly_once: each stage produces its outputs and commits its input offsets in one Kafka
    transaction, consumers read committed records only, and producers publish frames in
    transactions so a restarted producer resumes after the last committed frame.
    at_least_once: offsets are committed after outputs are acknowledged; redeliveries are
    absorbed by the idempotent sinks and the count table. Neither loses a frame."""

    def group(self, stage: str) -> str:
        return f"{self.group_prefix}-{stage}"


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating the nested dicts on the way."""
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would ('3' -> 3, 'true' -> True, '[a, b]' -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``VAPIPE_SECTION__FIELD=value`` variables into a nested override dict.

    Only names whose first part is a settings field count; other ``VAPIPE_*``
    variables (``VAPIPE_SHARED``, ``VAPIPE_CONFIG``, ``VAPIPE_CACHE``, ...) are left alone.
    """
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if path and path[0] in Settings.model_fields:
            set_path(tree, path, _parse_scalar(raw))
    return tree


def dotted_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``section.field=value`` strings (CLI ``--set``) into a nested override dict."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid override {pair!r}: expected section.field=value")
        set_path(tree, [p.strip() for p in key.split(".")], _parse_scalar(raw))
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _one_line(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    got = first.get("input")
    secret = any("password" in str(p) for p in first["loc"])
    got_text = "" if isinstance(got, dict) or secret else f" (got {got!r})"
    return f"invalid config in {origin}: {field}: {first['msg']}{got_text}{more}"


def load_settings(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load and validate settings: YAML file, then environment, then explicit overrides.

    Args:
        path: YAML file; None uses ``$VAPIPE_CONFIG`` if set, else the built-in defaults.
        overrides: nested dict from CLI flags, highest priority.
        environ: environment to read ``VAPIPE_*`` from (default ``os.environ``).

    Raises:
        ConfigError: one line naming the file, the field and the problem.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get("VAPIPE_CONFIG"):
        path = environ["VAPIPE_CONFIG"]
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid config in {path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    # Validate the whole tree, so a partial section keeps the other built-in defaults
    # (Settings' own, which differ per stage) instead of the sub-model's.
    data = _merge(Settings().model_dump(), data)
    env = env_overrides(environ)
    if env:
        data = _merge(data, env)
        origin += " + VAPIPE_* environment"
    if overrides:
        data = _merge(data, overrides)
        origin += " + flags"
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, origin)) from None
