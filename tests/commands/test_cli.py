"""The command line as a user meets it: one `error:` line and exit 1 when the broker is unreachable."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

COMMANDS = {
    "topics create": ["topics", "create"],
    "topics list": ["topics", "list"],
    "topics describe": ["topics", "describe"],
    "counts": ["counts"],
    "produce": ["produce", "--source", "demo", "--max-frames", "1"],
    "annotate": ["annotate", "hw", "-o", os.devnull],
}


@pytest.fixture(scope="module")
def unreachable_runs() -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """Every command against a dead address, started together (each waits out its connect timeout)."""
    env = dict(os.environ, VAPIPE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1", VAPIPE_KAFKA__CONNECT_TIMEOUT_S="2")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in COMMANDS.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    yield done


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_commands_fail_on_unreachable_broker_after_the_connect_timeout(
    command: str, unreachable_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    proc = unreachable_runs[command]
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err and "127.0.0.1:1 (waited 2s)" in err[-1] and err[-1].startswith("error:")
    assert "Traceback" not in proc.stderr


def test_help_lists_every_command_group() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("run", "produce", "status", "counts", "annotate", "demo", "chaos", "kafka", "topics", "bench", "streams"):
        assert command in proc.stdout
