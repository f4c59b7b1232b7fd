"""Crop core: confident boxes only, clipped to the image; a sink with safe, deterministic, idempotent files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.crop import Crop, CropSink, crop_detections, crop_key, load_index, safe_label
from pipeline.errors import SinkError
from pipeline.messages import Detections, FrameMeta
from tests.pipeline.helpers import DoesNotRaise, gradient_image, mock_detections, mock_meta

H, W = 48, 64
IMAGE = gradient_image(H, W)


# -- crop_detections --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xyxy", "confidence", "min_confidence", "expected"),
    [
        ([], [], 0.7, []),
        ([[10, 10, 20, 20]], [0.9], 0.7, [(0, (10, 10, 20, 20))]),
        ([[10, 10, 20, 20]], [0.7], 0.7, []),  # strictly above: 0.7 itself is out
        ([[10, 10, 20, 20]], [0.7001], 0.7, [(0, (10, 10, 20, 20))]),
        ([[10, 10, 20, 20]], [0.5], 0.7, []),
        ([[10, 10, 20, 20]], [0.0], 0.0, []),
        ([[10, 10, 20, 20]], [1.0], 0.99, [(0, (10, 10, 20, 20))]),
        ([[1.2, 2.7, 3.1, 4.9]], [0.9], 0.7, [(0, (1, 2, 4, 5))]),  # rounded outward
        ([[-5, -7, 10, 10]], [0.9], 0.7, [(0, (0, 0, 10, 10))]),  # clipped at the top-left
        ([[60, 40, 100, 100]], [0.9], 0.7, [(0, (60, 40, W, H))]),  # clipped at the bottom-right
        ([[-10, -10, 1000, 1000]], [0.9], 0.7, [(0, (0, 0, W, H))]),  # larger than the image
        ([[10, 10, 10, 20]], [0.9], 0.7, []),  # zero width
        ([[10, 10, 20, 10]], [0.9], 0.7, []),  # zero height
        ([[20, 20, 10, 10]], [0.9], 0.7, []),  # inverted
        ([[70, 0, 80, 10]], [0.9], 0.7, []),  # right of the image
        ([[-20, -20, -1, -1]], [0.9], 0.7, []),  # above-left of the image
        ([[64, 0, 64.5, 10]], [0.9], 0.7, []),  # starts on the right edge: nothing left after clipping
        (
            [[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 7, 7], [70, 70, 80, 80], [3, 3, 8, 8]],
            [0.95, 0.3, 0.71, 0.99, 0.7],
            0.7,
            [(0, (0, 0, 5, 5)), (2, (2, 2, 7, 7))],  # box_index is the position in the input
        ),
    ],
)
def test_crop_detections(
    xyxy: list[list[float]], confidence: list[float], min_confidence: float, expected: list[tuple[int, tuple[int, ...]]]
) -> None:
    labels = [f"label{i}" for i in range(len(xyxy))]
    detections = mock_detections(xyxy, confidence, labels)
    crops = crop_detections(IMAGE, detections, min_confidence)
    assert [(c.box_index, c.box) for c in crops] == expected
    for crop in crops:
        left, top, right, bottom = crop.box
        assert crop.label == f"label{crop.box_index}"
        assert crop.confidence == pytest.approx(confidence[crop.box_index])
        assert np.array_equal(crop.image, IMAGE[top:bottom, left:right])
        assert crop.image.shape == (bottom - top, right - left, 3)


# -- safe_label and crop_key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("car", "car"),
        ("traffic light", "traffic_light"),
        ("fire-hydrant_2", "fire-hydrant_2"),
        ("../../etc/x", "etc_x"),
        ("/etc/passwd", "etc_passwd"),
        ("..", "unlabelled"),
        (".", "unlabelled"),
        ("", "unlabelled"),
        ("   ", "unlabelled"),
        ("a/b\\c", "a_b_c"),
        ("C:\\Windows", "C_Windows"),
        ("  bus  ", "bus"),
        ("x\x00y\nz", "x_y_z"),
        ("café", "caf"),
        ("a" * 100, "a" * 64),
    ],
)
def test_safe_label(label: str, expected: str) -> None:
    assert safe_label(label) == expected
    assert "/" not in expected and "\\" not in expected and expected not in (".", "..")


@pytest.mark.parametrize(
    ("stream_id", "frame_index", "box_index", "expected"),
    [
        ("cam1", 7, 3, "cam1_f00000007_b003"),
        ("cam1", 0, 0, "cam1_f00000000_b000"),
        ("north-2_x", 12345678, 999, "north-2_x_f12345678_b999"),
    ],
)
def test_crop_key(stream_id: str, frame_index: int, box_index: int, expected: str) -> None:
    assert crop_key(mock_meta(stream_id, frame_index), box_index) == expected


@pytest.mark.parametrize("stream_id", ["a/b", "../../etc", "highway-320x240@r1", "x" * 200, "cam 1", "."])
def test_crop_key_is_a_safe_deterministic_file_stem(stream_id: str) -> None:
    key = crop_key(mock_meta(stream_id, 42), 5)
    assert key == crop_key(mock_meta(stream_id, 42), 5)
    assert set(key) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    assert key.endswith("_f00000042_b005")
    assert key != crop_key(mock_meta(stream_id, 43), 5) != crop_key(mock_meta(stream_id, 42), 6)


@pytest.mark.parametrize(
    ("stream_a", "stream_b"),
    [
        # Distinct streams must never share crop files or index entries.
        (
            "north-entrance-camera-overlooking-the-highway-junction-lane-1-2024",
            "north-entrance-camera-overlooking-the-highway-junction-lane-1-2025",
        ),
        ("highway@run1", "highway_run1"),  # for_run() ids contain '@'; '_' is as valid in a stream id
        ("cam.1", "cam_1"),
    ],
    ids=["long-ids-differ-after-64-chars", "at-vs-underscore", "dot-vs-underscore"],
)
def test_crop_key_distinct_for_distinct_streams(stream_a: str, stream_b: str) -> None:
    assert crop_key(mock_meta(stream_a, 1), 0) != crop_key(mock_meta(stream_b, 1), 0)


# -- CropSink ---------------------------------------------------------------------------------


def _crops(labels: list[str], confidence: float = 0.9) -> list[Crop]:
    boxes = [[4 * i, 2 * i, 4 * i + 10, 2 * i + 12] for i in range(len(labels))]
    return crop_detections(IMAGE, mock_detections(boxes, [confidence] * len(labels), labels), 0.7)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_sink_writes_label_folders_with_deterministic_names(tmp_path: Path) -> None:
    sink = CropSink(tmp_path / "crops", writer="crop-0")
    meta = mock_meta("cam1", 7, width=W, height=H)
    entries = sink.write(meta, _crops(["car", "traffic light", "car"]))
    root = tmp_path / "crops"
    k0, k1, k2 = (crop_key(meta, i) for i in range(3))
    assert k0 == "cam1_f00000007_b000"
    expected_paths = [f"car/{k0}.jpg", f"traffic_light/{k1}.jpg", f"car/{k2}.jpg"]
    assert _files(root) == {*expected_paths, "index/crop-0.jsonl"}
    assert [e["path"] for e in entries] == expected_paths
    assert entries[1] == {
        "key": k1,
        "path": f"traffic_light/{k1}.jpg",
        "label": "traffic light",
        "stream_id": "cam1",
        "frame_index": 7,
        "box_index": 1,
        "box": [4, 2, 14, 14],
        "confidence": pytest.approx(0.9),
    }
    image = cv2.imread(str(root / "car" / f"{k2}.jpg"))
    assert image is not None and image.shape == (12, 10, 3)
    assert set(load_index(root)) == {k0, k1, k2}
    # Same input, fresh folder: the same names.
    again = CropSink(tmp_path / "again", writer="crop-0").write(meta, _crops(["car", "traffic light", "car"]))
    assert [e["path"] for e in again] == expected_paths


def test_sink_second_write_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "crops"
    meta = mock_meta("cam1", 3)
    first = CropSink(root).write(meta, _crops(["car", "bus"]))
    files = _files(root)
    # A redelivery of the same frame, even to a new sink, lands on the same files; make its
    # pixels different so the overwrite is visible.
    black = np.zeros_like(IMAGE)
    boxes = mock_detections([[0, 0, 10, 12], [4, 2, 14, 14]], [0.9, 0.9], ["car", "bus"])
    second = CropSink(root).write(meta, crop_detections(black, boxes, 0.7))
    assert [e["key"] for e in second] == [e["key"] for e in first]
    assert _files(root) == files  # same file set: no duplicates, no temp files left behind
    for entry in second:
        image = cv2.imread(str(root / entry["path"]))
        assert image is not None and image.max() < 8  # the new (black) crop replaced the old one
    index = load_index(root)
    assert sorted(index) == [crop_key(meta, 0), crop_key(meta, 1)]
    assert len((root / "index" / "crop.jsonl").read_text().splitlines()) == 4  # appended, merged by load_index


def test_sink_no_crops_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "crops"
    assert CropSink(root).write(mock_meta(), []) == []
    assert not root.exists() or _files(root) == set()
    assert load_index(root) == {}


def test_sink_writers_keep_separate_index_files(tmp_path: Path) -> None:
    root = tmp_path / "crops"
    CropSink(root, writer="crop-0").write(mock_meta("a", 1), _crops(["car"]))
    CropSink(root, writer="crop/1").write(mock_meta("b", 2), _crops(["bus"]))
    assert {p.name for p in (root / "index").iterdir()} == {"crop-0.jsonl", "crop_1.jsonl"}
    assert sorted(load_index(root)) == sorted([crop_key(mock_meta("a", 1), 0), crop_key(mock_meta("b", 2), 0)])


def test_load_index_ignores_torn_lines(tmp_path: Path) -> None:
    root = tmp_path / "crops"
    CropSink(root).write(mock_meta("a", 1), _crops(["car"]))
    with open(root / "index" / "crop.jsonl", "a") as fh:
        fh.write('{"key": "a_f0000\n\n')
    assert list(load_index(root)) == [crop_key(mock_meta("a", 1), 0)]


@pytest.mark.parametrize("label", ["../../etc/x", "/etc/passwd", "..", "../..", "a/../../b"])
def test_sink_crafted_label_stays_inside_root(tmp_path: Path, label: str) -> None:
    root = tmp_path / "deep" / "crops"
    entries = CropSink(root).write(mock_meta("cam1", 0), _crops([label]))
    assert len(entries) == 1
    written = (root / entries[0]["path"]).resolve()
    assert written.is_file()
    assert root.resolve() in written.parents
    assert {p for p in _files(tmp_path) if not p.startswith("deep/crops/")} == set()
    assert entries[0]["label"] == label  # the index keeps the original label


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write to: chmod 0o500, or (as root, where chmod does not
    block writes) a path whose parent is a regular file."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (folder / "probe").mkdir()
    except OSError:
        return folder
    (folder / "probe").rmdir()
    folder.chmod(0o700)
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "crops"


@pytest.fixture
def restore_permissions(tmp_path: Path) -> Iterator[None]:
    yield
    for path in tmp_path.rglob("*"):
        if path.is_dir():
            path.chmod(0o700)


@pytest.mark.parametrize("where", ["read-only-dir", "below-a-file"])
def test_sink_unwritable_root_raises_sink_error(tmp_path: Path, where: str, restore_permissions: None) -> None:
    if where == "read-only-dir":
        root = _read_only_dir(tmp_path)
    else:
        (tmp_path / "a-file").write_text("not a folder")
        root = tmp_path / "a-file" / "crops"
    with pytest.raises(SinkError) as info:
        CropSink(root).write(mock_meta("cam1", 0), _crops(["car"]))
    message = str(info.value)
    assert "\n" not in message
    assert str(root.resolve()) in message
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    ("detections", "exception"),
    [
        (mock_detections([[0, 0, 10, 10]], [0.9]), DoesNotRaise()),
        (Detections.empty(), DoesNotRaise()),
    ],
)
def test_sink_accepts_crop_detections_output(tmp_path: Path, detections: Detections, exception: Any) -> None:
    with exception:
        entries = CropSink(tmp_path).write(FrameMeta("s", 0, 0.0, W, H), crop_detections(IMAGE, detections, 0.7))
        assert len(entries) == len(detections)


# -- durability: a crop is on disk before the index names it; replicas never share a temp file --------


def test_crop_files_are_fsynced_and_renamed_before_their_index_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync " + ("index" if name.endswith(".jsonl") else "dir" if os.path.isdir(name) else "crop"))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    CropSink(tmp_path / "crops", writer="crop-0").write(mock_meta("a", 1), _crops(["car", "bus"]))
    # Before: the crop was renamed into place unsynced while its index line was fsynced, so after a
    # power cut the index could name an empty or missing file.
    assert events == ["fsync crop", "rename", "fsync crop", "rename", "fsync dir", "fsync dir", "fsync index"]


def test_temp_names_are_unique_per_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temps: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (temps.append(Path(src).name), real_replace(src, dst)))
    for writer in ("crop-0", "crop-1"):
        CropSink(tmp_path / "crops", writer=writer).write(mock_meta("a", 1), _crops(["car"]))
    assert len(set(temps)) == 2 and all("crop-0" in t or "crop-1" in t for t in temps)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_index_rotates_into_numbered_segments_that_load_index_reads_in_order(tmp_path: Path) -> None:
    root = tmp_path / "crops"
    detections = mock_detections([[0, 0, 10, 10]], confidence=[0.9])
    sink = CropSink(root, writer="crop-0", index_segment_bytes=1)  # every write closes the previous segment
    for frame in range(3):
        sink.write(mock_meta("a", frame), crop_detections(IMAGE, detections, 0.7))
    sink.write(mock_meta("a", 0), crop_detections(IMAGE, detections, 0.7))  # a redelivery: the newest line wins
    names = sorted(p.name for p in (root / "index").iterdir())
    assert names == ["crop-0.000001.jsonl", "crop-0.000002.jsonl", "crop-0.000003.jsonl", "crop-0.jsonl"]
    index = load_index(root)
    assert sorted(index) == [crop_key(mock_meta("a", f), 0) for f in range(3)]
    # Closed segments can be archived or deleted; what remains still loads.
    (root / "index" / "crop-0.000001.jsonl").unlink()
    assert len(load_index(root)) == 3
