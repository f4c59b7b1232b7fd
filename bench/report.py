"""Write a benchmark's results: JSON, CSV, small PNG plots and a markdown report with the exact command."""

from __future__ import annotations

import csv
import json
import logging
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

logger = logging.getLogger(__name__)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scaling_plots(result: dict[str, Any], out: Path) -> list[str]:
    plt = _plt()
    table = result["table"]
    reps = [str(t["replicas"]) for t in table]
    mode = result["benchmark"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=80)
    ax = axes[0]
    ax.bar(reps, [t["wall_s_mean"] for t in table], yerr=[t["wall_s_std"] for t in table], capsize=4, color="#4c72b0")
    ax.set(xlabel="replicas per stage", ylabel="end-to-end time (s)", title=f"{mode} scaling: time")
    ax = axes[1]
    if mode == "strong":
        ax.plot(reps, [t["speedup"] for t in table], "o-", label="measured")
        ax.plot(reps, [int(r) for r in reps], "--", color="grey", label="ideal")
        ax.set(ylabel="speedup", title="speedup")
    else:
        ax.plot(reps, [t["time_ratio_to_base"] for t in table], "o-", label="measured")
        ax.axhline(1.0, ls="--", color="grey", label="ideal")
        ax.set_ylim(0, max(1.5, max(t["time_ratio_to_base"] for t in table) * 1.1))
        ax.set(ylabel="time / time at 1 replica", title="weak scaling ratio")
    ax.set_xlabel("replicas per stage")
    ax.legend()
    ax = axes[2]
    for r, timeline in sorted(result["timelines"].items()):
        ax.plot([row["t"] for row in timeline], [row["inter"]["lag"] for row in timeline], label=f"r={r}")
    ax.set(xlabel="seconds", ylabel="InterConsumer lag (records)", title="consumer lag (last repeat)")
    ax.legend()
    fig.tight_layout()
    name = f"{mode}.png"
    fig.savefig(out / name)
    plt.close(fig)
    return [name]


def _sweep_plots(result: dict[str, Any], out: Path) -> list[str]:
    plt = _plt()
    rows = result["rows"]
    labels = [f"{r['factor']}\nb{r['batch']} f{r['input_fps']} q{r['jpeg_quality']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), dpi=80)
    axes[0].bar(labels, [r["fps"] for r in rows], color="#55a868")
    for i, r in enumerate(rows):
        axes[0].text(i, r["fps"], f"{r['agreement']:.2f}", ha="center", va="bottom", fontsize=7)
    axes[0].set(ylabel="frames/s (label: detection agreement)", title="throughput")
    axes[1].bar(labels, [r["latency_p50_ms"] or 0 for r in rows], label="p50")
    axes[1].plot(labels, [r["latency_p99_ms"] or 0 for r in rows], "o", color="black", label="p99")
    axes[1].set(ylabel="capture → count (ms)", title="latency")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png")
    plt.close(fig)
    return ["sweep.png"]


def _compare_plots(result: dict[str, Any], out: Path) -> list[str]:
    """One row per model: throughput, speedup (with ideal) and latency p50/p99 against replicas, a line per engine."""
    plt = _plt()
    table = result["table"]
    models = list(dict.fromkeys(t["model"] for t in table))
    engines = list(dict.fromkeys(t["engine"] for t in table))
    fig, axes = plt.subplots(len(models), 4, figsize=(15, 3.2 * len(models)), dpi=80, squeeze=False)
    for row, model in enumerate(models):
        for i, engine in enumerate(engines):
            pts = [t for t in table if t["model"] == model and t["engine"] == engine]
            reps = [t["replicas"] for t in pts]
            color = f"C{i}"
            axes[row][0].plot(reps, [t["fps_mean"] for t in pts], "o-", color=color, label=engine)
            axes[row][1].plot(reps, [t["speedup"] for t in pts], "o-", color=color, label=engine)
            axes[row][2].plot(reps, [t["latency_p50_ms"] for t in pts], "o-", color=color, label=f"{engine} p50")
            axes[row][2].plot(reps, [t["latency_p99_ms"] for t in pts], "x--", color=color, label=f"{engine} p99")
            axes[row][3].plot(reps, [t["rss_mb_per_worker"] for t in pts], "o-", color=color, label=engine)
        reps = sorted({t["replicas"] for t in table})
        axes[row][1].plot(reps, reps, "--", color="grey", label="ideal")
        short = Path(model).name
        for ax, (ylabel, title) in zip(
            axes[row],
            [
                ("frames/s", "throughput"),
                ("speedup", "speedup"),
                ("capture → count (ms)", "latency"),
                ("peak RSS (MB)", "memory per worker"),
            ],
        ):
            ax.set(xlabel="replicas per stage", ylabel=ylabel, title=f"{title} · {short}")
            ax.set_xticks(reps)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
    return ["compare.png"]


def _ceiling_plots(result: dict[str, Any], out: Path) -> list[str]:
    """Frames/s per consumer (bare loop and pipeline) and total, against replicas."""
    plt = _plt()
    table = result["table"]
    reps = [t["replicas"] for t in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=80)
    for key, label in (("bare_fps", "bare kafka-python loop"), ("pipeline_fps", "InterConsumer (sleep:0ms)")):
        axes[0].plot(reps, [t[key] for t in table], "o-", label=label)
        axes[1].plot(reps, [t[key.replace("fps", "fps_per_consumer")] for t in table], "o-", label=label)
    if any(t.get("end_to_end_fps") for t in table):
        axes[0].plot(reps, [t.get("end_to_end_fps") or 0 for t in table], "s--", label="whole pipeline, end to end")
    axes[0].set(xlabel="replicas", ylabel="frames/s", title="total")
    axes[1].set(xlabel="replicas", ylabel="frames/s", title="per consumer")
    for ax in axes:
        ax.set_xticks(reps)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ceiling.png")
    plt.close(fig)
    return ["ceiling.png"]


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out_dir: str | Path, command: list[str] | None = None) -> Path:
    """Write ``<out>/<bench>.json``, ``.csv``, PNG plot(s) and ``README.md``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result["benchmark"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    rows = result.get("rows") or [result]
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in rows]
    with open(out / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        writer.writeheader()
        writer.writerows(flat)
    plots: list[str] = []
    if name in ("strong", "weak"):
        plots = _scaling_plots(result, out)
    elif name == "sweep":
        plots = _sweep_plots(result, out)
    elif name == "compare":
        plots = _compare_plots(result, out)
    elif name == "ceiling":
        plots = _ceiling_plots(result, out)
    cmd = " ".join(shlex.quote(a) for a in (command or ["vapipe", *sys.argv[1:]]))
    md = [
        f"# {name} benchmark",
        "",
        f"Command: `{cmd}`",
        "",
        f"Run: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; machine: {result.get('machine')}; "
        f"model: `{result.get('model')}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(result.get("versions", {}).items())),
        "",
    ]
    if "table" in result:
        md += ["## Summary", "", _md_table(result["table"]), ""]
    profile = result.get("profile")
    if profile:
        md += [
            "## Profile of one InterConsumer (cProfile, per frame)",
            "",
            f"Own time of every function: {profile['total_us_per_frame']} µs per frame "
            f"(under cProfile, which inflates Python calls). Cumulative time of the main steps (µs per frame):",
            "",
            _md_table([profile["buckets"]]),
            "",
            _md_table(profile["top"]),
            "",
        ]
    md += ["## Runs", "", _md_table(flat), ""]
    md += [f"![{p}]({p})" for p in plots]
    (out / "README.md").write_text("\n".join(md) + "\n")
    return out
