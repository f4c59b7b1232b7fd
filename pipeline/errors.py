"""One root error and a few precise subclasses; the CLI turns any of them into one line."""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "ConfigError",
    "SourceError",
    "DecodeError",
    "RecordTooLargeError",
    "ModelError",
    "BrokerError",
    "TopicError",
    "SinkError",
    "AccessDeniedError",
]


class PipelineError(Exception):
    """Root of every error vapipe raises on purpose; its message is shown to the user as is."""


class ConfigError(PipelineError):
    """A configuration file, flag or environment variable is invalid."""


class SourceError(PipelineError):
    """A video source cannot be opened or holds no readable frame."""


class DecodeError(PipelineError):
    """A Kafka record is not a valid vapipe message (poison message)."""


class RecordTooLargeError(PipelineError):
    """An output record would exceed the broker's message size limit, however often it is retried."""


class ModelError(PipelineError):
    """The detection model cannot be found or loaded."""


class BrokerError(PipelineError):
    """The Kafka broker cannot be reached, started or stopped."""


class TopicError(PipelineError):
    """Topics cannot be created or described as configured."""


class SinkError(PipelineError):
    """An output (crop folder, index file) cannot be written."""


class AccessDeniedError(PipelineError):
    """A secured broker refused an operation this client's user has no ACL for (never retried)."""
