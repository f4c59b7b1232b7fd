"""Three hosts for real: network namespaces on a bridge, 3 Kafka brokers on host1, the Ray head on
host2, a Ray worker with a GPU on host3 (cluster/lab.py). One lab for the module, set up and torn
down here; the driver runs on host2 as a person would run it after `ray attach`.

The detector is the synthetic calibration model: where the actors run and what a fault loses do not
depend on what is detected. Needs root for `ip netns`: a machine without it fails (never skips).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.lab import Lab, LabSpec, lab_overrides
from pipeline.config import Settings
from tests.conftest import ROOT, _missing

pytestmark = [pytest.mark.kafka, pytest.mark.ray, pytest.mark.lab, pytest.mark.slow]

MODEL = "synthetic:20ms"
LAB_TEST_FAULTS = ["kill-broker", "kill-gpu-host", "partition", "zombie"]
"""Every lab fault. A batch whose transaction coordinator was the killed broker waits
``kafka.ack_timeout_s`` (10 s here, 60 s by default) before a new producer settles it."""
FRAMES = 30


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        _missing("the lab needs root and iproute2 (`ip netns`)")
    # Its own names and /24 per test session (the test port tells sessions apart), all in 198.18.0.0/15.
    port = int(os.environ.get("VAPIPE_TEST_PORT", "19092"))
    spec = LabSpec(tag=f"t{port % 10000}", subnet=f"198.19.{port % 250}", state_dir=str(tmp_path_factory.mktemp("lab")))
    lab = Lab(spec)
    try:
        lab.up()
    except Exception as exc:
        lab.down()
        _missing(f"the lab did not come up: {exc}")
    try:
        yield lab
    finally:
        lab.down()
        assert not lab.is_up()


def vapipe(lab: Lab, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """`vapipe ...` on host2, the Ray head."""
    argv = lab.exec_argv("host2", [sys.executable, str(ROOT / "cli.py"), *args])
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def lab_run(
    lab: Lab, out: Path, video: str, *args: str, settings: list[str] | None = None, timeout_s: float = 240
) -> subprocess.CompletedProcess[str]:
    """`vapipe run` of ``video`` on the lab with the calibration detector, outputs in ``out``."""
    sets = [x for value in [f"output_dir={out}", *(settings or [])] for x in ("--set", value)]
    run = ["run", "-s", video, "--model", MODEL, "--calibration", *args]
    return vapipe(lab, "--config", str(lab.settings_file), *sets, *run, timeout_s=timeout_s)


def test_lab_overrides_place_every_stage_on_its_host() -> None:
    spec = LabSpec(subnet="198.18.5", brokers=3, inter_per_gpu=2)
    o = lab_overrides(spec)
    assert o["kafka"]["bootstrap_servers"] == "198.18.5.1:9092,198.18.5.1:9094,198.18.5.1:9096"
    assert o["ray"]["address"] == "198.18.5.2:6379"
    assert o["inter"] == {"num_gpus": 0.5}
    assert o["count"]["resources"] == {"node:198.18.5.2": 0.01} and o["producer"]["resources"] == {"node:198.18.5.1": 0.01}
    assert all(t["replication_factor"] == 3 and t["config"]["min.insync.replicas"] == "2" for t in o["topics"].values())
    # Every topic of the run, the streams control topic too: one broker down must stop none of them.
    s = Lab(spec).settings(Settings())
    assert {t.name: t.replication_factor for t in s.topics.all()} == {t.name: 3 for t in s.topics.all()}
    assert s.topics.streams.config["cleanup.policy"] == "compact"  # merged into, not replaced
    with pytest.raises(Exception, match="198.18.0.0/15"):
        LabSpec(subnet="10.0.0")


def test_three_brokers_form_one_cluster_and_topics_replicate_three_times(lab: Lab) -> None:
    from cluster.clients import check_broker
    from cluster.topics import create_topics, describe_topics

    s = lab.settings(Settings())
    assert len(check_broker(s.kafka)["brokers"]) == 3
    spec = s.topics.frames.model_copy(update={"name": "lab-replicated"})
    create_topics(s.kafka, [spec])
    assert [t.replication_factor for t in describe_topics(s.kafka, ["lab-replicated"])] == [3]
    # The brokers advertise host1's address: clients on every host reach them over the bridge.
    assert all(node.bootstrap.startswith(lab.spec.address("host1")) for node in lab.kafka().nodes)


def test_inter_consumers_land_on_the_gpu_host_and_end_stages_do_not(lab: Lab, highway: str, tmp_path: Path) -> None:
    proc = lab_run(
        lab,
        tmp_path,
        highway,
        "--inter",
        "2",
        "--crop",
        "1",
        "--count",
        "1",
        "--max-frames",
        str(FRAMES),
        "--fps",
        "0",
        "--address",
        lab.spec.head,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The summary file, not stdout: Ray forwards the actors' own output there too.
    (summary_file,) = (tmp_path / "runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    assert summary["frames_produced"] == FRAMES and next(iter(summary["per_stream"].values()))["counted"] == FRAMES
    # Ray's own actor table (state API), not what the actors say of themselves.
    hosts = lab.node_hosts()
    placed: dict[str, str] = {}
    for actor in lab.state_api("actors"):
        if actor.get("name"):
            placed.setdefault(actor["name"], hosts.get(actor["node_id"], "?"))
    inters = {n: h for n, h in placed.items() if n.startswith("inter-")}
    ends = {n: h for n, h in placed.items() if n.startswith(("crop-", "count-"))}
    assert set(inters) == {"inter-0", "inter-1"} and set(inters.values()) == {"host3"}, placed
    assert len(ends) == 2 and "host3" not in ends.values(), placed
    assert {h for n, h in placed.items() if n.startswith("producer-")} == {"host1"}, placed
    # The run's summary says the same.
    by_ip = {lab.spec.address(h): h for h in ("host1", "host2", "host3")}
    assert {n: by_ip.get(a["node"], a["node"]) for n, a in summary["actors"].items()} == {
        n: placed.get(n) for n in summary["actors"]
    }


def test_more_inter_consumers_than_gpu_slots_fail_with_one_line(lab: Lab, highway: str, tmp_path: Path) -> None:
    proc = lab_run(lab, tmp_path, highway, "--inter", "3", "--max-frames", "5", settings=["ray.unplaceable=fail"], timeout_s=120)
    assert proc.returncode == 1
    assert "inter: 3 replicas need GPU 0.5 each, the cluster has 1 (room for 2)" in proc.stderr, proc.stderr[-1500:]


@pytest.fixture(scope="module")
def lab_chaos(lab: Lab, highway: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `vapipe chaos --lab` over the lab faults the suite runs (the partition held 12 s, past the 10 s session)."""
    out = tmp_path_factory.mktemp("lab-chaos")
    proc = vapipe(
        lab,
        "--set",
        f"output_dir={out}",
        "--set",
        "kafka.session_timeout_ms=10000",
        "--set",
        "kafka.heartbeat_interval_ms=1000",
        "--set",
        "producer.fps=15",
        "--set",
        "kafka.ack_timeout_s=10",
        "--set",
        "kafka.request_timeout_ms=8000",
        "chaos",
        "--lab",
        "--faults",
        ",".join(["none", *LAB_TEST_FAULTS]),
        "--lab-state",
        lab.spec.state_dir,
        "--hold",
        "12",
        "--frames",
        "45",
        "--model",
        MODEL,
        "--source",
        highway,
        "--out",
        str(out / "report"),
        timeout_s=540,
    )
    result_file = out / "report" / "chaos.json"
    assert result_file.exists(), (proc.stdout + proc.stderr)[-3000:]
    return {"rc": proc.returncode, "stderr": proc.stderr, **json.loads(result_file.read_text())}


@pytest.mark.parametrize("fault", LAB_TEST_FAULTS)
def test_lab_fault_loses_nothing_and_counts_nothing_twice(fault: str, lab_chaos: dict[str, Any]) -> None:
    rows = {r["fault"]: r for r in lab_chaos["rows"]}
    assert rows["none"]["frames_counted"] == rows["none"]["frames_produced"] > 0, rows["none"]
    row = rows[fault]
    assert not row.get("error"), row
    # A zombie may come back after the run has drained (its successor counted the rest): no recovery to time.
    assert row["injected"] and (row["recovery_s"] is not None or fault == "zombie"), row
    assert row["lost"] == 0 and row["counted_twice"] == 0 and row["duplicates_on_c"] == 0, row
    assert row["frames_counted"] == row["frames_produced"] == rows["none"]["frames_produced"], row
    assert row["crops_match"] and row["table_match"], row
    # InterConsumers were on host3 throughout (after kill-gpu-host: on host3 again).
    assert {h for n, h in row["nodes"].items() if n.startswith("inter-")} == {"host3"}, row["nodes"]
