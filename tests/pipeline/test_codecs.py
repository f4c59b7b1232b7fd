"""Codecs: every encode/decode pair round-trips; poison records raise DecodeError; no pickle anywhere."""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline import codecs
from pipeline.codecs import (
    Record,
    decode_detected_frame,
    decode_detections,
    decode_frame,
    decode_jpeg,
    decode_json,
    encode_detected_frame,
    encode_detections,
    encode_end_of_stream,
    encode_frame,
    encode_jpeg,
    encode_json,
)
from pipeline.errors import DecodeError
from pipeline.messages import SCHEMA_VERSION, Detections, EndOfStream, FrameDetections
from tests.pipeline.helpers import DoesNotRaise, gradient_image, mock_detections, mock_frame, mock_meta

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
IMAGE = gradient_image(48, 64)
JPEG = encode_jpeg(IMAGE, quality=90)
DETECTIONS = mock_detections([[1.5, 2.25, 30.0, 40.0], [0, 0, 64, 48]], [0.91, 0.42], ["car", "traffic light"], [2, 9])
RESULT = FrameDetections(
    meta=mock_meta("cam1", 7, 1700000000.125, 64, 48), detections=DETECTIONS, model="yolo.onnx", inference_ms=12.34567
)


def frame_headers(**changes: str | None) -> list[tuple[str, bytes]]:
    """Valid topic A headers for RESULT.meta, with fields replaced (str) or removed (None)."""
    fields = {k: v.decode() for k, v in encode_frame(RESULT.meta, JPEG).headers}
    fields.update({k: v for k, v in changes.items() if v is not None})
    return [(k, v.encode()) for k, v in fields.items() if changes.get(k, "") is not None]


def detections_body(**changes: Any) -> dict[str, Any]:
    """A valid topic C JSON body for RESULT, with fields replaced or removed (value ...)."""
    body = json.loads(encode_detections(RESULT).value or b"")
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def _assert_no_pickle(record: Record) -> None:
    assert isinstance(record.value, bytes)
    assert not record.value.startswith(b"\x80")  # every pickle protocol >= 2 starts with PROTO 0x80
    for key, value in record.headers:
        assert isinstance(key, str) and isinstance(value, bytes)
        value.decode("utf-8")
    assert record.key is None or isinstance(record.key, bytes)


# -- JPEG -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "quality"), [(48, 64, 90), (1, 1, 90), (31, 17, 50), (240, 320, 100)])
def test_jpeg_round_trip(height: int, width: int, quality: int) -> None:
    image = gradient_image(height, width)
    data = encode_jpeg(image, quality=quality)
    assert data.startswith(JPEG_SOI) and data.endswith(JPEG_EOI)
    back = decode_jpeg(data)
    assert back.shape == (height, width, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - image.astype(int)).mean() < 12  # lossy, but close


