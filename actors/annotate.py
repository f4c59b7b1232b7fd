"""``vapipe annotate``: render one stream from topic B and the count stage's tracking updates to a video.

Reads every committed record of topic B (frames with their detections) and of the counts
topic (``"type": "traffic"`` updates: each applied frame's tracks and the crossings counted),
and draws each frame with ``pipeline.annotate.draw_frame``: tracked boxes with their ids, the
configured counting lines and the in/out counts as of that frame. Frames the tracker never saw
(tracking off, or stepped over) show their raw detections in grey.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2

from cluster.reading import read_all
from pipeline.annotate import RunningCounts, draw_frame
from pipeline.codecs import decode_detected_frame, decode_jpeg, decode_json
from pipeline.config import Settings
from pipeline.errors import DecodeError, PipelineError
from pipeline.messages import EndOfStream, FrameDetections

__all__ = ["Annotated", "annotate_stream", "read_tracking"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Annotated:
    """What ``annotate_stream`` wrote."""

    path: str
    frames: int
    """Frames written (every frame of the stream on topic B, up to ``max_frames``)."""
    tracked_frames: int
    """Of those, frames drawn with tracks (the others show raw detections)."""
    fps: float
    counts: dict[str, dict[str, int]]
    """Line -> in/out at the last frame written."""


def read_tracking(settings: Settings, stream_id: str) -> tuple[dict[int, list[list[Any]]], RunningCounts]:
    """Each tracked frame's tracks and the counted crossings of one stream, from the counts topic."""
    tracks: dict[int, list[list[Any]]] = {}
    running = RunningCounts([line.name for line in settings.tracking.lines_for(stream_id)])
    for record in read_all(settings.kafka, settings.topics.counts.name):
        try:
            update = decode_json(record.value)
        except DecodeError:
            continue
        if update.get("type") != "traffic" or update.get("stream_id") != stream_id:
            continue
        for index, rows in (update.get("tracks") or {}).items():
            tracks[int(index)] = rows
        for crossing in update.get("crossings") or []:
            running.add(crossing)
    return tracks, running


def _frames_on_b(settings: Settings, stream_id: str) -> dict[int, tuple[FrameDetections, bytes]]:
    frames: dict[int, tuple[FrameDetections, bytes]] = {}
    for record in read_all(settings.kafka, settings.topics.detected_frames.name):
        try:
            decoded = decode_detected_frame(record.value, record.headers)
        except DecodeError:
            continue
        if isinstance(decoded, EndOfStream) or decoded[0].meta.stream_id != stream_id:
            continue
        frames[decoded[0].meta.frame_index] = decoded
    return frames


def _fps(frames: list[FrameDetections]) -> float:
    """The capture rate, from the median gap between capture times (10 if it cannot be told), within 1-60:
    a stream published as fast as possible (``producer.fps: 0``) has gaps of a millisecond, and OpenCV's
    writer refuses such rates."""
    gaps = sorted(b.meta.capture_ts - a.meta.capture_ts for a, b in pairwise(frames))
    gaps = [g for g in gaps if g > 0]
    rate = 1.0 / gaps[len(gaps) // 2] if gaps else 10.0
    return round(min(max(rate, 1.0), 60.0), 3)


def annotate_stream(
    settings: Settings, stream_id: str, out: str | Path, max_frames: int | None = None, fps: float | None = None
) -> Annotated:
    """Render ``stream_id`` from topic B plus its tracking updates to ``out`` (mp4v, any extension OpenCV writes).

    Raises:
        PipelineError: topic B holds no frame of the stream, or OpenCV cannot write ``out``.
    """
    frames = _frames_on_b(settings, stream_id)
    if not frames:
        raise PipelineError(f"no frame of stream {stream_id!r} on {settings.topics.detected_frames.name}")
    tracks, running = read_tracking(settings, stream_id)
    order = sorted(frames)[:max_frames] if max_frames else sorted(frames)
    rate = fps or _fps([frames[i][0] for i in order])
    first = decode_jpeg(frames[order[0]][1])
    height, width = first.shape[:2]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), rate, (width, height))
    if not writer.isOpened():
        raise PipelineError(f"OpenCV cannot write a video to {path}")
    lines = settings.tracking.lines_for(stream_id)
    tracked = 0
    try:
        for index in order:
            result, jpeg = frames[index]
            image = decode_jpeg(jpeg)
            if image.shape[:2] != (height, width):
                image = cv2.resize(image, (width, height))
            rows = tracks.get(index)
            tracked += rows is not None
            caption = f"{stream_id} #{index}"
            writer.write(
                draw_frame(
                    image, tracks=rows, detections=result.detections, lines=lines, counts=running.at(index), caption=caption
                )
            )
    finally:
        writer.release()
    logger.info("wrote %d frames of %s to %s", len(order), stream_id, path)
    return Annotated(str(path), len(order), tracked, rate, running.at(order[-1]))
