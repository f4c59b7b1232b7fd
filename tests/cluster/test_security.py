"""Against a real ``--secure`` broker (SASL_SSL, SCRAM-SHA-512, StandardAuthorizer): each role's ACLs
(allowed and refused), the refusals a client meets and their one-line causes, a stage refused by the
broker, and a whole exactly-once run on Ray whose outputs, logs and records hold no password."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError
from pydantic import SecretStr

from cluster.broker import KafkaBroker, KafkaCluster
from cluster.clients import check_broker, make_consumer, make_producer
from cluster.security import SecurityFiles, acl_bindings, apply_acls, client_config, ensure_material, users_text
from cluster.topics import create_topics, describe_topics
from pipeline.config import ROLES, BrokerConfig, KafkaConfig, Settings
from pipeline.errors import AccessDeniedError, BrokerError
from tests.conftest import _missing, build_settings, free_ports

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One secured broker for the module (VAPIPE_TEST_SECURE_PORT picks its ports, else free ones)."""
    base = int(os.environ.get("VAPIPE_TEST_SECURE_PORT", "0"))
    port, controller_port = (base, base + 1) if base else free_ports(2)
    state = tmp_path_factory.mktemp("secure-kafka")
    cfg = BrokerConfig(port=port, controller_port=controller_port, state_dir=str(state), heap="384m", secure=True)
    broker = KafkaBroker(cfg)
    try:
        broker.start()
    except BrokerError as exc:
        _missing(f"could not start a secured test broker: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def files(secure_broker: KafkaBroker) -> SecurityFiles:
    assert secure_broker.security is not None
    return secure_broker.security


def secure_settings(broker: KafkaBroker, tmp_path: Path, **overrides: Any) -> Settings:
    """Unique topics and groups on the secured broker, every role's user from its security folder, ACLs applied."""
    assert broker.security is not None
    s = build_settings(broker.bootstrap, tmp_path, "synthetic:2ms", **overrides)
    s = s.model_copy(update={"kafka": client_config(s.kafka, broker.security)})
    create_topics(s.kafka, s.topics.all())  # as admin, the default user
    apply_acls(s.kafka, s)
    return s


def test_material_is_private_and_the_broker_listens_sasl_ssl_only(secure_broker: KafkaBroker, files: SecurityFiles) -> None:
    assert stat.S_IMODE(files.root.stat().st_mode) == 0o700
    for path in (
        files.ca_key,
        files.broker_pem,
        files.password_file("inter"),
        files.client_key("crop"),
        secure_broker.props_file,
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    props = secure_broker.props_file.read_text()
    assert f"listeners=SASL_SSL://127.0.0.1:{secure_broker.cfg.port}" in props
    assert "PLAINTEXT://" not in props
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in props
    info = check_broker(secure_broker.kafka)  # admin over SASL_SSL, CA-verified, hostname checked
    assert len(info["brokers"]) == 1
    text = users_text(Settings(), files, secure_broker.bootstrap)
    assert "VAPIPE_KAFKA__CREDENTIALS__INTER__PASSWORD_FILE" in text
    assert not any(files.password(u) in text for u in ROLES)  # paths, never passwords


def test_refusals_name_their_cause(secure_broker: KafkaBroker, files: SecurityFiles, tmp_path: Path) -> None:
    plain = KafkaConfig(bootstrap_servers=secure_broker.bootstrap, connect_timeout_s=3)
    with pytest.raises(BrokerError, match="speaks TLS and this client PLAINTEXT"):
        check_broker(plain)
    tls = plain.model_copy(
        update={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "ssl_cafile": str(files.ca_cert)}
    )
    with pytest.raises(BrokerError, match="no Kafka credentials"):
        check_broker(tls)
    wrong = tls.model_copy(update={"sasl_username": "producer", "sasl_password": SecretStr("not-the-password")})
    with pytest.raises(BrokerError, match="authentication of user 'producer' failed") as err:
        check_broker(wrong)
    assert "not-the-password" not in str(err.value) and "\n" not in str(err.value)
    other = ensure_material(tmp_path / "other", [])  # a CA the broker's certificate was not signed by
    right_user = tls.model_copy(update={"sasl_username": "admin", "sasl_password_file": str(files.password_file("admin"))})
    with pytest.raises(BrokerError, match="certificate is not trusted by kafka.ssl_cafile="):
        check_broker(right_user.model_copy(update={"ssl_cafile": str(other.ca_cert)}))


def _can_write(kafka: KafkaConfig, topic: str) -> bool:
    producer = make_producer(kafka, max_block_ms=10000)
    try:
        producer.send(topic, key=b"k", value=b"v").get(timeout=20)
        return True
    except TopicAuthorizationFailedError:
        return False
    finally:
        producer.close(timeout=2)


def _can_read(kafka: KafkaConfig, topic: str, group: str) -> bool:
    consumer = make_consumer(kafka, topic, group_id=group)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if consumer.poll(timeout_ms=500):
                return True
            # kafka-python logs a refused subscription rather than raising: ask its metadata
            if topic in consumer._client.cluster.unauthorized_topics:
                return False
        raise AssertionError(f"nothing read from {topic} within 20s")
    except (TopicAuthorizationFailedError, GroupAuthorizationFailedError):
        return False
    finally:
        consumer.close()


# (role, topic, allowed): writes, then reads with the role's own group.
WRITES = [
    ("producer", "frames", True),
    ("producer", "detected_frames", False),
    ("inter", "detected_frames", True),
    ("inter", "detections", True),
    ("inter", "dead_letter", True),
    ("inter", "frames", False),
    ("crop", "detections", False),
    ("count", "counts", True),
    ("count", "counts_changelog", True),
    ("count", "frames", False),
]
READS = [
    ("inter", "frames", True),
    ("inter", "detections", False),
    ("crop", "detected_frames", True),
    ("crop", "frames", False),
    ("count", "detections", True),
    ("count", "detected_frames", False),
]


def test_each_role_does_only_its_job(secure_broker: KafkaBroker, tmp_path: Path) -> None:
    s = secure_settings(secure_broker, tmp_path)
    for spec in s.topics.all():  # something to read on every topic
        assert _can_write(s.kafka, spec.name), f"admin could not write {spec.name}"
    got = {(role, attr): _can_write(s.kafka.as_role(role), getattr(s.topics, attr).name) for role, attr, _ in WRITES}
    assert got == {(role, attr): allowed for role, attr, allowed in WRITES}
    got = {(role, attr): _can_read(s.kafka.as_role(role), getattr(s.topics, attr).name, s.group(role)) for role, attr, _ in READS}
    assert got == {(role, attr): allowed for role, attr, allowed in READS}
    # A stage's user may not join another stage's consumer group.
    assert _can_read(s.kafka.as_role("crop"), s.topics.detected_frames.name, s.group("inter")) is False
    assert {b.principal for b in acl_bindings(s)} == {f"User:{r}" for r in ROLES if r != "admin"}


def test_a_stage_writing_a_topic_it_does_not_own_is_refused_and_says_so(
    secure_broker: KafkaBroker, tmp_path: Path, highway: str
) -> None:
    from actors.producer import FrameProducer
    from actors.stages import InterWorker
    from pipeline.sources import parse_source

    s = secure_settings(secure_broker, tmp_path, producer__max_frames=3)
    FrameProducer(s, parse_source(highway, stream_id="hw")).run()  # as the producer user, exactly-once
    # Misconfigured: the InterConsumer told to publish its detections to the counts topic (count's).
    wrong = s.model_copy(update={"topics": s.topics.model_copy(update={"detections": s.topics.counts})})
    worker = InterWorker(wrong, "inter-0")
    with pytest.raises(AccessDeniedError) as err:
        worker.run(max_messages=4, timeout_s=60)
    message = str(err.value)
    assert "stage inter (Kafka user 'inter') refused by the broker" in message and "\n" not in message
    assert "TopicAuthorizationFailedError" in message
    assert worker.last_error == message


@pytest.mark.ray
def test_a_secured_exactly_once_run_leaks_no_secret(
    secure_broker: KafkaBroker, tmp_path: Path, highway: str, ray_local: Any
) -> None:
    """Every stage on Ray as its own user, exactly-once; then no password anywhere it could leak to:
    the output folder and run summary, Ray's logs of this session, actor names, every record's key and
    headers, the broker's logs."""
    from actors.launcher import RunPlan
    from actors.ray.engine import run_pipeline
    from cluster.reading import read_all
    from pipeline.sources import parse_source

    assert secure_broker.security is not None
    s = secure_settings(secure_broker, tmp_path, producer__max_frames=12)
    assert s.processing_guarantee == "exactly_once"
    plan = RunPlan(
        sources=[parse_source(highway, stream_id="hw")],
        replicas={"inter": 1, "crop": 1, "count": 1},
        allow_calibration=True,
        include_dashboard=False,
        stall_timeout_s=120,
    )
    summary = run_pipeline(s, plan)
    assert summary.frames_produced == 12
    on_c = [r for r in read_all(s.kafka, s.topics.detections.name)]
    assert len(on_c) == 13  # 12 frames and the end of stream, each once

    secrets = [secure_broker.security.password(u).encode() for u in ("broker", *ROLES)]
    places: list[tuple[str, bytes]] = []
    for root in (
        Path(s.output_dir),
        Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs",
        secure_broker.log_dir,
    ):
        places += [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()]
    assert any("runs" in name for name, _ in places), "no run summary written"
    for spec in s.topics.all():
        for r in read_all(s.kafka, spec.name):
            places.append((f"{spec.name} key/headers", (r.key or b"") + b"".join(k.encode() + v for k, v in r.headers)))
    places.append(("actor names", " ".join(str(a) for a in ray_local.util.list_named_actors(all_namespaces=True)).encode()))
    leaks = [name for name, data in places for secret in secrets if secret in data]
    assert not leaks, f"a password appears in {leaks[:5]}"


def test_a_broker_requiring_client_certificates_refuses_clients_without_one(tmp_path: Path) -> None:
    base = int(os.environ.get("VAPIPE_TEST_SECURE_PORT", "0"))
    port, controller_port = (base + 4, base + 5) if base else free_ports(2)
    cfg = BrokerConfig(
        port=port,
        controller_port=controller_port,
        state_dir=str(tmp_path / "k"),
        heap="384m",
        secure=True,
        ssl_client_auth="required",
    )
    broker = KafkaBroker(cfg)
    try:
        broker.start()  # its own readiness check is admin with the admin certificate
    except BrokerError as exc:
        _missing(f"could not start a secured test broker: {exc}")
    try:
        assert broker.security is not None
        with_cert = client_config(
            KafkaConfig(bootstrap_servers=broker.bootstrap, connect_timeout_s=5), broker.security, mtls=True
        )
        assert len(check_broker(with_cert.as_role("count"))["brokers"]) == 1
        without = with_cert.model_copy(update={"ssl_certfile": None, "ssl_keyfile": None})
        with pytest.raises(BrokerError, match="requires a client certificate"):
            check_broker(without)
    finally:
        broker.stop()


def test_a_stage_reading_a_topic_it_may_not_read_is_refused_and_says_so(secure_broker: KafkaBroker, tmp_path: Path) -> None:
    from actors.stages import CropWorker

    s = secure_settings(secure_broker, tmp_path)
    wrong = s.model_copy(update={"topics": s.topics.model_copy(update={"detected_frames": s.topics.frames})})
    worker = CropWorker(wrong, "crop-0")
    with pytest.raises(
        AccessDeniedError, match=r"stage crop \(Kafka user 'crop'\) refused by the broker: no ACL lets it write or read the topic"
    ):
        worker.run(timeout_s=30)


def test_the_faust_engine_connects_as_its_role_over_sasl_ssl(secure_broker: KafkaBroker, tmp_path: Path) -> None:
    """The Faust engine's credentials, as Faust hands them to aiokafka, against the secured broker."""
    import asyncio

    from aiokafka import AIOKafkaConsumer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from actors.faust.app import broker_credentials

    s = secure_settings(secure_broker, tmp_path)
    auth = credentials_to_aiokafka_auth(broker_credentials(s.kafka.as_role("count")))
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert auth["sasl_plain_username"] == "count"

    async def topics() -> set[str]:
        consumer = AIOKafkaConsumer(bootstrap_servers=secure_broker.bootstrap, **auth)
        await consumer.start()
        try:
            return set(await consumer.topics())
        finally:
            await consumer.stop()

    seen = asyncio.run(topics())
    assert s.topics.detections.name in seen  # count may describe C


def _free_run(n: int) -> int:
    """The first of ``n`` consecutive free ports (a cluster's nodes take port, port+2, ...)."""
    import socket

    for base in range(31000 + os.getpid() % 4000, 45000, 7):
        sockets = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError(f"no {n} consecutive free ports")


def test_a_secured_three_broker_cluster_shares_one_ca_and_enforces_acls(tmp_path: Path) -> None:
    base = _free_run(6)
    # Three JVMs starting at once on a busy 2-core machine: give them longer than one broker's minute.
    cfg = BrokerConfig(
        port=base, controller_port=base + 1, state_dir=str(tmp_path / "kafka3"), heap="256m", secure=True, start_timeout_s=180
    )
    cluster = KafkaCluster(cfg, None, 3)
    try:
        cluster.start()
    except BrokerError as exc:
        cluster.stop()
        _missing(f"could not start a secured 3-broker cluster: {exc}")
    try:
        files = cluster.security
        assert files is not None and {n.security.root for n in cluster.nodes if n.security} == {files.root}
        assert len(check_broker(cluster.admin_kafka)["brokers"]) == 3  # the quorum formed over SSL, brokers over SASL_SSL
        s = build_settings(cluster.bootstrap, tmp_path, "synthetic:2ms")
        s = s.model_copy(update={"kafka": client_config(s.kafka, files)})
        frames = s.topics.frames.model_copy(update={"replication_factor": 3})
        create_topics(s.kafka, [frames])
        apply_acls(s.kafka, s)
        assert [t.replication_factor for t in describe_topics(s.kafka, [frames.name])] == [3]
        assert _can_write(s.kafka.as_role("producer"), frames.name) is True
        assert _can_write(s.kafka.as_role("crop"), frames.name) is False
        with pytest.raises(BrokerError, match="speaks TLS and this client PLAINTEXT"):
            check_broker(KafkaConfig(bootstrap_servers=cluster.bootstrap, connect_timeout_s=3))
    finally:
        cluster.stop()
