"""A BU steward's operations: erasure, access, encryption at rest and key rotation, consent import;
and the guarantee that special categories never reach an outgoing message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.app import BusinessUnitClient, Node
from clients.silo import load_silo
from clients.steward import (
    access_report,
    decrypt_file,
    encrypt_file,
    encrypt_silo,
    erase_customer,
    import_consent,
    prepare_simulated_home,
    rotate_silo_key,
)
from federation.features import resolve_feature_spec
from federation.job import Job
from federation.models import initial_parameters
from federation.wire import DroppedColumn, Instruction, Phase, UnitReport, refusal_of
from privacy.audit import verify_home
from privacy.encryption import DecryptionError, KeyRing
from privacy.home import UnitHome
from privacy.pseudonyms import pseudonymise
from privacy.unit_config import UnitConfig
from simulations.synthetic import synthesize

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture()
def unit(tmp_path: Path):
    """One synthetic BU (CSV) with a home holding its consent registry; a copy of the consent
    export is kept aside, as a steward's archive would be."""
    synthesize(tmp_path / "silos", units=1, customers=200, seed=4, file_format="csv")
    bu_config = tmp_path / "silos" / "retail_stores" / "bu.toml"
    shutil.copy(bu_config.parent / "consent.csv", tmp_path / "consent-archive.csv")
    home = prepare_simulated_home(UnitConfig.load(bu_config), tmp_path / "home")
    return bu_config, home


def _fit(bu_config: Path, home: UnitHome, run_id: str, phase: Phase = Phase.TRAIN, seed: int = 1):
    config = UnitConfig.load(bu_config)
    job = Job(rounds=1, features=resolve_feature_spec("churn", [config]))
    instruction = Instruction(
        phase=phase, server_round=1, run_id=run_id, started_at=NOW, job=job, seed=seed
    ).to_config()
    client = BusinessUnitClient(Node(bu_config, home.directory, True))
    return client.fit(initial_parameters(job.task, job.feature_spec.dim), instruction)


def test_erasure_removes_the_customer_everywhere_and_lists_the_runs_that_used_them(
    unit, tmp_path
) -> None:
    bu_config, home = unit
    _fit(bu_config, home, "run-A")
    config = UnitConfig.load(bu_config)
    customers = load_silo(config).tables["customers"]
    with home.lineage() as lineage:
        used = [
            c for c in customers["customer_id"] if lineage.runs_using(c, key=home.pseudonym_key())
        ]
    victim = used[0]
    n_tx = int((load_silo(config).tables["transactions"]["customer_id"] == victim).sum())

    result = erase_customer(config, home, victim, now=NOW)

    assert result.runs_that_used_the_customer == ["run-A"]
    assert result.rows_removed == {"customers": 1, "transactions": n_tx}
    assert result.consent_events_removed > 0
    silo = load_silo(config)
    for frame in silo.tables.values():
        assert victim not in set(frame["customer_id"])
    for path in bu_config.parent.iterdir():  # nothing of the customer left in any silo file
        assert victim.encode() not in path.read_bytes()
    with home.registry() as registry:
        assert registry.export_events(victim) == []
        assert registry.is_erased(victim, tombstone_key=home.pseudonym_key())
    # A re-import of the archived export does not bring them back.
    again = import_consent(home, tmp_path / "consent-archive.csv")
    assert again.erased == result.consent_events_removed and again.imported == 0
    # The next run does not use them.
    _fit(bu_config, home, "run-B")
    with home.lineage() as lineage:
        assert lineage.runs_using(victim, key=home.pseudonym_key()) == ["run-A"]
        assert "run-B" in lineage.runs()


def test_lineage_keeps_no_customer_id_in_clear(unit) -> None:
    bu_config, home = unit
    _fit(bu_config, home, "run-A")
    stored = b"".join(p.read_bytes() for p in home.directory.glob("lineage.sqlite*"))
    ids = load_silo(UnitConfig.load(bu_config)).tables["customers"]["customer_id"]
    assert not any(c.encode() in stored for c in ids)


