"""Kafka client factories and transaction helpers with the project's defaults and one-line failures.

Every client gets a bounded bootstrap timeout, so an unreachable broker fails
within ``kafka.connect_timeout_s`` with a message naming the address.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from pipeline.codecs import Record
from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError

__all__ = [
    "client_kwargs",
    "make_producer",
    "make_consumer",
    "make_admin",
    "check_broker",
    "send_record",
    "finish_transaction",
    "send_offsets_in_transaction",
]

logger = logging.getLogger(__name__)


def sasl_password(cfg: KafkaConfig) -> str | None:
    """The configured password, read from ``sasl_password_file`` here (on the machine making the client).

    Raises:
        BrokerError: the file cannot be read (names the file, never its content).
    """
    if cfg.sasl_password is not None:
        return cfg.sasl_password.get_secret_value()
    if not cfg.sasl_password_file:
        return None
    path = Path(cfg.sasl_password_file).expanduser()
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise BrokerError(
            f"cannot read the Kafka password of user {cfg.sasl_username!r} from {path}: {exc.strerror or exc}"
        ) from None


def _file(name: str | None) -> str | None:
    return str(Path(name).expanduser()) if name else None


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection settings shared by producers, consumers and the admin client.

    Raises:
        BrokerError: a SASL protocol without a user or password (no credentials for this role).
    """
    timeout_ms = int(cfg.connect_timeout_s * 1000)
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.hosts(),
        "security_protocol": cfg.security_protocol,
        "bootstrap_timeout_ms": timeout_ms,
        "reconnect_backoff_max_ms": 2000,
    }
    if cfg.security_protocol.startswith("SASL"):
        password = sasl_password(cfg)
        if not cfg.sasl_username or password is None:
            raise BrokerError(
                f"no Kafka credentials: {cfg.security_protocol} at {cfg.bootstrap_servers} needs kafka.sasl_username and a "
                "password (or kafka.credentials.<role>); `vapipe kafka users` on the broker machine says how"
            )
        kwargs["sasl_mechanism"] = cfg.sasl_mechanism
        kwargs["sasl_plain_username"] = cfg.sasl_username
        kwargs["sasl_plain_password"] = password
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_check_hostname"] = cfg.ssl_check_hostname
        kwargs["ssl_cafile"] = _file(cfg.ssl_cafile)
        kwargs["ssl_certfile"] = _file(cfg.ssl_certfile)
        kwargs["ssl_keyfile"] = _file(cfg.ssl_keyfile)
    kwargs.update(cfg.extra)
    return kwargs


def _unreachable(cfg: KafkaConfig, exc: Exception) -> BrokerError:
    cause = _security_cause(cfg, exc)
    if cause:
        return BrokerError(f"Kafka broker at {cfg.bootstrap_servers} refused the connection: {cause}")
    return BrokerError(
        f"Kafka broker unreachable at {cfg.bootstrap_servers} (waited {cfg.connect_timeout_s:g}s): "
        f"{type(exc).__name__}; start one with `vapipe kafka start` or set kafka.bootstrap_servers"
    )


def _security_cause(cfg: KafkaConfig, exc: BaseException) -> str | None:
    """Why a connection failed, when security is the reason: a wrong password, an untrusted or
    mismatched certificate, a plaintext client talking to a TLS listener. None otherwise.

    kafka-python reports all of these as "no broker available"; the cause is in the exception chain,
    or found by one TLS handshake with the first broker.
    """
    text = " ".join(str(e) for e in _chain(exc))
    if "Authentication failed" in text or "SaslAuthenticationFailed" in text or "authentication failed" in text:
        return f"authentication of user {cfg.sasl_username!r} failed (wrong password or no such user)"
    host, _, port = cfg.hosts()[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(cfg.connect_timeout_s, 5)) as sock:
            if cfg.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
                probe = ssl.create_default_context()
                probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
                with probe.wrap_socket(sock, server_hostname=host):
                    return (
                        f"it speaks TLS and this client {cfg.security_protocol}: set kafka.security_protocol=SASL_SSL, "
                        "kafka.ssl_cafile and credentials (`vapipe kafka users`)"
                    )
            context = ssl.create_default_context(cafile=_file(cfg.ssl_cafile))
            context.check_hostname = cfg.ssl_check_hostname
            if cfg.ssl_certfile:
                context.load_cert_chain(str(_file(cfg.ssl_certfile)), _file(cfg.ssl_keyfile))
            with context.wrap_socket(sock, server_hostname=host) as tls:
                tls.settimeout(1.0)  # TLS 1.3: a missing client certificate is refused after the handshake
                try:
                    tls.recv(1)
                except ssl.SSLError as err:
                    if "certificate" in str(err).lower():
                        return "it requires a client certificate (mTLS): set kafka.ssl_certfile and kafka.ssl_keyfile"
                except OSError:
                    pass
            if cfg.security_protocol == "SASL_SSL":  # TLS is fine and the broker answers: SASL refused us
                return f"authentication of user {cfg.sasl_username!r} failed (wrong password or no such user)"
    except ssl.SSLCertVerificationError as err:
        trust = f"kafka.ssl_cafile={cfg.ssl_cafile}" if cfg.ssl_cafile else "the system's CAs (kafka.ssl_cafile is not set)"
        return f"its certificate is not trusted by {trust}: {err.verify_message}"
    except (ssl.SSLError, OSError, ValueError):
        return None
    return None


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and len(out) < 10:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def make_producer(cfg: KafkaConfig, **overrides: Any) -> KafkaProducer:
    """A producer with the study's settings (linger 5 ms, snappy) and frame-sized requests."""
    kwargs = client_kwargs(cfg) | {
        "linger_ms": cfg.linger_ms,
        "compression_type": None if cfg.compression_type == "none" else cfg.compression_type,
        "max_request_size": cfg.max_message_bytes,
        "acks": "all",
        "retries": 10,
        "request_timeout_ms": cfg.request_timeout_ms,
    }
    kwargs.update(overrides)
    try:
        return KafkaProducer(**kwargs)
    except (KafkaConnectionError, KafkaTimeoutError) as exc:
        raise _unreachable(cfg, exc) from None


