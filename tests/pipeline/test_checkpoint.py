"""Local table checkpoints: round trip, and every checkpoint that cannot be trusted is ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.checkpoint import TableCheckpoint, checkpoint_path

TOPIC = "vapipe.counts-changelog"


def test_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    TableCheckpoint(TOPIC, 2, 1234, {"cam1": {"frames_applied": 9}}).save(tmp_path)
    loaded = TableCheckpoint.load(tmp_path, TOPIC, 2, max_age_s=60)
    assert loaded is not None and loaded.offset == 1234 and loaded.snapshots == {"cam1": {"frames_applied": 9}}
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_path(tmp_path, TOPIC, 2).name]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "empty"),
        (b"{not json", "torn"),
        (b"[" * 10000, "too deep"),
        (
            b'{"version": 99, "topic": "vapipe.counts-changelog", "partition": 2, "offset": 1, "written_at": 0, "snapshots": {}}',
            "version",
        ),
        (b'{"version": 1, "topic": "other", "partition": 2, "offset": 1, "written_at": 0, "snapshots": {}}', "other topic"),
        (
            b'{"version": 1, "topic": "vapipe.counts-changelog", "partition": 2, "offset": -1, "written_at": 0, "snapshots": {}}',
            "offset",
        ),
    ],
)
def test_a_checkpoint_that_cannot_be_trusted_is_ignored(tmp_path: Path, body: bytes, why: str) -> None:
    checkpoint_path(tmp_path, TOPIC, 2).write_bytes(body)
    assert TableCheckpoint.load(tmp_path, TOPIC, 2, max_age_s=1e12) is None, why


def test_missing_or_stale_checkpoints_are_ignored(tmp_path: Path) -> None:
    assert TableCheckpoint.load(tmp_path, TOPIC, 0, max_age_s=60) is None
    TableCheckpoint(TOPIC, 0, 5, {}).save(tmp_path)
    assert TableCheckpoint.load(tmp_path, TOPIC, 0, max_age_s=-1) is None  # older than a tombstone lives
