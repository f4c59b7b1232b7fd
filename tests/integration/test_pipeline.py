"""End to end on real video, real Kafka, real Ray and the real model (the shared int8 YOLOv8n)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.launcher import RunPlan
from actors.ray.engine import run_pipeline
from cluster.reading import read_all
from pipeline.codecs import decode_detections, decode_frame
from pipeline.config import Settings
from pipeline.count_table import comparable
from pipeline.crop import load_index
from pipeline.messages import EndOfStream, FrameDetections
from pipeline.sources import parse_source
from pipeline.stats import RunSummary
from pipeline.traffic import TrafficCounter
from tests.conftest import ReferenceDetector

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.model, pytest.mark.slow]


def read_topic(settings: Settings, topic: str) -> list[Any]:
    return read_all(settings.kafka, topic)


def detections_on_c(settings: Settings, stream_id: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for record in read_topic(settings, settings.topics.detections.name):
        item = decode_detections(record.value)
        if isinstance(item, FrameDetections) and item.meta.stream_id == stream_id:
            assert item.meta.frame_index not in out, f"frame {item.meta.frame_index} appears twice on C"
            out[item.meta.frame_index] = item.detections
    return out


HIGHWAY_LINE = {"name": "highway", "start": [0.25, 0.6], "end": [1.0, 0.6], "in_direction": "up"}
TRACKING: dict[str, Any] = {
    "tracking__enabled": True,
    "tracking__lines": [HIGHWAY_LINE],
    # Order and snapshots are what these tests check: a wait longer than any test's stall, so no frame
    # is stepped over for being late (stepping over is a latency policy, tested in tests/pipeline).
    "tracking__reorder_wait_s": 120,
    "tracking__reorder_max_frames": 256,
}
"""Settings overrides: tracking on, with the highway video's counting line (docs/results/counting)."""

REAL_TIME = {"producer__fps": 25}
"""The highway video's own rate, so a run lasts as long as the clip and a fault lands mid-run. Tracking
does not need it: frames carry the clip's media time however fast they are published."""


def frames_on_c(settings: Settings, stream_id: str) -> list[FrameDetections]:
    """A stream's detection records on C, in frame order (each once)."""
    out: dict[int, FrameDetections] = {}
    for record in read_topic(settings, settings.topics.detections.name):
        item = decode_detections(record.value)
        if not isinstance(item, EndOfStream) and item.meta.stream_id == stream_id:
            out[item.meta.frame_index] = item
    return [out[i] for i in sorted(out)]


def one_process_traffic(settings: Settings, stream_id: str) -> dict[str, Any]:
    """The tracked counts a single TrafficCounter gives over C's detections in frame order."""
    counter = TrafficCounter(settings.tracking, settings.counting.labels)
    for frame in frames_on_c(settings, stream_id):
        counter.update(frame)
    row = counter.table()[stream_id]
    return comparable(
        {
            **{k: row[k] for k in ("unique_vehicles", "moving_vehicles", "stationary_vehicles", "line_crossings")},
            "frames_tracked": row["frames_applied"],
            "frames_stepped_over": row["frames_stepped_over"],
        }
    )


def reference_detections(settings: Settings, stream_id: str, reference: ReferenceDetector) -> dict[int, Any]:
    """The same model in one process over the JPEG bytes read back from topic A."""
    assert reference.detector.config.name == settings.model.name
    out: dict[int, Any] = {}
    for record in read_topic(settings, settings.topics.frames.name):
        decoded = decode_frame(record.value, record.headers)
        if isinstance(decoded, EndOfStream):
            continue
        meta, jpeg = decoded
        if meta.stream_id == stream_id:
            out[meta.frame_index] = reference.detect(jpeg)
    return out


def run(settings: Settings, sources: list[str], inter: int, crop: int = 1, count: int = 1, on_progress: Any = None) -> RunSummary:
    plan = RunPlan(
        sources=[parse_source(s) for s in sources],
        replicas={"inter": inter, "crop": crop, "count": count},
        include_dashboard=False,
        stall_timeout_s=240,
    )
    return run_pipeline(settings, plan, on_progress=on_progress)


