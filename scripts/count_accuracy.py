"""Line-crossing accuracy on a real video: our TrafficCounter vs ultralytics' ObjectCounter vs a hand count.

Pure and in-process (no Kafka, no Ray): the shared model runs once over the video through
``pipeline.detector``, its detections are cached as JSON (outside the repo), and the same detections
feed ``pipeline.traffic.TrafficCounter`` and a micro-benchmark against ``pipeline.counting.VehicleCounter``.
ObjectCounter runs the model itself (it tracks inside ``model.track``), once per ultralytics tracker.

Usage (from the project root; ~1-2 min of CPU per model pass):
    python scripts/count_accuracy.py --video ../shared/videos/highway-320x240.avi \\
        --model ../shared/models/yolov8n_int8.onnx --cache /tmp/vapipe-highway-detections.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import COCO_VEHICLES, CountConfig, CountingLine, ModelConfig, TrackingConfig
from pipeline.counting import VehicleCounter
from pipeline.detector import make_detector
from pipeline.messages import Detections, FrameDetections, FrameMeta
from pipeline.traffic import TrafficCounter

logger = logging.getLogger("count_accuracy")

CACHE_VERSION = 1
DETECT_MIN_CONFIDENCE = 0.1
"""Cache boxes down to ByteTrack's low threshold: the tracker's second stage needs them."""


@dataclass(frozen=True)
class VideoDetections:
    """What the model found in every frame of one video, plus what the counter needs to know about the video."""

    video: str
    model: str
    width: int
    height: int
    fps: float
    frames: list[Detections]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "video": self.video,
            "model": self.model,
            "min_confidence": DETECT_MIN_CONFIDENCE,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "frames": [d.to_records() for d in self.frames],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VideoDetections:
        return cls(
            video=data["video"],
            model=data["model"],
            width=int(data["width"]),
            height=int(data["height"]),
            fps=float(data["fps"]),
            frames=[Detections.from_records(r) for r in data["frames"]],
        )

    def at_least(self, confidence: float) -> VideoDetections:
        """The same video with only the boxes at or above ``confidence`` (what a model run at that threshold gives)."""
        return replace(self, frames=[d.filter(d.confidence >= confidence) for d in self.frames])

    def frame_messages(self, stream_id: str = "highway", t0: float = 1_700_000_000.0) -> Iterator[FrameDetections]:
        """The detections as the count stage would receive them, with capture times from the video's frame rate."""
        for index, detections in enumerate(self.frames):
            meta = FrameMeta(stream_id, index, t0 + index / self.fps, self.width, self.height)
            yield FrameDetections(meta=meta, detections=detections, model=self.model)


def read_frames(video: str) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise SystemExit(f"cannot open video {video}")
    fps = float(capture.get(cv2.CAP_PROP_FPS)) or 25.0
    frames: list[np.ndarray] = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    capture.release()
    return frames, fps


def detect_video(video: str, model: str, cache: Path | None) -> VideoDetections:
    """Run the model over every frame once; reuse the JSON cache when it was made from the same video and model."""
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("version") == CACHE_VERSION and data.get("video") == video and data.get("model") == model:
            logger.info("detections from cache %s", cache)
            return VideoDetections.from_json(data)
    images, fps = read_frames(video)
    detector = make_detector(ModelConfig(name=model, device="cpu", min_confidence=DETECT_MIN_CONFIDENCE))
    started = time.perf_counter()
    frames = [detector.detect([image])[0] for image in images]
    logger.info("detected %d frames in %.1f s", len(frames), time.perf_counter() - started)
    height, width = images[0].shape[:2]
    result = VideoDetections(video=video, model=model, width=width, height=height, fps=fps, frames=frames)
    if cache is not None:
        cache.write_text(json.dumps(result.to_json()))
    return result


HAND_COUNT = {"up": 23, "down": 0}
"""../shared/README.md: 23 crossings, all moving up (22 motor vehicles and a slow cyclist the model misses)."""


