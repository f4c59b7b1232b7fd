"""The InterConsumer core alone (no Kafka, no Ray) against bare loops, at batch sizes 1-64.

Two steps, so the device machine needs only PyTorch, torchvision and OpenCV (plus this repo):

1. here, with the shared videos: ``save`` writes topic-A records (the producer's JPEGs and
   headers) to one file, length-prefixed (no pickle):
       .venv/bin/python scripts/gpu_bench.py save --out .cache/gpu/records.bin
2. on the device (or here, on the CPU, with a small range): ``run`` reads them and, per batch
   size, times
   - ``core``: what an InterConsumer does per poll without Kafka: headers parsed, JPEG checked,
     ``BatchDetector.detect_jpegs`` (decode on the GPU with nvJPEG, letterbox, fp16 inference,
     NMS), B and C records encoded; frames/s and the decode/inference/post-processing split;
   - ``bare``: a plain batched loop over the same JPEGs, as a user would write it: OpenCV decode
     and resize on the CPU, one stacked tensor, the same module, no NMS;
   - ``model``: the module alone on a ready batch tensor (the model's own ceiling);
       python scripts/gpu_bench.py run --records .cache/gpu/records.bin \\
           --model .cache/weights/yolov8n_from_int8.torchscript --batches 1,2,4,8,16,32,64

``--budget-s`` stops adding batch sizes once the time is spent, so a device call stays short.
The model is a TorchScript from ``scripts/recover_weights.py`` (it needs only PyTorch), or an ONNX
model on the CPU.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.codecs import Record, check_jpeg, decode_frame, encode_frame, encode_jpeg, encode_outputs  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.inference import BatchDetector, StageTimes  # noqa: E402
from pipeline.messages import FrameDetections, FrameMeta  # noqa: E402

_LEN = struct.Struct(">I")


def save(videos: list[str], frames: list[int], out: Path, quality: int) -> None:
    """Topic-A records of the first ``frames[i]`` frames of ``videos[i]``: u32 + JSON (key, headers), u32 + JPEG."""
    from pipeline.sources import VideoSource, parse_source

    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "wb") as fh:
        for i, (video, count) in enumerate(zip(videos, frames, strict=True)):
            with VideoSource(parse_source(video, stream_id=f"s{i}"), max_frames=count) as source:
                for frame in source:
                    h, w = frame.image.shape[:2]
                    rec = encode_frame(FrameMeta(f"s{i}", frame.index, time.time(), w, h), encode_jpeg(frame.image, quality))
                    meta = json.dumps({"key": (rec.key or b"").decode(), "headers": [[k, v.decode()] for k, v in rec.headers]})
                    assert rec.value is not None
                    for part in (meta.encode(), rec.value):
                        fh.write(_LEN.pack(len(part)))
                        fh.write(part)
                    n += 1
    print(f"wrote {n} records ({out.stat().st_size / 1e6:.1f} MB) to {out}")


def load(path: Path) -> list[Record]:
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        parts = []
        for _ in range(2):
            (size,) = _LEN.unpack_from(data, pos)
            parts.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
        meta = json.loads(parts[0])
        headers = [(k, v.encode()) for k, v in meta["headers"]]
        records.append(Record(key=meta["key"].encode(), value=parts[1], headers=headers))
    return records


def core_pass(detector: BatchDetector, records: list[Record], batch: int) -> tuple[float, StageTimes]:
    """Frames/s of the InterConsumer's work on ``records`` in polls of ``batch``, and the step times."""
    times = StageTimes()
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        polled = records[i : i + batch]
        frames = []
        for rec in polled:
            decoded = decode_frame(rec.value, rec.headers)
            assert isinstance(decoded, tuple)
            meta, jpeg = decoded
            check_jpeg(jpeg, expect=(meta.width, meta.height))
            frames.append((rec, meta, jpeg))
        found = detector.detect_jpegs([j for _, _, j in frames], times)
        for (rec, meta, jpeg), det in zip(frames, found, strict=True):
            assert not isinstance(det, Exception)
            encode_outputs(FrameDetections(meta, det, detector.name, 0.0), jpeg, rec.headers)
    return len(records) / (time.perf_counter() - t0), times