def test_highway_end_to_end_every_frame_counted_once(
    ray_local, make_settings, reference_detector: ReferenceDetector, highway: str
) -> None:
    """Three InterConsumers, two crop and two count replicas; one of each is the kill test's run below,
    which makes the same checks (a frame on C once and as the reference detects it, crops, tracks)."""
    frames = 60  # the kill test's frames: their reference detections are computed once
    s = make_settings(producer__max_frames=frames, **TRACKING)  # published as fast as it can be
    summary = run(s, [f"hw={highway}"], inter=3, crop=2, count=2)

    assert summary.frames_produced == frames
    assert summary.per_stream["hw"] == {"produced": frames, "skipped": 0, "counted": frames}
    assert summary.frames_processed["inter"] == frames
    assert summary.frames_processed["count"] == frames  # applied once each
    assert set(summary.actors) >= {f"inter-{i}" for i in range(3)}

    got, _ = assert_detections_and_crops_match_reference(s, "hw", frames, reference_detector)
    assert summary.vehicles["hw"] == summary.box_counts["hw"] == direct_vehicle_count(got)

    # Vehicles, not boxes: the count stage's tracker, fed out of order by three InterConsumers,
    # counts what one TrafficCounter counts over C in frame order.
    assert summary.traffic is not None
    traffic = comparable(summary.traffic["hw"])
    assert traffic == one_process_traffic(s, "hw")
    assert traffic["frames_tracked"] == frames and traffic["frames_stepped_over"] == 0
    assert sum(traffic["line_crossings"]["highway"]["in"].values()) >= 1  # a car crosses at frame 38
    # Its clock is the clip's own (25 fps from a whole-second epoch), whatever the producer's pace.
    captured = [f.meta.capture_ts for f in frames_on_c(s, "hw")]
    assert [t - captured[0] for t in captured] == pytest.approx([i / 25 for i in range(frames)], abs=1e-6)
    assert captured[0] == int(captured[0])


