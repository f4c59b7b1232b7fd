"""The InterConsumer's core, GPU-ready: a batch of JPEGs in, one ``Detections`` per JPEG out.

Each step works on the whole batch and is timed on its own (``StageTimes``), so an operator
sees whether decode, inference or post-processing limits a replica:

1. **decode** (``decode_jpegs``): on a GPU with ``torchvision.io.decode_jpeg(..., device="cuda")``
   (nvJPEG, the whole batch in one call), else OpenCV on the CPU; a JPEG that does not decode is
   returned as a ``DecodeError`` in its slot, so only that record is dead-lettered;
2. **preprocess** (``letterbox``): every image letterboxed to ``imgsz`` (gray 114 borders, as
   ultralytics' ``LetterBox``), RGB, scaled to 0..1, stacked into one tensor, fp16 on a GPU;
3. **inference**: an ONNX session (CPU; a fixed-batch model runs image by image), a TorchScript
   module or an ultralytics ``.pt`` model's ``nn.Module`` (the official weights);
4. **post-processing** (``postprocess``): confidence filter, per-class NMS
   (``torchvision.ops.batched_nms``), boxes scaled back to each frame's pixels.

Detectors that do not look at pixels (the calibration detector) are never given decoded images:
``JpegAdapter`` decodes only for detectors that need them.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from pipeline.codecs import DEFAULT_LIMITS, DecodeLimits, decode_jpeg
from pipeline.config import ModelConfig
from pipeline.detector import Detector, resolve_device
from pipeline.errors import DecodeError, ModelError
from pipeline.messages import Detections

__all__ = [
    "StageTimes",
    "JpegDetector",
    "JpegAdapter",
    "BatchDetector",
    "Letterbox",
    "decode_jpegs",
    "letterbox",
    "postprocess",
    "as_jpeg_detector",
]

logger = logging.getLogger(__name__)

PAD_VALUE = 114
"""Gray of the letterbox borders (ultralytics' value)."""


@dataclass
class StageTimes:
    """Seconds spent decoding, inferring and post-processing, accumulated over batches."""

    decode_s: float = 0.0
    inference_s: float = 0.0
    postprocess_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in vars(self).items()}


class JpegDetector(Protocol):
    """Turns a batch of JPEGs into one ``Detections`` (or the ``DecodeError`` of that JPEG) each."""

    name: str

    def detect_jpegs(self, jpegs: list[bytes], times: StageTimes) -> list[Detections | DecodeError]: ...


def decode_jpegs(jpegs: list[bytes], limits: DecodeLimits = DEFAULT_LIMITS, device: str = "cpu") -> list[Any | DecodeError]:
    """Decode a batch: BGR ``np.ndarray`` each on the CPU, RGB CHW ``uint8`` CUDA tensors on a GPU.

    Bounds (JPEG magic, declared pixels) are checked before any pixel is decoded, on both paths.
    """
    out: list[Any | DecodeError] = []
    if not device.startswith("cuda"):
        for data in jpegs:
            try:
                out.append(decode_jpeg(data, limits))
            except DecodeError as exc:
                out.append(exc)
        return out
    import torch
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    from pipeline.codecs import check_jpeg

    ok: list[int] = []
    for i, data in enumerate(jpegs):
        try:
            check_jpeg(data, limits)
            ok.append(i)
            out.append(None)
        except DecodeError as exc:
            out.append(exc)
    tensors = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in ok]
    try:
        decoded = tv_decode_jpeg(tensors, device=device) if tensors else []
    except RuntimeError:  # one bad JPEG fails the batch call: find it image by image
        decoded = []
        for t in tensors:
            try:
                decoded.append(tv_decode_jpeg(t, device=device))
            except RuntimeError as exc:
                decoded.append(DecodeError(f"payload of {t.numel()} bytes is not a decodable image: {exc}"))
    for i, image in zip(ok, decoded, strict=True):
        out[i] = image
    return out


@dataclass(frozen=True)
class Letterbox:
    """How one frame was fitted into the model's square input: scale, then padding (left, top)."""

    gain: float
    pad_x: int
    pad_y: int
    width: int
    height: int

    @classmethod
    def fit(cls, width: int, height: int, imgsz: int) -> Letterbox:
        """Ultralytics' ``LetterBox(auto=False, center=True)`` arithmetic, so boxes match its path."""
        gain = min(imgsz / height, imgsz / width)
        new_w, new_h = round(width * gain), round(height * gain)
        dw, dh = (imgsz - new_w) / 2, (imgsz - new_h) / 2
        return cls(gain, round(dw - 0.1), round(dh - 0.1), width, height)


