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
        self.partition_lag: dict[str, int] = {}
        """The same, per input partition (its number as a string)."""
        self.lag_s: float | None = None
        """How long the oldest record of the last polled batch had waited in Kafka (0 once a poll finds nothing)."""
        self._busy: deque[tuple[float, float]] = deque(maxlen=256)
        """(end, seconds) of the latest batches handled, for ``busy``."""
        self.started_at: float | None = None

    def batch_done(self, records: int) -> None:
        with self._lock:
            self.counters["records_in"] += records
            self._rate.append((time.monotonic(), self.counters["frames_in"]))

    def rollback(self, before: dict[str, int]) -> None:
        """Undo what a failed batch counted: it is counted again when it succeeds."""
        self.counters.clear()
        self.counters.update(before)

    def position(self, assigned: int, lag: int | None, per_partition: dict[str, int] | None = None) -> None:
        self.assigned = assigned
        self.lag = lag
        if per_partition is not None:
            self.partition_lag = per_partition

    def polled(self, timestamps_ms: list[int]) -> None:
        """A poll returned records with these Kafka timestamps (or none): the time lag, from the
        records themselves as the best lag exporters give it, not estimated from offsets."""
        if not timestamps_ms:
            self.lag_s = 0.0
            return
        self.lag_s = round(max(time.time() - min(timestamps_ms) / 1000, 0.0), 3)

    def handled(self, started: float) -> None:
        """A batch was processed from ``started`` (monotonic) to now: counts toward ``busy``."""
        now = time.monotonic()
        with self._lock:
            self._busy.append((now, now - started))

    def busy(self, window_s: float = 10.0) -> float:
        """Fraction of the last ``window_s`` spent processing batches (0 when idle): how loaded a replica is.

        Processing only, not the batch's commit: that cost is per batch, so it shrinks per frame as
        load grows and batches fill, and would make a lightly loaded stage look busier than it is."""
        now = time.monotonic()
        with self._lock:
            spent = sum(min(d, window_s - (now - end)) for end, d in self._busy if now - end < window_s)
        return round(min(max(spent / window_s, 0.0), 1.0), 3)

    def fps(self) -> float:
        with self._lock:
            if len(self._rate) < 2:
                return 0.0
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def uptime_s(self) -> float:
        return round(time.time() - self.started_at, 1) if self.started_at else 0.0
