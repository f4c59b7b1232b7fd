"""One encode/decode pair per topic. No pickle: JPEG bytes, JSON and string headers only.

A Kafka record is represented here without any Kafka import as ``Record``
(key, value, headers); the actors turn it into a client call.

Every decoder is total: whatever bytes it is given, it returns a value or raises
``DecodeError`` naming what is wrong, so a consumer can dead-letter a poison record and
carry on. Sizes are bounded before any parsing (``DecodeLimits``): JSON size and nesting
depth before ``json.loads`` (deep nesting would raise RecursionError), header sizes, and for
images the JPEG magic and the pixel count from the JPEG's SOF header before ``cv2.imdecode``
(a 20000x20000 image would decode to 1.2 GB), as Pillow's ``MAX_IMAGE_PIXELS`` does.

Wire formats (schema_version 1):

- A (frames): key ``stream/frame``, value = JPEG bytes, headers ``vapipe-type=frame``,
  ``schema_version``, ``stream_id``, ``frame_index``, ``capture_ts``, ``width``, ``height``
  and (optional, added without a version bump) ``publish_ts``.
  End of a finite stream: ``vapipe-type=eos``, empty value, ``frames_published``, ``frames_skipped``.
- B (detected frames): as A, plus header ``detections`` (JSON list) and ``model``.
- C (detections): key ``stream_id``, value = JSON object, ``type`` "detections", "eos" or
  "skipped" (a frame that will never be counted: dead-lettered by the InterConsumer, with a reason).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import cv2
import numpy as np

from pipeline.errors import DecodeError
from pipeline.messages import (
    SCHEMA_VERSION,
    Detections,
    EndOfStream,
    FrameDetections,
    FrameMeta,
    SkippedFrame,
    SkipReason,
)

__all__ = [
    "Header",
    "Record",
    "DecodeLimits",
    "DEFAULT_LIMITS",
    "jpeg_size",
    "check_json",
    "frame_position",
    "record_size",
    "encode_jpeg",
    "fit_jpeg",
    "check_jpeg",
    "decode_jpeg",
    "encode_frame",
    "encode_end_of_stream",
    "decode_frame",
    "encode_detected_frame",
    "encode_outputs",
    "decode_detected_frame",
    "encode_detections",
    "encode_skipped",
    "decode_detections",
    "encode_json",
    "decode_json",
]

logger = logging.getLogger(__name__)

Header = tuple[str, bytes]

TYPE_HEADER = "vapipe-type"

RECORD_OVERHEAD_BYTES = 512
"""Bytes a Kafka record batch adds around one record's key, value and headers (generous)."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds every decoder checks before parsing, so no input can exhaust the stack or memory.

    Attributes:
        max_json_bytes: largest JSON document (a topic C value, B's detections header, a snapshot).
        max_json_depth: deepest nesting of JSON arrays and objects (ours nest 3 deep).
        max_header_bytes: largest total size of a record's headers, detections included.
        max_image_pixels: largest width x height an image may declare before it is decoded.
    """

    max_json_bytes: int = 1024 * 1024
    max_json_depth: int = 32
    max_header_bytes: int = 2 * 1024 * 1024
    max_image_pixels: int = 40_000_000


DEFAULT_LIMITS = DecodeLimits()


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record before it is sent or after it is polled."""

    key: bytes | None
    value: bytes | None
    headers: Sequence[Header] = ()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode a BGR image as JPEG."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode an image of shape {image.shape}")
    return buf.tobytes()


