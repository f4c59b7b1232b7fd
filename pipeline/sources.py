"""Video sources read with OpenCV: files, RTSP/HTTP URLs, webcams, image folders, panned stills.

A source is validated when opened, so a missing or corrupt video fails before
anything is published. Frames that cannot be read mid-stream are skipped,
logged and counted, never silently lost.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from pipeline.errors import SourceError
from pipeline.live import check_scheme, redact_url, url_stream_name

__all__ = ["SourceSpec", "Frame", "CaptureClock", "VideoSource", "parse_source", "demo_image_path"]

logger = logging.getLogger(__name__)

SourceKind = Literal["file", "url", "webcam", "folder", "pan"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_CONSECUTIVE_BAD_FRAMES = 25
MAX_PLAUSIBLE_FPS = 1000.0
_STREAM_ID = re.compile(r"[^A-Za-z0-9_.@-]+")


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """Where frames come from and the stream id they are published under."""

    uri: str
    stream_id: str
    kind: SourceKind
    pan_frames: int = 90
    explicit_id: bool = False
    """True when the user named the stream (``cam1=…``): the id then persists across runs."""

    @property
    def display(self) -> str:
        """The URI as logs, errors, status and summaries show it: a URL's password redacted."""
        return redact_url(self.uri) if self.kind == "url" else self.uri

    @property
    def live(self) -> bool:
        """A camera (URL or webcam): frames are timed when grabbed, and a restart goes on rather than replaying."""
        return self.kind in ("url", "webcam")

    def for_run(self, run_id: str) -> SourceSpec:
        """Give a derived stream id a per-run suffix so each run of a file is counted afresh."""
        if self.explicit_id:
            return self
        return replace(self, stream_id=f"{self.stream_id}@{run_id}")


LIVE_FFMPEG_OPTIONS = "rtsp_transport;tcp|analyzeduration;500000|probesize;32768|fflags;nobuffer"
"""FFmpeg options for network cameras (unless ``OPENCV_FFMPEG_CAPTURE_OPTIONS`` is set): RTSP over
TCP (no lost packets to half-decode, passes NAT), and a short probe with no input buffer: FFmpeg's
default probe reads ~3 s of a camera before the first frame, which every frame then lags behind."""
_FFMPEG_OPTIONS_LOCK = threading.Lock()

NOMINAL_FPS = 10.0
"""Frame rate of sources that have none (image folders, panned stills, files without one): the study's 10."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One image read from a source.

    Attributes:
        index: position in the source, from 0, counting frames that could not be read.
        image: BGR pixels.
        grabbed_ts: wall-clock time (Unix seconds) when it was read.
        media_s: its time within a recording (index over the recording's frame rate); None for a live
            source, whose frames are timed by when they are grabbed.
    """

    index: int
    image: np.ndarray
    grabbed_ts: float
    media_s: float | None = None


class CaptureClock:
    """Capture times of one run's frames: when grabbed for a camera; for a recording, its media time
    from when the run's first frame was grabbed, so the tracker sees the clip's own timing however
    fast or unevenly the producer publishes it (a starved producer no longer breaks every track).

    The epoch is a whole second: ``epoch + media_s`` then rounds the same way in every run, so two
    runs of one clip give the tracker bit-identical time steps and count the same vehicles.
    """

    def __init__(self) -> None:
        self.epoch: float | None = None

    def continue_from(self, frame: Frame, capture_ts: float) -> None:
        """A resumed recording: ``frame`` was published before at ``capture_ts``; later frames follow on."""
        if frame.media_s is None:
            return
        epoch = capture_ts - frame.media_s
        whole = float(round(epoch))
        self.epoch = whole if abs(epoch - whole) < 1e-3 else epoch  # the predecessor's whole-second epoch

    def capture_ts(self, frame: Frame) -> float:
        if frame.media_s is None:
            return frame.grabbed_ts
        if self.epoch is None:
            self.epoch = float(math.floor(frame.grabbed_ts - frame.media_s))
        return self.epoch + frame.media_s


def _sanitize_stream_id(text: str) -> str:
    cleaned = _STREAM_ID.sub("-", text).strip("-.")
    return cleaned or "stream"


