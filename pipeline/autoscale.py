"""When to add or remove an InterConsumer: a pure controller over lag in seconds and busy fractions.

Kafka gives the load signal for free: how long records wait before a consumer reads them. The
controller adds a replica while that wait stays above ``target_lag_s`` and removes one while the
replicas' summed busy fraction would fit in one replica fewer; ``cooldown_s`` is both how long a
condition must hold and the least time between two scale events (each is a rebalance that pauses
the group). It never acts while a replica it added is not yet consuming. The Ray shell
(``actors.ray.engine.InterAutoscaler``) feeds it once a second and carries out its decisions.

Example:
    >>> from pipeline.config import AutoscaleConfig
    >>> ctl = LagController(AutoscaleConfig(enabled=True, min=1, max=3, target_lag_s=2, cooldown_s=5))
    >>> ctl.decide(ScaleInput(now=0.0, replicas=1, ready=1, lag_s=9.0, busy=1.0))
    0
    >>> ctl.decide(ScaleInput(now=5.0, replicas=1, ready=1, lag_s=9.0, busy=1.0))
    1
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import AutoscaleConfig

__all__ = ["ScaleInput", "LagController"]


@dataclass(frozen=True)
class ScaleInput:
    """One look at the InterConsumers."""

    now: float
    """Seconds on any monotonic clock."""
    replicas: int
    """InterConsumers launched (ready or not)."""
    ready: int
    """Those consuming (their first poll joined the group)."""
    lag_s: float
    """The stage's lag in seconds: the longest wait of the records its replicas last polled."""
    busy: float
    """Summed busy fraction of the ready replicas (2.0 = two replicas that never wait)."""
    room: bool = True
    """The cluster has room for one more replica (or may bring up a node for it)."""


@dataclass
class LagController:
    """Decides +1, -1 or 0 replicas from successive ``ScaleInput`` s; keeps only timestamps."""

    cfg: AutoscaleConfig
    last_change: float | None = None
    behind_since: float | None = None
    idle_since: float | None = None
    reason: str = ""
    """Why the last non-zero decision was taken (for logs and reports)."""

    def decide(self, s: ScaleInput) -> int:
        cfg = self.cfg
        if s.ready < s.replicas:  # a new replica is still starting or joining: lag means little until it does
            self.behind_since = self.idle_since = None
            return 0
        behind = s.lag_s > cfg.target_lag_s
        idle = not behind and s.busy <= (s.replicas - 1) * cfg.idle_busy
        self.behind_since = (self.behind_since if self.behind_since is not None else s.now) if behind else None
        self.idle_since = (self.idle_since if self.idle_since is not None else s.now) if idle else None
        if s.replicas < cfg.min and s.room:
            return self._change(s.now, 1, f"below min {cfg.min}")
        if s.replicas > cfg.max:
            return self._change(s.now, -1, f"above max {cfg.max}")
        if self.last_change is not None and s.now - self.last_change < cfg.cooldown_s:
            return 0
        if self.behind_since is not None and s.now - self.behind_since >= cfg.cooldown_s and s.replicas < cfg.max and s.room:
            return self._change(s.now, 1, f"lag {s.lag_s:.1f}s above {cfg.target_lag_s:g}s for {s.now - self.behind_since:.0f}s")
        if self.idle_since is not None and s.now - self.idle_since >= cfg.cooldown_s and s.replicas > cfg.min:
            return self._change(
                s.now,
                -1,
                f"busy {s.busy:.2f} fits {s.replicas - 1} replica(s) at {cfg.idle_busy:g} for {s.now - self.idle_since:.0f}s",
            )
        return 0

    def _change(self, now: float, delta: int, reason: str) -> int:
        self.last_change = now
        self.behind_since = self.idle_since = None
        self.reason = reason
        return delta
