"""``vapipe bench autoscale``: a step load (1 camera, then 3, then 1) against InterConsumers that scale on lag.

One run: camera ``a`` publishes a video at ``fps`` from the start; cameras ``b`` and ``c`` publish
``step_frames`` frames each (a folder of the video's first frames) from ``step_at_s``. The
calibration detector is sized so one InterConsumer keeps up with one camera. The report shows
input rate, replicas and lag in seconds over time, the scale events, how long lag took to come back
under target after each step, and (from what Kafka holds, as ``vapipe chaos`` judges) frames lost
and counted twice.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from actors.launcher import RunPlan
from actors.ray.engine import run_pipeline
from bench.chaos import verify
from bench.experiments import TOPIC_KEYS, environment, isolated
from cluster.topics import delete_topics
from pipeline.config import Settings
from pipeline.sources import parse_source

__all__ = ["autoscale_bench", "recovery_after", "write_autoscale_report", "scrape", "write_board"]

logger = logging.getLogger(__name__)


def scrape(url: str) -> dict[str, float]:
    """One scrape of a /metrics endpoint: ``name{label="v",...}`` -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def _quantile(row: dict[str, float], prev: dict[str, float], name: str, q: float, match: str = "") -> float | None:
    """Prometheus' histogram_quantile over the increase between two scrapes (linear within a bucket)."""
    buckets = []
    for key, value in row.items():
        if key.startswith(f"{name}_bucket{{") and match in key:
            le = key.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value - prev.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 0.0)
        lower, below = le, n
    return None


