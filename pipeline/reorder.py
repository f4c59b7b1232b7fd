"""Put one stream's frames back in index order before a stateful stage (tracking) sees them.

Several InterConsumers detect one stream's frames in parallel, so their results
reach the count stage out of order. A tracker needs them in order. This buffer
holds early frames until the missing ones arrive, and steps over an index that
will never come: one the producer marked skipped, one still missing after the
buffer waited ``wait_s`` for it, or any gap once ``max_frames`` frames are waiting.

Time is whatever clock the caller passes in (capture time for replayable
results, arrival time for a live bound on latency); the buffer never reads a
wall clock, so replays and tests are exact. Its state is plain data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

__all__ = ["STATE_VERSION", "Pushed", "Released", "ReorderBuffer"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1

T = TypeVar("T")

Pushed = Literal["buffered", "duplicate", "late"]
"""What happened to a pushed frame: waiting or released in order, seen before, or its index was already stepped over."""


@dataclass(frozen=True)
class Released(Generic[T]):
    """Frames that may now be applied, in index order, and the indices stepped over before them."""

    items: list[tuple[int, T]] = field(default_factory=list)
    stepped_over: list[int] = field(default_factory=list)


@dataclass
class _Waiting(Generic[T]):
    item: T
    since: float
    """The caller's clock when the frame was buffered."""


class ReorderBuffer(Generic[T]):
    """Releases frames of one stream in index order; bounded in size and in waiting time.

    Example:
        >>> buffer = ReorderBuffer[str](wait_s=2.0, max_frames=32)
        >>> buffer.push(1, "b", now=10.0)
        'buffered'
        >>> buffer.release(now=10.0).items
        []
        >>> buffer.push(0, "a", now=10.1)
        'buffered'
        >>> buffer.release(now=10.1).items
        [(0, 'a'), (1, 'b')]
    """

    def __init__(self, wait_s: float, max_frames: int, next_index: int = 0) -> None:
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        if max_frames <= 0:
            raise ValueError(f"max_frames must be > 0, got {max_frames}")
        self.wait_s = wait_s
        self.max_frames = max_frames
        self.next_index = next_index
        """Every index below this was released or stepped over."""
        self.waiting: dict[int, _Waiting[T]] = {}
        self.skipped: set[int] = set()
        """Indices at or above next_index known never to come (the producer skipped them)."""
        self.clock = float("-inf")

    def __len__(self) -> int:
        return len(self.waiting)

    def push(self, index: int, item: T, now: float) -> Pushed:
        """Buffer one frame; call ``release`` afterwards to take out what became ready."""
        self._tick(now)
        if index < self.next_index:
            return "late"
        if index in self.skipped:
            return "late"
        if index in self.waiting:
            return "duplicate"
        self.waiting[index] = _Waiting(item, self.clock)
        return "buffered"

    def skip(self, index: int) -> None:
        """Mark an index that will never come (the producer could not read that frame)."""
        if index >= self.next_index and index not in self.waiting:
            self.skipped.add(index)

    def release(self, now: float, *, flush: bool = False) -> Released[T]:
        """Take out every frame that is ready, in order, stepping over indices not worth waiting for.

        Args:
            now: the caller's clock (never earlier than before; a smaller value is ignored).
            flush: the stream ended: release everything, stepping over every gap.
        """
        self._tick(now)
        items: list[tuple[int, T]] = []
        stepped_over: list[int] = []
        while self.waiting or self.skipped:
            if self.next_index in self.skipped:
                self.skipped.discard(self.next_index)
                stepped_over.append(self.next_index)
                self.next_index += 1
                continue
            ready = self.waiting.pop(self.next_index, None)
            if ready is not None:
                items.append((self.next_index, ready.item))
                self.next_index += 1
                continue
            if not self.waiting:
                break  # only skipped indices further on: nothing to release before them
            first = min(self.waiting)
            oldest = min(w.since for w in self.waiting.values())
            give_up = flush or len(self.waiting) > self.max_frames or self.clock - oldest >= self.wait_s
            if not give_up:
                break
            stepped_over.extend(range(self.next_index, first))
            self.skipped = {i for i in self.skipped if i >= first}
            self.next_index = first
        if stepped_over:
            logger.debug("stepped over frames %s", stepped_over)
        return Released(items, stepped_over)

    def _tick(self, now: float) -> None:
        self.clock = max(self.clock, float(now))

    def to_state(self, encode: Callable[[T], Any]) -> dict[str, Any]:
        """Plain data; ``encode`` turns one buffered item into JSON-ready data."""
        return {
            "version": STATE_VERSION,
            "next_index": self.next_index,
            "clock": None if self.clock == float("-inf") else self.clock,
            "skipped": sorted(self.skipped),
            "waiting": [{"index": i, "since": w.since, "item": encode(w.item)} for i, w in sorted(self.waiting.items())],
        }

    @classmethod
    def from_state(cls, data: dict[str, Any], decode: Callable[[Any], T], wait_s: float, max_frames: int) -> ReorderBuffer[T]:
        """Rebuild from ``to_state`` output; the limits come from the current config, not the snapshot.

        Raises:
            ValueError: the state has another version.
        """
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"reorder state version {version!r} is not supported (expected {STATE_VERSION})")
        buffer = cls(wait_s=wait_s, max_frames=max_frames, next_index=int(data["next_index"]))
        buffer.clock = float("-inf") if data.get("clock") is None else float(data["clock"])
        buffer.skipped = {int(i) for i in data.get("skipped", [])}
        buffer.waiting = {int(w["index"]): _Waiting(decode(w["item"]), float(w["since"])) for w in data.get("waiting", [])}
        return buffer
