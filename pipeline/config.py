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
    "KafkaCredential",
    "Role",
    "ROLES",
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
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Role = Literal["producer", "inter", "crop", "count", "admin"]
"""Who a Kafka client acts for: each stage, the producers, and admin (topics, lag, the CLI)."""
ROLES: tuple[Role, ...] = ("producer", "inter", "crop", "count", "admin")
ProcessingGuarantee = Literal["exactly_once", "at_least_once"]
InDirection = Literal["up", "down", "left", "right"]
Anchor = Literal["bottom_center", "center"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class KafkaCredential(_Frozen):
    """One role's user on a secured broker (``kafka.credentials.<role>``); ``vapipe kafka users`` prints them."""

    username: str = Field(min_length=1)
    password: SecretStr | None = None
    """The password itself (e.g. from ``VAPIPE_KAFKA__CREDENTIALS__INTER__PASSWORD``); never printed."""
    password_file: str | None = None
    """A file holding the password, read where the client is made (so only machines that run this
    role need it); preferred over ``password``."""
    ssl_certfile: str | None = None
    """This role's client certificate (PEM) for mTLS; None uses ``kafka.ssl_certfile``."""
    ssl_keyfile: str | None = None

    @model_validator(mode="after")
    def _one_password(self) -> KafkaCredential:
        if self.password is not None and self.password_file:
            raise ValueError(f"credentials of {self.username!r}: set password or password_file, not both")
        return self


class KafkaConfig(_Frozen):
    """How every client reaches the cluster."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    """SASL_SSL for a broker started with ``vapipe kafka start --secure`` (docs/security.md)."""
    sasl_mechanism: SaslMechanism | None = None
    """SCRAM-SHA-512 for a ``--secure`` broker."""
    sasl_username: str | None = None
    """The user of clients that have no role of their own in ``credentials`` (the CLI, admin)."""
    sasl_password: SecretStr | None = None
    """Its password (``VAPIPE_KAFKA__SASL_PASSWORD``); never printed, never in logs or summaries."""
    sasl_password_file: str | None = None
    """A file holding that password instead (read when a client is made)."""
    ssl_cafile: str | None = None
    """CA certificate (PEM) that signed the broker's certificate; None trusts the system's CAs."""
    ssl_certfile: str | None = None
    """Client certificate (PEM) for mTLS, when the broker requires one."""
    ssl_keyfile: str | None = None
    """Its private key (PEM)."""
    ssl_check_hostname: bool = True
    """Check that the broker's certificate names the host connected to (keep on)."""
    credentials: dict[Role, KafkaCredential] = Field(default_factory=dict)
    """Per-role users: each stage connects as its role (producer, inter, crop, count; admin for
    topics and the CLI), so the broker's ACLs let it do only its job. A role missing here uses
    ``sasl_username`` / ``sasl_password``."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """How long a command waits for the broker before it fails with a clear error."""
    session_timeout_ms: int = Field(20000, ge=6000)
    """A consumer that stops heartbeating this long is dropped from its group and its partitions move
    to the others; lower recovers a killed replica sooner, higher rides out longer pauses (6 s minimum:
    the broker's group.min.session.timeout.ms)."""
    heartbeat_interval_ms: int = Field(2000, gt=0)
    """How often consumers heartbeat; keep it under a third of ``session_timeout_ms``."""
    request_timeout_ms: int = Field(30000, ge=1000)
    """How long a producer waits for one broker response before it retries (on a new leader after a
    broker died): lower notices a dead broker sooner."""
    ack_timeout_s: float = Field(60.0, gt=0)
    """How long a stage waits for its batch to be acknowledged (a transaction's offsets and commit)
    before it aborts and retries the batch with a new producer. A killed transaction coordinator
    holds a commit this long: lower recovers sooner, too low gives up on a busy broker."""
    linger_ms: int = Field(5, ge=0)
    """Producer batching delay; 5 ms as in the study."""
    compression_type: Compression = "snappy"
    """Producer compression; snappy as in the study."""
    transaction_retry_backoff_ms: int = Field(10, ge=0)
    """Backoff of a stage's transactional producer before retrying a request. Every batch's
    offsets meet CONCURRENT_TRANSACTIONS while the previous commit's markers are written, and
    kafka-python sleeps this long before retrying (100 ms by default: ~10 batches/s at most)."""
    max_message_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Largest record (a JPEG frame plus headers) producers send and brokers accept."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Passed unchanged to every kafka-python client (escape hatch)."""

    def hosts(self) -> list[str]:
        return [h.strip() for h in self.bootstrap_servers.split(",") if h.strip()]

    @model_validator(mode="after")
    def _secure_settings_agree(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism (SCRAM-SHA-512 for a --secure broker)"
            )
        if self.sasl_password is not None and self.sasl_password_file:
            raise ValueError("set sasl_password or sasl_password_file, not both")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mTLS needs both)")
        return self

    def as_role(self, role: Role) -> KafkaConfig:
        """These settings with ``role``'s user (``credentials[role]``) in place of the default one.

        Example:
            >>> cfg = KafkaConfig(credentials={"inter": KafkaCredential(username="inter", password="s")})
            >>> cfg.as_role("inter").sasl_username, cfg.as_role("crop").sasl_username
            ('inter', None)
        """
        cred = self.credentials.get(role)
        if cred is None:
            return self
        update: dict[str, Any] = {
            "sasl_username": cred.username,
            "sasl_password": cred.password,
            "sasl_password_file": cred.password_file,
        }
        if cred.ssl_certfile:
            update |= {"ssl_certfile": cred.ssl_certfile, "ssl_keyfile": cred.ssl_keyfile}
        return self.model_copy(update=update)


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
    secure: bool = False
    """Listen SASL_SSL (SCRAM-SHA-512) with a CA, certificates and one user per role generated into
    ``state_dir/security``, and ACLs so each role does only its job (``vapipe kafka start --secure``).
    A state folder once secured stays secured."""
    ssl_client_auth: Literal["none", "required"] = "none"
    """With ``secure``: ``required`` also demands a client certificate signed by the broker's CA (mTLS)."""


class TopicSpec(_Frozen):
    name: str = Field(min_length=1)
    partitions: int = Field(6, gt=0)
    replication_factor: int = Field(1, gt=0)
    config: dict[str, str] = Field(default_factory=dict)


BOUNDED_FRAMES: dict[str, str] = {"retention.bytes": str(2 * 1024**3), "retention.ms": str(24 * 3600 * 1000)}
"""A and B hold frames: a backlog (a stage down for a day) is capped at 2 GiB per partition and one
day, so it cannot fill the broker's disk; frames older than that are deleted unread."""

COMPACTED_STATE: dict[str, str] = {
    "cleanup.policy": "compact",
    "segment.ms": str(10 * 60 * 1000),
    "segment.bytes": str(64 * 1024**2),
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": str(24 * 3600 * 1000),
}
"""The count table's changelog: Kafka never compacts the active segment, so it is closed every
10 minutes (or 64 MiB) and cleaned once a tenth of it is dirty; a restore from offset 0 then
reads about one snapshot per stream plus at most ~10 minutes of writes, however long the
streams have run. Tombstones (``vapipe counts --prune``) stay readable for a day, the longest a
local checkpoint is trusted."""


class TopicsConfig(_Frozen):
    """The study's topics A, B and C, plus the count table's output and changelog."""

    frames: TopicSpec = TopicSpec(name="vapipe.A.frames", config=BOUNDED_FRAMES)
    """A: JPEG frames from producers."""
    detected_frames: TopicSpec = TopicSpec(name="vapipe.B.detected-frames", config=BOUNDED_FRAMES)
    """B: JPEG frames with their detections, for the crop stage."""
    detections: TopicSpec = TopicSpec(name="vapipe.C.detections")
    """C: detections only (JSON), keyed by stream, for the count stage."""
    counts: TopicSpec = TopicSpec(name="vapipe.counts", partitions=3)
    """Per-frame count updates (JSON)."""
    counts_changelog: TopicSpec = TopicSpec(
        name="vapipe.counts-changelog",
        partitions=6,
        config=COMPACTED_STATE,
    )
    """Compacted table state keyed by stream, so a restarted count replica recovers. Its partition
    count must equal ``detections``' (both are keyed by stream: a replica restores the changelog
    partitions numbered like the C partitions it owns)."""
    dead_letter: TopicSpec = TopicSpec(name="vapipe.dead-letter", partitions=1)
    """Records no stage could decode, with the reason and origin in headers."""
    streams: TopicSpec = TopicSpec(name="vapipe.streams", partitions=1, config={"cleanup.policy": "compact"})
    """Streams declared by ``vapipe streams add/remove`` (compacted, keyed by stream id): a running
    ``vapipe run --follow`` starts and stops producers to match."""

    def all(self) -> list[TopicSpec]:
        return [
            self.frames,
            self.detected_frames,
            self.detections,
            self.counts,
            self.counts_changelog,
            self.dead_letter,
            self.streams,
        ]


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
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each producer actor requests, e.g. ``{"node:198.18.0.1": 0.01}`` to keep
    producers on the machine beside the cameras (or the broker); empty: any node."""
    stall_s: float = Field(10.0, gt=0)
    """A camera (URL, webcam) that sends no new frame for this long is taken as lost and reconnected;
    also the time allowed to open a network stream."""
    mode: Literal["lossless", "realtime"] = "lossless"
    """``lossless``: every frame is published, however far behind the pipeline falls. ``realtime``:
    a frame is dropped at the source (skipped, reason ``behind``) while the frames of its stream
    waiting for the InterConsumers would take more than ``max_lag_s`` to clear, so latency stays
    bounded when input outruns capacity; every frame is published again once the backlog clears."""
    max_lag_s: float = Field(2.0, gt=0)
    """realtime: the most a published frame should wait for the InterConsumers."""
    reconnect_max_s: float = Field(30.0, gt=0)
    """Cap of the jittered exponential wait between a lost camera's reconnection attempts
    (0.5 s, 1 s, 2 s, ... this); a camera is retried for as long as the run lasts."""


class StageConfig(_Frozen):
    """Replicas and Ray resources of one consumer stage."""

    replicas: int = Field(1, gt=0)
    num_cpus: float = Field(0.5, gt=0)
    """Logical Ray CPUs per actor; fractions let several replicas share a small machine."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor when the cluster has GPUs (fractions allowed); ignored otherwise."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each actor requests (``ray start --resources``), e.g. ``{"detector": 1}``
    so InterConsumers land only on the nodes that declare it; empty: CPU (and num_gpus) only."""
    batch_size: int = Field(8, gt=0)
    """Records handled per poll (inference batch for the InterConsumer)."""
    batch_wait_ms: int = Field(0, ge=0)
    """Once a poll returned records, poll again up to this long to fill ``batch_size`` (a GPU's
    batch) from every stream; 0 takes what one poll returns. Bounds how long a slow stream waits."""
    poll_timeout_ms: int = Field(200, gt=0)
    threads: int | None = Field(None, gt=0)
    """Math threads (OpenMP, torch) in each actor; None = every core of its node. Ray would
    otherwise force 1 thread on actors with fractional num_cpus, halving YOLO's speed."""


class AutoscaleConfig(_Frozen):
    """InterConsumers that follow the load: one more while lag in seconds stays above target, one
    fewer while the replicas sit idle (``pipeline.autoscale``). Ray engine only."""

    enabled: bool = False
    min: int = Field(1, gt=0)
    """Fewest InterConsumers (the run starts with ``inter.replicas``, raised to at least this)."""
    max: int = Field(4, gt=0)
    """Most InterConsumers; a new one also needs room in the cluster (see ``request_nodes``)."""
    target_lag_s: float = Field(5.0, gt=0)
    """Scale up when the InterConsumers' lag in seconds (record timestamps) stays above this."""
    cooldown_s: float = Field(15.0, ge=0)
    """How long a condition must hold before acting, and the least time between two scale events
    (a rebalance pauses the group for a few seconds)."""
    idle_busy: float = Field(0.8, gt=0, le=1)
    """Scale down when the replicas' summed busy fraction would fit in one replica fewer, each at most
    this busy, and lag is under target."""
    request_nodes: bool = False
    """Add a replica even when the cluster has no free CPUs/GPUs for it, so Ray's autoscaler brings
    up a node (the replica waits until one comes); false keeps within the cluster as it is."""

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscaleConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class InterConfig(StageConfig):
    """The InterConsumers' stage settings, plus autoscaling on lag."""

    autoscale: AutoscaleConfig = AutoscaleConfig()


class MetricsConfig(_Frozen):
    """The Prometheus endpoint a run's driver serves while it runs (``actors.metrics``)."""

    port: int | None = Field(9464, ge=0, lt=65536)
    """Port of ``/metrics``; 0 picks a free one, null turns the endpoint off."""
    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 for a Prometheus on another machine."""


class ModelConfig(_Frozen):
    name: str = "yolov8n.pt"
    """Ultralytics model name or path; official weights are downloaded on first use."""
    device: str = "auto"
    """'auto' (GPU when the actor has one), 'cpu', 'cuda', 'cuda:1', ..."""
    imgsz: int = Field(640, gt=0)
    min_confidence: float = Field(0.25, ge=0, le=1)
    """Detections below this are dropped by the model itself."""
    safe_formats_only: bool = False
    """Refuse pickle-based weights (``.pt``, ``.pth``, ``.torchscript``, official names downloaded as
    ``.pt``): loading one runs whatever code it carries. True accepts only ONNX (``.onnx``), TensorRT
    (``.engine``) and OpenVINO (``.xml`` or an ``*_openvino_model`` folder): set it where models come
    from shared storage others can write."""
    runtime: Literal["ultralytics", "batched"] = "ultralytics"
    """'ultralytics': its predict loop; 'batched': vapipe's core (``pipeline/inference.py``): the
    batch's JPEGs decoded together (on the GPU with nvJPEG), one letterboxed tensor (fp16 on a
    GPU), NMS on the batch, decode/inference/post-processing timed apart."""


class CropConfig(_Frozen):
    min_confidence: float = Field(0.7, ge=0, le=1)
    """Crop only boxes strictly above this confidence."""
    jpeg_quality: int = Field(95, ge=1, le=100)
    index_segment_bytes: int = Field(64 * 1024**2, gt=0)
    """Each crop replica's index file is closed as a numbered segment at this size and a new one begun,
    so old segments can be archived or deleted; ``load_index`` reads whatever segments remain."""


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
    checkpoint_interval_s: float = Field(30.0, ge=0)
    """A count replica writes a local checkpoint of the table partitions it owns (snapshots plus
    changelog offset, under ``<output_dir>/state/``) at most this often, so a restart on the same
    machine replays only the changelog's tail (0: no checkpoints; every restore reads the changelog)."""

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
    """Interface of a local Ray's dashboard (which can submit jobs that run code on every node):
    loopback unless ``allow_remote_dashboard``; tunnel to it instead (cluster/README.md)."""
    allow_remote_dashboard: bool = False
    """Opt out: let ``dashboard_host`` be a non-loopback address. Anyone who reaches it runs code."""
    token_auth: bool = True
    """Ray token authentication (``RAY_AUTH_MODE=token``): every Ray client and node must present the
    cluster's token (``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN_PATH``). False opts out: anyone who reaches
    the Ray ports can run code on every node."""
    num_cpus: int | None = None
    """CPUs of a local Ray (None: all of this machine)."""
    unplaceable: Literal["wait", "fail"] = "wait"
    """More replicas than the cluster has GPU or custom-resource slots for: ``wait`` until nodes with
    room join (up to the run's start-up timeout, saying which actors wait for what), or ``fail`` at
    once with one line naming the stage, what it needs and what the cluster has."""

    @model_validator(mode="after")
    def _dashboard_on_loopback(self) -> RayConfig:
        if not self.allow_remote_dashboard and self.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"dashboard_host {self.dashboard_host} exposes the Ray dashboard (job submission = code execution) "
                "beyond this machine: tunnel to 127.0.0.1 instead, or set ray.allow_remote_dashboard=true to accept the risk"
            )
        return self


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
    inter: InterConfig = InterConfig(num_cpus=0.25, batch_size=8)
    crop: StageConfig = StageConfig(num_cpus=0.1, batch_size=32)
    count: StageConfig = StageConfig(num_cpus=0.1, batch_size=64)
    model: ModelConfig = ModelConfig()
    crops: CropConfig = CropConfig()
    counting: CountConfig = CountConfig()
    decoding: DecodeConfig = DecodeConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    faust: FaustConfig = FaustConfig()
    metrics: MetricsConfig = MetricsConfig()
    output_dir: str = "output"
    """Crops, index and run summaries go here."""
    umask: str = Field("027", pattern=r"^0?[0-7]{3}$")
    """File-creation mask (octal) of vapipe's processes and stage actors: 027 creates folders 0750 and
    files 0640, so other users of a machine cannot read crops, counts or summaries; 022 shares them."""
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

    def umask_bits(self) -> int:
        return int(self.umask, 8)

    def for_role(self, role: Role) -> Settings:
        """These settings with Kafka clients acting as ``role`` (``KafkaConfig.as_role``)."""
        kafka = self.kafka.as_role(role)
        return self if kafka is self.kafka else self.model_copy(update={"kafka": kafka})


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
