"""``vapipe bench ceiling``: the pipeline's own per-frame cost against the Kafka client's limit.

With the zero-cost calibration detector (``sleep:0ms``) nothing but the pipeline's own work is
left in an InterConsumer: Kafka client, header parsing, JSON, transactions, Python loops. The
benchmark compares it with the physical limit of the same client on the same machine: a bare
kafka-python consume -> produce loop moving the same topic-A records to B and C, in the same
transactions (one per poll of ``inter.batch_size`` records, offsets sent in it).

Both run in plain processes (``multiprocessing`` spawn), ``r`` of them, each on a fixed share
of topic A's partitions (``assign``, no group rebalance in the timed span), started together
after their clients exist; the timed span is from that start to the last committed batch.
Runs are interleaved (bare, pipeline, bare, ..., per replica count), and each pipeline run is
compared with the mean of the bare runs just before and after it.

The whole pipeline (producer -> inter -> crop -> count on Ray, ``sleep:0ms``) is run too, for
the end-to-end frames/s; and one InterConsumer is profiled (cProfile) to say where its time goes.
"""

from __future__ import annotations

import cProfile
import io
import logging
import multiprocessing as mp
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from actors.stages import InterWorker
from bench.experiments import TOPIC_KEYS, _run, environment, isolated
from cluster.clients import check_broker, finish_transaction, make_consumer, make_producer, send_offsets_in_transaction
from cluster.topics import create_topics, delete_topics
from pipeline.codecs import Record, decode_frame, encode_detections, encode_frame, encode_jpeg
from pipeline.config import Settings
from pipeline.detector import CalibrationDetector
from pipeline.messages import Detections, FrameDetections, FrameMeta
from pipeline.sources import VideoSource, parse_source

__all__ = ["ceiling", "topic_a_records", "bare_loop", "profile_rows"]

logger = logging.getLogger(__name__)

ZERO_COST = "sleep:0ms"
READY_TIMEOUT_S = 120.0


def topic_a_records(settings: Settings, videos: list[str], frames: int) -> list[Record]:
    """Topic-A records of the first ``frames`` frames of each video, as the producer encodes them."""
    records: list[Record] = []
    for i, video in enumerate(videos):
        with VideoSource(parse_source(video, stream_id=f"s{i}"), max_frames=frames) as source:
            for frame in source:
                h, w = frame.image.shape[:2]
                meta = FrameMeta(f"s{i}", frame.index, time.time(), w, h)
                records.append(encode_frame(meta, encode_jpeg(frame.image, settings.producer.jpeg_quality)))
    return records


def _c_value(record: Record) -> bytes:
    """The topic-C value the InterConsumer writes for a frame in which nothing was found."""
    decoded = decode_frame(record.value, record.headers)
    assert isinstance(decoded, tuple)
    value = encode_detections(FrameDetections(decoded[0], Detections.empty(), model=ZERO_COST)).value
    assert value is not None
    return value


def bare_loop(settings: Settings, consumer: Any, producer: Any, expected: int, c_value: bytes) -> int:
    """Move ``expected`` records from A to B (same value and headers, plus the two a detector adds)
    and C (a fixed value of the InterConsumer's size), one transaction per poll; returns records moved."""
    topics, cfg = settings.topics, settings.inter
    extra = [("model", ZERO_COST.encode()), ("detections", b"[]")]
    done = 0
    while done < expected:
        polled = consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=min(cfg.batch_size, expected - done))
        records = [r for batch in polled.values() for r in batch]
        if not records:
            continue
        producer.begin_transaction()
        futures = []
        offsets: dict[TopicPartition, Any] = {}
        for r in records:
            futures.append(producer.send(topics.detected_frames.name, key=r.key, value=r.value, headers=r.headers + extra))
            futures.append(producer.send(topics.detections.name, key=r.key.rpartition(b"/")[0], value=c_value))
            offsets[TopicPartition(r.topic, r.partition)] = r.offset + 1
        send_offsets_in_transaction(
            producer, {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}, consumer.group_metadata()
        )
        finish_transaction(producer, commit=True)
        for f in futures:
            f.get(timeout=60)
        done += len(records)
    return done


