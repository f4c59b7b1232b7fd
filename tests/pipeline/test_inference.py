"""The batched InterConsumer core: letterbox arithmetic, per-image decode failures, no decode for the
calibration detector, and the same boxes as the ultralytics path on the shared images and videos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.codecs import encode_jpeg
from pipeline.config import ModelConfig
from pipeline.detector import CalibrationDetector, UltralyticsDetector
from pipeline.errors import DecodeError
from pipeline.inference import BatchDetector, JpegAdapter, Letterbox, StageTimes, as_jpeg_detector, decode_jpegs, letterbox
from pipeline.messages import Detections
from pipeline.sources import VideoSource, parse_source


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((320, 240), Letterbox(2.0, 0, 80, 320, 240)),
        ((1280, 720), Letterbox(0.5, 0, 140, 1280, 720)),
        ((640, 640), Letterbox(1.0, 0, 0, 640, 640)),
        ((100, 400), Letterbox(1.6, 240, 0, 100, 400)),
    ],
)
def test_letterbox_fit(size: tuple[int, int], expected: Letterbox) -> None:
    assert Letterbox.fit(*size, imgsz=640) == expected


def test_letterbox_batch_is_one_normalised_rgb_tensor() -> None:
    blue = np.zeros((240, 320, 3), np.uint8)
    blue[..., 0] = 255  # BGR
    batch, boxes = letterbox([blue, np.zeros((64, 64, 3), np.uint8)], 64)
    assert tuple(batch.shape) == (2, 3, 64, 64)
    assert boxes[0] == Letterbox(0.2, 0, 8, 320, 240)
    assert float(batch[0, 2, 32, 32]) == 1.0 and float(batch[0, 0, 32, 32]) == 0.0  # RGB: blue is channel 2
    assert abs(float(batch[0, 0, 0, 0]) - 114 / 255) < 1e-6  # the border


def test_decode_jpegs_keeps_a_bad_jpeg_in_its_slot() -> None:
    good = encode_jpeg(np.zeros((16, 24, 3), np.uint8))
    out = decode_jpegs([good, b"\xff\xd8\xff" + b"\x00" * 10, good])
    assert isinstance(out[1], DecodeError)
    assert out[0].shape == (16, 24, 3) and out[2].shape == (16, 24, 3)


def test_calibration_detector_is_never_given_decoded_images() -> None:
    adapter = as_jpeg_detector(CalibrationDetector(0.0))
    assert isinstance(adapter, JpegAdapter)
    times = StageTimes()
    out = adapter.detect_jpegs([b"not even a jpeg", b"x"], times)
    assert out == [Detections.empty(), Detections.empty()]


def _match(a: Detections, b: Detections, iou: float) -> int:
    """Boxes of ``a`` with a same-label box in ``b`` at IoU >= ``iou`` and confidence within 0.05."""
    found = 0
    for i in range(len(a)):
        for j in range(len(b)):
            if a.labels[i] != b.labels[j] or abs(float(a.confidence[i]) - float(b.confidence[j])) > 0.05:
                continue
            x1, y1 = np.maximum(a.xyxy[i, :2], b.xyxy[j, :2])
            x2, y2 = np.minimum(a.xyxy[i, 2:], b.xyxy[j, 2:])
            inter = max(x2 - x1, 0) * max(y2 - y1, 0)
            union = np.prod(a.xyxy[i, 2:] - a.xyxy[i, :2]) + np.prod(b.xyxy[j, 2:] - b.xyxy[j, :2]) - inter
            if union > 0 and inter / union >= iou:
                found += 1
                break
    return found


@pytest.mark.model
def test_batched_core_finds_the_boxes_of_the_ultralytics_path(model_path: str, shared_dir: Path) -> None:
    import cv2

    images = [cv2.imread(str(p)) for p in sorted((shared_dir / "images").glob("*.jpg"))]
    for video in sorted((shared_dir / "videos").glob("*")):
        with VideoSource(parse_source(str(video)), max_frames=40) as source:
            images += [f.image for f in source if f.index % 10 == 0]
    jpegs = [encode_jpeg(im, 90) for im in images]
    decoded = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]  # same pixels for both
    config = ModelConfig(name=model_path, device="cpu")
    reference = UltralyticsDetector(config).detect(decoded)
    times = StageTimes()
    batched = BatchDetector(config).detect_jpegs(jpegs, times)
    assert times.decode_s > 0 and times.inference_s > 0 and times.postprocess_s > 0
    total = matched_ref = matched_ours = 0
    for ref, ours in zip(reference, batched, strict=True):
        assert isinstance(ours, Detections)
        total += len(ref)
        matched_ref += _match(ref, ours, 0.9)
        matched_ours += _match(ours, ref, 0.9)
        # Only boxes near the confidence threshold may differ between the two letterboxes.
        strong = ref.filter(ref.confidence > 0.4)
        assert _match(strong, ours, 0.9) == len(strong)
    assert total > 20
    assert matched_ref >= 0.95 * total and matched_ours >= 0.95 * sum(len(b) for b in batched if isinstance(b, Detections))
