"""``vapipe bench soak``: the pipeline left running, poisoned and killed on a schedule, then judged.

An endless synthetic source (several streams of a panned still, the calibration detector so
the machine is not the limit) runs for ``minutes``; meanwhile one poison record goes in every
``poison_every_s`` (alternately undecodable bytes on A and 100k-deep JSON on C), and a count
replica is killed for good every ``kill_every_s`` and a fresh one started (a restart on a new
Ray worker process, which restores the table from its checkpoint and the changelog).

Judged from outside, as ``vapipe chaos`` judges: RSS of every actor's process sampled with
psutil (slope in MB/hour after ``warmup_s``, per process incarnation), the largest snapshot on
the changelog, each kill's restore time (the replacement's first restore, and the survivor's
restore after the rebalance), frames lost and counted twice (the counts topic against what
the producers published), and p99 publish-to-count latency per minute (the counts topic's
record timestamps against each frame's ``publish_ts`` on C).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.launcher import RunPlan
from actors.ray.engine import RunControl, run_pipeline
from actors.stages import read_table
from bench.chaos import count_verdict
from bench.experiments import TOPIC_KEYS, environment, isolated
from cluster.clients import check_broker, make_producer
from cluster.reading import read_all
from cluster.topics import delete_topics
from pipeline.codecs import decode_detections, decode_json
from pipeline.config import Settings
from pipeline.errors import DecodeError
from pipeline.messages import FrameDetections
from pipeline.sources import demo_image_path, parse_source

__all__ = ["SoakSchedule", "soak", "rss_slopes", "write_soak_report", "TARGETS"]

logger = logging.getLogger(__name__)

TARGETS = {"rss_slope_mb_per_h": 5.0, "largest_snapshot_bytes": 4096, "restore_s": 5.0, "lost": 0, "counted_twice": 0}
"""Issue 12's targets: RSS slope per actor after warm-up, largest changelog value, restore time, lost, twice."""


@dataclass
class SoakSchedule:
    """The on_tick hook: samples RSS, injects poison, kills count replicas; keeps what it saw."""

    settings: Settings
    stream_ids: list[str]
    poison_every_s: float = 60.0
    kill_every_s: float = 180.0
    sample_every_s: float = 10.0
    faults_until_s: float = float("inf")
    """Poison and kills stop here (the end of the streams): the drain after it is judged, not disturbed."""
    t0: float | None = None
    """When the run's drain began (the first tick): the schedule's clock starts there."""
    rss: dict[str, list[tuple[float, int, float]]] = field(default_factory=lambda: defaultdict(list))
    """Actor name -> (seconds, pid, RSS MB) samples."""
    poisons: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    _last_sample: float = -1e9
    _last_poison: float = -1e9
    _last_kill: float = 0.0
    _producer: Any = None

    def __call__(self, control: RunControl) -> None:
        if self.t0 is None:
            self.t0 = time.monotonic()
        now = time.monotonic() - self.t0
        if now - self._last_sample >= self.sample_every_s:
            self._last_sample = now
            self._sample_rss(control, now)
        self._watch_restores(control, now)
        if now > self.faults_until_s:
            return
        if now - self._last_poison >= self.poison_every_s:
            self._last_poison = now
            self._poison(now)
        # The next kill waits for the last replacement's restore: kills faster than a replica can
        # restore (a slow machine) would measure a livelock of the soak's own making, not vapipe.
        restored = all(k["restore_s"] is not None for k in self.kills)
        if now - self._last_kill >= self.kill_every_s and restored:
            self._last_kill = now
            self._kill(control, now)

    def _sample_rss(self, control: RunControl, now: float) -> None:
        import psutil

        for name, st in list(control.progress.fresh.items()):
            if not st.pid:
                continue
            try:
                mb = psutil.Process(int(st.pid)).memory_info().rss / 2**20
            except (psutil.Error, ValueError):  # an actor on another node, or gone since it answered
                continue
            self.rss[name].append((round(now, 1), int(st.pid), round(mb, 2)))

    def _poison(self, now: float) -> None:
        if self._producer is None:
            self._producer = make_producer(self.settings.kafka)
        n = len(self.poisons)
        topics = self.settings.topics
        if n % 2 == 0:  # undecodable bytes on A, no headers: dead-lettered by the InterConsumer
            topic, key, value = topics.frames.name, None, b"\xff\xd8 not a jpeg " + bytes(range(256))
        else:  # 100k-deep JSON on C, keyed by a real stream: dead-lettered by the count stage
            topic, key, value = topics.detections.name, self.stream_ids[0].encode(), b"[" * 100_000
        self._producer.send(topic, key=key, value=value).get(timeout=30)
        self.poisons.append({"t": round(now, 1), "topic": topic})

    def _kill(self, control: RunControl, now: float) -> None:
        counts = sorted(n for n in control.actors if n.startswith("count-"))
        if len(counts) < 2:
            return
        victim = counts[len(self.kills) % len(counts)]
        survivors = {n: list(control.progress.stats[n].restore_s) for n in counts if n != victim and n in control.progress.stats}
        old = control.progress.stats.get(victim)
        control.remove_replica(victim)
        replacement = control.add_replica("count")
        self.kills.append(
            {
                "t": round(now, 1),
                "killed": victim,
                "replacement": replacement,
                "killed_pid": old.pid if old is not None else None,
                "survivor_restores_before": {n: len(r) for n, r in survivors.items()},
                "restore_s": None,
                "survivor_restore_s": None,
                "restored_after_s": None,
            }
        )
        logger.warning("soak: killed %s at %.0fs, started %s", victim, now, replacement)

    def _watch_restores(self, control: RunControl, now: float) -> None:
        for kill in self.kills:
            fresh = control.progress.fresh.get(kill["replacement"])
            # The replacement reuses the name: until it answers, the last answer under that name is the
            # killed process's, whose first restore is not this kill's.
            if kill["restore_s"] is None and fresh is not None and fresh.pid != kill["killed_pid"] and fresh.restore_s:
                kill["restore_s"] = fresh.restore_s[0]
                kill["restored_after_s"] = round(now - kill["t"], 1)
            if kill["survivor_restore_s"] is None:
                for name, before in kill["survivor_restores_before"].items():
                    st = control.progress.fresh.get(name)
                    if st is not None and len(st.restore_s) > before:
                        kill["survivor_restore_s"] = max(st.restore_s[before:])

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