class _AssignedInter(InterWorker):
    """An InterConsumer on a fixed set of partitions, stamping when its last batch became durable."""

    def __init__(self, *args: Any, partitions: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partitions = partitions
        self.last_done = 0.0

    def subscribe(self) -> None:
        assert self.consumer is not None
        self.consumer.assign([TopicPartition(self.input_topic, p) for p in self.partitions])

    def batch_done(self, records: list[Any]) -> None:
        super().batch_done(records)
        self.last_done = time.time()


def _worker(
    kind: str,
    settings: Settings,
    name: str,
    partitions: list[int],
    expected: int,
    c_value: bytes,
    ready: Any,
    go: Any,
    results: Any,
    profile: bool,
) -> None:
    """One replica in its own process: create the clients, wait for ``go``, move ``expected`` records."""
    try:
        if kind == "bare":
            consumer = make_consumer(settings.kafka, group_id=settings.group("inter"), client_id=name)
            consumer.assign([TopicPartition(settings.topics.frames.name, p) for p in partitions])
            producer = make_producer(
                settings.kafka,
                transactional_id=f"{settings.group('inter')}.{name}",
                retry_backoff_ms=settings.kafka.transaction_retry_backoff_ms,
            )
            producer.init_transactions()
            ready.put(name)
            go.wait()
            t0 = time.time()
            done = bare_loop(settings, consumer, producer, expected, c_value)
            t1 = time.time()
            consumer.close()
            producer.close()
            results.put({"name": name, "records": done, "t0": t0, "t1": t1})
            return
        worker = _AssignedInter(settings, name, detector=CalibrationDetector(0.0), partitions=partitions)
        worker.start()
        ready.put(name)
        go.wait()
        t0 = time.time()
        prof = cProfile.Profile() if profile else None
        if prof is not None:
            prof.enable()
        stats = worker.run(max_messages=expected)
        if prof is not None:
            prof.disable()
        out: dict[str, Any] = {"name": name, "records": stats["records_in"], "t0": t0, "t1": worker.last_done}
        if prof is not None:
            out["profile"] = profile_rows(prof, stats["records_in"])
        out["stats"] = {k: stats.get(k) for k in ("decode_s", "inference_s", "postprocess_s", "frames_out", "poison")}
        results.put(out)
    except BaseException as exc:  # report, do not hang the parent
        results.put({"name": name, "error": f"{type(exc).__name__}: {exc}"})
        raise


def profile_rows(prof: cProfile.Profile, frames: int, top: int = 25) -> dict[str, Any]:
    """Per-frame microseconds of the functions an InterConsumer spent most time in (own time), and the
    total, from a cProfile run over ``frames`` frames."""
    stats = pstats.Stats(prof, stream=io.StringIO())
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values())
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in sorted(entries.items(), key=lambda kv: -kv[1][2])[:top]:
        short = "/".join(file.split("/")[-2:])
        rows.append(
            {
                "function": f"{short}:{line}({func})",
                "calls_per_frame": round(ncalls / max(frames, 1), 2),
                "own_us_per_frame": round(tottime / max(frames, 1) * 1e6, 1),
                "cum_us_per_frame": round(cumtime / max(frames, 1) * 1e6, 1),
                "own_share": round(tottime / total, 3) if total else 0.0,
            }
        )
    cum = {f"{file}:{func}": ct for (file, _, func), (_, _, _, ct, _) in entries.items()}

    def bucket(*needles: str) -> float:
        found = [ct for key, ct in cum.items() if any(key.endswith(n) for n in needles)]
        return round(max(found, default=0.0) / max(frames, 1) * 1e6, 1)

    buckets = {
        "poll_us": bucket("worker.py:poll", "group.py:poll", "consumer/group.py:poll"),
        "process_us": bucket("stages.py:process"),
        "decode_us": bucket("stages.py:_decode", "inference.py:decode_records"),
        "encode_us": bucket("codecs.py:encode_detected_frame", "codecs.py:encode_outputs"),
        "send_us": bucket("clients.py:send_record"),
        "complete_us": bucket("delivery.py:complete"),
        "lag_us": bucket("worker.py:_measure_lag"),
    }
    return {"total_us_per_frame": round(total / max(frames, 1) * 1e6, 1), "buckets": buckets, "top": rows}


def _one_run(
    kind: str, settings: Settings, records: list[Record], replicas: int, c_value: bytes, profile: bool = False
) -> dict[str, Any]:
    """Publish the records to fresh topics, move them with ``replicas`` processes of ``kind``; frames/s."""
    s = isolated(settings)
    topics = s.topics
    create_topics(s.kafka, [getattr(topics, k) for k in TOPIC_KEYS])
    try:
        parts = topics.frames.partitions
        producer = make_producer(s.kafka)
        per_partition = [0] * parts
        for i, rec in enumerate(records):
            producer.send(topics.frames.name, key=rec.key, value=rec.value, headers=list(rec.headers), partition=i % parts)
            per_partition[i % parts] += 1
        producer.flush()
        producer.close()
        ctx = mp.get_context("spawn")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = []
        for i in range(replicas):
            mine = list(range(i, parts, replicas))
            expected = sum(per_partition[p] for p in mine)
            args = (kind, s, f"inter-{i}", mine, expected, c_value, ready, go, results, profile and i == 0)
            procs.append(ctx.Process(target=_worker, args=args, daemon=True))
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=READY_TIMEOUT_S)
        go.set()
        outs = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise RuntimeError(f"{kind} replica failed: {errors[0]}")
        t0 = min(o["t0"] for o in outs)
        t1 = max(o["t1"] for o in outs)
        total = sum(o["records"] for o in outs)
        per = [o["records"] / (o["t1"] - o["t0"]) for o in outs]
        row: dict[str, Any] = {
            "kind": kind,
            "replicas": replicas,
            "frames": total,
            "wall_s": round(t1 - t0, 3),
            "fps": round(total / (t1 - t0), 1),
            "fps_per_consumer": round(statistics.fmean(per), 1),
        }
        for o in outs:
            if "profile" in o:
                row["profile"] = o["profile"]
            if kind == "pipeline":
                row.setdefault("worker_stats", []).append(o.get("stats"))
        return row
    finally:
        delete_topics(s.kafka, [getattr(topics, k).name for k in TOPIC_KEYS])