def test_access_exports_what_the_bu_holds_about_a_customer(unit) -> None:
    bu_config, home = unit
    _fit(bu_config, home, "run-A")
    config = UnitConfig.load(bu_config)
    customer = load_silo(config).tables["customers"]["customer_id"].iloc[0]
    report = access_report(config, home, customer)
    json.dumps(report)  # JSON-ready
    assert report["customer_id"] == customer and report["erased"] is False
    assert [row["customer_id"] for row in report["tables"]["customers"]] == [customer]
    assert all(row["customer_id"] == customer for row in report["tables"]["transactions"])
    assert {e["purpose"] for e in report["consent_events"]} <= set(config.purposes)


def test_encryption_at_rest_and_key_rotation_keep_the_silo_readable(unit, tmp_path) -> None:
    bu_config, home = unit
    before = load_silo(UnitConfig.load(bu_config)).tables
    encrypted = encrypt_silo(bu_config, home)
    assert sorted(p.name for p in encrypted) == ["customers.csv.enc", "transactions.csv.enc"]
    assert not (bu_config.parent / "customers.csv").exists()
    config = UnitConfig.load(bu_config)
    assert config.source.encrypted
    old = home.keyring()
    retired_copy = tmp_path / "old-kek"
    shutil.copytree(home.keys_directory / "kek", retired_copy)
    new_kid = rotate_silo_key(config, home)
    assert new_kid != old.active_kid and old.active_kid not in home.keyring().kids
    rotation = [
        json.loads(line) for line in (home.directory / "audit.jsonl").read_text().splitlines()
    ][-2]
    assert rotation["event"] == "key.rotated"
    assert rotation["data"] == {
        "key": "silo key-encryption key",
        "old": old.active_kid,
        "new": new_kid,
        "files": 2,
    }
    assert verify_home(home.directory).ok
    after = load_silo(config, keyring=home.keyring()).tables
    for name, frame in before.items():
        pd.testing.assert_frame_equal(
            frame.reset_index(drop=True), after[name].reset_index(drop=True)
        )
    with pytest.raises(DecryptionError):
        load_silo(config, keyring=KeyRing.open(retired_copy))


def test_special_categories_never_reach_an_outgoing_message(unit) -> None:
    """Whatever the special-category values are, the BU's replies (parameters and report) are
    the same, and never name such a column as used."""
    bu_config, home = unit
    replies = []
    for religion, health in (("none", "none"), ("muslim", "cardiac")):
        customers = bu_config.parent / "customers.csv"
        frame = pd.read_csv(customers, dtype=str)
        frame["religion"], frame["health_condition"] = religion, health
        frame.to_csv(customers, index=False)
        # a fresh home each time: the same job, not a second run composing with the first
        fresh = prepare_simulated_home(
            UnitConfig.load(bu_config), home.directory.with_name(religion)
        )
        for phase in (Phase.TRAIN, Phase.EVALUATE):
            replies.append(_fit(bu_config, fresh, "run-1", phase=phase, seed=3))
    for (a_params, a_n, a_metrics), (b_params, b_n, b_metrics_) in (
        (replies[0], replies[2]),
        (replies[1], replies[3]),
    ):
        assert a_n == b_n and a_metrics == b_metrics_
        for x, y in zip(a_params, b_params, strict=True):
            np.testing.assert_array_equal(x, y)
        # the only mention of a special-category column is the report that it was dropped
        text = json.dumps(a_metrics)
        assert text.count("religion") == text.count("customers.religion") <= 1
        assert text.count("health") == text.count("customers.health_condition") <= 1
    report = UnitReport.from_metrics(replies[0][2])
    assert (
        DroppedColumn(column="customers.religion", reason="special_category")
        in report.columns_dropped
    )
    assert not any("religion" in c or "health" in c for c in report.columns_used)


def _silofed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )


