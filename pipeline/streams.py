"""The stream control topic's records: which streams a running pipeline should have.

``vapipe streams add ID=URL`` and ``vapipe streams remove ID`` write to a compacted topic keyed by
stream id (``topics.streams``): a value names the stream's source, a tombstone (no value) removes
it, so the topic's compacted state is the set of streams declared now. A ``vapipe run --follow``
reads the records written after it started and starts or stops producers to match. The source
may hold a camera's password: it travels in the value only, never in the key or a header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.codecs import DEFAULT_LIMITS, Record, decode_json, encode_json
from pipeline.errors import DecodeError
from pipeline.messages import SCHEMA_VERSION

__all__ = ["StreamCommand", "encode_stream_command", "decode_stream_command"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamCommand:
    """Add (``source`` set) or remove (``source`` None) one stream."""

    stream_id: str
    source: str | None


def encode_stream_command(command: StreamCommand) -> Record:
    """Control-topic record: key = stream id, value = its source as JSON, or a tombstone to remove it."""
    if command.source is None:
        return Record(key=command.stream_id.encode(), value=None)
    body = {"type": "stream", "schema_version": SCHEMA_VERSION, "stream_id": command.stream_id, "source": command.source}
    return Record(key=command.stream_id.encode(), value=encode_json(body))


def decode_stream_command(key: bytes | None, value: bytes | None) -> StreamCommand:
    """Decode a control-topic record.

    Raises:
        DecodeError: no key, or a value that is not a stream declaration.
    """
    if not key:
        raise DecodeError("stream command without a key (the stream id)")
    try:
        stream_id = key.decode()
    except UnicodeDecodeError:
        raise DecodeError("stream command key is not UTF-8") from None
    if value is None:
        return StreamCommand(stream_id, None)
    body = decode_json(value, DEFAULT_LIMITS)
    if body.get("type") != "stream" or body.get("schema_version") != SCHEMA_VERSION:
        raise DecodeError(f"not a stream command (type {body.get('type')!r}, schema_version {body.get('schema_version')!r})")
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise DecodeError("stream command without a source")
    return StreamCommand(stream_id, source)
