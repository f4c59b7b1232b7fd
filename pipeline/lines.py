"""Geometry of counting lines: which side of a line a point is on, and whether a move crossed it.

Points are normalised frame coordinates (x to the right, y down, in [0, 1]);
distances are fractions of the frame diagonal, so one setting means the same on
a 320x240 and a 1920x1080 stream.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import Anchor, CountingLine, InDirection

__all__ = ["Point", "LineGeometry", "anchors", "segments_intersect", "diagonal_distance"]

logger = logging.getLogger(__name__)

Point = tuple[float, float]

_DIRECTION_VECTORS: dict[InDirection, Point] = {"up": (0.0, -1.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "right": (1.0, 0.0)}


def anchors(xyxy: np.ndarray, width: int, height: int, anchor: Anchor) -> np.ndarray:
    """The point of each box that has to cross a line, normalised: ``(n, 2)``.

    Boxes are clipped to the frame first, so a vehicle entering at the edge has its
    anchor on the visible part of it.
    """
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    x1 = np.clip(boxes[:, 0], 0, width)
    x2 = np.clip(boxes[:, 2], 0, width)
    y1 = np.clip(boxes[:, 1], 0, height)
    y2 = np.clip(boxes[:, 3], 0, height)
    x = (x1 + x2) / 2 / width
    y = (y2 if anchor == "bottom_center" else (y1 + y2) / 2) / height
    return np.stack([x, y], axis=1)


def diagonal_distance(a: Point, b: Point, width: int, height: int) -> float:
    """Distance between two normalised points as a fraction of the frame diagonal."""
    dx, dy = (b[0] - a[0]) * width, (b[1] - a[1]) * height
    return math.hypot(dx, dy) / math.hypot(width, height)


def _orientation(a: Point, b: Point, c: Point) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _on_segment(a: Point, b: Point, p: Point) -> bool:
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def segments_intersect(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """Whether segment p1-p2 meets segment q1-q2 (touching counts)."""
    d1, d2 = _orientation(q1, q2, p1), _orientation(q1, q2, p2)
    d3, d4 = _orientation(p1, p2, q1), _orientation(p1, p2, q2)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return (
        (d1 == 0 and _on_segment(q1, q2, p1))
        or (d2 == 0 and _on_segment(q1, q2, p2))
        or (d3 == 0 and _on_segment(p1, p2, q1))
        or (d4 == 0 and _on_segment(p1, p2, q2))
    )


@dataclass(frozen=True)
class LineGeometry:
    """A counting line prepared for one frame size."""

    line: CountingLine
    width: int
    height: int

    @property
    def name(self) -> str:
        return self.line.name

    def signed_distance(self, p: Point) -> float:
        """Distance of ``p`` from the (infinite) line, as a fraction of the frame diagonal; positive on the "in" side."""
        (ax, ay), (bx, by) = self.line.start, self.line.end
        w, h = self.width, self.height
        ux, uy = (bx - ax) * w, (by - ay) * h
        cross = ux * (p[1] - ay) * h - uy * (p[0] - ax) * w
        dx, dy = _DIRECTION_VECTORS[self.line.in_direction]
        in_sign = 1.0 if ux * dy - uy * dx > 0 else -1.0
        return in_sign * cross / math.hypot(ux, uy) / math.hypot(w, h)

    def side(self, p: Point, hysteresis: float) -> int:
        """+1 on the "in" side, -1 on the "out" side, 0 within ``hysteresis`` of the line (undecided)."""
        d = self.signed_distance(p)
        return 1 if d > hysteresis else -1 if d < -hysteresis else 0

    def crossed(self, a: Point, b: Point) -> bool:
        """Whether a move from ``a`` to ``b`` passes through the line segment itself, not beside its ends."""
        return segments_intersect(a, b, self.line.start, self.line.end)
