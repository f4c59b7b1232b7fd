"""Sources: --source forms parse, bad inputs fail at open() with SourceError, readable frames come out."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.errors import SourceError
from pipeline.sources import NOMINAL_FPS, CaptureClock, Frame, SourceSpec, VideoSource, pan_frames, parse_source
from tests.pipeline.helpers import DoesNotRaise, gradient_image


@pytest.mark.parametrize(
    ("text", "uri", "stream_id", "kind", "pan", "explicit"),
    [
        ("videos/highway-320x240.avi", "videos/highway-320x240.avi", "highway-320x240", "file", 90, False),
        ("  clip.mp4  ", "clip.mp4", "clip", "file", 90, False),
        ("cam1=rtsp://x/y", "rtsp://x/y", "cam1", "url", 90, True),
        ("rtsp://198.18.0.5:554/stream1", "rtsp://198.18.0.5:554/stream1", "198.18.0.5-554-stream1", "url", 90, False),
        (
            "https://example.org/live.m3u8?token=a=b",
            "https://example.org/live.m3u8?token=a=b",
            "example.org-live.m3u8",
            "url",
            90,
            False,
        ),
        ("0", "0", "webcam0", "webcam", 90, False),
        ("front=1", "1", "front", "webcam", 90, True),
        ("pan:img.jpg:12", "img.jpg", "img", "pan", 12, False),
        ("pan:img.jpg", "img.jpg", "img", "pan", 90, False),
        ("pan:C:/pics/img.jpg", "C:/pics/img.jpg", "img", "pan", 90, False),
        ("lane 2=pan:img.jpg:5", "img.jpg", "lane-2", "pan", 5, True),
        ("my cam.mp4", "my cam.mp4", "my-cam", "file", 90, False),
    ],
)
def test_parse_source_forms(text: str, uri: str, stream_id: str, kind: str, pan: int, explicit: bool) -> None:
    assert parse_source(text) == SourceSpec(uri=uri, stream_id=stream_id, kind=kind, pan_frames=pan, explicit_id=explicit)  # type: ignore[arg-type]


def test_parse_source_folder(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    spec = parse_source(str(folder))
    assert (spec.kind, spec.uri, spec.stream_id) == ("folder", str(folder), "frames")


def test_parse_source_demo() -> None:
    spec = parse_source("demo")
    assert (spec.kind, spec.stream_id, Path(spec.uri).name) == ("pan", "demo", "bus.jpg")
    assert Path(spec.uri).is_file()


def test_parse_source_path_with_equals_sign(tmp_path: Path) -> None:
    # Partitioned folders ("date=2024-05-01/") are common; an existing path is a path, not name=uri.
    video = tmp_path / "date=2024-05-01" / "cam.mp4"
    video.parent.mkdir()
    video.write_bytes(b"not opened here")
    spec = parse_source(str(video))
    assert (spec.kind, spec.uri, spec.stream_id) == ("file", str(video), "cam")


@pytest.mark.parametrize(
    ("text", "stream_id", "exception"),
    [
        ("clip.mp4", "given", DoesNotRaise()),
        ("", None, pytest.raises(SourceError, match="empty --source")),
        ("   ", None, pytest.raises(SourceError, match="empty --source")),
    ],
)
def test_parse_source_explicit_id_and_empty(text: str, stream_id: str | None, exception: Any) -> None:
    with exception:
        spec = parse_source(text, stream_id=stream_id)
        assert (spec.stream_id, spec.explicit_id) == ("given", True)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (parse_source("clip.mp4"), "clip@r1"),
        (parse_source("cam1=clip.mp4"), "cam1"),  # a named stream keeps its id across runs
    ],
)
def test_for_run(spec: SourceSpec, expected: str) -> None:
    assert spec.for_run("r1").stream_id == expected


# -- opening ----------------------------------------------------------------------------------


def test_missing_video_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match="video file not found") as info:
        VideoSource(parse_source(str(path))).open()
    assert str(path) in str(info.value)


def test_corrupt_video_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes())
    source = VideoSource(parse_source(str(path)))
    with pytest.raises(SourceError) as info:
        source.open()
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_video_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(SourceError, match="video file is empty") as info:
        VideoSource(parse_source(str(path))).open()
    assert str(path) in str(info.value)


def test_video_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a file"):
        VideoSource(SourceSpec(uri=str(tmp_path), stream_id="x", kind="file")).open()


@pytest.mark.parametrize("max_frames", [30, 1])
def test_highway_video(highway: str, max_frames: int) -> None:
    source = VideoSource(parse_source(highway), max_frames=max_frames).open()
    try:
        frames = list(source)
    finally:
        source.close()
    assert [f.index for f in frames] == list(range(max_frames))
    assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in frames)
    assert source.frames_skipped == 0
    assert source.frame_count == 750
    assert source.native_fps == pytest.approx(25.0)
    if max_frames > 1:
        assert not np.array_equal(frames[0].image, frames[-1].image)  # real footage: frames differ


def test_a_recording_is_timed_by_its_own_frame_rate(highway: str, tmp_path: Path) -> None:
    with VideoSource(parse_source(highway), max_frames=3) as video:
        assert [f.media_s for f in video] == pytest.approx([0.0, 0.04, 0.08])  # 25 fps, however fast it is read
    folder = tmp_path / "stills"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        assert cv2.imwrite(str(folder / name), np.zeros((8, 8, 3), np.uint8))
    with VideoSource(parse_source(str(folder))) as stills:
        assert [f.media_s for f in stills] == [0.0, 1 / NOMINAL_FPS]
    assert VideoSource(parse_source("rtsp://camera/live")).media_fps is None  # live: timed when grabbed


def test_capture_clock_gives_a_recording_its_media_time_and_a_camera_its_grab_time() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    clock = CaptureClock()
    # A producer starved for 5 s between frames 1 and 2 does not stretch the clip's time.
    t = 1_800_000_000.0
    recorded = [Frame(10, image, t + 0.9, 0.4), Frame(11, image, t + 1.0, 0.44), Frame(12, image, t + 6.0, 0.48)]
    stamps = [clock.capture_ts(f) for f in recorded]
    assert clock.epoch == t and stamps == pytest.approx([t + 0.4, t + 0.44, t + 0.48])
    # Another run of the same clip, days later: the same steps, bit for bit (epochs of today's
    # Unix times share one binary exponent, so a whole-second epoch leaves the rounding to the media time).
    later = CaptureClock()
    again = [later.capture_ts(Frame(f.index, image, f.grabbed_ts + 3 * 86400.678, f.media_s)) for f in recorded]
    assert [b - a for a, b in pairwise(again)] == [b - a for a, b in pairwise(stamps)]
    # A restarted producer goes on from the last frame in the topic, whenever it restarts.
    resumed = CaptureClock()
    resumed.continue_from(recorded[1], stamps[1])
    assert resumed.epoch == t and resumed.capture_ts(Frame(12, image, t + 999.0, 0.48)) == stamps[2]
    live = Frame(3, image, 2000.5)
    assert CaptureClock().capture_ts(live) == 2000.5


def test_video_context_manager(highway: str) -> None:
    with VideoSource(parse_source(highway), max_frames=3) as source:
        assert len(list(source)) == 3
    assert source._cap is None


# -- image folders and panned stills ----------------------------------------------------------


def test_image_folder_skips_and_counts_a_corrupt_image(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, name in enumerate(["a.jpg", "b.png", "d.jpg"]):
        assert cv2.imwrite(str(folder / name), np.full((20, 30, 3), 40 * (i + 1), dtype=np.uint8))
    (folder / "c.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    source = VideoSource(parse_source(str(folder))).open()
    assert source.frame_count == 4
    frames = list(source)
    assert [f.index for f in frames] == [0, 1, 3]  # c.jpg (index 2) skipped, indices stay tied to files
    assert [int(f.image[0, 0, 0]) for f in frames] == [40, 80, 120]
    assert source.frames_skipped == 1


def test_image_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="holds no images"):
        VideoSource(parse_source(str(tmp_path))).open()


@pytest.mark.parametrize("count", [5, 1])
def test_pan_source(shared_dir: Path, count: int) -> None:
    source = VideoSource(parse_source(f"pan:{shared_dir / 'images' / 'street-dog.jpg'}:{count}")).open()
    frames = list(source)
    assert source.frame_count == count
    assert [f.index for f in frames] == list(range(count))
    assert all(f.image.shape == (480, 640, 3) for f in frames)


def test_pan_source_max_frames(shared_dir: Path) -> None:
    source = VideoSource(parse_source(f"pan:{shared_dir / 'images' / 'bus.jpg'}:20"), max_frames=4).open()
    assert len(list(source)) == 4


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "image not found"), (b"garbage", "cannot decode image")],
)
def test_pan_source_bad_image(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "still.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SourceError, match=match):
        VideoSource(parse_source(f"pan:{path}:3")).open()


@pytest.mark.parametrize(("count", "n_frames"), [(0, 0), (-1, 0), (1, 1), (7, 7)])
def test_pan_frames(count: int, n_frames: int) -> None:
    frames = pan_frames(gradient_image(120, 90), count)
    assert len(frames) == n_frames
    assert all(f.shape == (480, 640, 3) and f.flags["C_CONTIGUOUS"] for f in frames)
    if count == 7:
        assert np.array_equal(frames[0], frames[-1])  # slides right and back
        assert not np.array_equal(frames[0], frames[3])