def rss_slopes(samples: dict[str, list[tuple[float, int, float]]], warmup_s: float) -> dict[str, dict[str, Any]]:
    """Per actor: the RSS slope (MB/hour) of its longest-lived process after ``warmup_s`` of that process.

    Each process (pid) is fitted on its own: a replacement starts small, and fitting across the
    restart would read the drop as a leak's opposite.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, rows in samples.items():
        by_pid: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for t, pid, mb in rows:
            by_pid[pid].append((t, mb))
        best: dict[str, Any] | None = None
        for pid, points in by_pid.items():
            start = points[0][0]
            kept = [(t, mb) for t, mb in points if t - start >= warmup_s]
            if len(kept) < 3:
                continue
            ts = np.asarray([t for t, _ in kept]) / 3600
            mbs = np.asarray([mb for _, mb in kept])
            slope = float(np.polyfit(ts, mbs, 1)[0])
            span_s = kept[-1][0] - kept[0][0]
            row = {
                "pid": pid,
                "slope_mb_per_h": round(slope, 2),
                "fitted_s": round(span_s, 1),
                "rss_mb_first": kept[0][1],
                "rss_mb_last": kept[-1][1],
                "samples": len(kept),
            }
            if best is None or span_s > best["fitted_s"]:
                best = row
        if best is not None:
            out[name] = best
    return out


def judge(settings: Settings, produced: dict[str, int], t_start: float) -> dict[str, Any]:
    """Lost and counted-twice frames, latency per minute and the largest snapshot, from what Kafka holds."""
    # Latency runs from when the producer published a frame (its capture stamp is media time for a
    # recording, the tracker's clock): taken from the frame's metadata on C.
    published: dict[tuple[str, int], float] = {}
    for r in read_all(settings.kafka, settings.topics.detections.name, timeout_s=600):
        try:
            item = decode_detections(r.value)
        except DecodeError:
            continue
        if isinstance(item, FrameDetections):
            published.setdefault((item.meta.stream_id, item.meta.frame_index), item.meta.published_at)
    updates: Counter[tuple[str, int]] = Counter()
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    latency_by_minute: dict[int, list[float]] = defaultdict(list)
    for r in read_all(settings.kafka, settings.topics.counts.name, timeout_s=600):
        try:
            update = decode_json(r.value)
        except DecodeError:
            continue
        if update.get("type") != "count":
            continue
        key = (str(update["stream_id"]), int(update["frame_index"]))
        by_stream[key[0]].append(update)
        updates[key] += 1
        if updates[key] == 1 and r.timestamp and key in published:
            counted = r.timestamp / 1000
            latency_by_minute[int((counted - t_start) // 60)].append((counted - published[key]) * 1000)
    # Judged as `vapipe chaos` judges: a count record sent again is not a frame counted twice.
    table = read_table(settings)
    verdicts = [count_verdict(by_stream[sid], n, table.get(sid)) for sid, n in produced.items()]
    lost = sum(v["lost"] for v in verdicts)
    twice = sum(v["counted_twice"] for v in verdicts)
    snapshot_sizes = [
        len(r.value) for r in read_all(settings.kafka, settings.topics.counts_changelog.name, timeout_s=600) if r.value
    ]
    dead = read_all(settings.kafka, settings.topics.dead_letter.name, timeout_s=120)
    return {
        "frames_produced": sum(produced.values()),
        "frames_counted": len(updates),
        "lost": lost,
        "counted_twice": twice,
        "duplicates_on_counts": sum(v["duplicates_on_counts"] for v in verdicts),
        "largest_snapshot_bytes": max(snapshot_sizes, default=0),
        "changelog_records_read_at_end": len(snapshot_sizes),
        "dead_lettered": len(dead),
        "latency_p99_ms_by_minute": [
            {
                "minute": m,
                "p99_ms": round(float(np.percentile(v, 99)), 1),
                "p50_ms": round(float(np.percentile(v, 50)), 1),
                "n": len(v),
            }
            for m, v in sorted(latency_by_minute.items())
            if m >= 0
        ],
    }


def soak(
    settings: Settings,
    minutes: float,
    streams: int = 3,
    fps: float = 3.0,
    poison_every_s: float = 60.0,
    kill_every_s: float = 180.0,
    sample_every_s: float = 10.0,
    warmup_s: float | None = None,
    on_progress: Any = None,
) -> dict[str, Any]:
    """Run the soak and return its result (see the module docstring)."""
    check_broker(settings.kafka)
    duration_s = minutes * 60
    frames = max(1, int(fps * duration_s))
    warm = warmup_s if warmup_s is not None else min(300.0, duration_s / 5)
    s = isolated(settings)
    s = s.model_copy(
        update={
            "output_dir": str(Path(settings.output_dir) / "soak" / uuid.uuid4().hex[:8]),
            "producer": s.producer.model_copy(update={"fps": fps, "max_frames": frames}),
            "crops": s.crops.model_copy(update={"min_confidence": 0.95}),  # a few crops a frame, not a disk's worth
            "counting": s.counting.model_copy(update={"checkpoint_interval_s": min(s.counting.checkpoint_interval_s, 10.0)}),
        }
    )
    still = demo_image_path()
    sources = [parse_source(f"pan:{still}:{frames}", stream_id=f"soak{i}") for i in range(streams)]
    schedule = SoakSchedule(
        s, [src.stream_id for src in sources], poison_every_s, kill_every_s, sample_every_s, faults_until_s=duration_s
    )
    plan = RunPlan(
        sources=sources,
        replicas={"inter": 1, "crop": 1, "count": 2},
        include_dashboard=False,
        allow_calibration=True,
        stall_timeout_s=300,
    )
    t_start = time.time()
    try:
        summary = run_pipeline(s, plan, on_progress=on_progress, on_tick=schedule).to_dict()
        produced = {sid: int(row["produced"]) for sid, row in summary["per_stream"].items()}
        verdict = judge(s, produced, t_start)
    finally:
        schedule.close()
        delete_topics(s.kafka, [getattr(s.topics, k).name for k in TOPIC_KEYS])
    slopes = rss_slopes(schedule.rss, warm)
    restores = [k["restore_s"] for k in schedule.kills if k["restore_s"] is not None]
    restores += [k["survivor_restore_s"] for k in schedule.kills if k["survivor_restore_s"] is not None]
    result = {
        "benchmark": "soak",
        "minutes": minutes,
        "streams": streams,
        "fps_per_stream": fps,
        "poison_every_s": poison_every_s,
        "kill_every_s": kill_every_s,
        "warmup_s": warm,
        "wall_s": summary["wall_s"],
        **verdict,
        "poisons_injected": len(schedule.poisons),
        "kills": schedule.kills,
        "restore_s_max": max(restores, default=None),
        "rss": slopes,
        "rss_samples": {k: v for k, v in schedule.rss.items()},
        "rss_slope_max_mb_per_h": max((r["slope_mb_per_h"] for r in slopes.values()), default=None),
        **environment(s),
    }
    result["targets_met"] = targets_met(result)
    return result


def targets_met(result: dict[str, Any]) -> dict[str, bool]:
    """Each of issue 12's targets: met or not (None figures, e.g. no kill in a short run, count as met)."""
    slope = result["rss_slope_max_mb_per_h"]
    restore = result["restore_s_max"]
    return {
        "rss_slope": slope is None or slope < TARGETS["rss_slope_mb_per_h"],
        "largest_snapshot": result["largest_snapshot_bytes"] <= TARGETS["largest_snapshot_bytes"],
        "restore": restore is None or restore < TARGETS["restore_s"],
        "lost": result["lost"] == TARGETS["lost"],
        "counted_twice": result["counted_twice"] == TARGETS["counted_twice"],
    }