def fit_jpeg(
    image: np.ndarray, quality: int, max_bytes: int, min_quality: int = 40, min_side: int = 32
) -> tuple[bytes, int, int] | None:
    """JPEG of the image within ``max_bytes``, with its width and height: lower the quality down to
    ``min_quality``, then halve the size (keeping the aspect) until it fits; None if even
    ``min_side`` pixels do not fit."""
    q = int(quality)
    while True:
        jpeg = encode_jpeg(image, q)
        if len(jpeg) <= max_bytes:
            return jpeg, image.shape[1], image.shape[0]
        if q > min_quality:
            q = max(min_quality, q - 20)
            continue
        h, w = image.shape[:2]
        if min(h, w) // 2 < min_side:
            return None
        image = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height a JPEG declares in its SOF header, read without decoding it.

    Raises:
        DecodeError: the bytes are not a JPEG (no SOI magic) or hold no frame header before the scan.

    Example:
        >>> jpeg_size(encode_jpeg(np.zeros((48, 64, 3), np.uint8)))
        (64, 48)
    """
    n = len(data)
    if not data.startswith(b"\xff\xd8\xff"):
        raise DecodeError(f"payload of {n} bytes is not a decodable image: not a JPEG (starts {bytes(data[:4])!r})")
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if length < 7 or pos + 9 > n:
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        if marker in (0xDA, 0xD9) or length < 2:  # start of scan or end of image before any frame header
            break
        pos += 2 + length
    raise DecodeError(f"payload of {n} bytes is not a decodable image: no JPEG frame header")


def check_jpeg(
    data: bytes | None, limits: DecodeLimits = DEFAULT_LIMITS, expect: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Everything ``decode_jpeg`` checks before decoding, without decoding: (width, height).

    A stage that passes the JPEG on without looking at its pixels still refuses what is not a
    JPEG, declares another size than its headers, or too many pixels.

    Raises:
        DecodeError: as ``decode_jpeg``, except for a JPEG whose entropy-coded data is corrupt.
    """
    if not data:
        raise DecodeError("empty image payload")
    width, height = jpeg_size(data)
    if width <= 0 or height <= 0:
        raise DecodeError(f"JPEG declares an empty image ({width}x{height})")
    if expect is not None and (width, height) != expect:
        raise DecodeError(f"headers say {expect[0]}x{expect[1]} but the JPEG is {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise DecodeError(
            f"JPEG of {width}x{height} pixels is above the limit of {limits.max_image_pixels} pixels (decompression bomb?)"
        )
    return width, height


def decode_jpeg(data: bytes | None, limits: DecodeLimits = DEFAULT_LIMITS, expect: tuple[int, int] | None = None) -> np.ndarray:
    """Decode JPEG bytes to a BGR array, after checking the format and the declared pixel count.

    Args:
        data: the JPEG bytes.
        limits: ``max_image_pixels`` bounds width x height before any pixel is decoded.
        expect: (width, height) the record's headers claim; a JPEG of another size is refused.

    Raises:
        DecodeError: the bytes are empty, not a JPEG, declare more than ``limits.max_image_pixels``
            pixels or another size than ``expect``, or do not decode.
    """
    check_jpeg(data, limits, expect)
    assert data is not None
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DecodeError(f"payload of {len(data)} bytes is not a decodable image")
    return np.asarray(image)


_JSON_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def check_json(value: bytes, limits: DecodeLimits = DEFAULT_LIMITS, what: str = "JSON document") -> None:
    """Reject a JSON document that is too large or nested too deep, without parsing it.

    Scans only the structural bytes (brackets, quotes, backslashes), skipping string contents,
    so ``json.loads`` never sees input that could raise RecursionError.

    Raises:
        DecodeError: above ``limits.max_json_bytes`` or nested deeper than ``limits.max_json_depth``.
    """
    if len(value) > limits.max_json_bytes:
        raise DecodeError(f"{what} of {len(value)} bytes is above the limit of {limits.max_json_bytes} bytes")
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _JSON_STRUCTURE.finditer(value):
        pos = match.start()
        char = value[pos]
        if in_string:
            if pos == escaped_at:
                continue
            if char == 0x5C:  # backslash: the next byte is escaped
                escaped_at = pos + 1
            elif char == 0x22:
                in_string = False
            continue
        if char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            if depth > limits.max_json_depth:
                raise DecodeError(f"{what} is nested deeper than {limits.max_json_depth} levels")
        elif char in (0x5D, 0x7D):
            depth -= 1


