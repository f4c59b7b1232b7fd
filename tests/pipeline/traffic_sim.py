"""Synthetic traffic with known answers: vehicles on straight paths, rendered as per-frame detections.

Each ``Vehicle`` moves its anchor (bottom-centre of its box, normalised) along
a timed polyline; ground truth follows from the geometry (``true_crossings``), so a scene is a row in a table:
scene, expected counts. ``render`` adds the trouble real streams have: jitter,
occlusion gaps, missed and false boxes, dropped frames, boxes cut by the frame edge.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import CountingLine
from pipeline.lines import LineGeometry, segments_intersect
from pipeline.messages import Detections, FrameDetections, FrameMeta

__all__ = ["Vehicle", "Noise", "Scene", "render", "true_crossings", "highway", "T0"]

T0 = 1_700_000_000.0
WIDTH, HEIGHT = 640, 480
CLASS_IDS = {"bicycle": 1, "car": 2, "motorcycle": 3, "bus": 5, "truck": 7, "person": 0}


@dataclass(frozen=True)
class Vehicle:
    """A vehicle whose anchor (bottom-centre of its box, normalised) follows a polyline in time.

    ``path`` is ``((t, x, y), ...)`` with increasing t; between points it moves at constant
    speed, and two points with the same x, y make it stand still.
    """

    path: tuple[tuple[float, float, float], ...]
    label: str = "car"
    size: tuple[float, float] = (40.0, 30.0)
    """Box width and height in pixels."""
    hidden: tuple[tuple[float, float], ...] = ()
    """Time intervals in which the model does not see it (occlusion)."""
    confidence: float = 0.8

    @classmethod
    def straight(cls, start: tuple[float, float], end: tuple[float, float], t_start: float, t_end: float, **kw: Any) -> Vehicle:
        return cls(((t_start, *start), (t_end, *end)), **kw)

    def anchor_at(self, t: float) -> tuple[float, float] | None:
        if not self.path[0][0] <= t <= self.path[-1][0]:
            return None
        for (t0, x0, y0), (t1, x1, y1) in zip(self.path, self.path[1:], strict=False):
            if t0 <= t <= t1:
                f = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
                return (x0 + f * (x1 - x0), y0 + f * (y1 - y0))
        return (self.path[-1][1], self.path[-1][2])

    def box_at(self, t: float, width: int, height: int) -> list[float] | None:
        """The visible part of the box (clipped to the frame), or None when hidden or outside."""
        anchor = self.anchor_at(t)
        if anchor is None or any(a <= t <= b for a, b in self.hidden):
            return None
        w, h = self.size
        x, y = anchor[0] * width, anchor[1] * height
        box = [max(x - w / 2, 0.0), max(y - h, 0.0), min(x + w / 2, float(width)), min(y, float(height))]
        if box[2] - box[0] < 4 or box[3] - box[1] < 4:
            return None  # (almost) out of the frame
        return box


@dataclass(frozen=True)
class Noise:
    """What goes wrong in a real stream; the default is a clean stream."""

    jitter_px: float = 0.0
    """Std of the noise on each box corner."""
    miss_rate: float = 0.0
    """Chance the model misses a visible vehicle in a frame."""
    false_rate: float = 0.0
    """Chance of one spurious one-frame box per frame."""
    drop_rate: float = 0.0
    """Chance a frame never reaches the counter (its index is skipped)."""
    confidence_std: float = 0.0
    seed: int = 0


@dataclass
class Scene:
    vehicles: list[Vehicle]
    fps: float = 25.0
    duration: float = 10.0
    width: int = WIDTH
    height: int = HEIGHT
    stream_id: str = "sim"
    extra: dict[str, int] = field(default_factory=dict)


def render(scene: Scene, noise: Noise = Noise()) -> list[FrameDetections]:
    """Per-frame detections of a scene, in frame order; dropped frames are left out (their index is missing)."""
    rng = random.Random(noise.seed)
    frames: list[FrameDetections] = []
    for index in range(round(scene.duration * scene.fps)):
        t = index / scene.fps
        records = []
        for v in scene.vehicles:
            box = v.box_at(t, scene.width, scene.height)
            if box is None or rng.random() < noise.miss_rate:
                continue
            if noise.jitter_px:
                box = [c + rng.gauss(0.0, noise.jitter_px) for c in box]
            conf = (
                min(max(v.confidence + rng.gauss(0.0, noise.confidence_std), 0.05), 0.99)
                if noise.confidence_std
                else v.confidence
            )
            records.append({"label": v.label, "class_id": CLASS_IDS[v.label], "confidence": conf, "box": box})
        if rng.random() < noise.false_rate:
            x, y = rng.uniform(0, scene.width - 40), rng.uniform(0, scene.height - 30)
            records.append({"label": "car", "class_id": 2, "confidence": rng.uniform(0.3, 0.7), "box": [x, y, x + 40, y + 30]})
        if rng.random() < noise.drop_rate:
            continue
        meta = FrameMeta(scene.stream_id, index, T0 + t, scene.width, scene.height)
        frames.append(FrameDetections(meta=meta, detections=Detections.from_records(records)))
    return frames


def true_crossings(vehicles: Sequence[Vehicle], line: CountingLine, width: int = WIDTH, height: int = HEIGHT) -> Counter[str]:
    """Ground truth: ``{"in": n, "out": m}``, at most one per vehicle and direction.

    A crossing is a change of side between two path points (points exactly on the line
    do not decide a side) whose connecting move passes through the line segment.
    """
    geometry = LineGeometry(line, width, height)
    out: Counter[str] = Counter()
    for v in vehicles:
        decided = [(x, y) for _, x, y in v.path if geometry.signed_distance((x, y)) != 0]
        seen: set[str] = set()
        for a, b in itertools.pairwise(decided):
            side_a, side_b = geometry.signed_distance(a) > 0, geometry.signed_distance(b) > 0
            if side_a != side_b and segments_intersect(a, b, line.start, line.end):
                seen.add("in" if side_b else "out")
        out.update(seen)
    return out


def highway(seed: int, vehicles_per_direction: int = 20, duration: float = 40.0) -> Scene:
    """A busy two-way road across a horizontal line at y=0.6: two lanes each way, random speeds, some trucks, parked cars."""
    rng = np.random.default_rng(seed)
    vehicles: list[Vehicle] = []
    for direction, lanes in (("up", (0.58, 0.68)), ("down", (0.32, 0.42))):
        for _ in range(vehicles_per_direction):
            x = float(rng.choice(lanes) + rng.normal(0, 0.01))
            t0 = float(rng.uniform(0, duration - 6))
            travel = float(rng.uniform(2.0, 5.0))
            y0, y1 = (1.1, -0.05) if direction == "up" else (-0.05, 1.1)
            label = "truck" if rng.random() < 0.15 else "car"
            size = (70.0, 60.0) if label == "truck" else (44.0, 34.0)
            vehicles.append(Vehicle.straight((x, y0), (x, y1), t0, t0 + travel, label=label, size=size))
    for x in (0.08, 0.92):  # parked on the shoulders, on the line
        vehicles.append(Vehicle.straight((x, 0.6), (x, 0.6), 0.0, duration))
    return Scene(vehicles, fps=25.0, duration=duration, stream_id=f"highway-{seed}")