def bare_pass(detector: BatchDetector, records: list[Record], batch: int, imgsz: int) -> float:
    """A plain loop: OpenCV decode + resize on the CPU, one tensor, the same module, no NMS."""
    import cv2
    import torch

    run, device, half = detector._run, detector.device, detector.half
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        imgs = [
            cv2.resize(cv2.imdecode(np.frombuffer(r.value or b"", np.uint8), cv2.IMREAD_COLOR), (imgsz, imgsz))
            for r in records[i : i + batch]
        ]
        x = torch.from_numpy(np.ascontiguousarray(np.stack(imgs)[..., ::-1].transpose(0, 3, 1, 2))).to(device)
        x = (x.half() if half else x.float()) / 255.0
        run(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return len(records) / (time.perf_counter() - t0)


def model_pass(detector: BatchDetector, frames: int, batch: int, imgsz: int) -> float:
    import torch

    dtype = torch.float16 if detector.half else torch.float32
    x = torch.rand(batch, 3, imgsz, imgsz, device=detector.device, dtype=dtype)
    calls = max(frames // batch, 1)
    t0 = time.perf_counter()
    for _ in range(calls):
        detector._run(x)
    if detector.device.startswith("cuda"):
        torch.cuda.synchronize()
    return calls * batch / (time.perf_counter() - t0)


def run(records_path: Path, model: str, batches: list[int], frames: int, device: str, budget_s: float, out: Path | None) -> None:
    import torch

    records = load(records_path)
    records = (records * (frames // max(len(records), 1) + 1))[:frames]
    config = ModelConfig(name=model, device=device, runtime="batched")
    detector = BatchDetector(config)
    detector.load()
    gpu = torch.cuda.get_device_name(0) if detector.device.startswith("cuda") else "none"
    print(f"model {model} on {detector.device} (gpu: {gpu}, fp16: {detector.half}); {len(records)} frames per point")
    header = f"{'batch':>5} {'core f/s':>9} {'bare f/s':>9} {'model f/s':>10} {'core/bare':>9} {'decode ms':>9} {'infer ms':>9} {'post ms':>8}"
    print(header)
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    for batch in batches:
        if time.monotonic() - start > budget_s:
            print(f"budget of {budget_s:g}s spent: stopping before batch {batch}")
            break
        core_pass(detector, records[: batch * 2], batch)  # warm-up (cuDNN autotune, nvJPEG handles)
        core_fps, times = core_pass(detector, records, batch)
        bare_fps = bare_pass(detector, records, batch, config.imgsz)
        model_fps = model_pass(detector, len(records), batch, config.imgsz)
        n = len(records)
        row = {
            "batch": batch,
            "core_fps": round(core_fps, 1),
            "bare_fps": round(bare_fps, 1),
            "model_fps": round(model_fps, 1),
            "core_vs_bare": round(core_fps / bare_fps, 3),
            "decode_ms_per_frame": round(times.decode_s * 1000 / n, 3),
            "infer_ms_per_frame": round(times.inference_s * 1000 / n, 3),
            "post_ms_per_frame": round(times.postprocess_s * 1000 / n, 3),
        }
        rows.append(row)
        print(
            f"{batch:>5} {core_fps:>9.1f} {bare_fps:>9.1f} {model_fps:>10.1f} {row['core_vs_bare']:>9.3f} "
            f"{row['decode_ms_per_frame']:>9.3f} {row['infer_ms_per_frame']:>9.3f} {row['post_ms_per_frame']:>8.3f}"
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result = {"model": model, "device": detector.device, "gpu": gpu, "frames": len(records), "rows": rows}
        (out / "gpu_bench.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="write topic-A records of the shared videos to a file")
    shared = ROOT.parent / "shared" / "videos"
    s.add_argument("--videos", default=f"{shared / 'highway-320x240.avi'},{shared / 'race-1280x720.mp4'}")
    s.add_argument("--frames", default="384,128", help="frames of each video")
    s.add_argument("--quality", type=int, default=90)
    s.add_argument("--out", type=Path, default=ROOT / ".cache" / "gpu" / "records.bin")
    r = sub.add_parser("run", help="time the core and the bare loops")
    r.add_argument("--records", type=Path, default=ROOT / ".cache" / "gpu" / "records.bin")
    r.add_argument("--model", default=str(ROOT / ".cache" / "weights" / "yolov8n_from_int8.torchscript"))
    r.add_argument("--batches", default="1,2,4,8,16,32,64")
    r.add_argument("--frames", type=int, default=512, help="frames per point (the records, repeated)")
    r.add_argument("--device", default="auto")
    r.add_argument("--budget-s", type=float, default=360.0)
    r.add_argument("--out", type=Path, default=None, help="folder for gpu_bench.json")
    args = parser.parse_args()
    if args.cmd == "save":
        save(args.videos.split(","), [int(x) for x in args.frames.split(",")], args.out, args.quality)
    else:
        batches = [int(x) for x in args.batches.split(",")]
        run(args.records, args.model, batches, args.frames, args.device, args.budget_s, args.out)


if __name__ == "__main__":
    main()
