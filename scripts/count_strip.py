"""A strip of annotated highway frames at the crossings where vapipe's counter and ObjectCounter disagree.

Runs ``TrafficCounter`` over the cached detections of ``scripts/count_accuracy.py`` (no model
run here) and draws the chosen frames with ``pipeline.annotate.draw_frame``: track ids, the
counting line and its running in/out count. A person checks the counts by looking.

    python scripts/count_strip.py --video ../shared/videos/highway-320x240.avi \
        --cache /tmp/vapipe-highway-detections.json --frames 470,480,684,692,709,716 \
        --out docs/results/counting/strip.jpg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from count_accuracy import COCO_VEHICLES, VideoDetections, read_frames

from pipeline.annotate import draw_frame
from pipeline.config import CountingLine, TrackingConfig
from pipeline.traffic import TrafficCounter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", required=True)
    parser.add_argument("--cache", type=Path, required=True, help="detections cached by scripts/count_accuracy.py")
    parser.add_argument("--frames", default="470,480,684,692,709,716")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    wanted = {int(x) for x in args.frames.split(",") if x.strip()}
    video = VideoDetections.from_json(json.loads(args.cache.read_text()))
    images, _ = read_frames(args.video)
    line = CountingLine(name="highway", start=(0.25, 0.60), end=(1.00, 0.60), in_direction="up")
    counter = TrafficCounter(TrackingConfig(enabled=True, lines=(line,)), labels=COCO_VEHICLES)
    tiles: list[np.ndarray] = []
    for frame in video.frame_messages():
        update = counter.update(frame)
        index = frame.meta.frame_index
        if index in wanted:
            crossings = update.counts.get("line_crossings", {}).get("highway", {})
            counts = {"highway": {d: sum(crossings.get(d, {}).values()) for d in ("in", "out")}}
            tile = draw_frame(
                images[index], tracks=update.tracks.get(index, []), lines=[line], counts=counts, caption=f"frame {index}"
            )
            tiles.append(tile)
    if not tiles:
        raise SystemExit("none of the frames asked for was applied")
    strip = np.concatenate(tiles, axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), strip)
    print(f"{args.out}: {len(tiles)} frames, {strip.shape[1]}x{strip.shape[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