def _loads(value: bytes | str, limits: DecodeLimits, what: str) -> Any:
    data = value.encode() if isinstance(value, str) else bytes(value)
    check_json(data, limits, what)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
        raise DecodeError(f"malformed {what}: {exc}") from None


def _headers_dict(headers: Sequence[Header] | None, limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, str]:
    out: dict[str, str] = {}
    total = 0
    try:
        items = list(headers or ())
    except TypeError:
        raise DecodeError("headers are not a list of (key, value) pairs") from None
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise DecodeError("headers are not a list of (key, value) pairs") from None
        key = str(key)
        if value is None:
            value = b""
        total += len(key) + len(value)
        if total > limits.max_header_bytes:
            raise DecodeError(f"headers are above the limit of {limits.max_header_bytes} bytes")
        try:
            out[key] = value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)
        except UnicodeDecodeError:
            raise DecodeError(f"header {key!r} is not UTF-8") from None
    return out


def frame_position(headers: Sequence[Header] | None) -> tuple[str, int] | None:
    """Best-effort (stream, frame index) of a frame record whose decoding failed, from its headers.

    Lets a stage that dead-letters a frame tell the count stage that this index will never
    come. Never raises; None when the headers do not name a frame.
    """
    try:
        fields = _headers_dict(headers)
        if fields.get(TYPE_HEADER) != "frame":
            return None
        stream_id, index = fields["stream_id"], int(fields["frame_index"])
    except (DecodeError, KeyError, ValueError, OverflowError):
        return None
    if not stream_id or index < 0 or len(stream_id) > 1024:
        return None
    return stream_id, index