def letterbox(images: list[Any], imgsz: int, device: str = "cpu", half: bool = False) -> tuple[Any, list[Letterbox]]:
    """Letterbox a batch into one normalised ``(n, 3, imgsz, imgsz)`` RGB tensor (fp16 when ``half``).

    CPU images are BGR ``np.ndarray`` (OpenCV resize); GPU images are RGB CHW tensors (resized on
    the GPU), as ``decode_jpegs`` returns them.
    """
    import torch

    boxes: list[Letterbox] = []
    if not device.startswith("cuda"):
        batch = np.full((len(images), imgsz, imgsz, 3), PAD_VALUE, dtype=np.uint8)
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            lb = Letterbox.fit(w, h, imgsz)
            new_w, new_h = round(w * lb.gain), round(h * lb.gain)
            resized = image if (new_w, new_h) == (w, h) else cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            batch[i, lb.pad_y : lb.pad_y + new_h, lb.pad_x : lb.pad_x + new_w] = resized
            boxes.append(lb)
        tensor = torch.from_numpy(np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2)))
        return (tensor.half() if half else tensor.float()) / 255.0, boxes
    import torch.nn.functional as F

    out = torch.full(
        (len(images), 3, imgsz, imgsz), PAD_VALUE / 255.0, device=device, dtype=torch.float16 if half else torch.float32
    )
    for i, image in enumerate(images):
        h, w = int(image.shape[1]), int(image.shape[2])
        lb = Letterbox.fit(w, h, imgsz)
        new_w, new_h = round(w * lb.gain), round(h * lb.gain)
        x = image.unsqueeze(0).to(out.dtype) / 255.0
        if (new_w, new_h) != (w, h):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        out[i, :, lb.pad_y : lb.pad_y + new_h, lb.pad_x : lb.pad_x + new_w] = x[0]
        boxes.append(lb)
    return out, boxes


def postprocess(
    pred: Any,
    boxes: list[Letterbox],
    names: dict[int, str],
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
) -> list[Detections]:
    """YOLOv8 raw output ``(n, 4 + classes, anchors)`` to ``Detections`` in each frame's pixels.

    As ultralytics' ``non_max_suppression`` (class-aware, best class per anchor) and ``scale_boxes``.
    """
    import torch
    from torchvision.ops import batched_nms

    results: list[Detections] = []
    for p, lb in zip(pred, boxes, strict=True):
        p = p.transpose(0, 1).float()  # (anchors, 4 + classes)
        scores, cls = p[:, 4:].max(1)
        keep = scores > conf
        p, scores, cls = p[keep], scores[keep], cls[keep]
        if not len(scores):
            results.append(Detections.empty())
            continue
        xy, wh = p[:, :2], p[:, 2:4] / 2
        xyxy = torch.cat([xy - wh, xy + wh], 1)
        idx = batched_nms(xyxy, scores, cls, iou)[:max_det]
        xyxy, scores, cls = xyxy[idx], scores[idx], cls[idx]
        xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - lb.pad_x) / lb.gain).clamp(0, lb.width)
        xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - lb.pad_y) / lb.gain).clamp(0, lb.height)
        class_id = cls.cpu().numpy().astype(np.int64)
        results.append(
            Detections(
                xyxy=xyxy.cpu().numpy().astype(np.float32),
                confidence=scores.cpu().numpy().astype(np.float32),
                class_id=class_id,
                labels=tuple(names.get(int(c), str(int(c))) for c in class_id),
            )
        )
    return results


def _onnx_names(meta: dict[str, str]) -> dict[int, str]:
    raw = meta.get("names")
    if not raw:
        return {}
    parsed = ast.literal_eval(raw)  # a dict literal, never code
    return {int(k): str(v) for k, v in parsed.items()}


