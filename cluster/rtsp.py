"""A real RTSP camera on this machine: ``scripts/rtsp_server.py`` (GStreamer's RTSP server) as a subprocess.

Tests and ``vapipe bench latency`` point live sources at it. It can be stopped and started again
on the same port (a camera that drops out) and frozen (``SIGSTOP``: it keeps the connection and
sends nothing, as a hung camera does). It runs under the system Python, whose python3-gi and
GStreamer packages ``make setup`` installs (``scripts/system_deps.sh``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipelineError

__all__ = ["RtspServer", "SYSTEM_PYTHON", "SERVER_SCRIPT", "check_rtsp_server"]

logger = logging.getLogger(__name__)

SYSTEM_PYTHON = os.environ.get("VAPIPE_SYSTEM_PYTHON", "/usr/bin/python3")
"""The interpreter with Debian's python3-gi (the project's virtualenv has no GStreamer bindings)."""
SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rtsp_server.py"
_PROBE = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
    "from gi.repository import Gst; Gst.init(None); "
    "missing = [e for e in ('appsrc', 'x264enc', 'rtph264pay', 'decodebin') if Gst.ElementFactory.find(e) is None]; "
    "print(','.join(missing))"
)


def check_rtsp_server() -> None:
    """Raise PipelineError, in one line, when the RTSP server cannot run here."""
    try:
        out = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PipelineError(f"the RTSP test server needs {SYSTEM_PYTHON} with python3-gi: {exc}") from None
    if out.returncode != 0 or out.stdout.strip():
        what = out.stdout.strip() or (out.stderr.strip().splitlines() or ["?"])[-1]
        raise PipelineError(f"the RTSP test server cannot run ({what}): run `make setup` as root (scripts/system_deps.sh)")


class RtspServer:
    """One looped video served at ``rtsp://[user:password@]127.0.0.1:<port><path>``.

    Example:
        >>> with RtspServer(video, port=8554, fps=10) as server:
        ...     server.stop(); time.sleep(5); server.start()   # the camera was away for 5 s
    """

    def __init__(
        self,
        video: str,
        port: int,
        path: str = "/live",
        fps: int = 25,
        user: str | None = None,
        password: str | None = None,
        frames: int | None = None,
        log: Path | None = None,
    ) -> None:
        self.video, self.port, self.path, self.fps = video, port, path, fps
        self.user, self.password, self.frames = user, password, frames
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self._log_file: IO[str] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"rtsp://{auth}127.0.0.1:{self.port}{self.path}"

    def start(self, timeout_s: float = 30.0) -> RtspServer:
        """Start serving; returns once the server listens.

        Raises:
            PipelineError: it exited or did not become ready in ``timeout_s``.
        """
        if self.proc is not None:
            return self
        cmd = [SYSTEM_PYTHON, str(SERVER_SCRIPT), self.video, "--port", str(self.port), "--path", self.path]
        cmd += ["--fps", str(self.fps)]
        if self.frames:
            cmd += ["--frames", str(self.frames)]
        if self.user:
            cmd += ["--user", self.user, "--password", self.password or ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:  # exited
                break
            lines.append(line.strip())
            if line.startswith("READY"):
                self._drain_output()
                return self
        self.stop()
        raise PipelineError(f"RTSP server on port {self.port} did not start: {' | '.join(lines[-3:]) or 'no output'}")

    def _drain_output(self) -> None:
        """Keep reading the server's output (to a log file or nowhere) so it never blocks on a full pipe."""
        import threading

        proc = self.proc
        assert proc is not None and proc.stdout is not None
        sink = self.log.open("a") if self.log else None
        self._log_file = sink

        def pump(stream: Any) -> None:
            for line in stream:
                if sink is not None and not sink.closed:
                    sink.write(line)
                    sink.flush()

        threading.Thread(target=pump, args=(proc.stdout,), daemon=True).start()

    def stop(self) -> None:
        """Stop serving (clients see the connection drop); ``start`` serves again on the same port."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
            proc.terminate()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def freeze(self) -> None:
        """The server stops sending but keeps every connection open (SIGSTOP), as a hung camera does."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
