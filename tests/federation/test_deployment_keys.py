"""A deployment's key material and enrolment, without starting anything: the CA and the coordinator's
certificate, node key pairs, enrolment, rotation, and the node's checks before Flower starts."""

from __future__ import annotations

import ipaddress
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from clients.node import NodeOptions, plan_node
from federation.deployment import (
    DeploymentDirectory,
    check_private,
    enrol,
    fingerprint,
    init_deployment,
    keygen,
    rotate_node_key,
)
from federation.job import Job
from privacy.audit import load_or_create_signing_key, read_entries, verify
from privacy.errors import ConfigurationError
from privacy.unit_config import UnitConfig
from server.submit import run_deadline, write_app
from simulations.synthetic import synthesize


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def silos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deployment") / "silos"
    synthesize(root, units=2, customers=60, seed=1)
    return {p.parent.name: p for p in sorted(root.glob("*/bu.toml"))}


@pytest.fixture
def directory(tmp_path: Path) -> DeploymentDirectory:
    return init_deployment(
        tmp_path / "dep", name="acme", addresses=("coord.acme.internal", "10.0.0.5"), port=9443
    )


def test_init_makes_a_ca_and_a_certificate_for_every_address(
    directory: DeploymentDirectory,
) -> None:
    ca = x509.load_pem_x509_certificate(directory.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(directory.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coord.acme.internal", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(directory.ca_key) == 0o600
    assert _mode(directory.server_key) == 0o600
    assert _mode(directory.ca_key.parent) == 0o700
    assert _mode(directory.ca_certificate) == 0o644
    deployment = directory.load()
    assert deployment.coordinator_address == "coord.acme.internal:9443"
    assert deployment.units == {}


def test_init_refuses_an_existing_deployment_and_a_bad_address(
    directory: DeploymentDirectory, tmp_path: Path
) -> None:
    key = directory.ca_key.read_bytes()
    with pytest.raises(ConfigurationError, match="already holds a deployment"):
        init_deployment(directory.root, name="again", addresses=("127.0.0.1",))
    assert directory.ca_key.read_bytes() == key  # nothing overwritten
    with pytest.raises(ConfigurationError, match="--address 'https://x:1'"):
        init_deployment(tmp_path / "other", name="x", addresses=("https://x:1",))
    assert not (tmp_path / "other" / "ca").exists()


def test_enrol_keeps_only_the_public_schema_and_makes_a_node_bundle(
    directory: DeploymentDirectory, silos: dict[str, Path]
) -> None:
    unit = "ecommerce"
    enrolment = enrol(directory, UnitConfig.load(silos[unit]))
    schema = tomllib.loads(directory.schema_file(unit).read_text())
    assert set(schema) == {
        "schema_version",
        "unit",
        "jurisdictions",
        "tables",
        "purposes",
        "max_customers",
    }
    assert {t["file"] for t in schema["tables"].values()} == set(schema["tables"])
    bundle = directory.node_bundle(unit)
    assert _mode(bundle / "node.key") == 0o600
    private = serialization.load_ssh_private_key((bundle / "node.key").read_bytes(), None)
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert fingerprint(public.decode()) == enrolment.fingerprint
    assert (bundle / "ca.pem").read_bytes() == directory.ca_certificate.read_bytes()
    node = tomllib.loads((bundle / "node.toml").read_text())
    assert node == {
        "unit": unit,
        "coordinator": "coord.acme.internal:9443",
        "ca": "ca.pem",
        "key": "node.key",
    }
    assert directory.load().units[unit].fingerprint == enrolment.fingerprint
    with pytest.raises(ConfigurationError, match="already enrolled"):
        enrol(directory, UnitConfig.load(silos[unit]))


def test_a_bu_made_key_is_enrolled_from_its_public_half_only(
    directory: DeploymentDirectory, silos: dict[str, Path], tmp_path: Path
) -> None:
    printed = keygen(tmp_path / "bu")
    assert _mode(tmp_path / "bu" / "node.key") == 0o600
    with pytest.raises(ConfigurationError, match="never overwritten"):
        keygen(tmp_path / "bu")
    enrolment = enrol(
        directory,
        UnitConfig.load(silos["retail_stores"]),
        public_key=(tmp_path / "bu" / "node.pub").read_text(),
    )
    assert enrolment.fingerprint == printed
    assert not directory.node_bundle("retail_stores").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not a key", "not an OpenSSH public key"),
        (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode(),
            "ECDSA on a NIST curve",
        ),
    ],
)
def test_a_public_key_flower_cannot_use_is_refused(
    directory: DeploymentDirectory, silos: dict[str, Path], text: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        enrol(directory, UnitConfig.load(silos["ecommerce"]), public_key=text, source="x.pub")
    assert directory.load().units == {}


def test_rotation_replaces_the_key_and_names_unknown_units(
    directory: DeploymentDirectory, silos: dict[str, Path]
) -> None:
    enrol(directory, UnitConfig.load(silos["ecommerce"]))
    old, new = rotate_node_key(directory, "ecommerce")
    assert old.fingerprint != new.fingerprint
    assert new.rotated_at is not None and new.enrolled_at == old.enrolled_at
    assert directory.load().units["ecommerce"].fingerprint == new.fingerprint
    assert directory.public_key_file("ecommerce").read_text().split()[:2] == new.public_key.split()
    with pytest.raises(ConfigurationError, match="'nobody' is not enrolled"):
        rotate_node_key(directory, "nobody")
    # the deployment's own audit log records the enrolment and the rotation, by fingerprint
    key = load_or_create_signing_key(directory.audit_key).public_key()
    result = verify(directory.audit_log_file, key)
    assert result.ok
    entries = read_entries(directory.audit_log_file, result.entries)
    logged = [(e["event"], e["data"]) for e in entries if e["event"] != "checkpoint"]
    assert [event for event, _ in logged] == [
        "log.opened",
        "deployment.created",
        "node.enrolled",
        "key.rotated",
    ]
    assert logged[-1][1] == {
        "unit": "ecommerce",
        "key": "node authentication key",
        "old_fingerprint": old.fingerprint,
        "new_fingerprint": new.fingerprint,
    }


def test_a_broken_deployment_file_is_named(directory: DeploymentDirectory) -> None:
    directory.config_file.write_text('name = "x"\nport = "many"\n')
    with pytest.raises(ConfigurationError, match=r"deployment.toml: invalid deployment: .*port"):
        directory.load()
    with pytest.raises(ConfigurationError, match="silofed deploy init"):
        DeploymentDirectory(directory.root / "missing").load()


def test_a_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    keygen(tmp_path)
    (tmp_path / "node.key").chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        check_private(tmp_path / "node.key")


def _options(bu_config: Path, home: Path, **changes) -> NodeOptions:
    base = dict(bu_config=bu_config, home=home, coordinator=None, ca=None, key=None, insecure=False)
    return NodeOptions(**{**base, **changes})


def test_the_node_refuses_a_key_without_tls_and_other_misconfigurations(
    directory: DeploymentDirectory, silos: dict[str, Path], tmp_path: Path
) -> None:
    enrol(directory, UnitConfig.load(silos["ecommerce"]))
    bundle = directory.node_bundle("ecommerce")
    bu, home = silos["ecommerce"], tmp_path / "home"
    plan = plan_node(_options(bu, home), bundle)
    assert plan.coordinator == "coord.acme.internal:9443"
    assert plan.ca == (bundle / "ca.pem").resolve()
    assert plan.fingerprint == directory.load().units["ecommerce"].fingerprint
    with pytest.raises(ConfigurationError, match="works only over TLS"):
        plan_node(_options(bu, home, insecure=True), bundle)
    with pytest.raises(ConfigurationError, match="--key: a deployed node authenticates"):
        plan_node(_options(bu, home, coordinator="127.0.0.1:1"), None)
    with pytest.raises(ConfigurationError, match="--coordinator"):
        plan_node(_options(bu, home, key=bundle / "node.key"), None)
    with pytest.raises(ConfigurationError, match="no such file"):
        plan_node(_options(bu, home, ca=tmp_path / "absent.pem"), bundle)
    with pytest.raises(ConfigurationError, match="bundle is for unit 'ecommerce'"):
        plan_node(_options(silos["retail_stores"], home), bundle)
    insecure = plan_node(_options(bu, home, coordinator="127.0.0.1:1", insecure=True), None)
    assert insecure.key is None and insecure.ca is None


def test_the_job_travels_in_an_app_without_code(directory: DeploymentDirectory) -> None:
    app = write_app(directory)
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert config["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "clients.app:app",
    }
    assert set(config["config"]) == {"job", "deployment", "out", "run-id", "resume"}


def test_the_run_deadline_is_the_sum_of_the_deployments_deadlines() -> None:
    from federation.features import FeatureSpec, Numeric

    features = FeatureSpec(
        label="customers.y",
        features=(Numeric(name="age", column="customers.age", lower=0.0, upper=100.0),),
    )
    job = Job(rounds=2, features=features)
    # the ranges exchange, two training exchanges and one DP evaluation: 60 + 4 x 100 + margin
    assert run_deadline(job, connect=60.0, per_exchange=100.0) == 60 + 400 + 120
    without = job.model_copy(
        update={"training": job.training.model_copy(update={"ranges_share": 0})}
    )
    assert run_deadline(without, connect=60.0, per_exchange=100.0) == 60 + 300 + 120


def test_the_coordinator_plans_any_job_kind_from_the_enrolled_public_schemas(
    directory: DeploymentDirectory, silos: dict[str, Path], tmp_path: Path
) -> None:
    import json

    from federation.job import load_job_file
    from server.app import deployment_plan

    for bu_config in silos.values():
        enrol(directory, UnitConfig.load(bu_config))
    examples = Path(__file__).resolve().parents[2] / "examples"
    for example in ("funnel", "cohort_retention", "segments", "response_model"):
        job = Job.parse(load_job_file(examples / f"{example}.toml"), source=example)
        config = {
            "job": job.model_dump_json(exclude_none=True),
            "deployment": str(directory.root),
            "out": str(tmp_path / example),
            "run-id": f"run-{example}",
        }
        plan = deployment_plan(config)
        assert (plan.mode, plan.seed, plan.run_id) == ("deployment", None, f"run-{example}")
        assert plan.enrolled == tuple(sorted(silos)) and plan.expected_units == 2
        assert (plan.connect_timeout, plan.round_timeout) == (300.0, 900.0)
    seeded = {**config, "job": json.dumps({"task": "churn", "seed": 1})}
    with pytest.raises(ConfigurationError, match="never carries a seed"):
        deployment_plan(seeded)
    named = {
        "kind": "query",
        "query": {"purpose": "analytics", "recipe": "funnel", "units": ["ecommerce"]},
    }
    with pytest.raises(ConfigurationError, match="every enrolled BU takes part"):
        deployment_plan({**config, "job": json.dumps(named)})
