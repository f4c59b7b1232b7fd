"""A stage worker's counters, rate and position, read by the driver while the loop runs.

Counters change on the loop's thread and are read from another (Ray answers ``stats`` on its
own thread), so only committed batches move them and the rate window is locked.
"""

from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["StageMeter"]


class StageMeter:
    """Counters of committed work, frames/s over the last ~30 batches, and the consumer's position."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "records_in",
                "frames_in",
                "frames_out",
                "poison",
                "dead_lettered",
                "skip_markers",
                "commit_failures",
                "retries",
            ),
            0,
        )
        self._rate: deque[tuple[float, int]] = deque(maxlen=30)
        self._lock = threading.Lock()
        self.assigned = 0
        """Partitions this worker owns, as of its last poll."""
        self.lag: int | None = None
        """Records left in those partitions."""
        self.started_at: float | None = None

    def batch_done(self, records: int) -> None:
        with self._lock:
            self.counters["records_in"] += records
            self._rate.append((time.monotonic(), self.counters["frames_in"]))

    def rollback(self, before: dict[str, int]) -> None:
        """Undo what a failed batch counted: it is counted again when it succeeds."""
        self.counters.clear()
        self.counters.update(before)

    def position(self, assigned: int, lag: int | None) -> None:
        self.assigned = assigned
        self.lag = lag

    def fps(self) -> float:
        with self._lock:
            if len(self._rate) < 2:
                return 0.0
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def uptime_s(self) -> float:
        return round(time.time() - self.started_at, 1) if self.started_at else 0.0
