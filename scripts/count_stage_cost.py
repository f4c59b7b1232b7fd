"""Count-stage cost of tracking: ``CountWorker.process`` with tracking off and on, side by side in one run.

The same topic-C records (the highway video's cached detections from ``scripts/count_accuracy.py``,
or a synthetic busy road when no cache is given) go through the count stage's own ``process`` in
batches of ``count.batch_size``, decode, count, tracking, count updates and one changelog snapshot per
stream per batch included; only Kafka is left out (a producer stub takes the records), so the
difference is the stage's CPU cost of tracking. Runs alternate off/on ``--repeat`` times.

    .venv/bin/python scripts/count_stage_cost.py --cache /tmp/vapipe-highway-detections.json --repeat 5
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.faust.gaps import EventRecord  # kafka-python's ConsumerRecord fields
from actors.stages import CountWorker
from pipeline.codecs import encode_detections
from pipeline.config import CountingLine, Settings, TrackingConfig
from pipeline.messages import EndOfStream, FrameDetections

LINE = CountingLine(name="highway", start=(0.25, 0.6), end=(1.0, 0.6), in_direction="up")


class _Producer:
    """Takes what the stage sends and keeps the byte count (no broker)."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def send(self, topic: str, key: Any = None, value: bytes | None = None, **_: Any) -> None:
        self.sent[topic] = self.sent.get(topic, 0) + len(value or b"")


def frames(cache: Path | None) -> list[FrameDetections]:
    if cache is not None:
        from scripts.count_accuracy import VideoDetections

        return list(VideoDetections.from_json(json.loads(cache.read_text())).frame_messages("highway"))
    from tests.pipeline.traffic_sim import highway, render

    return render(highway(0, vehicles_per_direction=20, duration=30.0))


def arrivals(items: list[FrameDetections], spread: int, seed: int = 0) -> Iterator[FrameDetections]:
    """In the order several InterConsumers deliver them: each frame up to ``spread`` places off."""
    rng = random.Random(seed)
    yield from (f for _, f in sorted(((i + rng.uniform(0, spread), f) for i, f in enumerate(items)), key=lambda p: p[0]))


def run_once(settings: Settings, items: list[FrameDetections], spread: int) -> tuple[float, dict[str, int], dict[str, Any]]:
    worker = CountWorker(settings, "count-cost")
    producer = _Producer()
    worker.producer = producer
    topic = settings.topics.detections.name
    records = [
        EventRecord(topic, 0, i, enc.key, enc.value, list(enc.headers))
        for i, enc in enumerate(encode_detections(f) for f in arrivals(items, spread))
    ]
    stream_id = items[0].meta.stream_id
    eos = encode_detections(EndOfStream(stream_id, len(items)))
    records.append(EventRecord(topic, 0, len(records), eos.key, eos.value, list(eos.headers)))
    batch = settings.count.batch_size
    t0 = time.perf_counter()
    for start in range(0, len(records), batch):
        worker.process(records[start : start + batch])
    elapsed = time.perf_counter() - t0
    return len(items) / elapsed, producer.sent, worker.counter.table()[stream_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="detections cached by scripts/count_accuracy.py")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--spread", type=int, default=8, help="how far out of order frames arrive (frames)")
    args = parser.parse_args()
    items = frames(args.cache)
    off = Settings()
    on = Settings(tracking=TrackingConfig(enabled=True, lines=(LINE,)))
    results: dict[str, list[float]] = {"off": [], "on": []}
    sent: dict[str, dict[str, int]] = {}
    table: dict[str, Any] = {}
    for _ in range(args.repeat):
        for name, settings in (("off", off), ("on", on)):
            fps, sent[name], table[name] = run_once(settings, items, args.spread)
            results[name].append(fps)
    print(f"{len(items)} frames, batches of {off.count.batch_size}, arrivals up to {args.spread} frames out of order")
    print(f"python {platform.python_version()}, {platform.machine()}, {args.repeat} alternating repeats")
    print("| count stage | frames/s median | best | ms/frame (median) | bytes to counts topic | bytes to changelog |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("off", "on"):
        med = statistics.median(results[name])
        counts_bytes = sent[name].get(on.topics.counts.name, 0)
        changelog_bytes = sent[name].get(on.topics.counts_changelog.name, 0)
        print(
            f"| tracking {name} | {med:,.0f} | {max(results[name]):,.0f} | {1000 / med:.2f} | {counts_bytes:,} | {changelog_bytes:,} |"
        )
    crossings = table["on"].get("line_crossings", {})
    print(
        f"tracked: unique {table['on'].get('unique_vehicles')}, crossings {crossings}, frames {table['on'].get('frames_tracked')}"
    )


if __name__ == "__main__":
    main()