def test_decode_jpeg_refuses_other_image_formats() -> None:
    ok, png = cv2.imencode(".png", IMAGE)
    assert ok
    with pytest.raises(DecodeError, match="not a JPEG"):
        decode_jpeg(png.tobytes())  # any format OpenCV reads was accepted, PNG bombs included


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "empty image payload"),
        (b"", "empty image payload"),
        (b"not a jpeg", "payload of 10 bytes is not a decodable image"),
        (JPEG[:10], "not a decodable image"),
        (JPEG[: len(JPEG) // 2], "not a decodable image"),
        (bytes(range(256)) * 4, "payload of 1024 bytes"),
        (json.dumps({"a": 1}).encode(), "not a decodable image"),
    ],
)
def test_decode_jpeg_poison(data: bytes | None, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_jpeg(data)


# -- topic A ----------------------------------------------------------------------------------


def test_frame_round_trip() -> None:
    record = encode_frame(RESULT.meta, JPEG)
    assert record.key == b"cam1/00000007"
    assert record.value == JPEG  # the JPEG itself, raw: no base64, no envelope
    _assert_no_pickle(record)
    meta, jpeg = decode_frame(record.value, record.headers)  # type: ignore[misc]
    assert meta == RESULT.meta
    assert meta.capture_ts == 1700000000.125  # repr() keeps every digit
    assert jpeg == JPEG
    assert decode_jpeg(jpeg).shape == IMAGE.shape


@pytest.mark.parametrize("eos", [EndOfStream("cam1", 30), EndOfStream("cam@run-1", 750, frames_skipped=3), EndOfStream("s", 0)])
def test_end_of_stream_round_trip(eos: EndOfStream) -> None:
    record = encode_end_of_stream(eos)
    assert record.key == f"{eos.stream_id}/eos".encode()
    assert record.value == b""
    _assert_no_pickle(record)
    assert decode_frame(record.value, record.headers) == eos
    assert decode_detected_frame(record.value, record.headers) == eos  # B carries the same marker


def test_publish_time_travels_with_the_frame_and_is_optional() -> None:
    published = dataclasses.replace(RESULT.meta, publish_ts=1700000003.5)
    meta, _ = decode_frame(JPEG, encode_frame(published, JPEG).headers)  # type: ignore[misc]
    assert meta.publish_ts == 1700000003.5 and meta.published_at == 1700000003.5
    assert meta.capture_ts == RESULT.meta.capture_ts  # the capture clock is kept apart from the publish one
    c = decode_detections(encode_detections(dataclasses.replace(RESULT, meta=published)).value)
    assert isinstance(c, FrameDetections) and c.meta == published
    old, _ = decode_frame(JPEG, frame_headers())  # type: ignore[misc]  # a record from before publish_ts
    assert old.publish_ts is None and old.published_at == old.capture_ts
    with pytest.raises(DecodeError, match="invalid publish_ts nan"):
        decode_frame(JPEG, [*frame_headers(), ("publish_ts", b"nan")])
    with pytest.raises(DecodeError, match="invalid metadata"):
        decode_frame(JPEG, [*frame_headers(), ("publish_ts", b"soon")])


def test_headers_as_kafka_python_gives_them() -> None:
    # kafka-python yields headers as a list of (str, bytes) tuples; bytearray values must work too.
    headers = [(k, bytearray(v)) for k, v in encode_frame(RESULT.meta, JPEG).headers]
    meta, _ = decode_frame(bytearray(JPEG), headers)  # type: ignore[arg-type, misc]
    assert meta == RESULT.meta


@pytest.mark.parametrize(
    ("value", "headers", "match"),
    [
        (JPEG, None, "unknown or missing vapipe-type header None"),
        (JPEG, [], "unknown or missing vapipe-type"),
        (JPEG, frame_headers(**{"vapipe-type": None}), "unknown or missing vapipe-type"),
        (JPEG, frame_headers(**{"vapipe-type": "video"}), "unknown or missing vapipe-type header 'video'"),
        (JPEG, frame_headers(schema_version=None), "missing or invalid schema_version None"),
        (JPEG, frame_headers(schema_version="one"), "missing or invalid schema_version 'one'"),
        (JPEG, frame_headers(schema_version=str(SCHEMA_VERSION + 1)), f"unknown schema_version {SCHEMA_VERSION + 1}"),
        (JPEG, frame_headers(stream_id=None), "missing metadata field 'stream_id'"),
        (JPEG, frame_headers(frame_index=None), "missing metadata field 'frame_index'"),
        (JPEG, frame_headers(capture_ts=None), "missing metadata field 'capture_ts'"),
        (JPEG, frame_headers(width=None), "missing metadata field 'width'"),
        (JPEG, frame_headers(height=None), "missing metadata field 'height'"),
        (JPEG, frame_headers(frame_index="seven"), "invalid metadata"),
        (JPEG, frame_headers(frame_index="1e400"), "invalid metadata"),
        (JPEG, frame_headers(frame_index="-1"), "invalid metadata: frame_index must be >= 0"),
        (JPEG, frame_headers(stream_id=""), "invalid metadata: stream_id must not be empty"),
        (JPEG, frame_headers(width="0"), "invalid metadata: frame size must be positive"),
        (JPEG, frame_headers(capture_ts="nan"), "invalid capture_ts nan"),
        (JPEG, frame_headers(capture_ts="inf"), "invalid capture_ts inf"),
        (JPEG, [*frame_headers(), ("stream_id", b"\xff\xfe")], "header 'stream_id' is not UTF-8"),
        (b"", frame_headers(), "frame cam1/00000007 has an empty payload"),
        (None, frame_headers(), "empty payload"),
        (
            b"",
            [("vapipe-type", b"eos"), ("schema_version", b"1"), ("stream_id", b"s")],
            "end-of-stream record lacks 'frames_published'",
        ),
        (
            b"",
            [("vapipe-type", b"eos"), ("schema_version", b"1"), ("stream_id", b"s"), ("frames_published", b"many")],
            "invalid end-of-stream record",
        ),
        (b"", [("vapipe-type", b"eos"), ("stream_id", b"s"), ("frames_published", b"3")], "missing or invalid schema_version"),
    ],
)
def test_decode_frame_poison(value: bytes | None, headers: Any, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_frame(value, headers)


# -- topic B ----------------------------------------------------------------------------------


@pytest.mark.parametrize("detections", [DETECTIONS, Detections.empty()], ids=["two-boxes", "empty"])
def test_detected_frame_round_trip(detections: Detections) -> None:
    result = FrameDetections(meta=RESULT.meta, detections=detections, model="yolo.onnx", inference_ms=3.0)
    record = encode_detected_frame(result, JPEG)
    assert record.key == b"cam1/00000007"
    assert record.value == JPEG
    _assert_no_pickle(record)
    headers = dict(record.headers)
    assert json.loads(headers["detections"]) == detections.to_records()
    back, jpeg = decode_detected_frame(record.value, record.headers)  # type: ignore[misc]
    assert jpeg == JPEG
    assert back.meta == result.meta
    assert back.detections == detections
    assert back.model == "yolo.onnx"


def _b_headers(detections_header: bytes | None) -> list[tuple[str, bytes]]:
    headers = list(encode_detected_frame(RESULT, JPEG).headers)
    headers = [(k, v) for k, v in headers if k != "detections"]
    return headers if detections_header is None else [*headers, ("detections", detections_header)]


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        (_b_headers(None), "frame cam1/00000007 on the detections topic lacks a 'detections' header"),
        (_b_headers(b"not json"), "malformed detections JSON"),
        (_b_headers(b"[{"), "malformed detections JSON"),
        (_b_headers(b'{"label": "car"}'), "detections must be a JSON list"),
        (_b_headers(b'"car"'), "detections must be a JSON list"),
        (_b_headers(b"null"), "detections must be a JSON list"),
        (_b_headers(b'[{"label": "car", "class_id": 2, "confidence": 0.9}]'), "invalid detections: KeyError"),
        (_b_headers(b'[{"label": "car", "class_id": 2, "confidence": 0.9, "box": [1, 2, 3]}]'), "invalid detections"),
        (_b_headers(b'[{"label": "car", "class_id": 2, "confidence": 0.9, "box": ["a", 2, 3, 4]}]'), "invalid detections"),
        (_b_headers(b"[1, 2]"), "invalid detections: TypeError"),
        (_b_headers(b"\xff\xfe"), "header 'detections' is not UTF-8"),
    ],
)
def test_decode_detected_frame_poison(headers: list[tuple[str, bytes]], match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_detected_frame(JPEG, headers)


def test_decode_detected_frame_checks_metadata_too() -> None:
    headers = [(k, v) for k, v in _b_headers(b"[]") if k != "width"]
    with pytest.raises(DecodeError, match="missing metadata field 'width'"):
        decode_detected_frame(JPEG, headers)


# -- topic C ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    [
        RESULT,
        mock_frame("cam2", 0, Detections.empty()),
        FrameDetections(meta=mock_meta("a b/c", 99, 0.0, 1, 1), detections=DETECTIONS, model="", inference_ms=0.0),
    ],
    ids=["two-boxes", "empty", "odd-stream-id"],
)
def test_detections_round_trip(item: FrameDetections) -> None:
    record = encode_detections(item)
    assert record.key == item.meta.stream_id.encode()  # keyed by stream: one count replica per stream
    assert record.headers == ()
    _assert_no_pickle(record)
    body = json.loads(record.value or b"")  # JSON only, no image
    assert body["type"] == "detections" and body["schema_version"] == SCHEMA_VERSION
    back = decode_detections(record.value)
    assert isinstance(back, FrameDetections)
    assert back.meta == item.meta
    assert back.detections == item.detections
    assert back.model == item.model
    assert back.inference_ms == pytest.approx(round(item.inference_ms, 3))


