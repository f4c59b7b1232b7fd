"""The Grafana board and the Prometheus config in the repo name only metrics vapipe exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from pipeline.metrics import METRICS

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_every_panel_queries_exported_metrics_and_every_metric_has_a_panel() -> None:
    board = json.loads((CLUSTER / "grafana" / "vapipe-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bvapipe_[a-z0-9_]+", e)}
    exported = set(METRICS) | {f"{n}_bucket" for n, (kind, _, _) in METRICS.items() if kind == "histogram"}
    assert used <= exported, used - exported
    base = {re.sub(r"_bucket$", "", m) for m in used}
    missing = (
        set(METRICS)
        - base
        - {
            "vapipe_frames_published_total",
            "vapipe_poison_records_total",
            "vapipe_detections_total",
            "vapipe_crops_total",
            "vapipe_stage_fps",
        }
    )
    assert not missing, f"no panel for {missing}"


def test_prometheus_config_scrapes_the_default_metrics_port() -> None:
    config = yaml.safe_load((CLUSTER / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