@dataclass(frozen=True)
class CountResult:
    """Crossings per image direction, and the frames at which each was counted (to compare counters)."""

    name: str
    up: int
    down: int
    events: list[tuple[int, str, str]]
    """(frame index, "up"/"down", class) per counted crossing."""
    note: str = ""


def run_traffic_counter(video: VideoDetections, line: CountingLine, config: TrackingConfig, name: str) -> CountResult:
    counter = TrafficCounter(config.model_copy(update={"lines": (line,)}), labels=COCO_VEHICLES)
    events: list[tuple[int, str, str]] = []
    for frame in video.frame_messages():
        for crossing in counter.update(frame).crossings:
            events.append((crossing.frame_index, "up" if crossing.direction == "in" else "down", crossing.label))
    up = sum(1 for _, d, _ in events if d == "up")
    return CountResult(name, up, len(events) - up, events)


def run_object_counter(video: str, model: str, line: CountingLine, tracker: str, cache: Path | None) -> CountResult:
    """ultralytics' ObjectCounter on the video, tracking with its own tracker; it counts "IN" moving down a horizontal line."""
    name = f"ultralytics ObjectCounter ({tracker})"
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("video") == video and data.get("model") == model and data.get("tracker") == tracker:
            return CountResult(name, data["up"], data["down"], [(int(f), str(d), str(c)) for f, d, c in data["events"]])
    from ultralytics import solutions

    images, _ = read_frames(video)
    height, width = images[0].shape[:2]
    region = [(line.start[0] * width, line.start[1] * height), (line.end[0] * width, line.end[1] * height)]
    vehicle_ids = [i for i, label in _coco_names(model).items() if label in COCO_VEHICLES]
    counter = solutions.ObjectCounter(
        model=model, region=region, classes=vehicle_ids, tracker=tracker, show=False, verbose=False, device="cpu"
    )
    events: list[tuple[int, str, str]] = []
    seen_in, seen_out = 0, 0
    started = time.perf_counter()
    for index, image in enumerate(images):
        result = counter.process(image)
        for _ in range(result.in_count - seen_in):
            events.append((index, "down", _last_class(result.classwise_count, "IN", events)))
        for _ in range(result.out_count - seen_out):
            events.append((index, "up", _last_class(result.classwise_count, "OUT", events)))
        seen_in, seen_out = result.in_count, result.out_count
    logger.info("ObjectCounter (%s): %d frames in %.1f s", tracker, len(images), time.perf_counter() - started)
    out = CountResult(name, seen_out, seen_in, events)
    if cache is not None:
        cache.write_text(
            json.dumps({"video": video, "model": model, "tracker": tracker, "up": out.up, "down": out.down, "events": events})
        )
    return out


def _coco_names(model: str) -> dict[int, str]:
    from ultralytics import YOLO

    return {int(k): str(v) for k, v in YOLO(model, task="detect").names.items()}


def _last_class(classwise: dict[str, dict[str, int]], key: str, events: list[tuple[int, str, str]]) -> str:
    """The class whose count in this direction just went up (ObjectCounter keeps only totals)."""
    direction = "down" if key == "IN" else "up"
    before = Counter(label for _, d, label in events if d == direction)
    for label, counts in classwise.items():
        if counts[key] > before[label]:
            return label
    return "?"