@pytest.mark.parametrize("eos", [EndOfStream("cam1", 30), EndOfStream("cam1", 750, frames_skipped=2)])
def test_detections_end_of_stream_round_trip(eos: EndOfStream) -> None:
    record = encode_detections(eos)
    assert record.key == b"cam1"
    _assert_no_pickle(record)
    assert json.loads(record.value or b"")["type"] == "eos"
    assert decode_detections(record.value) == eos


def test_encode_json_is_compact_and_deterministic() -> None:
    assert encode_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    assert encode_detections(RESULT).value == encode_detections(RESULT).value
    assert decode_json(encode_json({"b": 1})) == {"b": 1}


def _c(**changes: Any) -> bytes:
    return json.dumps(detections_body(**changes)).encode()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (None, "empty JSON payload"),
        (b"", "empty JSON payload"),
        (b"{not json", "malformed JSON"),
        (b'{"type": "detections"', "malformed JSON"),
        (b"\xff\xfe\x00garbage", "malformed JSON"),
        (JPEG, "malformed JSON"),
        (b"[1, 2, 3]", "JSON payload must be an object, got list"),
        (b'"detections"', "JSON payload must be an object, got str"),
        (b"42", "JSON payload must be an object, got int"),
        (b"null", "JSON payload must be an object, got NoneType"),
        (_c(type="frame"), "unknown record type 'frame'"),
        (_c(type=...), "unknown record type None"),
        (_c(schema_version=...), "missing or invalid schema_version None"),
        (_c(schema_version=SCHEMA_VERSION + 1), f"unknown schema_version {SCHEMA_VERSION + 1}"),
        (_c(schema_version="x"), "missing or invalid schema_version 'x'"),
        (_c(frame_index=...), "missing metadata field 'frame_index'"),
        (_c(width=...), "missing metadata field 'width'"),
        (_c(frame_index="x"), "invalid metadata"),
        (_c(frame_index=-3), "frame_index must be >= 0"),
        (_c(capture_ts=None), "invalid metadata"),
        (_c(detections=...), "detections must be a JSON list"),
        (_c(detections={"label": "car"}), "detections must be a JSON list"),
        (_c(detections=[{"label": "car"}]), "invalid detections"),
        (_c(detections=[{"label": "car", "class_id": 2, "confidence": 0.9, "box": [1, 2]}]), "invalid detections"),
        (b'{"type": "eos", "schema_version": 1, "stream_id": "s"}', "end-of-stream record lacks 'frames_published'"),
        (b'{"type": "eos", "schema_version": 1, "stream_id": "s", "frames_published": "x"}', "invalid end-of-stream"),
        (b'{"type": "eos", "schema_version": 2, "stream_id": "s", "frames_published": 1}', "unknown schema_version 2"),
    ],
)
def test_decode_detections_poison(value: bytes | None, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_detections(value)


# Values JSON can carry but int()/float()/numpy reject with OverflowError (or, for inference_ms,
# an unguarded ValueError/TypeError). A consumer must see DecodeError for these, like for any other
# poison record, or it crashes instead of skipping the message. NaN/inf boxes decode today and
# later crash crop_detections (int(nan)); the decoder should reject them as it rejects a NaN capture_ts.
_HUGE = b"1e400"  # json.loads -> float('inf')


@pytest.mark.parametrize(
    "value",
    [
        _c(inference_ms="slow"),
        _c(inference_ms=[1]),
        _c(frame_index=1).replace(b'"frame_index": 1', b'"frame_index": ' + _HUGE),
        _c().replace(f'"schema_version": {SCHEMA_VERSION}'.encode(), b'"schema_version": ' + _HUGE),
        _c(detections=[{"label": "car", "class_id": 2**70, "confidence": 0.9, "box": [0, 0, 1, 1]}]),
        _c(detections=[{"label": "car", "class_id": 2, "confidence": 0.9, "box": [float("nan"), 0, 10, 10]}]),
        _c(detections=[{"label": "car", "class_id": 2, "confidence": 0.9, "box": [0, 0, float("inf"), 10]}]),
        b'{"type": "eos", "schema_version": 1, "stream_id": "s", "frames_published": ' + _HUGE + b"}",
    ],
    ids=[
        "inference_ms-text",
        "inference_ms-list",
        "frame_index-inf",
        "schema_version-inf",
        "class_id-too-big",
        "box-nan",
        "box-inf",
        "eos-frames_published-inf",
    ],
)
def test_decode_detections_poison_numbers_raise_decode_error(value: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_detections(value)


@pytest.mark.parametrize(
    ("value", "exception"),
    [
        (_c(), DoesNotRaise()),
        (_c(inference_ms=None), DoesNotRaise()),
        (_c(inference_ms=...), DoesNotRaise()),
        (_c(model=...), DoesNotRaise()),
    ],
)
def test_decode_detections_optional_fields(value: bytes, exception: Any) -> None:
    with exception:
        result = decode_detections(value)
        assert isinstance(result, FrameDetections)


def test_pickle_is_not_used() -> None:
    assert not any(v is pickle for v in vars(codecs).values())
    pickled = pickle.dumps({"type": "detections"})
    with pytest.raises(DecodeError):
        decode_detections(pickled)
    with pytest.raises(DecodeError):
        decode_jpeg(pickled)


def test_fit_jpeg_lowers_quality_then_halves_size_until_it_fits() -> None:
    from pipeline.codecs import encode_jpeg, fit_jpeg

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)  # noise compresses badly
    full = len(encode_jpeg(noisy, 90))
    jpeg, w, h = fit_jpeg(noisy, 90, full - 1)  # type: ignore[misc]
    assert len(jpeg) < full and (w, h) in ((320, 240), (160, 120))
    small, w, h = fit_jpeg(noisy, 90, 8000)  # type: ignore[misc]
    assert len(small) <= 8000 and w < 320 and abs(w / h - 320 / 240) < 0.05
    assert decode_jpeg(small).shape == (h, w, 3)
    assert fit_jpeg(noisy, 90, 100) is None  # not even the smallest size fits


# -- total decoders: poison that used to crash a stage or exhaust memory --------------------------


def png_bomb(side: int = 20000) -> bytes:
    """A tiny PNG of side x side pixels (a decompression bomb: ~1.2 GB once decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * (side * 3)
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()  # truncated rows: enough
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose SOF header is patched to declare another size (a JPEG bomb, as far as size goes)."""
    data = bytearray(JPEG)
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC2):
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    data[pos + 5 : pos + 7] = height.to_bytes(2, "big")
    data[pos + 7 : pos + 9] = width.to_bytes(2, "big")
    return bytes(data)