def write_soak_report(result: dict[str, Any], folder: Path, command: str) -> Path:
    """soak.json, soak.png (RSS per actor, p99 latency per minute) and README.md in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "soak.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), dpi=80)
    for name, rows in sorted(result["rss_samples"].items()):
        axes[0].plot([t / 60 for t, _, _ in rows], [mb for _, _, mb in rows], ".-", ms=2, lw=0.8, label=name)
    for kill in result["kills"]:
        axes[0].axvline(kill["t"] / 60, color="grey", ls=":", lw=0.8)
    axes[0].set(xlabel="minutes (dotted: a count replica killed)", ylabel="RSS (MB)", title="RSS per actor")
    axes[0].legend(fontsize=6, ncol=2)
    lat = result["latency_p99_ms_by_minute"]
    axes[1].plot([r["minute"] for r in lat], [r["p99_ms"] for r in lat], "o-", ms=3, label="p99")
    axes[1].plot([r["minute"] for r in lat], [r["p50_ms"] for r in lat], "o-", ms=3, label="p50")
    axes[1].set(xlabel="minute", ylabel="publish to count (ms)", title="latency per minute", yscale="log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(folder / "soak.png")
    plt.close(fig)
    met = result["targets_met"]
    lines = [
        "# Soak",
        "",
        f"`{command}`",
        "",
        f"{result['minutes']} minutes, {result['streams']} streams at {result['fps_per_stream']} f/s (model "
        f"`{result['model']}`), one poison record every {result['poison_every_s']:g} s, a count replica killed every "
        f"{result['kill_every_s']:g} s. Machine: {result['machine']}.",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
        f"| RSS slope, worst actor (MB/hour after {result['warmup_s']:g} s warm-up) | {result['rss_slope_max_mb_per_h']} | < 5 | {met['rss_slope']} |",
        f"| largest changelog value (bytes) | {result['largest_snapshot_bytes']} | <= 4096 | {met['largest_snapshot']} |",
        f"| slowest restore after a kill (s) | {result['restore_s_max']} | < 5 | {met['restore']} |",
        f"| frames lost (of {result['frames_produced']}) | {result['lost']} | 0 | {met['lost']} |",
        f"| frames counted twice | {result['counted_twice']} | 0 | {met['counted_twice']} |",
        f"| poison records injected / records dead-lettered | {result['poisons_injected']} / {result['dead_lettered']} | equal | "
        f"{result['poisons_injected'] == result['dead_lettered']} |",
        "",
        "## RSS per actor (longest-lived process, after warm-up)",
        "",
        "| actor | pid | MB/hour | fitted (s) | first MB | last MB |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {r['pid']} | {r['slope_mb_per_h']} | {r['fitted_s']} | {r['rss_mb_first']} | {r['rss_mb_last']} |"
            for name, r in sorted(result["rss"].items())
        ],
        "",
        "## Kills",
        "",
        "| at (s) | killed | replacement | its restore (s) | survivor's restore (s) | replacement restored after (s) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {k['t']} | {k['killed']} | {k['replacement']} | {k['restore_s']} | {k['survivor_restore_s']} | {k['restored_after_s']} |"
            for k in result["kills"]
        ],
        "",
        "## Latency per minute (publish to count, ms)",
        "",
        "| minute | p50 | p99 | frames |",
        "|---|---|---|---|",
        *[f"| {r['minute']} | {r['p50_ms']} | {r['p99_ms']} | {r['n']} |" for r in lat],
        "",
        "![RSS and latency](soak.png)",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
    return folder