def finish_transaction(producer: KafkaProducer, commit: bool, timeout_s: float = 60.0) -> None:
    """Commit (or abort) the producer's open transaction, giving up after ``timeout_s``.

    kafka-python's ``commit_transaction`` and ``abort_transaction`` wait without a limit; a
    request lost while the broker restarts would hold a stage forever. Raises
    ``KafkaTimeoutError`` instead, so the caller can drop the producer and let a new one
    (same transactional id) abort what is left.
    """
    manager = producer._transaction_manager  # same steps as KafkaProducer.commit_transaction, with a timeout
    result = manager.begin_commit() if commit else manager.begin_abort()
    producer._sender.wakeup()
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        raise KafkaTimeoutError(f"transaction {'commit' if commit else 'abort'} not acknowledged within {timeout_s:g}s")


def send_offsets_in_transaction(producer: KafkaProducer, offsets: Any, group_metadata: Any, timeout_s: float = 60.0) -> None:
    """``send_offsets_to_transaction`` with a time limit (see ``finish_transaction``)."""
    result = producer._transaction_manager.send_offsets_to_transaction(offsets, group_metadata)
    producer._sender.wakeup()
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        raise KafkaTimeoutError(f"transaction offsets not acknowledged within {timeout_s:g}s")


def make_consumer(cfg: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer that commits by hand (after outputs are acknowledged), starts at the earliest
    record and reads committed records only."""
    kwargs = client_kwargs(cfg) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_bytes": max(cfg.max_message_bytes * 2, 52428800),
        "max_partition_fetch_bytes": cfg.max_message_bytes,
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        # A topic created moments before subscribing may be missing from the first metadata;
        # refresh often so the group rebalances onto it within seconds, not minutes.
        "metadata_max_age_ms": 5000,
        # Records of aborted or open transactions are never seen: a crashed exactly-once
        # stage leaves no half-written batch for the next stage to count.
        "isolation_level": "read_committed",
    }
    kwargs.update(overrides)
    try:
        return KafkaConsumer(*topics, **kwargs)
    except (KafkaConnectionError, KafkaTimeoutError) as exc:
        raise _unreachable(cfg, exc) from None


def make_admin(cfg: KafkaConfig) -> KafkaAdminClient:
    kwargs = client_kwargs(cfg) | {"request_timeout_ms": int(max(cfg.connect_timeout_s, 5) * 1000)}
    try:
        return KafkaAdminClient(**kwargs)
    except (KafkaConnectionError, KafkaTimeoutError) as exc:
        raise _unreachable(cfg, exc) from None
    except KafkaError as exc:
        cause = _security_cause(cfg, exc)
        raise BrokerError(f"Kafka broker at {cfg.bootstrap_servers} refused the admin client: {cause or exc}") from None


def check_broker(cfg: KafkaConfig) -> dict[str, Any]:
    """Ask the cluster to describe itself; returns {'cluster_id', 'brokers': [...]}.

    Raises:
        BrokerError: unreachable within ``cfg.connect_timeout_s``.
    """
    admin = make_admin(cfg)
    try:
        return dict(admin.describe_cluster())
    except KafkaError as exc:
        raise _unreachable(cfg, exc) from None
    finally:
        admin.close()


def send_record(producer: KafkaProducer, topic: str, record: Record, partition: int | None = None) -> Any:
    """Send a core ``Record``; returns the future so callers can flush and check acks in bulk."""
    return producer.send(
        topic,
        key=record.key,
        value=record.value,
        headers=list(record.headers),
        partition=partition,
    )
