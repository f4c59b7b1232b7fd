"""Drawing what the count stage saw: tracked boxes with ids, counting lines, running in/out counts.

Pure OpenCV on BGR arrays, no I/O (supervision's annotators, without the dependency).
``RunningCounts`` turns the crossings of the counts topic's tracking updates into the
counts as of each frame; ``draw_frame`` draws one frame.

Example:
    >>> running = RunningCounts(("highway",))
    >>> running.add({"line": "highway", "direction": "in", "label": "car", "track_id": 4, "frame_index": 38})
    >>> image = draw_frame(image, tracks=[[4, "car", 80.0, 120.0, 130.0, 160.0]], lines=settings.tracking.lines,
    ...                    counts=running.at(38))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from pipeline.config import CountingLine
from pipeline.messages import Detections

__all__ = ["RunningCounts", "draw_frame", "track_color"]

logger = logging.getLogger(__name__)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LINE_COLOR = (0, 215, 255)  # amber, BGR
_TEXT_BG = (0, 0, 0)
_TEXT_FG = (255, 255, 255)


def track_color(track_id: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per track id (golden-ratio hue steps)."""
    hue = int((track_id * 0.618033988749895 % 1.0) * 179)
    hsv = np.array([[[hue, 200, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


class RunningCounts:
    """Line crossings as of each frame, from the counted crossings (each ``(line, direction, track)`` once)."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = tuple(lines)
        self._seen: set[tuple[str, str, int]] = set()
        self._events: list[tuple[int, str, str]] = []

    def add(self, crossing: dict[str, Any]) -> None:
        """One crossing as the counts topic carries it (``Crossing.to_dict()``); a redelivered one is ignored."""
        key = (str(crossing["line"]), str(crossing["direction"]), int(crossing["track_id"]))
        if key in self._seen:
            return
        self._seen.add(key)
        self._events.append((int(crossing["frame_index"]), key[0], key[1]))

    def at(self, frame_index: int) -> dict[str, dict[str, int]]:
        """Line -> {"in": n, "out": n} counted up to and including ``frame_index``."""
        counts = {line: {"in": 0, "out": 0} for line in self.lines}
        for index, line, direction in self._events:
            if index <= frame_index:
                counts.setdefault(line, {"in": 0, "out": 0})[direction] += 1
        return counts


def _label(image: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], scale: float) -> None:
    (w, h), base = cv2.getTextSize(text, _FONT, scale, 1)
    y = max(y, h + base)
    cv2.rectangle(image, (x, y - h - base), (x + w + 2, y), color, -1)
    cv2.putText(image, text, (x + 1, y - base), _FONT, scale, _TEXT_BG, 1, cv2.LINE_AA)


def draw_frame(
    image: np.ndarray,
    *,
    tracks: Sequence[Sequence[Any]] | None = None,
    detections: Detections | None = None,
    lines: Sequence[CountingLine] = (),
    counts: dict[str, dict[str, int]] | None = None,
    caption: str = "",
) -> np.ndarray:
    """Draw on a copy of ``image``: tracks (``[track_id, label, x1, y1, x2, y2]``, with ids) or, without
    tracks, plain detections; the counting lines with their running in/out counts; a caption.

    Args:
        image: BGR frame.
        tracks: the frame's tracks from a tracking update (``TrafficUpdate.tracks``).
        detections: drawn (grey, no ids) when ``tracks`` is None: tracking was off or the frame was stepped over.
        lines: counting lines in normalised coordinates.
        counts: line -> {"in": n, "out": n}, drawn beside each line.
        caption: top-left text (stream and frame).

    Returns:
        The annotated copy.
    """
    out = image.copy()
    h, w = out.shape[:2]
    scale = max(0.35, min(w, h) / 700)
    thickness = max(1, round(min(w, h) / 300))
    for line in lines:
        a = (round(line.start[0] * (w - 1)), round(line.start[1] * (h - 1)))
        b = (round(line.end[0] * (w - 1)), round(line.end[1] * (h - 1)))
        cv2.line(out, a, b, _LINE_COLOR, thickness + 1, cv2.LINE_AA)
        c = (counts or {}).get(line.name, {"in": 0, "out": 0})
        _label(
            out,
            f"{line.name} in {c.get('in', 0)} out {c.get('out', 0)}",
            min(a[0], b[0]),
            min(a[1], b[1]) - 3,
            _LINE_COLOR,
            scale,
        )
    if tracks is not None:
        for row in tracks:
            track_id, label = int(row[0]), str(row[1])
            x1, y1, x2, y2 = (round(float(v)) for v in row[2:6])
            color = track_color(track_id)
            cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
            _label(out, f"#{track_id} {label}", x1, y1 - 2, color, scale)
    elif detections is not None:
        for i in range(len(detections)):
            x1, y1, x2, y2 = (round(float(v)) for v in detections.xyxy[i])
            cv2.rectangle(out, (x1, y1), (x2, y2), (160, 160, 160), thickness)
    if caption:
        (tw, th), base = cv2.getTextSize(caption, _FONT, scale, 1)
        cv2.rectangle(out, (0, 0), (tw + 6, th + base + 6), _TEXT_BG, -1)
        cv2.putText(out, caption, (3, th + 3), _FONT, scale, _TEXT_FG, 1, cv2.LINE_AA)
    return out