def test_erase_and_access_commands(unit, tmp_path) -> None:
    bu_config, home = unit
    customer = load_silo(UnitConfig.load(bu_config)).tables["customers"]["customer_id"].iloc[3]
    shown = _silofed(
        "access",
        customer,
        "--bu-config",
        str(bu_config),
        "--home",
        str(home.directory),
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["customer_id"] == customer
    erased = _silofed(
        "erase",
        customer,
        "--bu-config",
        str(bu_config),
        "--home",
        str(home.directory),
        cwd=tmp_path,
    )
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["rows_removed"]["customers"] == 1
    # the erasure is in the BU's own audit log, closed by a signed checkpoint, without the id
    log = (home.directory / "audit.jsonl").read_text()
    entries = [json.loads(line) for line in log.splitlines()]
    assert [e["event"] for e in entries[-2:]] == ["customer.erased", "checkpoint"]
    assert entries[-2]["data"]["rows_removed"]["customers"] == 1
    assert entries[-2]["actor"] == "bu:retail_stores" and customer not in log
    assert verify_home(home.directory).ok
    assert (
        json.loads(
            _silofed(
                "access",
                customer,
                "--bu-config",
                str(bu_config),
                "--home",
                str(home.directory),
                cwd=tmp_path,
            ).stdout
        )["erased"]
        is True
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda t: t.replace('"customers.age",', '"customers.religion",', 1),
            ["purposes.churn_model", "customers.religion", "special category"],
        ),
        (
            lambda t: t.replace('"customers.age",', '"customers.agee",', 1),
            ["customers.agee", "does not declare"],
        ),
        (
            lambda t: t.replace("[purposes.churn_model]", "[purposes.churn_model]\nweights = 3", 1),
            ["purposes.churn_model.weights", "Extra inputs"],
        ),
    ],
    ids=["special-category-allowed", "unknown-column", "unknown-key"],
)
def test_a_bad_bu_toml_is_named_and_nothing_is_written(unit, tmp_path, edit, expected) -> None:
    bu_config, _ = unit
    bu_config.write_text(edit(bu_config.read_text()))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args in (
        ("simulate", "--data", "silos", "--out", "run"),
        ("erase", "x", "--bu-config", str(bu_config), "--home", str(tmp_path / "new-home")),
    ):
        done = _silofed(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        message = " ".join(done.stderr.split())
        assert str(bu_config) in message or "bu.toml" in message
        for phrase in expected:
            assert phrase in message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_pseudonyms_of_the_same_id_differ_between_units(unit, tmp_path) -> None:
    bu_config, home = unit
    other = UnitHome(tmp_path / "other-home", UnitConfig.load(bu_config))
    ids = pd.Series(["ret-000001"])
    assert pseudonymise(ids, home.pseudonym_key())[0] != pseudonymise(ids, other.pseudonym_key())[0]


def test_a_unit_left_with_no_eligible_customer_takes_no_part_without_crashing(unit) -> None:
    bu_config, home = unit
    ids = load_silo(UnitConfig.load(bu_config)).tables["customers"]["customer_id"]
    with home.registry() as registry:  # everyone revokes before the job starts
        registry.import_events(
            pd.DataFrame(
                {
                    "customer_id": ids,
                    "purpose": "churn_model",
                    "granted": False,
                    "timestamp": pd.Timestamp("2026-05-01"),
                }
            ),
            source="test",
            tombstone_key=home.pseudonym_key(),
        )
    parameters, n, metrics = _fit(bu_config, home, "run-A")
    assert (parameters, n) == ([], 0)
    reason = refusal_of(metrics).reason
    assert "has no eligible customer for purpose 'churn_model'" in reason
    assert f"'revoked': {len(ids)}" in reason


def test_consent_import_command_reports_and_skips_duplicates(unit, tmp_path) -> None:
    bu_config, home = unit
    done = _silofed(
        "consent",
        "import",
        str(tmp_path / "consent-archive.csv"),
        "--bu-config",
        str(bu_config),
        "--home",
        str(home.directory),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 0 event(s);")  # the home already holds the export


def test_a_kept_file_is_encrypted_bound_to_its_purpose(unit, tmp_path) -> None:
    bu_config, home = unit
    config = UnitConfig.load(bu_config)
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    encrypted = encrypt_file(config, home, model, purpose="churn_model")
    assert not model.exists() and b"weights" not in encrypted.read_bytes()
    assert decrypt_file(config, home, encrypted, purpose="churn_model") == b"weights"
    with pytest.raises(DecryptionError):
        decrypt_file(config, home, encrypted, purpose="response_model")