def test_count_replica_killed_mid_run_keeps_the_same_tracks(
    ray_local, make_settings, reference_detector: ReferenceDetector, highway: str
) -> None:
    """ray.kill of the only count replica a third of the way in (the first crossing comes at frame 38):
    Ray restarts it, it resumes the stream's tracker from the changelog, and counts what one uninterrupted
    TrafficCounter over C counts. The real model, because crossings need vehicles that move.

    Also the one-replica-per-stage end to end: every frame once on C as the reference detects it, the
    crops exactly C's boxes above 0.7, the vehicle table C's direct count."""
    from bench.chaos import Injector

    frames = 60
    s = make_settings(producer__max_frames=frames, **TRACKING, **REAL_TIME)
    injector = Injector("kill-count", trigger_frames=frames // 3)
    plan = RunPlan(
        sources=[parse_source(f"hw={highway}")],
        replicas={"inter": 1, "crop": 1, "count": 1},
        include_dashboard=False,
        stall_timeout_s=240,
    )
    summary = run_pipeline(s, plan, on_tick=injector)
    assert injector.fired_at is not None and injector.counted_at_fire < frames, injector  # killed mid-run
    assert summary.per_stream["hw"] == {"produced": frames, "skipped": 0, "counted": frames}
    assert summary.frames_processed["inter"] == frames
    got, _ = assert_detections_and_crops_match_reference(s, "hw", frames, reference_detector)
    assert summary.vehicles["hw"] == summary.box_counts["hw"] == direct_vehicle_count(got)
    assert summary.traffic is not None
    traffic = comparable(summary.traffic["hw"])
    assert traffic == one_process_traffic(s, "hw")
    assert traffic["frames_tracked"] == frames and traffic["frames_stepped_over"] == 0
    assert sum(traffic["line_crossings"]["highway"]["in"].values()) >= 1


VEHICLES = {"bicycle", "car", "motorcycle", "bus", "train", "truck"}


def direct_vehicle_count(detections: dict[int, Any], labels: Any = VEHICLES) -> dict[str, int]:
    """The vehicle table as it should be: a direct count of the detections above 0.5."""
    direct: dict[str, int] = {}
    for d in detections.values():
        for label, conf in zip(d.labels, d.confidence):
            if label in labels and conf > 0.5:
                direct[label] = direct.get(label, 0) + 1
    return direct


def assert_detections_and_crops_match_reference(
    s: Settings, stream_id: str, frames: int, reference: ReferenceDetector
) -> tuple[dict[int, Any], dict[str, Any]]:
    """Detections on C equal a one-process run of the model; crops are exactly C's boxes above 0.7.

    Returns C's detections per frame and the crop index, for further checks.
    """
    # Crops: only confidences > 0.7, each in its label's folder.
    crops_root = Path(s.output_dir) / "crops"
    index = load_index(crops_root)
    assert index and all(e["confidence"] > 0.7 for e in index.values())
    for e in index.values():
        path = crops_root / e["path"]
        assert path.is_file() and path.parent.name == e["label"]
    assert {p.stem for p in crops_root.glob("*/*.jpg")} == set(index)

    # Detections on C equal, frame by frame, the same model run in one process on A's JPEG bytes.
    got = detections_on_c(s, stream_id)
    want = reference_detections(s, stream_id, reference)
    assert sorted(got) == sorted(want) == list(range(frames))
    for i in range(frames):
        assert got[i].labels == want[i].labels, f"frame {i}"
        np.testing.assert_allclose(got[i].confidence, want[i].confidence, atol=1e-5, err_msg=f"frame {i}")
        np.testing.assert_allclose(got[i].xyxy, want[i].xyxy, atol=1e-3, err_msg=f"frame {i}")

    # The crop stage kept exactly the boxes above 0.7 from C.
    assert len(index) == sum(int((d.confidence > 0.7).sum()) for d in got.values())
    return got, index


def test_two_streams_keep_their_counts_apart(ray_local, make_settings, highway: str, race: str) -> None:
    from actors.ray.engine import actor_stats

    s = make_settings(producer__max_frames=20)
    seen: dict[str, Any] = {}

    def status_mid_run(progress: Any) -> None:  # what `vapipe status` asks the cluster
        if not seen:
            seen.update(actor_stats("auto"))

    summary = run(s, [f"hw={highway}", f"race={race}"], inter=2, on_progress=status_mid_run)
    assert {"inter-0", "inter-1", "crop-0", "count-0", "producer-hw", "producer-race"} <= set(seen)
    assert all(not isinstance(st, str) and st.name == name and st.node for name, st in seen.items())
    assert summary.per_stream["hw"]["counted"] == 20
    assert summary.per_stream["race"]["counted"] == 20
    for stream in ("hw", "race"):
        assert summary.vehicles[stream] == direct_vehicle_count(detections_on_c(s, stream), s.counting.labels)
    assert summary.vehicles["hw"] != summary.vehicles["race"]


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_video_fails_before_anything_is_published(make_settings, tmp_path: Path, kind: str) -> None:
    s = make_settings()
    path = tmp_path / "clip.mp4"
    if kind == "corrupt":
        path.write_bytes(os.urandom(4096))
    env = dict(
        os.environ,
        VAPIPE_KAFKA__BOOTSTRAP_SERVERS=s.kafka.bootstrap_servers,
        VAPIPE_TOPICS__FRAMES__NAME=s.topics.frames.name,
        VAPIPE_MODEL__NAME=s.model.name,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "run", "--source", str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(path) in last
    assert "Traceback" not in proc.stderr
    from cluster.topics import list_topics

    assert s.topics.frames.name not in list_topics(s.kafka)  # nothing created, nothing published


def test_unreadable_frame_is_skipped_and_counted_in_the_summary(
    ray_local, make_settings, shared_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, name in enumerate(["bus.jpg", "street-dog.jpg", "bus.jpg"]):
        (folder / f"{i:03d}.jpg").write_bytes((shared_dir / "images" / name).read_bytes())
    (folder / "001b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not an image")
    s = make_settings(model__name="sleep:5ms")
    plan = RunPlan(
        sources=[parse_source(f"cam={folder}")],
        replicas={"inter": 1, "crop": 1, "count": 1},
        include_dashboard=False,
        allow_calibration=True,
        stall_timeout_s=120,
    )
    summary = run_pipeline(s, plan)
    assert summary.frames_skipped == 1
    assert summary.per_stream["cam"] == {"produced": 3, "skipped": 1, "counted": 3}


def test_run_refuses_the_calibration_detector_unless_asked(make_settings, highway: str) -> None:
    from pipeline.errors import ConfigError

    s = make_settings(model__name="sleep:40ms")
    plan = RunPlan(sources=[parse_source(f"hw={highway}")], replicas={"inter": 1, "crop": 1, "count": 1})
    with pytest.raises(ConfigError, match="calibration"):
        run_pipeline(s, plan)