def ceiling(
    settings: Settings,
    videos: list[str],
    frames: int,
    replicas: list[int],
    repeat: int = 2,
    end_to_end: bool = True,
    on_progress: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Pipeline InterConsumer (``sleep:0ms``) frames/s against a bare consume -> produce loop, side by side.

    Returns:
        ``{"benchmark": "ceiling", "table": [...], "rows": [...], "profile": {...}, ...}``; the table
        has, per replica count, bare and pipeline frames/s (total and per consumer), their ratio
        (median over repeats of pipeline / mean of the bare runs around it), and the end-to-end
        frames/s of the whole pipeline.
    """
    check_broker(settings.kafka)
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"name": ZERO_COST})})
    records = topic_a_records(settings, videos, frames)
    c_value = _c_value(records[0])
    rows: list[dict[str, Any]] = []
    for rep in range(repeat):
        for r in replicas:
            bare_before = _one_run("bare", settings, records, r, c_value)
            pipe = _one_run("pipeline", settings, records, r, c_value)
            bare_after = _one_run("bare", settings, records, r, c_value)
            ref = (bare_before["fps"] + bare_after["fps"]) / 2
            ref_per = (bare_before["fps_per_consumer"] + bare_after["fps_per_consumer"]) / 2
            pipe.update(
                repeat=rep, ratio=round(pipe["fps"] / ref, 3), ratio_per_consumer=round(pipe["fps_per_consumer"] / ref_per, 3)
            )
            for b in (bare_before, bare_after):
                b["repeat"] = rep
            rows += [bare_before, pipe, bare_after]
            logger.warning(
                "ceiling r=%d repeat %d: bare %.0f, pipeline %.0f, bare %.0f f/s -> ratio %.3f",
                r, rep, bare_before["fps"], pipe["fps"], bare_after["fps"], pipe["ratio"],
            )  # fmt: skip
    profiled = _one_run("pipeline", settings, records, 1, c_value, profile=True)
    e2e: dict[int, float] = {}
    if end_to_end:
        for r in replicas:
            s = isolated(settings, producer={"fps": 0.0, "max_frames": frames})
            summary, _ = _run(s, videos, r, on_progress)
            e2e[r] = summary["frames_per_s"]
            logger.warning("ceiling end to end r=%d: %.1f f/s", r, e2e[r])
    table = []
    for r in replicas:
        bare = [x for x in rows if x["kind"] == "bare" and x["replicas"] == r]
        pipe = [x for x in rows if x["kind"] == "pipeline" and x["replicas"] == r]
        entry: dict[str, Any] = {
            "replicas": r,
            "bare_fps": round(statistics.median(x["fps"] for x in bare), 1),
            "pipeline_fps": round(statistics.median(x["fps"] for x in pipe), 1),
            "bare_fps_per_consumer": round(statistics.median(x["fps_per_consumer"] for x in bare), 1),
            "pipeline_fps_per_consumer": round(statistics.median(x["fps_per_consumer"] for x in pipe), 1),
            "ratio": round(statistics.median(x["ratio"] for x in pipe), 3),
            "end_to_end_fps": round(e2e[r], 1) if r in e2e else None,
        }
        entry["end_to_end_vs_bare"] = round(e2e[r] / entry["bare_fps"], 3) if r in e2e else None
        table.append(entry)
    for row in rows:
        row.pop("worker_stats", None)
    env = environment(settings)
    return {
        "benchmark": "ceiling",
        "videos": videos,
        "frames_per_video": frames,
        "records": len(records),
        "batch_size": settings.inter.batch_size,
        "processing_guarantee": settings.processing_guarantee,
        "repeat": repeat,
        "target": 0.8,
        "table": table,
        "rows": rows,
        "profile": profiled.get("profile", {}),
        "profiled_fps": profiled["fps"],
        **env,
    }
