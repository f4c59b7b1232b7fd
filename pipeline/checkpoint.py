"""Local checkpoints of a changelog-backed table: one file per changelog partition, snapshots plus offset.

Kafka Streams keeps a ``.checkpoint`` file of changelog offsets beside each state store and,
after a restart, replays only the changelog after it. The count stage does the same: a
checkpoint holds every stream's snapshot of one changelog partition as of an offset, so a
restore reads the checkpoint and the changelog's tail from that offset, and a replica that
ran for months restores in the time it takes to read a few seconds of snapshots.

A checkpoint is only a shortcut: any checkpoint, old or new, is the table as of *some*
offset, and replaying the changelog from that offset gives the current table. The one
exception is a tombstone that compaction has already removed (after ``delete.retention.ms``):
a checkpoint older than that may hold a stream deleted since, so ``load`` ignores it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.codecs import DecodeLimits, decode_json
from pipeline.errors import DecodeError

__all__ = ["TableCheckpoint", "checkpoint_path"]

logger = logging.getLogger(__name__)

VERSION = 1


def checkpoint_path(folder: str | Path, topic: str, partition: int) -> Path:
    """Where the checkpoint of one changelog partition lives: ``<folder>/<topic>-<partition>.checkpoint.json``."""
    return Path(folder) / f"{topic}-{partition}.checkpoint.json"


@dataclass
class TableCheckpoint:
    """The snapshots of one changelog partition as of ``offset`` (the next offset to read).

    Example:
        >>> cp = TableCheckpoint("vapipe.counts-changelog", 2, 1234, {"cam1": {"frames_applied": 9}})
        >>> cp.save("output/state/count")
        >>> TableCheckpoint.load("output/state/count", "vapipe.counts-changelog", 2, max_age_s=3600).offset
        1234
    """

    topic: str
    partition: int
    offset: int
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    written_at: float = 0.0

    def save(self, folder: str | Path) -> Path:
        """Write atomically and durably: a temp file of its own (several replicas may share ``folder``),
        fsynced, renamed into place, the folder fsynced.

        Raises:
            OSError: the folder is not writable or the disk is full (a checkpoint is optional: callers log it).
        """
        path = checkpoint_path(folder, self.topic, self.partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        body = {
            "version": VERSION,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "written_at": time.time(),
            "snapshots": self.snapshots,
        }
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(body, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        with contextlib.suppress(OSError):
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return path

    @classmethod
    def load(
        cls, folder: str | Path, topic: str, partition: int, max_age_s: float, limits: DecodeLimits | None = None
    ) -> TableCheckpoint | None:
        """The checkpoint of one partition, or None when there is none, it does not decode, or it is
        older than ``max_age_s`` (a tombstone it predates may have been compacted away since)."""
        path = checkpoint_path(folder, topic, partition)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        try:
            body = decode_json(raw, limits or DecodeLimits(max_json_bytes=max(len(raw), 1)))
            if not isinstance(body, dict) or body.get("version") != VERSION:
                raise DecodeError(f"unknown checkpoint version {body.get('version') if isinstance(body, dict) else body!r}")
            if body.get("topic") != topic or body.get("partition") != partition:
                raise DecodeError(f"checkpoint of {body.get('topic')}[{body.get('partition')}], not {topic}[{partition}]")
            offset, written_at, snapshots = body["offset"], float(body["written_at"]), body["snapshots"]
            if not isinstance(offset, int) or offset < 0 or not isinstance(snapshots, dict):
                raise DecodeError("checkpoint offset or snapshots malformed")
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            logger.warning("ignoring the checkpoint %s: %s", path, exc)
            return None
        if time.time() - written_at > max_age_s:
            logger.info("ignoring the checkpoint %s: older than %.0fs", path, max_age_s)
            return None
        return cls(topic, partition, offset, {str(k): v for k, v in snapshots.items() if isinstance(v, dict)}, written_at)
