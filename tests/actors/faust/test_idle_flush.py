"""The Faust count worker's idle flush: frames that wait for one that never comes are applied by a timer."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.faust.app import settings_to_json
from actors.stages import read_table
from tests.actors.test_count_tracking import IDLE_FLUSH, publish_twenty_frames_without_the_eighth

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.kafka
def test_an_idle_faust_count_worker_flushes_a_stream_whose_missing_frame_never_comes(make_settings, tmp_path: Path) -> None:
    """As the Ray replica's test: frame 7 is lost upstream, no end of stream comes; a timer steps over it."""
    s = make_settings(processing_guarantee="at_least_once", **IDLE_FLUSH)
    sid = publish_twenty_frames_without_the_eighth(s)
    (tmp_path / "settings.json").write_text(settings_to_json(s))
    with open(tmp_path / "count-0.out", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "actors.faust.worker", "stage", "count", "count-0", str(tmp_path)],
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    try:
        snapshot: dict = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            snapshot = read_table(s).get(sid, {})
            if snapshot.get("frames_tracked") == 19:
                break
            time.sleep(1.0)
        log_tail = (tmp_path / "count-0.out").read_text()[-2000:]
        assert proc.poll() is None, f"the Faust count worker exited: {log_tail}"
        assert snapshot.get("frames_tracked") == 19 and snapshot.get("frames_stepped_over") == 1, (snapshot, log_tail)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
