"""What TLS and SASL/SCRAM cost: a plaintext broker and a ``--secure`` one, side by side in one run.

Two measurements, each alternated plain/secure for ``--rounds`` rounds so drift on a shared machine
hits both alike, and reported as ratios:

1. Kafka alone: publish ``--frames`` JPEG frames of a video (the producer settings of the pipeline:
   snappy, linger 5 ms, acks=all) and read them back with a read_committed consumer; frames/s, and the
   CPU seconds the client process and the broker used.
2. The pipeline: ``run_pipeline`` on a local Ray with the synthetic detector (no model cost, so the
   transport's share is as large as it gets), exactly-once, one replica per stage; frames/s end to end.

Usage:
    python scripts/secure_bench.py --port 19712 --frames 400 --rounds 2 --out docs/results/security
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's modules, not an installed copy


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kafka_round(kafka: Any, frames: list[bytes], broker_pid: int) -> dict[str, float]:
    import uuid

    from cluster.clients import make_consumer, make_producer
    from cluster.topics import create_topics
    from pipeline.config import TopicSpec

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    create_topics(kafka, [TopicSpec(name=topic, partitions=6)])
    cpu0, broker0, t0 = time.process_time(), _cpu_s(broker_pid), time.perf_counter()
    producer = make_producer(kafka)
    for i, frame in enumerate(frames):
        producer.send(topic, key=str(i).encode(), value=frame)
    producer.flush()
    producer.close()
    consumer = make_consumer(kafka, topic, group_id=None)
    got = 0
    while got < len(frames):
        got += sum(len(b) for b in consumer.poll(timeout_ms=1000).values())
    consumer.close()
    wall = time.perf_counter() - t0
    return {
        "fps": len(frames) / wall,
        "client_cpu_s": time.process_time() - cpu0,
        "broker_cpu_s": _cpu_s(broker_pid) - broker0,
    }


def pipeline_round(settings: Any, video: str, frames: int) -> dict[str, float]:
    import uuid

    from actors.launcher import RunPlan
    from actors.ray.engine import run_pipeline
    from cluster.topics import create_topics
    from pipeline.sources import parse_source

    tag = uuid.uuid4().hex[:8]
    topics = {k: {"name": f"b{tag}.{k}"} for k in type(settings.topics).model_fields}
    topics["counts_changelog"]["config"] = {"cleanup.policy": "compact"}
    s = settings.model_validate(settings.model_dump(mode="python") | {"topics": topics, "group_prefix": f"b{tag}"})
    s = s.model_copy(update={"kafka": settings.kafka, "producer": s.producer.model_copy(update={"max_frames": frames, "fps": 0})})
    create_topics(s.kafka, s.topics.all())
    if s.kafka.security_protocol != "PLAINTEXT":
        from cluster.security import apply_acls

        apply_acls(s.kafka, s)
    plan = RunPlan(
        sources=[parse_source(video, stream_id="bench")],
        replicas={"inter": 1, "crop": 1, "count": 1},
        allow_calibration=True,
        include_dashboard=False,
        stall_timeout_s=120,
    )
    summary = run_pipeline(s, plan)
    return {"fps": summary.frames_produced / summary.wall_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=19712, help="plain broker on port, port+1; secure on port+2, port+3")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--video", default=str(Path(__file__).resolve().parents[2] / "shared" / "videos" / "race-1280x720.mp4"))
    ap.add_argument("--pipeline-frames", type=int, default=300, help="0 skips the pipeline runs")
    ap.add_argument("--out", default=None, help="folder for results.json")
    args = ap.parse_args()

    import ray

    from cluster.broker import KafkaBroker
    from cluster.security import client_config
    from pipeline.config import BrokerConfig, KafkaConfig, load_settings
    from pipeline.sources import VideoSource, parse_source

    source = VideoSource(parse_source(args.video, stream_id="v"), max_frames=args.frames).open()
    from pipeline.codecs import encode_jpeg

    frames = [encode_jpeg(image, 90) for image in _images(source)]
    mean_kb = sum(map(len, frames)) / len(frames) / 1024
    tmp = Path(tempfile.mkdtemp(prefix="vapipe-secure-bench-"))
    brokers = {
        "plain": KafkaBroker(
            BrokerConfig(port=args.port, controller_port=args.port + 1, state_dir=str(tmp / "plain"), heap="512m")
        ),
        "secure": KafkaBroker(
            BrokerConfig(
                port=args.port + 2, controller_port=args.port + 3, state_dir=str(tmp / "secure"), heap="512m", secure=True
            )
        ),
    }
    results: dict[str, list[dict[str, float]]] = {
        "kafka.plain": [],
        "kafka.secure": [],
        "pipeline.plain": [],
        "pipeline.secure": [],
    }
    try:
        kafka: dict[str, KafkaConfig] = {}
        for name, broker in brokers.items():
            status = broker.start()
            kafka[name] = broker.kafka if broker.security is None else client_config(broker.kafka, broker.security)
            print(f"{name} broker ready at {status.bootstrap} in {status.ready_s:.1f}s")
        for r in range(args.rounds):
            for name in ("plain", "secure") if r % 2 == 0 else ("secure", "plain"):
                pid = brokers[name].status().pid
                results[f"kafka.{name}"].append(kafka_round(kafka[name], frames, pid))
                print(f"round {r} kafka {name}: {results[f'kafka.{name}'][-1]}")
        if args.pipeline_frames:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(namespace="vapipe", include_dashboard=False, logging_level="WARNING", num_cpus=4)
            base = load_settings(None, overrides={"model": {"name": "synthetic:1ms"}, "output_dir": str(tmp / "out")}, environ={})
            for r in range(args.rounds):
                for name in ("plain", "secure") if r % 2 == 0 else ("secure", "plain"):
                    s = base.model_copy(update={"kafka": kafka[name]})
                    results[f"pipeline.{name}"].append(pipeline_round(s, args.video, args.pipeline_frames))
                    print(f"round {r} pipeline {name}: {results[f'pipeline.{name}'][-1]}")
            ray.shutdown()
    finally:
        for broker in brokers.values():
            broker.stop()

    def mean(key: str, field: str) -> float:
        rows = results[key]
        return sum(row[field] for row in rows) / len(rows) if rows else float("nan")

    print(f"\n{args.frames} frames of {Path(args.video).name} (mean JPEG {mean_kb:.0f} KiB), {args.rounds} alternated rounds")
    kp, ks = mean("kafka.plain", "fps"), mean("kafka.secure", "fps")
    print(f"kafka produce+consume: plain {kp:.0f} frames/s, secure {ks:.0f} frames/s, secure/plain {ks / kp:.2f}")
    for field in ("client_cpu_s", "broker_cpu_s"):
        p, s_ = mean("kafka.plain", field), mean("kafka.secure", field)
        print(f"  {field}: plain {p:.2f}, secure {s_:.2f}, secure/plain {s_ / p:.2f}")
    if args.pipeline_frames:
        pp, ps = mean("pipeline.plain", "fps"), mean("pipeline.secure", "fps")
        print(
            f"pipeline (synthetic detector, exactly-once): plain {pp:.1f} frames/s, secure {ps:.1f} frames/s, secure/plain {ps / pp:.2f}"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(
            json.dumps({"frames": args.frames, "mean_jpeg_kib": mean_kb, **results}, indent=2) + "\n"
        )


def _images(source: Any) -> list[Any]:
    return [frame.image for frame in source]


if __name__ == "__main__":
    main()
