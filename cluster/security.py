"""A secured broker: CA and certificates, one SCRAM user per role, and ACLs so each role does only its job.

``vapipe kafka start --secure`` keeps everything in ``<state_dir>/security`` (folder 0700, files 0600):

- ``ca.crt`` / ``ca.key``: a private CA (the only thing clients need to trust the broker);
- ``broker.pem``: the broker's key and certificate (its hosts as subject alternative names), also
  presented as a client certificate on the controller listener (mTLS between broker and controller);
- ``users/<user>.password``: a random password per user (``broker`` between nodes, and one per role);
- ``clients/<role>.crt`` / ``.key``: a client certificate per role, for brokers that require mTLS.

The broker listens SASL_SSL with SCRAM-SHA-512; the users are created when storage is formatted
(``kafka-storage format --add-scram``), so they exist before the broker first answers. The
StandardAuthorizer denies whatever no ACL allows; ``acl_bindings`` is the table of what each role may
do and ``apply_acls`` writes it (idempotent). Everything here works on one broker's properties and
files, so a cluster applies it to each of its brokers with one shared security folder.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ROLES, BrokerConfig, KafkaConfig, KafkaCredential, Role, Settings
from pipeline.errors import BrokerError

__all__ = [
    "MECHANISM",
    "BROKER_USER",
    "SecurityFiles",
    "AclBinding",
    "ensure_material",
    "security_files",
    "write_private",
    "secure_properties",
    "scram_format_args",
    "admin_config",
    "client_config",
    "acl_bindings",
    "apply_acls",
    "users_text",
]

logger = logging.getLogger(__name__)

MECHANISM = "SCRAM-SHA-512"
BROKER_USER = "broker"
"""The brokers' own principal (inter-broker SASL and the controller listener's certificate CN)."""
CERT_DAYS = 825


@dataclass(frozen=True)
class SecurityFiles:
    """Where a secured broker's material lives (``<state_dir>/security``)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def broker_pem(self) -> Path:
        return self.root / "broker.pem"

    @property
    def enabled(self) -> Path:
        """Marker: this state folder is secured (and stays so)."""
        return self.root / "enabled"

    def password_file(self, user: str) -> Path:
        return self.root / "users" / f"{user}.password"

    def client_cert(self, role: str) -> Path:
        return self.root / "clients" / f"{role}.crt"

    def client_key(self, role: str) -> Path:
        return self.root / "clients" / f"{role}.key"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text().strip()

    @classmethod
    def of(cls, state_dir: str | Path) -> SecurityFiles:
        return cls(Path(state_dir).expanduser().resolve() / "security")


def security_files(broker: BrokerConfig, state_dir: str | Path) -> SecurityFiles | None:
    """The broker's security folder when it is (to be) secured: ``broker.secure``, or secured before."""
    files = SecurityFiles.of(state_dir)
    return files if broker.secure or files.enabled.exists() else None


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (created 0600, never briefly world-readable)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _names(hosts: Iterable[str]) -> list[object]:
    from cryptography import x509

    out: list[object] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts:
        if not host or host in ("0.0.0.0", "::", "localhost", "127.0.0.1"):
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _issue(
    ca_key: object, ca_cert: object | None, cn: str, *, is_ca: bool = False, hosts: Iterable[str] = ()
) -> tuple[bytes, bytes]:
    """A new EC key and a certificate for ``cn`` signed by the CA (self-signed when ``ca_cert`` is None)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ca_key if is_ca else ec.generate_private_key(ec.SECP256R1())
    # Leaf certificates carry only a CN: it is the principal the broker maps them to.
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if is_ca:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vapipe"))
    subject = x509.Name(attrs)
    issuer = subject if ca_cert is None else ca_cert.subject  # type: ignore[attr-defined]
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if hosts else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)  # type: ignore[arg-type]
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def ensure_material(state_dir: str | Path, hosts: Iterable[str]) -> SecurityFiles:
    """Create what is missing of the CA, the broker certificate, the users' passwords and the role
    certificates; reissue the broker certificate when ``hosts`` gained a name it does not cover.

    Idempotent: an existing CA and passwords are kept (clients hold copies of them).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    files = SecurityFiles.of(state_dir)
    files.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(files.root, 0o700)
    if not files.ca_cert.exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        key_pem, cert_pem = _issue(ca_key, None, "vapipe CA", is_ca=True)
        write_private(files.ca_key, key_pem)
        write_private(files.ca_cert, cert_pem)
        logger.info("created a CA in %s", files.root)
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    wanted = sorted({h for h in hosts if h})
    hosts_file = files.root / "broker.hosts"
    if not files.broker_pem.exists() or hosts_file.read_text().split() != wanted:
        key_pem, cert_pem = _issue(ca_key, ca_cert, BROKER_USER, hosts=wanted)
        write_private(files.broker_pem, key_pem + cert_pem)
        hosts_file.write_text(" ".join(wanted) + "\n")
    for user in (BROKER_USER, *ROLES):
        if not files.password_file(user).exists():
            write_private(files.password_file(user), (secrets.token_urlsafe(32) + "\n").encode())
    for role in ROLES:
        if not files.client_cert(role).exists():
            key_pem, cert_pem = _issue(ca_key, ca_cert, role)
            write_private(files.client_key(role), key_pem)
            write_private(files.client_cert(role), cert_pem)
    files.enabled.write_text("SASL_SSL SCRAM-SHA-512\n")
    return files


