"""One encode/decode pair per topic. No pickle: JPEG bytes, JSON and string headers only.

A Kafka record is represented here without any Kafka import as ``Record``
(key, value, headers); the actors turn it into a client call. Every decoder
raises ``DecodeError`` naming what is wrong, so a consumer can dead-letter or
skip a poison message and carry on.

Wire formats (schema_version 1):

- A (frames): key ``stream/frame``, value = JPEG bytes, headers ``vapipe-type=frame``,
  ``schema_version``, ``stream_id``, ``frame_index``, ``capture_ts``, ``width``, ``height``.
  End of a finite stream: ``vapipe-type=eos``, empty value, ``frames_published``, ``frames_skipped``.
- B (detected frames): as A, plus header ``detections`` (JSON list) and ``model``.
- C (detections): key ``stream_id``, value = JSON object, ``type`` "detections" or "eos".
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.errors import DecodeError
from pipeline.messages import SCHEMA_VERSION, Detections, EndOfStream, FrameDetections, FrameMeta

__all__ = [
    "Header",
    "Record",
    "encode_jpeg",
    "fit_jpeg",
    "decode_jpeg",
    "encode_frame",
    "encode_end_of_stream",
    "decode_frame",
    "encode_detected_frame",
    "decode_detected_frame",
    "encode_detections",
    "decode_detections",
    "encode_json",
    "decode_json",
]

logger = logging.getLogger(__name__)

Header = tuple[str, bytes]

TYPE_HEADER = "vapipe-type"


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


def decode_jpeg(data: bytes | None) -> np.ndarray:
    """Decode JPEG (or any OpenCV-readable image) bytes to a BGR array.

    Raises:
        DecodeError: the bytes are empty or not an image.
    """
    if not data:
        raise DecodeError("empty image payload")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DecodeError(f"payload of {len(data)} bytes is not a decodable image")
    return np.asarray(image)


def _headers_dict(headers: Sequence[Header] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers or ():
        try:
            out[key] = value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)
        except UnicodeDecodeError:
            raise DecodeError(f"header {key!r} is not UTF-8") from None
    return out


def _check_version(version: Any) -> None:
    try:
        v = int(version)
    except (TypeError, ValueError, OverflowError):
        raise DecodeError(f"missing or invalid schema_version {version!r}") from None
    if v != SCHEMA_VERSION:
        raise DecodeError(f"unknown schema_version {v} (this vapipe reads {SCHEMA_VERSION})")


def _meta_headers(meta: FrameMeta) -> list[Header]:
    return [
        (TYPE_HEADER, b"frame"),
        ("schema_version", str(meta.schema_version).encode()),
        ("stream_id", meta.stream_id.encode()),
        ("frame_index", str(meta.frame_index).encode()),
        ("capture_ts", repr(meta.capture_ts).encode()),
        ("width", str(meta.width).encode()),
        ("height", str(meta.height).encode()),
    ]


def _meta_from_fields(fields: dict[str, Any]) -> FrameMeta:
    _check_version(fields.get("schema_version"))
    try:
        meta = FrameMeta(
            stream_id=str(fields["stream_id"]),
            frame_index=int(fields["frame_index"]),
            capture_ts=float(fields["capture_ts"]),
            width=int(fields["width"]),
            height=int(fields["height"]),
        )
    except KeyError as exc:
        raise DecodeError(f"missing metadata field {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"invalid metadata: {exc}") from None
    if not math.isfinite(meta.capture_ts):
        raise DecodeError(f"invalid capture_ts {meta.capture_ts!r}")
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


def decode_frame(value: bytes | None, headers: Sequence[Header] | None) -> tuple[FrameMeta, bytes] | EndOfStream:
    """Decode a topic A record into (metadata, JPEG bytes), or the stream's end marker.

    The JPEG itself is not decoded here; call ``decode_jpeg`` when the pixels are needed.
    """
    fields = _headers_dict(headers)
    kind = fields.get(TYPE_HEADER)
    if kind == "eos":
        return _eos_from_fields(fields)
    if kind != "frame":
        raise DecodeError(f"unknown or missing {TYPE_HEADER} header {kind!r}")
    meta = _meta_from_fields(fields)
    if not value:
        raise DecodeError(f"frame {meta.key} has an empty payload")
    return meta, bytes(value)


def encode_detected_frame(result: FrameDetections, jpeg: bytes) -> Record:
    """Topic B record: the original JPEG with its detections in headers."""
    headers = _meta_headers(result.meta) + [
        ("model", result.model.encode()),
        ("detections", json.dumps(result.detections.to_records()).encode()),
    ]
    return Record(key=result.meta.key.encode(), value=jpeg, headers=headers)


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


def decode_detected_frame(value: bytes | None, headers: Sequence[Header] | None) -> tuple[FrameDetections, bytes] | EndOfStream:
    """Decode a topic B record into (detections with metadata, JPEG bytes) or an end marker."""
    decoded = decode_frame(value, headers)
    if isinstance(decoded, EndOfStream):
        return decoded
    meta, jpeg = decoded
    fields = _headers_dict(headers)
    if "detections" not in fields:
        raise DecodeError(f"frame {meta.key} on the detections topic lacks a 'detections' header")
    try:
        raw = json.loads(fields["detections"])
    except json.JSONDecodeError as exc:
        raise DecodeError(f"malformed detections JSON: {exc}") from None
    result = FrameDetections(meta=meta, detections=_detections_from_json(raw), model=fields.get("model", ""))
    return result, jpeg


def encode_json(obj: dict[str, Any]) -> bytes:
    """Compact, deterministic JSON (sorted keys) for topics C, counts and the changelog."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def decode_json(value: bytes | None) -> dict[str, Any]:
    """Parse a JSON object value, raising DecodeError for anything else."""
    if not value:
        raise DecodeError("empty JSON payload")
    try:
        obj = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"JSON payload must be an object, got {type(obj).__name__}")
    return obj


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
    meta = item.meta
    body = {
        "type": "detections",
        "schema_version": meta.schema_version,
        "stream_id": meta.stream_id,
        "frame_index": meta.frame_index,
        "capture_ts": meta.capture_ts,
        "width": meta.width,
        "height": meta.height,
        "model": item.model,
        "inference_ms": round(item.inference_ms, 3),
        "detections": item.detections.to_records(),
    }
    return Record(key=meta.stream_id.encode(), value=encode_json(body))


def decode_detections(value: bytes | None) -> FrameDetections | EndOfStream:
    """Decode a topic C record."""
    body = decode_json(value)
    kind = body.get("type")
    if kind == "eos":
        return _eos_from_fields(body)
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