DEEP = b"[" * 100000
DEEP_OBJECT = b'{"a":' * 40 + b"1" + b"}" * 40


def test_jpeg_size_reads_the_frame_header_without_decoding() -> None:
    assert codecs.jpeg_size(JPEG) == (64, 48)
    assert codecs.jpeg_size(jpeg_declaring(20000, 20000)) == (20000, 20000)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (png_bomb(), "not a JPEG"),
        (jpeg_declaring(20000, 20000), "20000x20000 pixels is above the limit"),
        (jpeg_declaring(0, 48), "empty image"),
        (b"\xff\xd8\xff", "no JPEG frame header"),
        (b"\xff\xd8\xff\xe0\x00\x02" * 3, "no JPEG frame header"),
        (b"\xff\xd8\xff\xe0\xff\xff", "no JPEG frame header"),  # a segment length past the end
        (b"\xff\xd8\xff\xda\x00\x08", "no JPEG frame header"),  # scan before any frame header
        (JPEG[:200], "no JPEG frame header|not a decodable image"),
    ],
)
def test_decode_jpeg_bounds_format_and_pixels_before_decoding(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_jpeg(data)


def test_decode_jpeg_refuses_a_size_other_than_the_headers_claim() -> None:
    assert decode_jpeg(JPEG, expect=(64, 48)).shape == (48, 64, 3)
    with pytest.raises(DecodeError, match="headers say 2x2 but the JPEG is 64x48"):
        decode_jpeg(JPEG, expect=(2, 2))


@pytest.mark.parametrize(
    ("value", "limits", "match"),
    [
        (DEEP, codecs.DEFAULT_LIMITS, "nested deeper than 32"),
        (b"{" * 100000, codecs.DEFAULT_LIMITS, "nested deeper than 32"),
        (DEEP_OBJECT, codecs.DEFAULT_LIMITS, "nested deeper than 32"),
        (b'{"a":"' + b"[" * 100 + b'"}', codecs.DEFAULT_LIMITS, None),  # brackets inside a string are text
        (b'{"a":"\\\\"}', codecs.DEFAULT_LIMITS, None),  # an escaped backslash closes nothing
        (b'{"a":"\\"[[[["}', codecs.DecodeLimits(max_json_depth=2), None),  # an escaped quote does not end it
        (b'{"a":' + b"1" * 5000 + b"}", codecs.DEFAULT_LIMITS, "malformed JSON"),  # int above Python's digit limit
        (b'{"a":"' + b"x" * 2000 + b'"}', codecs.DecodeLimits(max_json_bytes=1000), "above the limit of 1000 bytes"),
        (b"\xff\xfe", codecs.DEFAULT_LIMITS, "malformed JSON"),
    ],
)
def test_decode_json_is_total(value: bytes, limits: codecs.DecodeLimits, match: str | None) -> None:
    if match is None:
        assert isinstance(decode_json(value, limits), dict)
    else:
        with pytest.raises(DecodeError, match=match):
            decode_json(value, limits)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (DEEP, "nested deeper"),
        (json.dumps(detections_body(detections=json.loads(b"[" * 40 + b"]" * 40))).encode(), "nested deeper"),
        (encode_json({"type": "skipped", "schema_version": 1, "stream_id": "s", "frame_index": 3}), "unknown skip reason"),
        (encode_json({"type": "skipped", "schema_version": 1, "stream_id": "s", "reason": "poison"}), "lacks 'frame_index'"),
        (encode_json({"type": "skipped", "schema_version": 1, "stream_id": "", "frame_index": 3, "reason": "poison"}), "invalid"),
        (
            encode_json({"type": "skipped", "schema_version": 1, "stream_id": "s", "frame_index": -1, "reason": "poison"}),
            "invalid",
        ),
    ],
)
def test_decode_detections_is_total(value: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_detections(value)


def test_skipped_frame_round_trip_on_c() -> None:
    from pipeline.messages import SkippedFrame

    item = SkippedFrame("cam1", 5, "poison")
    record = codecs.encode_skipped(item)
    assert record.key == b"cam1"
    _assert_no_pickle(record)
    assert decode_detections(record.value) == item


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        (frame_headers() + [("model", b"m"), ("detections", DEEP)], "nested deeper"),
        (frame_headers() + [("model", b"m"), ("detections", b"[" + b"1," * 600000 + b"1]")], "above the limit"),
        (frame_headers() + [("big", b"x" * (3 * 1024 * 1024))], "headers are above the limit"),
        (frame_headers(width="20000", height="20000") + [("detections", b"[]")], "above 40000000"),
        ([("vapipe-type", None), ("stream_id", b"x")], "unknown or missing vapipe-type"),
        ([(b"\xff", b"frame")], "unknown or missing vapipe-type"),
        ("not headers", "not a list of"),
        ([("only-a-key",)], "not a list of"),
    ],
)
def test_decode_detected_frame_is_total(headers: Any, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_detected_frame(JPEG, headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (frame_headers(), ("cam1", 7)),
        (frame_headers(width="nan", capture_ts="x"), ("cam1", 7)),  # other fields broken: still placeable
        (frame_headers(frame_index="-3"), None),
        (frame_headers(frame_index="seven"), None),
        (frame_headers(stream_id=None), None),
        (frame_headers(**{"vapipe-type": "eos"}), None),
        ([("stream_id", b"cam1"), ("frame_index", b"7")], None),  # no type header: not known to be a frame
        ([("vapipe-type", b"frame"), ("stream_id", b"\xff"), ("frame_index", b"1")], None),
        (None, None),
        ("junk", None),
    ],
)
def test_frame_position_never_raises(headers: Any, expected: tuple[str, int] | None) -> None:
    assert codecs.frame_position(headers) == expected