def _props(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def secure_properties(props: str, files: SecurityFiles, client_auth: str = "none") -> str:
    """One broker's ``server.properties`` turned secure: its PLAINTEXT listener becomes SASL_SSL
    (SCRAM-SHA-512, also between brokers), its controller listener SSL with client certificates,
    and the StandardAuthorizer denies what no ACL allows."""
    lines = _props(props)
    for key in ("listeners", "advertised.listeners"):
        lines[key] = lines[key].replace("PLAINTEXT://", "SASL_SSL://")
    broker_password = files.password(BROKER_USER)
    lines |= {
        "inter.broker.listener.name": "SASL_SSL",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{BROKER_USER}" password="{broker_password}";'
        ),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(files.broker_pem),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(files.ca_cert),
        "ssl.endpoint.identification.algorithm": "https",
        "listener.name.controller.ssl.client.auth": "required",
        "listener.name.sasl_ssl.ssl.client.auth": client_auth,
        # A certificate's principal is its CN: the brokers' certificate says "broker".
        "ssl.principal.mapping.rules": "RULE:^(.*,)?CN=([^,]+)(,.*)?$/$2/,DEFAULT",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{BROKER_USER};User:admin",
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def scram_format_args(files: SecurityFiles) -> list[str]:
    """``kafka-storage format`` arguments that create every user's SCRAM credential with the storage."""
    return [f"--add-scram={MECHANISM}=[name={user},password={files.password(user)}]" for user in (BROKER_USER, *ROLES)]


def client_config(kafka: KafkaConfig, files: SecurityFiles, *, mtls: bool = False) -> KafkaConfig:
    """``kafka`` pointed at a secured broker of this machine: its CA, admin as the default user, and
    every role's user from the security folder (password files, and certificates with ``mtls``)."""
    creds = {
        role: KafkaCredential(
            username=role,
            password_file=str(files.password_file(role)),
            ssl_certfile=str(files.client_cert(role)) if mtls else None,
            ssl_keyfile=str(files.client_key(role)) if mtls else None,
        )
        for role in ROLES
    }
    return kafka.model_copy(
        update={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "ssl_cafile": str(files.ca_cert),
            "credentials": creds,
        }
    ).as_role("admin")


def admin_config(kafka: KafkaConfig, files: SecurityFiles) -> KafkaConfig:
    """The admin user's client settings for this machine's secured broker."""
    return client_config(kafka, files, mtls=True)


@dataclass(frozen=True)
class AclBinding:
    """One ALLOW rule: ``principal`` may do ``operation`` on a resource (``prefixed``: every name starting so)."""

    principal: str
    resource: str
    """TOPIC, GROUP or TRANSACTIONAL_ID."""
    name: str
    operation: str
    """READ or WRITE (each implies DESCRIBE), or CREATE."""
    prefixed: bool = False


def acl_bindings(settings: Settings) -> list[AclBinding]:
    """What each role may do, and nothing else (admin is a super user):

    - producer writes A (and reads it back to resume a stream) under ``vapipe-producer.*`` transactions;
    - inter reads A and writes B, C and the dead-letter topic;
    - crop reads B; count reads C and writes the counts and changelog topics (and reads the changelog
      to recover); both may dead-letter a record they cannot decode;
    - each stage uses only its own consumer group and transactional ids (``<group_prefix>-<stage>*``),
      and may create and use topics named after its group (Faust's internal topics).

    Example:
        >>> [b.operation for b in acl_bindings(Settings()) if b.principal == "User:crop" and b.resource == "TOPIC"][:1]
        ['READ']
    """
    t = settings.topics
    creds = settings.kafka.credentials

    def user(role: Role) -> str:
        return f"User:{creds[role].username if role in creds else role}"

    out: list[AclBinding] = []

    def allow(role: Role, resource: str, names: Iterable[str], *ops: str, prefixed: bool = False) -> None:
        out.extend(AclBinding(user(role), resource, name, op, prefixed) for name in names for op in ops)

    allow("producer", "TOPIC", [t.frames.name], "WRITE", "READ")
    allow("producer", "TRANSACTIONAL_ID", ["vapipe-producer."], "WRITE", prefixed=True)
    allow("inter", "TOPIC", [t.frames.name], "READ")
    allow("inter", "TOPIC", [t.detected_frames.name, t.detections.name, t.dead_letter.name], "WRITE")
    allow("crop", "TOPIC", [t.detected_frames.name], "READ")
    allow("crop", "TOPIC", [t.dead_letter.name], "WRITE")
    allow("count", "TOPIC", [t.detections.name, t.counts_changelog.name], "READ")
    allow("count", "TOPIC", [t.counts.name, t.counts_changelog.name, t.dead_letter.name], "WRITE")
    for stage in ("inter", "crop", "count"):
        group = settings.group(stage)
        allow(stage, "GROUP", [group], "READ", prefixed=True)  # type: ignore[arg-type]
        allow(stage, "TRANSACTIONAL_ID", [group], "WRITE", prefixed=True)  # type: ignore[arg-type]
        allow(stage, "TOPIC", [group], "CREATE", "READ", "WRITE", prefixed=True)  # type: ignore[arg-type]
    return out


def apply_acls(admin: KafkaConfig, settings: Settings) -> int:
    """Write ``acl_bindings(settings)`` with the admin user; returns how many rules the broker holds for them.

    Raises:
        BrokerError: the broker refused a rule (the admin user is not a super user, ...).
    """
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    from cluster.clients import make_admin

    acls = [
        ACL(
            principal=b.principal,
            host="*",
            operation=ACLOperation[b.operation],
            permission_type=ACLPermissionType.ALLOW,
            resource_pattern=ResourcePattern(
                ResourceType[b.resource],
                b.name,
                ACLResourcePatternType.PREFIXED if b.prefixed else ACLResourcePatternType.LITERAL,
            ),
        )
        for b in acl_bindings(settings)
    ]
    client = make_admin(admin)
    try:
        result = client.create_acls(acls)
    finally:
        client.close()
    if result["failed"]:
        raise BrokerError(f"the broker refused {len(result['failed'])} ACLs: {result['failed'][0]}")
    return len(result["succeeded"])


def users_text(settings: Settings, files: SecurityFiles, bootstrap: str) -> str:
    """How to hand each machine its credentials: which files to copy and which settings to set.

    Prints file paths, never a password.
    """
    if not files.enabled.exists():
        raise BrokerError(f"no secured broker in {files.root.parent}: start one with `vapipe kafka start --secure`")
    out = [
        f"# Secured broker at {bootstrap} (SASL_SSL, {MECHANISM}); security folder {files.root}",
        "# Every machine: copy the CA certificate (public) and set",
        f"#   scp {files.ca_cert} HOST:~/.vapipe/ca.crt",
        f"export VAPIPE_KAFKA__BOOTSTRAP_SERVERS={bootstrap}",
        "export VAPIPE_KAFKA__SECURITY_PROTOCOL=SASL_SSL",
        f"export VAPIPE_KAFKA__SASL_MECHANISM={MECHANISM}",
        "export VAPIPE_KAFKA__SSL_CAFILE=~/.vapipe/ca.crt",
        "",
        "# Then each machine gets the password file (and, for mTLS, the certificate and key) of the",
        "# roles it runs, and nothing else; copy them with `install -m 600` or scp, never by chat or mail.",
    ]
    for role in ROLES:
        # admin is the default user: the one of clients without a role (the CLI, `vapipe run`'s topic admin).
        var = "VAPIPE_KAFKA__SASL" if role == "admin" else f"VAPIPE_KAFKA__CREDENTIALS__{role.upper()}"
        what = {
            "producer": "machines that run producers (cameras)",
            "inter": "machines that run InterConsumers (YOLO)",
            "crop": "machines that run crop workers",
            "count": "machines that run count workers",
            "admin": "the machine that runs `vapipe run` / `vapipe topics` (creates topics, reads lag)",
        }[role]
        out += [
            "",
            f"# {role}: {what}",
            f"#   scp {files.password_file(role)} HOST:~/.vapipe/{role}.password",
            f"#   (mTLS) scp {files.client_cert(role)} {files.client_key(role)} HOST:~/.vapipe/",
            f"export {var}_USERNAME={role}" if role == "admin" else f"export {var}__USERNAME={role}",
            f"export {var}_PASSWORD_FILE=~/.vapipe/{role}.password"
            if role == "admin"
            else f"export {var}__PASSWORD_FILE=~/.vapipe/{role}.password",
        ]
    out += [
        "",
        "# With Ray the head's settings travel to every actor, and each actor reads its role's password",
        "# file on its own node: copy each role's file to every node that may run that role.",
        f"# ACLs: {len(acl_bindings(settings))} rules for the configured topics and groups (`vapipe kafka acls` re-applies them).",
    ]
    return "\n".join(out)
