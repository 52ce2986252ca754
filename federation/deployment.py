"""A deployment: one coordinator (Flower SuperLink and silofed's ServerApp) and one node (a Flower
SuperNode) per BU, each on its own machine, over TLS, where only enrolled BU nodes may connect.

The coordinator's deployment directory holds everything the coordinator needs, and the bundle each
BU steward receives:

    DIR/deployment.toml          addresses, port, deadlines, enrolled BUs (public keys, fingerprints)
    DIR/ca/ca.pem, ca.key        the deployment's own certificate authority (ca.key 0600: keep it offline)
    DIR/coordinator/server.pem   the coordinator's TLS certificate, for the addresses it serves
    DIR/coordinator/server.key   its private key (0600)
    DIR/units/UNIT/schema.toml   each BU's public schema (tables, columns, purposes; no data source)
    DIR/nodes/UNIT/              a node bundle, when the coordinator made the BU's key pair:
        ca.pem, node.toml          the CA certificate and the coordinator's address
        node.key, node.pub         the node's key pair (node.key 0600: the BU keeps it secret)
    DIR/flwr/                    Flower's own state (FLWR_HOME), never ~/.flwr
    DIR/state/                   the SuperLink's database and log
    DIR/runs/RUN_ID/             run directories, the same as a simulation's

Node keys are ECDSA P-384 in OpenSSH format, the kind Flower's node authentication takes; TLS keys
are ECDSA P-384 too. A BU may make its own key pair (`silofed deploy keygen`) and send only the
public key; the private key then never leaves the BU's machine.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import tomli_w
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privacy.atomic import write_atomic
from privacy.audit import AuditLog, load_or_create_signing_key
from privacy.errors import ConfigurationError
from privacy.schema import SiloSchema
from privacy.tomlfile import read_toml

if TYPE_CHECKING:
    from federation.job import Job

_M = TypeVar("_M", bound=BaseModel)

DEPLOYMENT_FILE = "deployment.toml"
NODE_FILE = "node.toml"
DEPLOYMENT_DOCS = "docs/deployment.md"
DEFAULT_PORT = 9093
CA_YEARS = 10
CERTIFICATE_DAYS = 825  # the longest validity browsers and most TLS stacks still accept
_CURVE = ec.SECP384R1()
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-:]+$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Timeouts(_Frozen):
    """Every wait of a deployed run has a deadline, so nothing hangs on a node that went away."""

    connect: float = Field(
        300.0, gt=0, description="seconds for every enrolled BU node to connect before a run"
    )
    round: float = Field(
        900.0,
        gt=0,
        description="seconds for one exchange's replies; a BU silent for longer has dropped out",
    )


class Enrolment(_Frozen):
    unit: str
    public_key: str = Field(description="the node's public key, OpenSSH format")
    fingerprint: str
    enrolled_at: datetime
    rotated_at: datetime | None = None


class Deployment(_Frozen):
    """`deployment.toml`: what the coordinator serves and which BU nodes it admits."""

    schema_version: Literal[1] = 1
    name: str = Field(min_length=1)
    addresses: tuple[str, ...] = Field(
        min_length=1,
        description="host names and IP addresses BU nodes reach the coordinator at (in its "
        "certificate); the first is written into node bundles",
    )
    listen: str = Field("0.0.0.0", description="the interface the coordinator binds to")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    timeouts: Timeouts = Timeouts()
    units: dict[str, Enrolment] = Field(default_factory=dict)

    @property
    def coordinator_address(self) -> str:
        return join_address(self.addresses[0], self.port)


class NodeSettings(_Frozen):
    """`node.toml` in a node bundle: where the coordinator is and which files secure the link."""

    unit: str
    coordinator: str = Field(description="host:port of the coordinator")
    ca: str = "ca.pem"
    key: str = "node.key"


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DeploymentDirectory:
    """The paths of a deployment directory, and reading and writing its `deployment.toml`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    @property
    def config_file(self) -> Path:
        return self.root / DEPLOYMENT_FILE

    ca_certificate = property(lambda self: self.root / "ca" / "ca.pem")
    ca_key = property(lambda self: self.root / "ca" / "ca.key")
    server_certificate = property(lambda self: self.root / "coordinator" / "server.pem")
    server_key = property(lambda self: self.root / "coordinator" / "server.key")
    flwr_home = property(lambda self: self.root / "flwr")
    state = property(lambda self: self.root / "state")
    runs = property(lambda self: self.root / "runs")
    app = property(lambda self: self.root / "app")
    status_file = property(lambda self: self.root / "state" / "coordinator.json")
    audit_key = property(lambda self: self.root / "coordinator" / "audit.key")
    audit_log_file = property(lambda self: self.root / "audit.jsonl")

    def record(self, event: str, data: dict) -> None:
        """An entry in the deployment's own audit log (`audit.jsonl`, signed with the
        coordinator's audit key): enrolments and key rotations, each closed by a final signed
        checkpoint. Runs keep their own logs in their run directories."""
        log = AuditLog(
            self.audit_log_file, actor="coordinator", key=load_or_create_signing_key(self.audit_key)
        )
        log.append(event, data)
        log.checkpoint(final=True)

    def schema_file(self, unit: str) -> Path:
        return self.root / "units" / unit / "schema.toml"

    def public_key_file(self, unit: str) -> Path:
        return self.root / "units" / unit / "node.pub"

    def node_bundle(self, unit: str) -> Path:
        return self.root / "nodes" / unit

    def load(self) -> Deployment:
        missing = (
            f"no deployment here; create one with `silofed deploy init {self.root}` "
            f"(see {DEPLOYMENT_DOCS})"
        )
        return _load_toml(self.config_file, Deployment, "deployment", missing=missing)

    def save(self, deployment: Deployment) -> None:
        write_atomic(
            self.config_file, tomli_w.dumps(deployment.model_dump(mode="json", exclude_none=True))
        )

    def schemas(self, deployment: Deployment) -> list[SiloSchema]:
        """The enrolled BUs' public schemas, in unit order."""
        return [load_schema(self.schema_file(unit)) for unit in sorted(deployment.units)]