def record_size(record: Record) -> int:
    """Bytes a record takes on the wire, with a generous allowance for framing."""
    headers = sum(len(k.encode()) + len(v) for k, v in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers + RECORD_OVERHEAD_BYTES


def _check_version(version: Any) -> None:
    try:
        v = int(version)
    except (TypeError, ValueError, OverflowError):
        raise DecodeError(f"missing or invalid schema_version {version!r}") from None
    if v != SCHEMA_VERSION:
        raise DecodeError(f"unknown schema_version {v} (this vapipe reads {SCHEMA_VERSION})")


def _meta_headers(meta: FrameMeta) -> list[Header]:
    headers: list[Header] = [
        (TYPE_HEADER, b"frame"),
        ("schema_version", str(meta.schema_version).encode()),
        ("stream_id", meta.stream_id.encode()),
        ("frame_index", str(meta.frame_index).encode()),
        ("capture_ts", repr(meta.capture_ts).encode()),
        ("width", str(meta.width).encode()),
        ("height", str(meta.height).encode()),
    ]
    if meta.publish_ts is not None:
        headers.append(("publish_ts", repr(meta.publish_ts).encode()))
    return headers


def _meta_from_fields(fields: dict[str, Any]) -> FrameMeta:
    _check_version(fields.get("schema_version"))
    try:
        meta = FrameMeta(
            stream_id=str(fields["stream_id"]),
            frame_index=int(fields["frame_index"]),
            capture_ts=float(fields["capture_ts"]),
            width=int(fields["width"]),
            height=int(fields["height"]),
            publish_ts=None if fields.get("publish_ts") is None else float(fields["publish_ts"]),
        )
    except KeyError as exc:
        raise DecodeError(f"missing metadata field {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"invalid metadata: {exc}") from None
    if not math.isfinite(meta.capture_ts):
        raise DecodeError(f"invalid capture_ts {meta.capture_ts!r}")
    if not math.isfinite(meta.published_at):
        raise DecodeError(f"invalid publish_ts {meta.publish_ts!r}")
    return meta


def _eos_from_fields(fields: dict[str, Any]) -> EndOfStream:
    _check_version(fields.get("schema_version"))
    try:
        return EndOfStream(
            stream_id=str(fields["stream_id"]),
            frames_published=int(fields["frames_published"]),
            frames_skipped=int(fields.get("frames_skipped", 0)),
        )
    except KeyError as exc:
        raise DecodeError(f"end-of-stream record lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"invalid end-of-stream record: {exc}") from None


def encode_frame(meta: FrameMeta, jpeg: bytes) -> Record:
    """Topic A record for one frame."""
    return Record(key=meta.key.encode(), value=jpeg, headers=_meta_headers(meta))


def encode_end_of_stream(eos: EndOfStream) -> Record:
    """Topic A (and B) record that closes a finite stream."""
    headers = [
        (TYPE_HEADER, b"eos"),
        ("schema_version", str(eos.schema_version).encode()),
        ("stream_id", eos.stream_id.encode()),
        ("frames_published", str(eos.frames_published).encode()),
        ("frames_skipped", str(eos.frames_skipped).encode()),
    ]
    return Record(key=f"{eos.stream_id}/eos".encode(), value=b"", headers=headers)


def decode_frame(
    value: bytes | None, headers: Sequence[Header] | None, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[FrameMeta, bytes] | EndOfStream:
    """Decode a topic A record into (metadata, JPEG bytes), or the stream's end marker.

    The JPEG itself is not decoded here; call ``decode_jpeg`` when the pixels are needed.
    """
    fields = _headers_dict(headers, limits)
    kind = fields.get(TYPE_HEADER)
    if kind == "eos":
        return _eos_from_fields(fields)
    if kind != "frame":
        raise DecodeError(f"unknown or missing {TYPE_HEADER} header {kind!r}")
    meta = _meta_from_fields(fields)
    if not value:
        raise DecodeError(f"frame {meta.key} has an empty payload")
    if meta.width * meta.height > limits.max_image_pixels:
        raise DecodeError(f"frame {meta.key} declares {meta.width}x{meta.height} pixels, above {limits.max_image_pixels}")
    return meta, bytes(value)


def encode_detected_frame(result: FrameDetections, jpeg: bytes) -> Record:
    """Topic B record: the original JPEG with its detections in headers."""
    headers = _meta_headers(result.meta) + [
        ("model", result.model.encode()),
        ("detections", json.dumps(result.detections.to_records()).encode()),
    ]
    return Record(key=result.meta.key.encode(), value=jpeg, headers=headers)


def encode_outputs(result: FrameDetections, jpeg: bytes, headers: Sequence[Header] | None = None) -> tuple[Record, Record]:
    """The InterConsumer's two records for a frame, B (frame + detections) and C (detections), with
    the detections turned into JSON once for both.

    Args:
        result: the frame's metadata and detections.
        jpeg: the frame as it came.
        headers: the topic-A record's headers, already checked by ``decode_frame``: B carries them
            on as they are (whatever else the producer stamped included) instead of rebuilding them.
    """
    meta = result.meta
    detections = json.dumps(result.detections.to_records(), separators=(",", ":"))
    b_headers = [*(headers if headers is not None else _meta_headers(meta)), ("model", result.model.encode())]
    b_headers.append(("detections", detections.encode()))
    body = _detections_body(result)
    # Sorted keys as encode_json, with the detections (already JSON) spliced in as the last key.
    c_value = encode_json(body)[:-1] + b',"detections":' + detections.encode() + b"}"
    key = meta.stream_id.encode()
    return Record(key=meta.key.encode(), value=jpeg, headers=b_headers), Record(key=key, value=c_value)


def _detections_from_json(raw: Any) -> Detections:
    if not isinstance(raw, list):
        raise DecodeError("detections must be a JSON list")
    try:
        detections = Detections.from_records(raw)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"invalid detections: {exc!r}") from None
    if not (np.isfinite(detections.xyxy).all() and np.isfinite(detections.confidence).all()):
        raise DecodeError("detections hold a NaN or infinite box or confidence")
    return detections


def decode_detected_frame(
    value: bytes | None, headers: Sequence[Header] | None, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[FrameDetections, bytes] | EndOfStream:
    """Decode a topic B record into (detections with metadata, JPEG bytes) or an end marker."""
    decoded = decode_frame(value, headers, limits)
    if isinstance(decoded, EndOfStream):
        return decoded
    meta, jpeg = decoded
    fields = _headers_dict(headers, limits)
    if "detections" not in fields:
        raise DecodeError(f"frame {meta.key} on the detections topic lacks a 'detections' header")
    raw = _loads(fields["detections"], limits, "detections JSON")
    result = FrameDetections(meta=meta, detections=_detections_from_json(raw), model=fields.get("model", ""))
    return result, jpeg


def encode_json(obj: dict[str, Any]) -> bytes:
    """Compact, deterministic JSON (sorted keys) for topics C, counts and the changelog."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode_json(value: bytes | None, limits: DecodeLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse a JSON object value, raising DecodeError for anything else (too large or deep included)."""
    if not value:
        raise DecodeError("empty JSON payload")
    obj = _loads(value, limits, "JSON")
    if not isinstance(obj, dict):
        raise DecodeError(f"JSON payload must be an object, got {type(obj).__name__}")
    return obj


def encode_skipped(item: SkippedFrame) -> Record:
    """Topic C record saying a frame will never be counted (dead-lettered upstream), with why."""
    body = {
        "type": "skipped",
        "schema_version": item.schema_version,
        "stream_id": item.stream_id,
        "frame_index": item.frame_index,
        "reason": item.reason,
    }
    return Record(key=item.stream_id.encode(), value=encode_json(body))


def _skipped_from_fields(fields: dict[str, Any]) -> SkippedFrame:
    _check_version(fields.get("schema_version"))
    reason = fields.get("reason")
    known: tuple[SkipReason, ...] = get_args(SkipReason)
    if reason not in known:
        raise DecodeError(f"unknown skip reason {reason!r} (known: {', '.join(known)})")
    try:
        return SkippedFrame(
            stream_id=str(fields["stream_id"]), frame_index=int(fields["frame_index"]), reason=known[known.index(reason)]
        )
    except KeyError as exc:
        raise DecodeError(f"skipped-frame record lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"invalid skipped-frame record: {exc}") from None


def encode_detections(item: FrameDetections | EndOfStream) -> Record:
    """Topic C record (JSON only, no image), keyed by stream so one count replica owns a stream."""
    if isinstance(item, EndOfStream):
        body: dict[str, Any] = {
            "type": "eos",
            "schema_version": item.schema_version,
            "stream_id": item.stream_id,
            "frames_published": item.frames_published,
            "frames_skipped": item.frames_skipped,
        }
        return Record(key=item.stream_id.encode(), value=encode_json(body))
    body = _detections_body(item) | {"detections": item.detections.to_records()}
    return Record(key=item.meta.stream_id.encode(), value=encode_json(body))


def _detections_body(result: FrameDetections) -> dict[str, Any]:
    """Topic C's fields of a frame but its detections: one place for ``encode_detections`` and ``encode_outputs``."""
    meta = result.meta
    return {
        "type": "detections",
        "schema_version": meta.schema_version,
        "stream_id": meta.stream_id,
        "frame_index": meta.frame_index,
        "capture_ts": meta.capture_ts,
        "publish_ts": meta.publish_ts,
        "width": meta.width,
        "height": meta.height,
        "model": result.model,
        "inference_ms": round(result.inference_ms, 3),
    }


def decode_detections(value: bytes | None, limits: DecodeLimits = DEFAULT_LIMITS) -> FrameDetections | EndOfStream | SkippedFrame:
    """Decode a topic C record: a frame's detections, a stream's end, or a frame that was skipped."""
    body = decode_json(value, limits)
    kind = body.get("type")
    if kind == "eos":
        return _eos_from_fields(body)
    if kind == "skipped":
        return _skipped_from_fields(body)
    if kind != "detections":
        raise DecodeError(f"unknown record type {kind!r}")
    meta = _meta_from_fields(body)
    try:
        inference_ms = float(body.get("inference_ms", 0.0) or 0.0)
    except (TypeError, ValueError, OverflowError):
        raise DecodeError(f"invalid inference_ms {body.get('inference_ms')!r}") from None
    return FrameDetections(
        meta=meta,
        detections=_detections_from_json(body.get("detections")),
        model=str(body.get("model", "")),
        inference_ms=inference_ms,
    )