def write_board(scrapes: list[tuple[float, dict[str, float]]], path: Path) -> None:
    """The Grafana board's main panels rendered with matplotlib from the scraped series (Grafana is not
    packaged here): camera and stage frames/s, replicas, lag in seconds, end-to-end and inference latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(prefix: str) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for t, row in scrapes:
            for key, value in row.items():
                if key.startswith(prefix + "{"):
                    out.setdefault(key[len(prefix) :], []).append((t, value))
        return out

    def rate(prefix: str, by: str) -> dict[str, list[tuple[float, float]]]:
        per: dict[str, dict[float, float]] = {}
        for t, row in scrapes:
            for key, value in row.items():
                if key.startswith(prefix + "{") and f'{by}="' in key:
                    label = key.split(f'{by}="')[1].split('"')[0]
                    per.setdefault(label, {})[t] = per.setdefault(label, {}).get(t, 0.0) + value
        out = {}
        for label, points in per.items():
            ts = sorted(points)
            out[label] = [(b, max(points[b] - points[a], 0.0) / (b - a)) for a, b in itertools.pairwise(ts) if b > a]
        return out

    fig, axes = plt.subplots(3, 2, figsize=(12, 8), dpi=80)
    panels = [
        (axes[0][0], "Camera frames/s", series("vapipe_camera_fps"), "frames/s"),
        (axes[0][1], "Stage frames/s", rate("vapipe_stage_frames_total", "stage"), "frames/s"),
        (axes[1][0], "Replicas", series("vapipe_stage_replicas"), "replicas"),
        (axes[1][1], "Consumer lag (seconds)", series("vapipe_consumer_lag_seconds"), "s"),
    ]
    for ax, title, data, unit in panels:
        for label, points in sorted(data.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label.strip("{}").replace('"', ""))
        ax.set(title=title, ylabel=unit)
        ax.legend(fontsize=7)
    pairs = list(zip(scrapes, scrapes[5:], strict=False))  # quantiles over 5-scrape windows, like rate(...[5s])
    for ax, title, name, match in (
        (axes[2][0], "End-to-end latency (publish to count)", "vapipe_e2e_latency_seconds", ""),
        (axes[2][1], "InterConsumer inference time per frame", "vapipe_inference_seconds", 'phase="inference"'),
    ):
        for q in (0.5, 0.99):
            points = [(b[0], _quantile(b[1], a[1], name, q, match)) for a, b in pairs]
            ax.plot([t for t, v in points if v is not None], [v for _, v in points if v is not None], label=f"p{int(q * 100)}")
        ax.set(title=title, ylabel="s", xlabel="seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _frames_folder(video: str, folder: Path, n: int) -> str:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(video)
    try:
        for i in range(n):
            ok, image = cap.read()
            if not ok:
                break
            cv2.imwrite(str(folder / f"{i:05d}.jpg"), image)
    finally:
        cap.release()
    return str(folder)


def recovery_after(samples: list[dict[str, Any]], step_t: float, target_s: float) -> float | None:
    """Seconds from a step until lag, having risen above target after it, is back under target;
    0 if it never rose, None if it never came back."""
    window = [r for r in samples if r["t"] >= step_t]
    first_above = next((i for i, r in enumerate(window) if r["lag_s"] > target_s), None)
    if first_above is None:
        return 0.0
    back = next((r["t"] for r in window[first_above:] if r["lag_s"] <= target_s), None)
    return None if back is None else round(back - step_t, 1)


def autoscale_bench(
    settings: Settings,
    video: str,
    model: str,
    fps: float,
    step_at_s: float,
    step_frames: int,
    max_replicas: int,
    target_lag_s: float,
    cooldown_s: float,
    on_progress: Any = None,
) -> dict[str, Any]:
    """One step-load run; returns the result dict the report is written from."""
    s = isolated(settings)
    auto = s.inter.autoscale.model_copy(
        update={"enabled": True, "min": 1, "max": max_replicas, "target_lag_s": target_lag_s, "cooldown_s": cooldown_s}
    )
    s = s.model_copy(
        update={
            "inter": s.inter.model_copy(update={"autoscale": auto, "replicas": 1}),
            "model": s.model.model_copy(update={"name": model}),
            "producer": s.producer.model_copy(update={"fps": fps, "max_frames": None}),
            "metrics": s.metrics.model_copy(update={"port": 0}),
        }
    )
    step = _frames_folder(video, Path(s.output_dir) / "bench-autoscale" / "step", step_frames)
    plan = RunPlan(
        sources=[parse_source(f"a={video}"), parse_source(f"b={step}"), parse_source(f"c={step}")],
        replicas={"inter": 1, "crop": 1, "count": 1},
        include_dashboard=False,
        allow_calibration=True,
        start_after_s={"b": step_at_s, "c": step_at_s},
    )
    try:
        summary = run_pipeline(s, plan, on_progress=on_progress).to_dict()
        streams = {sid: verify(s, sid, row["produced"]) for sid, row in summary["per_stream"].items()}
    finally:
        delete_topics(s.kafka, [getattr(s.topics, k).name for k in TOPIC_KEYS])
    samples = summary["autoscale"]["samples"]
    # Steps on the run's clock: the producers start about when the samples do.
    step_down_t = step_at_s + step_frames / fps
    return {
        "benchmark": "autoscale",
        "command": "vapipe " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "video": video,
        "fps_per_camera": fps,
        "step_at_s": step_at_s,
        "step_down_at_s": step_down_t,
        "step_frames": step_frames,
        "autoscale": summary["autoscale"]["config"],
        "events": summary["autoscale"]["events"],
        "samples": samples,
        "max_replicas_reached": max((r["replicas"] for r in samples), default=0),
        "final_replicas": samples[-1]["replicas"] if samples else None,
        "lag_back_under_target_s": {
            "step_up": recovery_after(samples, step_at_s, target_lag_s),
            "step_down": recovery_after(samples, step_down_t, target_lag_s),
        },
        "streams": streams,
        "lost": sum(v["lost"] for v in streams.values()),
        "counted_twice": sum(v["counted_twice"] for v in streams.values()),
        "duplicates_on_c": sum(v["duplicates_on_c"] for v in streams.values()),
        "frames_produced": summary["frames_produced"],
        "frames_per_s": summary["frames_per_s"],
        "count_latency_ms": summary["count_latency_ms"],
        **environment(s),
    }


def write_autoscale_report(result: dict[str, Any], out: Path) -> None:
    """autoscale.json, autoscale.csv (one sample a second), autoscale.png and README.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale.json").write_text(json.dumps(result, indent=2) + "\n")
    samples = result["samples"]
    with (out / "autoscale.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]) if samples else ["t"])
        writer.writeheader()
        writer.writerows(samples)
    t = [r["t"] for r in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), dpi=80, sharex=True)
    axes[0].plot(t, [r["input_fps"] for r in samples], color="#4c72b0")
    axes[0].set(ylabel="input frames/s", title="step load: 1 camera, 3, then 1")
    axes[1].step(t, [r["replicas"] for r in samples], where="post", color="#55a868", label="launched")
    axes[1].step(t, [r["ready"] for r in samples], where="post", color="#c44e52", ls="--", label="consuming")
    axes[1].set(ylabel="InterConsumers")
    axes[1].legend()
    axes[2].plot(t, [r["lag_s"] for r in samples], color="#8172b2")
    axes[2].axhline(result["autoscale"]["target_lag_s"], ls="--", color="grey", label="target")
    axes[2].set(ylabel="lag (s)", xlabel="seconds")
    axes[2].legend()
    for ax in axes:
        ax.axvline(result["step_at_s"], color="black", lw=0.5)
        ax.axvline(result["step_down_at_s"], color="black", lw=0.5)
    fig.tight_layout()
    fig.savefig(out / "autoscale.png")
    plt.close(fig)
    events = "\n".join(f"| {e['t']:.1f} | {e['change']} | {e['replicas']} | {e['why']} |" for e in result["events"])
    back = result["lag_back_under_target_s"]
    extras = ""
    if (out / "board.png").exists():
        extras += "\nThe Grafana board's panels, rendered with matplotlib from the run's /metrics scraped once a second:\n\n![board](board.png)\n"
    if (out / "top.txt").exists():
        extras += (
            "\n`vapipe top` at the peak (the same view, rendered from the same reports):\n\n```\n"
            + (out / "top.txt").read_text()
            + "```\n"
        )
    (out / "README.md").write_text(
        f"""# Autoscaling InterConsumers on lag

```
{result["command"]}
```

Step load: camera `a` at {result["fps_per_camera"]:g} frames/s from the start; cameras `b` and `c`
({result["step_frames"]} frames each) from {result["step_at_s"]:g} s to about {result["step_down_at_s"]:g} s.
Detector `{result["model"]}`; autoscale `{json.dumps(result["autoscale"])}`.
Machine: {result["machine"]}.

![input rate, replicas and lag over time](autoscale.png)

| t (s) | change | replicas after | why |
|---|---|---|---|
{events}

| figure | value |
|---|---|
| most InterConsumers | {result["max_replicas_reached"]} |
| InterConsumers at the end | {result["final_replicas"]} |
| lag back under target after the step up | {back["step_up"]} s |
| lag back under target after the step down | {back["step_down"]} s |
| frames produced | {result["frames_produced"]} |
| lost | {result["lost"]} |
| counted twice | {result["counted_twice"]} |
| duplicates on C | {result["duplicates_on_c"]} |
| latency p50 / p99 (publish to count) | {result["count_latency_ms"].get("p50")} / {result["count_latency_ms"].get("p99")} ms |

Samples (one a second: replicas, ready, lag_s, busy, input_fps) in `autoscale.csv`; everything in `autoscale.json`.
{extras}"""
    )
