"""Detector: model names are checked early; the calibration detector; the real shared model on a known image."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.detector import (
    CalibrationDetector,
    UltralyticsDetector,
    check_model,
    is_calibration,
    make_detector,
    resolve_device,
)
from pipeline.errors import ModelError
from pipeline.messages import Detections
from tests.pipeline.helpers import DoesNotRaise, gradient_image

REFERENCE = {"bicycle": 0.88, "car": 0.59, "dog": 0.96, "truck": 0.51}
"""shared/README.md: street-dog.jpg with yolov8n_int8.onnx at conf 0.25."""


@pytest.mark.parametrize(
    ("name", "exception"),
    [
        ("yolov8n.pt", DoesNotRaise()),  # official names are left to ultralytics (downloaded on first use)
        ("yolo11s.onnx", DoesNotRaise()),
        ("sleep:5ms", DoesNotRaise()),
        ("sleep:0.5ms", DoesNotRaise()),
        ("missing/model.onnx", pytest.raises(ModelError, match="model file not found: missing/model.onnx")),
        ("./yolov8n.pt", pytest.raises(ModelError, match="model file not found")),
        ("../models/x.pt", pytest.raises(ModelError, match="model file not found")),
        ("C:\\models\\x.pt", pytest.raises(ModelError, match="model file not found")),
        ("resnet", pytest.raises(ModelError, match="unknown model 'resnet'.*yolov8n.pt.*\\.onnx")),
        ("yolov8n.pth", pytest.raises(ModelError, match="unknown model")),
        ("sleep:5", pytest.raises(ModelError, match="unknown model 'sleep:5'")),
        ("sleep:fast", pytest.raises(ModelError, match="unknown model")),
    ],
)
def test_check_model_names(name: str, exception: Any) -> None:
    with exception:
        check_model(name)


def test_check_model_missing_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "models" / "gone.onnx"
    with pytest.raises(ModelError, match="model file not found") as info:
        check_model(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("folder", ["weights.pt", "model.onnx"])
def test_check_model_folder(tmp_path: Path, folder: str) -> None:
    path = tmp_path / folder
    path.mkdir()
    with pytest.raises(ModelError, match="is a folder, not a model file"):
        check_model(str(path))


@pytest.mark.model
def test_check_model_existing_file(model_path: str) -> None:
    check_model(model_path)


@pytest.mark.parametrize(
    ("name", "per_frame_s", "label"),
    [("sleep:5ms", 0.005, "sleep:5ms"), ("sleep:0.5ms", 0.0005, "sleep:0.5ms"), ("sleep:0ms", 0.0, "sleep:0ms")],
)
def test_make_detector_calibration(name: str, per_frame_s: float, label: str) -> None:
    assert is_calibration(name)
    detector = make_detector(ModelConfig(name=name))
    assert isinstance(detector, CalibrationDetector)
    assert detector.per_frame_s == pytest.approx(per_frame_s)
    assert detector.name == label


def test_calibration_detector_returns_empty_detections_per_image() -> None:
    detector = make_detector(ModelConfig(name="sleep:5ms"))
    images = [gradient_image() for _ in range(3)]
    start = time.perf_counter()
    results = detector.detect(images)
    elapsed = time.perf_counter() - start
    assert results == [Detections.empty()] * 3
    assert elapsed >= 0.015 * 0.9  # sleeps per frame
    assert detector.detect([]) == []


@pytest.mark.model
def test_make_detector_is_lazy(model_path: str) -> None:
    detector = make_detector(ModelConfig(name=model_path, device="cpu"))
    assert isinstance(detector, UltralyticsDetector)
    assert detector._model is None  # nothing loaded until the first detect()/load()
    assert detector.detect([]) == []
    assert detector._model is None


def test_make_detector_rejects_missing_path() -> None:
    with pytest.raises(ModelError, match="model file not found"):
        make_detector(ModelConfig(name="no/such/model.onnx"))


@pytest.mark.parametrize(("device", "expected"), [("cpu", "cpu"), ("cuda:1", "cuda:1")])
def test_resolve_device_explicit(device: str, expected: str) -> None:
    assert resolve_device(device) == expected


@pytest.mark.parametrize("name", ["fake.pt", "fake.onnx"])
def test_load_rejects_a_file_that_is_not_a_model(tmp_path: Path, name: str) -> None:
    # InterWorker.setup() calls load() so a bad model fails the stage at start, with one line,
    # not at the first batch with whatever the runtime raises.
    fake = tmp_path / name
    fake.write_bytes(b"this is not a model, just a truncated download")
    with pytest.raises(ModelError, match="cannot load model"):
        UltralyticsDetector(ModelConfig(name=str(fake), device="cpu")).load()


# -- the real shared model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def yolo(model_path: str) -> UltralyticsDetector:
    detector = UltralyticsDetector(ModelConfig(name=model_path, device="cpu", min_confidence=0.25))
    detector.load()
    return detector


@pytest.fixture(scope="module")
def street_dog(shared_dir: Path) -> np.ndarray:
    image = cv2.imread(str(shared_dir / "images" / "street-dog.jpg"))
    assert image is not None
    return image


@pytest.mark.model
def test_real_model_finds_reference_objects(yolo: UltralyticsDetector, street_dog: np.ndarray) -> None:
    (found,) = yolo.detect([street_dog])
    assert set(found.labels) == set(REFERENCE)
    assert len(found) == len(REFERENCE)  # one box per object
    for label, confidence in zip(found.labels, found.confidence, strict=True):
        assert float(confidence) == pytest.approx(REFERENCE[label], abs=0.02), label
    h, w = street_dog.shape[:2]
    assert found.xyxy.shape == (4, 4)
    assert np.all(found.xyxy >= -1) and np.all(found.xyxy[:, [0, 2]] <= w + 1) and np.all(found.xyxy[:, [1, 3]] <= h + 1)
    assert np.all(found.xyxy[:, 2] > found.xyxy[:, 0]) and np.all(found.xyxy[:, 3] > found.xyxy[:, 1])
    assert found.class_id.dtype == np.int64
    assert dict(zip(found.labels, found.class_id.tolist(), strict=True)) == {"bicycle": 1, "car": 2, "dog": 16, "truck": 7}
    assert "ultralytics" in sys.modules


@pytest.mark.model
def test_real_model_batch_of_identical_images(yolo: UltralyticsDetector, street_dog: np.ndarray) -> None:
    results = yolo.detect([street_dog, street_dog.copy(), street_dog.copy()])
    assert len(results) == 3
    assert results[0] == results[1] == results[2]
    assert set(results[0].labels) == set(REFERENCE)


@pytest.mark.model
def test_real_model_blank_image_finds_nothing(yolo: UltralyticsDetector) -> None:
    (found,) = yolo.detect([np.zeros((240, 320, 3), dtype=np.uint8)])
    assert found == Detections.empty()


def test_synthetic_detector_finds_the_same_boxes_in_the_same_image_and_is_a_calibration_model() -> None:
    from pipeline.detector import SyntheticDetector, is_calibration, synthetic_detections

    detector = make_detector(ModelConfig(name="synthetic:0ms"))
    assert isinstance(detector, SyntheticDetector) and detector.name == "synthetic:0ms" and is_calibration("synthetic:5ms")
    image = gradient_image()
    first, again = detector.detect([image, image.copy()])
    assert len(first) == 16 and first.labels == again.labels
    np.testing.assert_array_equal(first.confidence, again.confidence)
    assert (first.confidence >= 0.3).all() and (first.confidence <= 0.99).all()
    h, w = image.shape[:2]
    assert (first.xyxy[:, 2] < w).all() and (first.xyxy[:, 3] < h).all()
    assert synthetic_detections(image[:1, :1]) == Detections.empty()


def test_synthetic_detections_spread_over_crop_and_count_thresholds_on_a_real_frame(highway: str) -> None:
    from pipeline.detector import synthetic_detections
    from pipeline.sources import VideoSource, parse_source

    source = VideoSource(parse_source(highway), max_frames=5).open()
    confidences = np.concatenate([synthetic_detections(f.image).confidence for f in source])
    source.close()
    assert (confidences > 0.7).any() and ((confidences > 0.5) & (confidences <= 0.7)).any() and (confidences <= 0.5).any()
