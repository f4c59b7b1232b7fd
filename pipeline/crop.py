"""Crop stage core: pick confident boxes, cut them out, write them to a per-label corpus.

File names derive from (stream, frame, box index), so a redelivered message
overwrites its own crops instead of duplicating them, and the index keeps one
entry per crop key. Labels are sanitised: no label can leave the output folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.codecs import encode_jpeg
from pipeline.errors import SinkError
from pipeline.messages import Detections, FrameMeta

__all__ = ["Crop", "safe_label", "crop_detections", "crop_key", "CropSink", "load_index"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Crop:
    """One box cut out of a frame."""

    label: str
    box_index: int
    confidence: float
    box: tuple[int, int, int, int]
    image: np.ndarray


def safe_label(label: str) -> str:
    """A folder name for a label: letters, digits, '-' and '_' only ('traffic light' -> 'traffic_light')."""
    cleaned = _UNSAFE.sub("_", label.strip()).strip("_")
    return cleaned[:64] or "unlabelled"


def crop_detections(image: np.ndarray, detections: Detections, min_confidence: float) -> list[Crop]:
    """Cut out every box with confidence strictly above ``min_confidence``.

    Boxes are rounded outward and clipped to the image; boxes with no area left are dropped.
    ``box_index`` is the box's position in ``detections``, stable across redeliveries.
    """
    h, w = image.shape[:2]
    crops: list[Crop] = []
    for i in np.flatnonzero(detections.confidence > min_confidence):
        x1, y1, x2, y2 = detections.xyxy[i]
        left, top = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        right, bottom = min(int(np.ceil(x2)), w), min(int(np.ceil(y2)), h)
        if right <= left or bottom <= top:
            continue
        crops.append(
            Crop(
                label=detections.labels[i],
                box_index=int(i),
                confidence=float(detections.confidence[i]),
                box=(left, top, right, bottom),
                image=image[top:bottom, left:right],
            )
        )
    return crops


def crop_key(meta: FrameMeta, box_index: int) -> str:
    """Deterministic crop name: stream, frame and box.

    A stream id that is not already a safe name gets a short hash of itself, so two
    ids that sanitise alike ('cam.1', 'cam_1') never share crop files.
    """
    stream = safe_label(meta.stream_id)
    if stream != meta.stream_id:
        stream += "-" + hashlib.sha1(meta.stream_id.encode()).hexdigest()[:8]
    return f"{stream}_f{meta.frame_index:08d}_b{box_index:03d}"


def _describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full writing {path}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"output folder not writable: {path}"
    return f"cannot write {path}: {exc.strerror or exc}"


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        raise SinkError(_describe_os_error(exc, folder)) from exc
    finally:
        os.close(fd)


class CropSink:
    """Writes crops under ``<root>/<label>/<key>.jpg`` and records them in an index.

    Each writer appends to its own ``<root>/index/<writer>.jsonl`` so replicas never
    interleave lines; ``load_index`` merges them, keeping one entry per crop key. Once that file
    reaches ``index_segment_bytes`` it is closed as ``<writer>.<n>.jsonl`` (n = 1, 2, ...) and a new
    one begins, so a camera that runs for months leaves closed segments an operator can archive
    or delete (``logrotate``-style), never one file that only grows.

    Raises:
        SinkError: a crop or index line could not be written (disk full, no permission).
    """

    def __init__(
        self, root: str | Path, writer: str = "crop", jpeg_quality: int = 95, index_segment_bytes: int = 64 * 1024**2
    ) -> None:
        self.root = Path(root).resolve()
        self.writer = safe_label(writer)
        self.jpeg_quality = jpeg_quality
        self.index_path = self.root / "index" / f"{self.writer}.jsonl"
        self.index_segment_bytes = index_segment_bytes

    def _target(self, label: str, key: str) -> Path:
        path = (self.root / safe_label(label) / f"{key}.jpg").resolve()
        if self.root not in path.parents:  # defence in depth: safe_label already forbids this
            raise SinkError(f"refusing to write outside {self.root}: {path}")
        return path

    def _temp(self, path: Path) -> Path:
        """A temp name no other writer uses: two replicas writing the same crop (a redelivery after a
        rebalance) must not write into, or rename, each other's half-written file."""
        return path.with_name(f".{path.name}.{self.writer}-{os.getpid()}.tmp")

    def write(self, meta: FrameMeta, crops: Iterable[Crop]) -> list[dict[str, Any]]:
        """Write one frame's crops atomically and durably, then index them.

        Each crop goes to a temp file that is fsynced, then renamed into place; the folders of
        renamed files are fsynced too, all before the index lines that name them are written, so
        after a crash the index never names a crop that is not on disk.
        """
        entries: list[dict[str, Any]] = []
        folders: set[Path] = set()
        for crop in crops:
            key = crop_key(meta, crop.box_index)
            path = self._target(crop.label, key)
            tmp = self._temp(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as fh:
                    fh.write(encode_jpeg(crop.image, self.jpeg_quality))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
                folders.add(path.parent)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise SinkError(_describe_os_error(exc, path)) from exc
            entries.append(
                {
                    "key": key,
                    "path": str(path.relative_to(self.root)),
                    "label": crop.label,
                    "stream_id": meta.stream_id,
                    "frame_index": meta.frame_index,
                    "box_index": crop.box_index,
                    "box": list(crop.box),
                    "confidence": crop.confidence,
                }
            )
        for folder in sorted(folders):
            _fsync_dir(folder)
        if entries:
            self._append_index(entries)
        return entries

    def _append_index(self, entries: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
        try:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            self._rotate_index()
            with open(self.index_path, "a", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise SinkError(_describe_os_error(exc, self.index_path)) from exc

    def _rotate_index(self) -> None:
        """Close the index file as the next numbered segment once it reaches ``index_segment_bytes``."""
        try:
            size = self.index_path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.index_segment_bytes:
            return
        closed = [_segment_number(p) for p in self.index_path.parent.glob(f"{self.writer}.*.jsonl")]
        number = max((n for n in closed if n is not None), default=0) + 1
        os.replace(self.index_path, self.index_path.with_name(f"{self.writer}.{number:06d}.jsonl"))
        _fsync_dir(self.index_path.parent)


def _segment_number(path: Path) -> int | None:
    """``crop-0.000003.jsonl`` -> 3; the open segment ``crop-0.jsonl`` -> None (writer names have no dots)."""
    parts = path.name.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _index_order(path: Path) -> tuple[str, float]:
    """Each writer's closed segments in order, then its open one: later lines win."""
    number = _segment_number(path)
    return path.name.split(".")[0], float("inf") if number is None else number


def load_index(root: str | Path) -> dict[str, dict[str, Any]]:
    """All crops recorded under ``root``, one entry per crop key (last write wins)."""
    index: dict[str, dict[str, Any]] = {}
    folder = Path(root) / "index"
    if not folder.is_dir():
        return index
    for path in sorted(folder.glob("*.jsonl"), key=_index_order):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("ignoring a torn line in %s", path)
                    continue
                index[entry["key"]] = entry
    return index