def test_encode_outputs_builds_b_and_c_from_one_json_and_the_incoming_headers() -> None:
    meta = mock_meta()
    jpeg = encode_jpeg(gradient_image(meta.height, meta.width))
    result = FrameDetections(meta, mock_detections([(1, 2, 10, 12), (3, 4, 20, 30)], labels=("car", "bus")), "m", 1.5)
    incoming = [*codecs.encode_frame(meta, jpeg).headers, ("publish_ts", b"12.5")]  # another stamp is carried on
    b, c = codecs.encode_outputs(result, jpeg, incoming)
    assert b.headers[: len(incoming)] == incoming and b.value == jpeg
    back, back_jpeg = codecs.decode_detected_frame(b.value, b.headers)  # type: ignore[misc]
    assert back.detections == result.detections and back_jpeg == jpeg
    assert codecs.decode_detections(c.value) == codecs.decode_detections(codecs.encode_detections(result).value)
    assert c.key == meta.stream_id.encode()
    published = dataclasses.replace(result, meta=dataclasses.replace(meta, publish_ts=12.5))
    _, c = codecs.encode_outputs(published, jpeg)
    assert codecs.decode_detections(c.value) == published  # the publish time reaches C: latency is measured from it


def test_check_jpeg_refuses_without_decoding() -> None:
    jpeg = encode_jpeg(np.zeros((16, 24, 3), np.uint8))
    assert codecs.check_jpeg(jpeg, expect=(24, 16)) == (24, 16)
    with pytest.raises(DecodeError, match="headers say 10x10 but the JPEG is 24x16"):
        codecs.check_jpeg(jpeg, expect=(10, 10))