def demo_image_path() -> Path:
    """The bus photo that ships inside the ultralytics package (used by ``vapipe demo``)."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")  # locate without importing torch
    if spec is None or spec.origin is None:
        raise SourceError("the demo image ships with ultralytics, which is not installed")
    path = Path(spec.origin).parent / "assets" / "bus.jpg"
    if not path.exists():
        raise SourceError(f"ultralytics ships no demo image at {path}")
    return path


def parse_source(text: str, stream_id: str | None = None) -> SourceSpec:
    """Parse a ``--source`` value.

    Forms: ``path/to/video.mp4``, ``rtsp://…`` or ``http(s)://…``, a webcam index
    (``0``), a folder of images, ``pan:path/to/image.jpg[:frames]`` (a still panned
    into a clip) or ``demo`` (the ultralytics bus photo panned). Prefix ``name=`` to
    choose the stream id: ``cam1=rtsp://…``.
    """
    text = text.strip()
    if not text:
        raise SourceError("empty --source")
    name, sep, rest = text.partition("=")
    if sep and stream_id is None and "://" not in name and "/" not in name and "\\" not in name and not Path(text).exists():
        text, stream_id = rest, name
    explicit = stream_id is not None
    spec = _parse_uri(text, stream_id)
    return replace(spec, explicit_id=explicit)


def _parse_uri(text: str, stream_id: str | None) -> SourceSpec:
    if text == "demo":
        return SourceSpec(uri=str(demo_image_path()), stream_id=_sanitize_stream_id(stream_id or "demo"), kind="pan")
    if text.startswith("pan:"):
        rest = text[4:]
        frames = 90
        head, sep, tail = rest.rpartition(":")
        if sep and tail.isdigit():
            rest, frames = head, int(tail)
        return SourceSpec(uri=rest, stream_id=_sanitize_stream_id(stream_id or Path(rest).stem), kind="pan", pan_frames=frames)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.I):
        check_scheme(text)
        return SourceSpec(uri=text, stream_id=_sanitize_stream_id(stream_id or url_stream_name(text)), kind="url")
    if text.isdigit():
        return SourceSpec(uri=text, stream_id=_sanitize_stream_id(stream_id or f"webcam{text}"), kind="webcam")
    path = Path(text).expanduser()
    kind: SourceKind = "folder" if path.is_dir() else "file"
    return SourceSpec(uri=str(path), stream_id=_sanitize_stream_id(stream_id or path.stem), kind=kind)


class VideoSource:
    """Iterate a source's frames; open() validates it and fails with SourceError.

    Attributes:
        frames_skipped: frames that could not be read and were skipped.
    """

    def __init__(self, spec: SourceSpec, max_frames: int | None = None, timeout_s: float | None = None) -> None:
        """``timeout_s``: a network source that does not open, or sends no frame, for this long fails."""
        self.spec = spec
        self.max_frames = max_frames
        self.timeout_s = timeout_s
        self.frames_skipped = 0
        self._cap: cv2.VideoCapture | None = None
        self._first: np.ndarray | None = None
        self._first_ts = 0.0
        self._images: list[Path] = []
        self._still: np.ndarray | None = None
        self.frame_count: int | None = None
        self.native_fps: float | None = None

    @property
    def live(self) -> bool:
        """A camera: frames are timed when grabbed, and a restart goes on rather than replaying."""
        return self.spec.live

    @property
    def media_fps(self) -> float | None:
        """The rate at which a recording was captured (``NOMINAL_FPS`` if it does not say); None when live."""
        if self.live:
            return None
        return self.native_fps or NOMINAL_FPS

    def _frame(self, index: int, image: np.ndarray, grabbed_ts: float | None = None) -> Frame:
        fps = self.media_fps
        return Frame(index, image, time.time() if grabbed_ts is None else grabbed_ts, None if fps is None else index / fps)

    # -- opening -------------------------------------------------------------
    def open(self) -> VideoSource:
        kind, uri = self.spec.kind, self.spec.uri
        if kind == "folder":
            self._images = sorted(p for p in Path(uri).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._images:
                raise SourceError(f"image folder {uri} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.frame_count = len(self._images)
            return self
        if kind == "pan":
            if not Path(uri).is_file():
                raise SourceError(f"image not found: {uri}")
            self._still = cv2.imread(uri, cv2.IMREAD_COLOR)
            if self._still is None:
                raise SourceError(f"cannot decode image {uri}")
            self.frame_count = self.spec.pan_frames
            return self
        if kind == "file":
            path = Path(uri)
            if not path.exists():
                raise SourceError(f"video file not found: {uri}")
            if not path.is_file():
                raise SourceError(f"video source is not a file: {uri}")
            if path.stat().st_size == 0:
                raise SourceError(f"video file is empty: {uri}")
        cap = self._capture()
        shown = self.spec.display
        if not cap.isOpened():
            cap.release()
            what = {"file": "video file", "url": "stream", "webcam": "webcam"}[kind]
            raise SourceError(f"cannot open {what} {shown}: OpenCV found no decodable video")
        ok, first = cap.read()
        if not ok or first is None:
            cap.release()
            raise SourceError(f"no readable frame in {shown}: the video is corrupt or empty")
        self._cap, self._first, self._first_ts = cap, first, time.time()
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if kind == "file" and count > 0 else None
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.native_fps = fps if 0 < fps <= MAX_PLAUSIBLE_FPS else None  # some containers report a timebase
        return self

    def _capture(self) -> cv2.VideoCapture:
        kind, uri = self.spec.kind, self.spec.uri
        if kind == "webcam":
            return cv2.VideoCapture(int(uri))
        if kind != "url" or self.timeout_s is None:
            return cv2.VideoCapture(uri)
        ms = max(1, round(self.timeout_s * 1000))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        if "OPENCV_FFMPEG_CAPTURE_OPTIONS" in os.environ:  # the user's own FFmpeg options win
            return cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
        with _FFMPEG_OPTIONS_LOCK:  # OpenCV reads the variable when it opens: set it for this open only
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = LIVE_FFMPEG_OPTIONS
            try:
                return cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
            finally:
                del os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"]

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> VideoSource:
        return self.open() if self._cap is None and self._still is None and not self._images else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        frames = self._iter_all()
        for n, frame in enumerate(frames):
            if self.max_frames is not None and n >= self.max_frames:
                break
            yield frame

    def _iter_all(self) -> Iterator[Frame]:
        if self.spec.kind == "folder":
            yield from self._iter_folder()
        elif self.spec.kind == "pan":
            yield from self._iter_pan()
        else:
            yield from self._iter_capture()

    def _skip(self, index: int, why: str) -> None:
        self.frames_skipped += 1
        logger.warning("%s: skipped frame %d: %s", self.spec.stream_id, index, why)

    def _iter_folder(self) -> Iterator[Frame]:
        for index, path in enumerate(self._images):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                self._skip(index, f"cannot decode {path.name}")
                continue
            yield self._frame(index, image)

    def _iter_pan(self) -> Iterator[Frame]:
        assert self._still is not None
        yield from (self._frame(i, img) for i, img in enumerate(iter_pan_frames(self._still, self.spec.pan_frames)))

    def _iter_capture(self) -> Iterator[Frame]:
        cap = self._cap
        if cap is None:
            raise SourceError(f"source {self.spec.display} is not open")
        assert self._first is not None
        yield self._frame(0, self._first, self._first_ts)
        self._first = None
        index, bad_run = 1, 0
        while True:
            ok, image = cap.read()
            if ok and image is not None:
                bad_run = 0
                yield self._frame(index, image)
                index += 1
                continue
            # A failed read is the end of a file unless frames remain; then it is a bad frame.
            remaining = self.frame_count is not None and index < self.frame_count
            if not remaining or bad_run >= MAX_CONSECUTIVE_BAD_FRAMES:
                return
            self._skip(index, "decoder returned no image")
            bad_run += 1
            index += 1


def pan_frames(image: np.ndarray, count: int, out_width: int = 640, out_height: int = 480) -> list[np.ndarray]:
    """Turn a still into ``count`` frames by sliding a window across it, so objects move.

    The still is scaled so it is 1.5x wider than the window, then the window slides
    from left to right and back.
    """
    return list(iter_pan_frames(image, count, out_width, out_height))


def iter_pan_frames(image: np.ndarray, count: int, out_width: int = 640, out_height: int = 480) -> Iterator[np.ndarray]:
    """``pan_frames`` one frame at a time: a pan of millions of frames (the soak's endless source) holds one."""
    if count <= 0:
        return
    h, w = image.shape[:2]
    scale = max(out_height / h, 1.5 * out_width / w)
    scaled = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    sh, sw = scaled.shape[:2]
    span = sw - out_width
    top = (sh - out_height) // 2
    for i in range(count):
        phase = (i / max(count - 1, 1)) * 2
        x = round(span * (phase if phase <= 1 else 2 - phase))
        yield np.ascontiguousarray(scaled[top : top + out_height, x : x + out_width])
