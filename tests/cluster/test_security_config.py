"""Broker-free parts of issue 16: the generated material, the secure broker properties, the ACL table,
typed client settings and their refusals, Ray's loopback dashboard, and the pickle-free model setting."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from cluster.clients import client_kwargs
from cluster.security import ensure_material, scram_format_args, secure_properties, users_text
from pipeline.config import ConfigError, KafkaConfig, KafkaCredential, RayConfig, Settings, load_settings
from pipeline.detector import check_model
from pipeline.errors import BrokerError, ModelError


def test_material_is_private_and_names_the_broker_hosts(tmp_path: Path) -> None:
    files = ensure_material(tmp_path, ["0.0.0.0", "198.18.0.10"])
    assert stat.S_IMODE(files.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.password_file("count").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.broker_pem.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "198.18.0.10"}
    before = files.password("inter")
    again = ensure_material(tmp_path, ["0.0.0.0", "198.18.0.10"])
    assert again.password("inter") == before  # kept: clients hold copies


def test_secure_properties_turn_every_listener_secure(tmp_path: Path) -> None:
    files = ensure_material(tmp_path, [])
    plain = "listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093\nadvertised.listeners=PLAINTEXT://127.0.0.1:9092\n"
    props = secure_properties(plain, files, "required")
    assert "listeners=SASL_SSL://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093" in props
    assert "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL" in props
    assert "listener.name.sasl_ssl.ssl.client.auth=required" in props
    assert "allow.everyone.if.no.acl.found=false" in props
    assert all("SCRAM-SHA-512=[name=" in a for a in scram_format_args(files))


def test_each_stage_connects_as_its_role_and_passwords_stay_secret(tmp_path: Path) -> None:
    secret = tmp_path / "inter.password"
    secret.write_text("s3cret-inter\n")
    kafka = KafkaConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="admin",
        sasl_password="s3cret-admin",
        credentials={"inter": KafkaCredential(username="inter", password_file=str(secret))},
    )
    s = Settings(kafka=kafka)
    assert s.for_role("inter").kafka.sasl_username == "inter"
    assert s.for_role("crop").kafka.sasl_username == "admin"  # no role of its own: the default user
    assert client_kwargs(s.for_role("inter").kafka)["sasl_plain_password"] == "s3cret-inter"
    for text in (repr(s), s.model_dump_json(), str(s.model_dump(mode="json"))):
        assert "s3cret" not in text
    with pytest.raises(BrokerError, match="no Kafka credentials"):
        client_kwargs(kafka.model_copy(update={"sasl_password": None}))
    missing = kafka.as_role("inter").model_copy(update={"sasl_password_file": str(tmp_path / "nope")})
    with pytest.raises(BrokerError, match="cannot read the Kafka password of user 'inter'"):
        client_kwargs(missing)


def test_settings_refuse_contradictions_in_one_line() -> None:
    with pytest.raises(ConfigError, match="needs sasl_mechanism"):
        load_settings(None, overrides={"kafka": {"security_protocol": "SASL_SSL"}}, environ={})
    with pytest.raises(ConfigError, match="ssl_certfile and ssl_keyfile go together"):
        load_settings(None, overrides={"kafka": {"ssl_certfile": "c.pem"}}, environ={})
    with pytest.raises(ConfigError, match="set password or password_file") as err:
        load_settings(
            None,
            overrides={"kafka": {"credentials": {"inter": {"username": "i", "password": "pw-x", "password_file": "f"}}}},
            environ={},
        )
    assert "pw-x" not in str(err.value)
    with pytest.raises(ConfigError, match="credentials"):
        load_settings(None, overrides={"kafka": {"credentials": {"janitor": {"username": "j"}}}}, environ={})


def test_ray_dashboard_stays_on_loopback_unless_opted_out() -> None:
    assert RayConfig().token_auth is True and RayConfig().dashboard_host == "127.0.0.1"
    with pytest.raises(ValueError, match="allow_remote_dashboard"):
        RayConfig(dashboard_host="0.0.0.0")
    assert RayConfig(dashboard_host="0.0.0.0", allow_remote_dashboard=True).dashboard_host == "0.0.0.0"


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("yolov8n.pt", True),
        ("models/x.pt", True),
        ("m.torchscript", True),
        ("m.onnx", False),
        ("m.engine", False),
        ("m.xml", False),
        ("yolov8n_openvino_model/", False),
    ],
)
def test_safe_formats_only_refuses_pickle_weights(name: str, refused: bool) -> None:
    try:
        check_model(name, safe_only=True)
        message = ""
    except ModelError as exc:
        message = str(exc)
    assert ("pickle-based weights (.pt) can run code" in message) is refused, message
    check_model("m.pt")  # allowed by default: the configured name is the only model loaded


def test_users_text_names_files_never_passwords(tmp_path: Path) -> None:
    files = ensure_material(tmp_path, [])
    text = users_text(Settings(), files, "198.18.0.10:9092")
    assert str(files.password_file("producer")) in text and "VAPIPE_KAFKA__SASL_PASSWORD_FILE" in text
    assert not any(files.password(u) in text for u in ("broker", "producer", "inter", "crop", "count", "admin"))


def test_faust_workers_get_every_secret_but_only_through_their_settings_file(tmp_path: Path) -> None:
    from actors.faust.app import settings_from_json, settings_to_json

    s = Settings(kafka=KafkaConfig(credentials={"count": KafkaCredential(username="count", password="pw-count")}))
    again = settings_from_json(settings_to_json(s))
    cred = again.kafka.credentials["count"]
    assert cred.password is not None and cred.password.get_secret_value() == "pw-count"


def test_a_camera_url_password_never_becomes_the_stream_id() -> None:
    from pipeline.sources import parse_source

    spec = parse_source("rtsp://user:pw123@198.18.0.5:554/cam1/stream")
    assert "pw123" not in spec.stream_id and "user" not in spec.stream_id
    assert spec.stream_id == "198.18.0.5-554-cam1-stream"