def _problems(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
    )


# -- key material --------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600, in a directory only its owner can list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists():
        os.chmod(path, 0o600)  # write_atomic keeps an existing file's mode
    write_atomic(path, data)  # a new file is created 0600 (mkstemp)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes | str) -> None:
    """Write a public file (a certificate, a public key, a schema) atomically, readable by all."""
    write_atomic(path, data)
    os.chmod(path, 0o644)


def check_private(path: Path) -> None:
    """A private key readable by others is refused, as ssh does."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigurationError(
            f"{path}: the private key is readable by others (mode {mode:04o}); run "
            f"`chmod 600 {path}`, and rotate the key if anyone else may have read it"
        )


def new_node_key() -> tuple[bytes, bytes]:
    """A node key pair: (private key, public key), both OpenSSH text."""
    key = ec.generate_private_key(_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def public_key_of(public_text: str, *, source: str) -> str:
    """Check an OpenSSH public key is one Flower's node authentication takes (a NIST EC curve);
    return it as one line."""
    try:
        key = serialization.load_ssh_public_key(public_text.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigurationError(
            f"{source}: not an OpenSSH public key ({err}); give the node.pub that "
            "`silofed deploy keygen` wrote"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise ConfigurationError(
            f"{source}: node keys must be ECDSA on a NIST curve (P-256, P-384 or P-521), which "
            "Flower's node authentication requires; make one with `silofed deploy keygen`"
        )
    return " ".join(public_text.split()[:2])


def fingerprint(public_text: str) -> str:
    """The key's fingerprint as `ssh-keygen -l` prints it (SHA256 of the key blob)."""
    blob = base64.b64decode(public_text.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "silofed deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(name: str, *, now: datetime | None = None) -> tuple[bytes, bytes]:
    """A self-signed CA for one deployment: (private key PEM, certificate PEM)."""
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(_CURVE)
    subject = _name(f"{name} CA")
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return _pem_key(key), certificate.public_bytes(serialization.Encoding.PEM)


def issue_server_certificate(
    ca_key_pem: bytes,
    ca_certificate_pem: bytes,
    addresses: tuple[str, ...],
    *,
    now: datetime | None = None,
) -> tuple[bytes, bytes]:
    """The coordinator's TLS key and certificate, valid for every name and IP in `addresses`."""
    now = now or datetime.now(UTC)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_certificate = x509.load_pem_x509_certificate(ca_certificate_pem)
    key = ec.generate_private_key(_CURVE)
    names: list[x509.GeneralName] = []
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(addresses[0]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return _pem_key(key), certificate.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_address(address: str) -> str:
    if not _ADDRESS.fullmatch(address):
        raise ConfigurationError(
            f"--address {address!r}: give a host name or an IP address the BU nodes use to "
            "reach the coordinator (no scheme, no port)"
        )
    return address


# -- schemas and jobs ---------------------------------------------------------------------------


def check_deployable(job: Job) -> Job:
    """On a deployment every enrolled BU takes part in every job."""
    from federation.job import JobKind  # the job model pulls in the DP stack: only when needed

    if job.kind is JobKind.QUERY and job.query is not None and job.query.units:
        raise ConfigurationError(
            "query.units: on a deployment every enrolled BU takes part in every job; remove "
            "query.units (or run the query in simulation on the BUs it names)"
        )
    return job


def public_schema(config: SiloSchema) -> dict:
    """The part of a BU's configuration the coordinator needs to plan a job: its name, tables,
    columns and purposes, and its declared size bound. The data source, home, keys and privacy
    policy stay with the BU."""
    fields = ("schema_version", "unit", "jurisdictions", "tables", "purposes", "max_customers")
    schema = config.model_dump(mode="json", include=set(fields), exclude_none=True)
    for name, table in schema["tables"].items():
        # where the BU keeps the table (a file name, an SQL query) is the BU's business
        table.pop("query", None)
        table["file"] = name
    return schema


def load_schema(path: Path) -> SiloSchema:
    missing = "the BU's schema is missing; enrol the BU again with `silofed deploy enrol`"
    return _load_toml(path, SiloSchema, "BU schema", missing=missing)


def _load_toml(path: Path, model: type[_M], what: str, *, missing: str) -> _M:
    """Read and validate a TOML file; every error names the file and the fix."""
    data = read_toml(path, what=what, missing=missing)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigurationError(f"{path}: invalid {what}: {_problems(err)}") from None


# -- operations ---------------------------------------------------------------------------------


def init_deployment(
    root: Path,
    *,
    name: str,
    addresses: tuple[str, ...],
    port: int = DEFAULT_PORT,
    listen: str = "0.0.0.0",
    timeouts: Timeouts | None = None,
) -> DeploymentDirectory:
    """Create the CA, the coordinator's certificate and an empty `deployment.toml`. Refuses a
    directory that already holds a deployment (its keys would be lost)."""
    directory = DeploymentDirectory(root)
    if directory.config_file.exists() or directory.ca_key.exists():
        raise ConfigurationError(
            f"{directory.root} already holds a deployment; enrol BUs with `silofed deploy enrol` "
            "or choose a new directory"
        )
    if not addresses:
        raise ConfigurationError(
            "--address: give at least one host name or IP address the BU nodes use to reach "
            "the coordinator"
        )
    addresses = tuple(check_address(a) for a in addresses)
    deployment = Deployment(
        name=name,
        addresses=addresses,
        port=port,
        listen=listen,
        timeouts=timeouts or Timeouts(),
    )
    ca_key, ca_certificate = create_ca(name)
    # The coordinator's own tools reach it over loopback: the certificate names that too.
    names = tuple(dict.fromkeys((*addresses, "127.0.0.1", "localhost")))
    server_key, server_certificate = issue_server_certificate(ca_key, ca_certificate, names)
    write_private(directory.ca_key, ca_key)
    write_public(directory.ca_certificate, ca_certificate)
    write_private(directory.server_key, server_key)
    write_public(directory.server_certificate, server_certificate)
    directory.save(deployment)
    directory.record("deployment.created", {"name": name, "addresses": list(addresses)})
    return directory


def enrol(
    directory: DeploymentDirectory,
    schema: SiloSchema,
    *,
    public_key: str | None = None,
    source: str = "--public-key",
    now: datetime | None = None,
) -> Enrolment:
    """Admit a BU: store its public schema and its node's public key. Without a public key the
    coordinator makes the key pair and writes a node bundle for the BU (`DIR/nodes/UNIT/`)."""
    deployment = directory.load()
    if schema.unit in deployment.units:
        raise ConfigurationError(
            f"unit '{schema.unit}' is already enrolled in {directory.config_file}; to give it a "
            f"new key run `silofed deploy rotate-key {directory.root} --unit {schema.unit}`"
        )
    public = _node_public_key(directory, deployment, schema.unit, public_key, source)
    enrolment = Enrolment(
        unit=schema.unit,
        public_key=public,
        fingerprint=fingerprint(public),
        enrolled_at=now or datetime.now(UTC),
    )
    write_public(directory.schema_file(schema.unit), tomli_w.dumps(public_schema(schema)))
    write_public(directory.public_key_file(schema.unit), public + "\n")
    directory.save(
        deployment.model_copy(update={"units": {**deployment.units, schema.unit: enrolment}})
    )
    directory.record(
        "node.enrolled",
        {
            "unit": schema.unit,
            "fingerprint": enrolment.fingerprint,
            "purposes": sorted(schema.purposes),
            "key_made_by": "coordinator (node bundle)" if public_key is None else "BU",
        },
    )
    return enrolment


def rotate_node_key(
    directory: DeploymentDirectory,
    unit: str,
    *,
    public_key: str | None = None,
    source: str = "--public-key",
    now: datetime | None = None,
) -> tuple[Enrolment, Enrolment]:
    """Replace a BU node's key: (old enrolment, new enrolment). The old key is no longer
    admitted once the coordinator re-reads the deployment (`silofed deploy coordinator` does
    at every start, and `rotate-key` tells a running one)."""
    deployment = directory.load()
    if unit not in deployment.units:
        raise ConfigurationError(
            f"unit '{unit}' is not enrolled in {directory.config_file} (enrolled: "
            f"{', '.join(sorted(deployment.units)) or 'none'})"
        )
    old = deployment.units[unit]
    public = _node_public_key(directory, deployment, unit, public_key, source)
    new = old.model_copy(
        update={
            "public_key": public,
            "fingerprint": fingerprint(public),
            "rotated_at": now or datetime.now(UTC),
        }
    )
    write_public(directory.public_key_file(unit), public + "\n")
    directory.save(deployment.model_copy(update={"units": {**deployment.units, unit: new}}))
    directory.record(
        "key.rotated",
        {
            "unit": unit,
            "key": "node authentication key",
            "old_fingerprint": old.fingerprint,
            "new_fingerprint": new.fingerprint,
        },
    )
    return old, new


def _node_public_key(
    directory: DeploymentDirectory,
    deployment: Deployment,
    unit: str,
    public_key: str | None,
    source: str,
) -> str:
    if public_key is not None:
        return public_key_of(public_key, source=source)
    private, public = new_node_key()
    bundle = directory.node_bundle(unit)
    write_private(bundle / "node.key", private)
    write_public(bundle / "node.pub", public)
    write_public(bundle / "ca.pem", directory.ca_certificate.read_bytes())
    settings = NodeSettings(unit=unit, coordinator=deployment.coordinator_address)
    write_public(bundle / NODE_FILE, tomli_w.dumps(settings.model_dump()))
    return public_key_of(public.decode(), source=str(bundle / "node.pub"))


def keygen(out: Path) -> str:
    """A node key pair made on the BU's own machine: `out/node.key` (0600) and `out/node.pub`,
    which is all the coordinator needs. Refuses to overwrite a key. Returns the fingerprint."""
    key_file, public_file = out / "node.key", out / "node.pub"
    if key_file.exists():
        raise ConfigurationError(
            f"{key_file} exists; a node key is never overwritten (move it away first, and "
            "rotate the key at the coordinator with `silofed deploy rotate-key`)"
        )
    private, public = new_node_key()
    write_private(key_file, private)
    write_public(public_file, public)
    return fingerprint(public.decode())


def load_node_settings(bundle: Path) -> NodeSettings:
    missing = (
        "not a node bundle; use the directory the coordinator sent (DIR/nodes/UNIT), or pass "
        "--coordinator, --ca and --key"
    )
    return _load_toml(bundle / NODE_FILE, NodeSettings, "node settings", missing=missing)
