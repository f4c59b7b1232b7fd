"""Message types: shape checks name expected and actual shapes, records round-trip, filter keeps order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.messages import SCHEMA_VERSION, Detections, EndOfStream, FrameMeta
from tests.pipeline.helpers import DoesNotRaise, mock_detections


def _arrays(n_xyxy: tuple[int, ...], n_conf: tuple[int, ...], n_cls: tuple[int, ...], n_labels: int) -> dict[str, Any]:
    return {
        "xyxy": np.zeros(n_xyxy, dtype=np.float32),
        "confidence": np.zeros(n_conf, dtype=np.float32),
        "class_id": np.zeros(n_cls, dtype=np.int64),
        "labels": ("car",) * n_labels,
    }


@pytest.mark.parametrize(
    ("kwargs", "exception"),
    [
        (_arrays((0, 4), (0,), (0,), 0), DoesNotRaise()),
        (_arrays((3, 4), (3,), (3,), 3), DoesNotRaise()),
        (_arrays((2, 3), (2,), (2,), 2), pytest.raises(ValueError, match=r"xyxy must have shape \(2, 4\), got \(2, 3\)")),
        (_arrays((3, 4), (2,), (2,), 2), pytest.raises(ValueError, match=r"xyxy must have shape \(2, 4\), got \(3, 4\)")),
        (_arrays((8,), (2,), (2,), 2), pytest.raises(ValueError, match=r"xyxy must have shape \(2, 4\), got \(8,\)")),
        (_arrays((2, 4), (2, 1), (2,), 2), pytest.raises(ValueError, match=r"confidence must have shape \(2,\), got \(2, 1\)")),
        (_arrays((2, 4), (2,), (3,), 2), pytest.raises(ValueError, match=r"class_id must have shape \(2,\), got \(3,\)")),
        (_arrays((2, 4), (2,), (2,), 1), pytest.raises(ValueError, match=r"labels must have 2 entries, got 1")),
    ],
)
def test_detections_shape_validation(kwargs: dict[str, Any], exception: Any) -> None:
    with exception:
        assert len(Detections(**kwargs)) == len(kwargs["confidence"])


def test_empty_detections() -> None:
    empty = Detections.empty()
    assert len(empty) == 0
    assert empty.xyxy.shape == (0, 4)
    assert empty.to_records() == []
    assert Detections.from_records([]) == empty


@pytest.mark.parametrize(
    ("kwargs", "exception"),
    [
        ({"stream_id": "cam1", "frame_index": 0, "capture_ts": 1.5, "width": 640, "height": 480}, DoesNotRaise()),
        ({"stream_id": "cam1", "frame_index": 10**9, "capture_ts": 0.0, "width": 1, "height": 1}, DoesNotRaise()),
        (
            {"stream_id": "", "frame_index": 0, "capture_ts": 0.0, "width": 1, "height": 1},
            pytest.raises(ValueError, match="stream_id must not be empty"),
        ),
        (
            {"stream_id": "s", "frame_index": -1, "capture_ts": 0.0, "width": 1, "height": 1},
            pytest.raises(ValueError, match="frame_index must be >= 0, got -1"),
        ),
        (
            {"stream_id": "s", "frame_index": 0, "capture_ts": 0.0, "width": 0, "height": 1},
            pytest.raises(ValueError, match="frame size must be positive, got 0x1"),
        ),
        (
            {"stream_id": "s", "frame_index": 0, "capture_ts": 0.0, "width": 5, "height": -2},
            pytest.raises(ValueError, match="got 5x-2"),
        ),
    ],
)
def test_frame_meta_validation(kwargs: dict[str, Any], exception: Any) -> None:
    with exception:
        meta = FrameMeta(**kwargs)
        assert meta.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize(
    ("stream_id", "frame_index", "key"),
    [("cam1", 0, "cam1/00000000"), ("highway@r1", 123, "highway@r1/00000123"), ("x", 123456789, "x/123456789")],
)
def test_frame_meta_key(stream_id: str, frame_index: int, key: str) -> None:
    assert FrameMeta(stream_id, frame_index, 0.0, 1, 1).key == key


def test_frame_meta_is_frozen() -> None:
    meta = FrameMeta("cam1", 0, 0.0, 1, 1)
    with pytest.raises(AttributeError):
        meta.frame_index = 3  # type: ignore[misc]


def test_end_of_stream_defaults() -> None:
    eos = EndOfStream("cam1", frames_published=30)
    assert (eos.frames_skipped, eos.schema_version) == (0, SCHEMA_VERSION)


@pytest.mark.parametrize(
    "detections",
    [
        Detections.empty(),
        mock_detections([[1, 2, 3, 4]], [0.5], ["car"], [2]),
        mock_detections([[0.5, 1.25, 100.75, 200.125], [10, 20, 30, 40]], [0.123456, 0.999], ["traffic light", "dog"], [9, 16]),
    ],
)
def test_records_round_trip(detections: Detections) -> None:
    records = detections.to_records()
    assert len(records) == len(detections)
    for record in records:
        assert set(record) == {"label", "class_id", "confidence", "box"}
        assert type(record["class_id"]) is int and type(record["confidence"]) is float
        assert len(record["box"]) == 4 and all(type(v) is float for v in record["box"])
    back = Detections.from_records(records)
    assert back == detections
    assert back.xyxy.dtype == np.float32 and back.class_id.dtype == np.int64


def test_to_records_values() -> None:
    records = mock_detections([[1, 2, 3, 4]], [0.5], ["bus"], [5]).to_records()
    assert records == [{"label": "bus", "class_id": 5, "confidence": 0.5, "box": [1.0, 2.0, 3.0, 4.0]}]


@pytest.mark.parametrize(
    ("records", "exception"),
    [
        ([{"label": "car", "class_id": 2, "confidence": 0.9, "box": [0, 0, 1, 1]}], DoesNotRaise()),
        ([{"label": "car", "class_id": 2, "confidence": 0.9}], pytest.raises(KeyError)),
        ([{"label": "car", "class_id": 2, "confidence": 0.9, "box": [0, 0, 1]}], pytest.raises(ValueError)),
        (
            [{"label": "car", "class_id": 2, "confidence": 0.9, "box": [0, 0, 1, 1, 2, 2, 3, 3]}],
            pytest.raises(ValueError, match="shape"),
        ),
    ],
)
def test_from_records_rejects_bad_boxes(records: list[dict[str, Any]], exception: Any) -> None:
    with exception:
        assert len(Detections.from_records(records)) == 1


@pytest.mark.parametrize(
    ("mask", "expected_labels"),
    [
        ([True, False, True], ("car", "dog")),
        ([False, False, False], ()),
        ([True, True, True], ("car", "bus", "dog")),
        (np.array([0.9, 0.2, 0.8]) > 0.5, ("car", "dog")),
    ],
)
def test_filter(mask: Any, expected_labels: tuple[str, ...]) -> None:
    detections = mock_detections([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], [0.9, 0.2, 0.8], ["car", "bus", "dog"], [2, 5, 16])
    kept = detections.filter(np.asarray(mask))
    assert kept.labels == expected_labels
    assert len(kept) == len(expected_labels)
    keep = [i for i, label in enumerate(detections.labels) if label in expected_labels]
    assert np.array_equal(kept.xyxy, detections.xyxy[keep])
    assert np.array_equal(kept.confidence, detections.confidence[keep])
    assert np.array_equal(kept.class_id, detections.class_id[keep])


def test_equality() -> None:
    a = mock_detections([[0, 0, 1, 1]], [0.9], ["car"], [2])
    assert a == mock_detections([[0, 0, 1, 1]], [0.9], ["car"], [2])
    assert a != mock_detections([[0, 0, 1, 1]], [0.9], ["bus"], [2])
    assert a != mock_detections([[0, 0, 1, 2]], [0.9], ["car"], [2])
    assert a != mock_detections([[0, 0, 1, 1]], [0.8], ["car"], [2])
    assert a.__eq__("car") is NotImplemented