def benchmark(video: VideoDetections, line: CountingLine, repeats: int = 3) -> list[tuple[str, float]]:
    """Frames/s of each counter on the same cached detections (best of ``repeats``, one process, no I/O)."""
    frames = list(video.frame_messages())
    count_cfg = CountConfig()
    tracking = TrackingConfig(enabled=True, lines=(line,))

    def box_counter() -> None:
        counter = VehicleCounter(count_cfg.labels, count_cfg.min_confidence, count_cfg.window_frames)
        for frame in frames:
            counter.update(frame)

    def traffic_counter() -> None:
        counter = TrafficCounter(tracking, labels=count_cfg.labels)
        for frame in frames:
            counter.update(frame)

    def traffic_counter_with_snapshots() -> None:
        counter = TrafficCounter(tracking, labels=count_cfg.labels)
        for frame in frames:
            counter.update(frame)
            json.dumps(counter.snapshot(frame.meta.stream_id))

    out = []
    for name, run in (
        ("VehicleCounter (boxes per frame, existing)", box_counter),
        ("TrafficCounter (reorder + tracking + lines)", traffic_counter),
        ("TrafficCounter + JSON snapshot after every frame", traffic_counter_with_snapshots),
    ):
        best = min(_timed(run) for _ in range(repeats))
        out.append((name, len(frames) / best))
    return out


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def snapshot_sizes(video: VideoDetections, line: CountingLine) -> tuple[int, int]:
    """Median and largest JSON snapshot of the stream over the video, in bytes."""
    counter = TrafficCounter(TrackingConfig(enabled=True, lines=(line,)), labels=COCO_VEHICLES)
    sizes = []
    for frame in video.frame_messages():
        counter.update(frame)
        sizes.append(len(json.dumps(counter.snapshot(frame.meta.stream_id))))
    return sorted(sizes)[len(sizes) // 2], max(sizes)


def markdown(results: list[CountResult], line: CountingLine, speeds: list[tuple[str, float]], sizes: tuple[int, int]) -> str:
    rows = [
        "| counter | up (away from camera) | down | total | error vs hand count (23) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| hand count (shared/README.md) | {HAND_COUNT['up']} | {HAND_COUNT['down']} | {sum(HAND_COUNT.values())} | - |",
    ]
    for r in results:
        total = r.up + r.down
        rows.append(f"| {r.name} | {r.up} | {r.down} | {total} | {total - sum(HAND_COUNT.values()):+d} |")
    lines = [f"Line `{line.name}` from {line.start} to {line.end} (normalised), anchor bottom-centre for TrafficCounter.", ""]
    lines += rows
    lines += ["", "Frames at which each counter counted a crossing (frame index, direction, class):", ""]
    for r in results:
        lines.append(f"- {r.name}: " + ", ".join(f"{f}{'↑' if d == 'up' else '↓'}{label}" for f, d, label in r.events))
    lines += ["", "| counter on the same cached detections (750 frames) | frames/s |", "| --- | ---: |"]
    lines += [f"| {name} | {fps:,.0f} |" for name, fps in speeds]
    lines += ["", f"TrafficCounter snapshot of this stream: median {sizes[0]:,} bytes, largest {sizes[1]:,} bytes of JSON."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache", type=Path, default=None, help="JSON file for the detections (keep it outside the repo)")
    parser.add_argument("--detect-only", action="store_true", help="fill the cache and stop")
    parser.add_argument(
        "--trackers",
        nargs="*",
        default=["bytetrack.yaml", "tracktrack.yaml"],
        help="ultralytics trackers to run ObjectCounter with (each is one more model pass); none to skip",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    video = str(Path(args.video).resolve())
    model = str(Path(args.model).resolve())
    detections = detect_video(video, model, args.cache)
    if args.detect_only:
        return 0
    line = CountingLine(name="highway", start=(0.25, 0.60), end=(1.00, 0.60), in_direction="up")
    defaults = TrackingConfig(enabled=True)
    paper = defaults.model_copy(update={"high_threshold": 0.5, "new_track_threshold": 0.6})
    results = [
        run_traffic_counter(detections, line, defaults, "vapipe TrafficCounter (defaults)"),
        run_traffic_counter(detections, line, paper, "vapipe TrafficCounter, ByteTrack paper thresholds (high 0.5, new 0.6)"),
        run_traffic_counter(
            detections.at_least(0.25), line, defaults, "vapipe TrafficCounter, boxes >= 0.25 only (model.min_confidence default)"
        ),
    ]
    for tracker in args.trackers:
        cache = None if args.cache is None else args.cache.with_name(f"{args.cache.stem}-objectcounter-{Path(tracker).stem}.json")
        results.append(run_object_counter(video, model, line, tracker, cache))
    speeds = benchmark(detections, line)
    print(markdown(results, line, speeds, snapshot_sizes(detections, line)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