class BatchDetector:
    """The core for one model: ``detect_jpegs`` runs decode, letterbox, inference and NMS on a batch.

    Example:
        >>> det = BatchDetector(ModelConfig(name="../shared/models/yolov8n_int8.onnx"))
        >>> det.detect_jpegs([jpeg], StageTimes())[0].labels
        ('bicycle', 'car', 'dog', 'truck')
    """

    def __init__(self, config: ModelConfig, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.config = config
        self.name = config.name
        self.limits = limits
        self.device = resolve_device(config.device)
        self.half = self.device.startswith("cuda")
        self.names: dict[int, str] = {}
        self._run: Any = None

    def load(self) -> None:
        if self._run is not None:
            return
        path = Path(self.config.name)
        from pipeline.detector import check_model

        check_model(self.config.name, safe_only=self.config.safe_formats_only)
        try:
            if path.suffix == ".onnx":
                self._load_onnx(path)
            elif path.suffix == ".torchscript":
                self._load_torchscript(path)
            else:
                self._load_ultralytics()
        except ModelError:
            raise
        except Exception as exc:  # many types for a bad file
            raise ModelError(f"cannot load model {self.config.name!r}: {exc}") from exc
        logger.info("loaded %s on %s (batched core)", self.config.name, self.device)

    def _load_onnx(self, path: Path) -> None:
        import onnxruntime as ort
        import torch

        if self.device != "cpu":
            raise ModelError(f"the batched core runs ONNX models on the CPU only, not {self.device}: use a .torchscript or .pt")
        self.half = False
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = _onnx_names(session.get_modelmeta().custom_metadata_map)
        inp = session.get_inputs()[0]
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None

        def run(x: Any) -> Any:
            arr = x.numpy()
            if fixed is None:
                return torch.from_numpy(session.run(None, {inp.name: arr})[0])
            parts = [session.run(None, {inp.name: arr[i : i + fixed]})[0] for i in range(0, len(arr), fixed)]
            return torch.from_numpy(np.concatenate(parts))

        self._run = run

    def _load_torchscript(self, path: Path) -> None:
        import torch

        extra = {"config.txt": ""}
        module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra)
        config = json.loads(extra["config.txt"] or "{}")
        self.names = {int(k): str(v) for k, v in config.get("names", {}).items()}
        self._use_module(module.half() if self.half else module.float())

    def _load_ultralytics(self) -> None:
        from ultralytics import YOLO

        model = YOLO(self.config.name, task="detect")
        module = model.model.fuse().eval().to(self.device)
        self.names = {int(k): str(v) for k, v in model.names.items()}
        self._use_module(module.half() if self.half else module.float())

    def _use_module(self, module: Any) -> None:
        import torch

        def run(x: Any) -> Any:
            with torch.inference_mode():
                y = module(x)
            return y[0] if isinstance(y, list | tuple) else y

        self._run = run

    def detect_jpegs(self, jpegs: list[bytes], times: StageTimes) -> list[Detections | DecodeError]:
        if not jpegs:
            return []
        self.load()
        t0 = time.perf_counter()
        decoded = decode_jpegs(jpegs, self.limits, self.device)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, DecodeError)]
        batch, boxes = letterbox([decoded[i] for i in good], self.config.imgsz, self.device, self.half) if good else (None, [])
        t1 = time.perf_counter()
        pred = self._run(batch) if good else None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        t2 = time.perf_counter()
        found = postprocess(pred, boxes, self.names, conf=self.config.min_confidence) if good else []
        t3 = time.perf_counter()
        times.decode_s += t1 - t0
        times.inference_s += t2 - t1
        times.postprocess_s += t3 - t2
        out: list[Detections | DecodeError] = list(decoded)
        for i, det in zip(good, found, strict=True):
            out[i] = det
        return out


@dataclass
class JpegAdapter:
    """A BGR-image ``Detector`` behind ``detect_jpegs``: decodes with OpenCV only if it needs pixels.

    The calibration detector (``needs_pixels = False``) never pays for a decode it would not use.
    """

    detector: Detector
    limits: DecodeLimits = DEFAULT_LIMITS
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.detector.name

    def load(self) -> None:
        load = getattr(self.detector, "load", None)
        if load is not None:
            load()

    def detect_jpegs(self, jpegs: list[bytes], times: StageTimes) -> list[Detections | DecodeError]:
        t0 = time.perf_counter()
        if getattr(self.detector, "needs_pixels", True):
            decoded: list[Any] = decode_jpegs(jpegs, self.limits)
        else:
            decoded = [None] * len(jpegs)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, DecodeError)]
        t1 = time.perf_counter()
        found = self.detector.detect([decoded[i] for i in good]) if good else []
        times.decode_s += t1 - t0
        times.inference_s += time.perf_counter() - t1
        out: list[Detections | DecodeError] = list(decoded)
        for i, det in zip(good, found, strict=True):
            out[i] = det
        return out


def as_jpeg_detector(detector: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> JpegDetector:
    """The detector itself when it takes JPEGs, else wrapped in a ``JpegAdapter``."""
    if hasattr(detector, "detect_jpegs"):
        return detector  # type: ignore[no-any-return]
    return JpegAdapter(detector, limits)
